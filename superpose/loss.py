"""Fast multi-hot cross-entropy: one logsumexp per position, the gradient in one pass, and a
chunked head+loss that never holds the full logits.

The paper scores a bag with a loop of s ``F.cross_entropy`` calls; each call normalises the same
logits again and keeps its own ``[N, V]`` log-probabilities for the backward. Here the forward
keeps only the logsumexp ``[N]`` and the backward writes ``softmax(z) * sum_j w_j - sum_j w_j
onehot(y_j)`` straight into the gradient buffer. Work runs over row blocks of the logits so that
the fp32 temporaries stay small (in cache on CPU) instead of being fresh ``[N, V]`` buffers.

Shapes: N positions, V vocabulary, m target slots, d model width. ``targets`` here are already
safe indices (ignored slots point at 0) and ``slot_w`` ``[N, m]`` fp32 is 0 on ignored slots.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _block_rows(logits: torch.Tensor) -> int:
    """Rows per block: ~4 MiB of fp32 temporaries on CPU (cache-sized), ~256 MiB on GPUs."""
    elements = 1 << (26 if logits.device.type == "cuda" else 20)
    return max(1, elements // max(1, logits.shape[-1]))


def _blocks(n: int, rows: int):
    return ((start, min(start + rows, n)) for start in range(0, n, rows))


def logsumexp_rows(logits: torch.Tensor) -> torch.Tensor:
    """fp32 logsumexp of each row ``[N, V] -> [N]`` without an ``[N, V]`` fp32 temporary."""
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for a, b in _blocks(logits.shape[0], _block_rows(logits)):
        torch.logsumexp(logits[a:b].float(), dim=-1, out=out[a:b])
    return out


def mce_grad_(out: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor,
              slot_w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Write ``scale * (softmax(z) * sum_j w_j - sum_j w_j onehot(y_j))`` into ``out`` ``[N, V]``.

    ``out`` may be ``logits`` itself (the chunked path recomputes logits and overwrites them).
    Duplicate targets add up (scatter_add), so a token that occurs twice gets twice the weight.
    """
    row_scale = slot_w.sum(dim=1) * scale  # [N]
    slot_scale = slot_w * scale  # [N, m]
    direct = out.dtype == torch.float32
    rows = _block_rows(logits)
    tmp = None if direct else torch.empty(min(rows, logits.shape[0]), logits.shape[1], device=logits.device)
    for a, b in _blocks(logits.shape[0], rows):
        g = out[a:b] if direct else tmp[: b - a]  # [r, V] fp32
        torch.sub(logits[a:b], lse[a:b, None], out=g)
        g.exp_().mul_(row_scale[a:b, None])
        g.scatter_add_(1, targets[a:b], -slot_scale[a:b])
        if not direct:
            out[a:b].copy_(g)
    return out


def _weighted_nll_sum(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, slot_w: torch.Tensor) -> torch.Tensor:
    picked = logits.gather(1, targets).float()  # [N, m]
    return (slot_w * (lse[:, None] - picked)).sum()


class MultiHotCrossEntropy(torch.autograd.Function):
    """``sum_{n,j} w_nj * (logsumexp(z_n) - z_n[y_nj])`` for logits ``[N, V]`` -> fp32 scalar."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, slot_w: torch.Tensor) -> torch.Tensor:
        lse = logsumexp_rows(logits)  # [N]
        ctx.save_for_backward(logits, lse, targets, slot_w)
        return _weighted_nll_sum(logits, lse, targets, slot_w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, lse, targets, slot_w = ctx.saved_tensors
        out = torch.empty_like(logits, memory_format=torch.contiguous_format)
        return mce_grad_(out, logits, lse, targets, slot_w, grad), None, None


class ChunkedHeadCrossEntropy(torch.autograd.Function):
    """The multi-hot loss of ``hidden @ weight.T + bias`` computed ``chunk`` positions at a time.

    Only one ``[chunk, V]`` logits buffer exists at a time; the backward recomputes each chunk's
    logits, turns them into the gradient in place and accumulates the head gradient in fp32.
    ``dtype`` is the matmul dtype (the autocast dtype, or the parameters' dtype).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, slot_w, chunk: int, dtype: torch.dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            h, w, b = _cast(hidden, weight, bias, dtype)
            n = h.shape[0]
            lse = torch.empty(n, dtype=torch.float32, device=h.device)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            buf = torch.empty(min(chunk, n), w.shape[0], dtype=dtype, device=h.device)  # [C, V]
            for a, c in _blocks(n, chunk):
                z = _logits_into(buf[: c - a], h[a:c], w, b)
                lse[a:c] = logsumexp_rows(z)
                total += _weighted_nll_sum(z, lse[a:c], targets[a:c], slot_w[a:c])
        ctx.save_for_backward(hidden, weight, bias, targets, slot_w, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight, bias, targets, slot_w, lse = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            h, w, b = _cast(hidden, weight, bias, dtype)
            n = h.shape[0]
            grad_h = torch.empty_like(h)  # [N, d]
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)  # [V, d]
            grad_b = None if b is None else torch.zeros(b.shape, dtype=torch.float32, device=b.device)
            buf = torch.empty(min(chunk, n), w.shape[0], dtype=dtype, device=h.device)  # [C, V]
            for a, c in _blocks(n, chunk):
                g = _logits_into(buf[: c - a], h[a:c], w, b)
                mce_grad_(g, g, lse[a:c], targets[a:c], slot_w[a:c], grad)  # dL/dz, in place
                torch.matmul(g, w, out=grad_h[a:c])
                if dtype == torch.float32:
                    grad_w.addmm_(g.t(), h[a:c])
                else:
                    grad_w += g.t() @ h[a:c]
                if grad_b is not None:
                    grad_b += g.sum(dim=0, dtype=torch.float32)
        return (
            grad_h.to(hidden.dtype),
            grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None, None, None, None,
        )


def _cast(hidden, weight, bias, dtype):
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _logits_into(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``out[:] = h @ w.T (+ b)`` without allocating: ``[C, d] x [V, d] -> [C, V]``."""
    if b is None:
        return torch.matmul(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), out=out)


def slot_table(targets: torch.Tensor, weights: torch.Tensor | None, ignore_index: int):
    """Flatten targets ``[..., m]`` to safe indices ``[N, m]`` and per-slot weights ``[N, m]`` fp32."""
    slots = targets.shape[-1]
    y = targets.reshape(-1, slots)  # [N, m]
    if weights is None:
        weights = torch.ones(slots, dtype=torch.float32, device=y.device)
    valid = y != ignore_index
    slot_w = weights.to(device=y.device, dtype=torch.float32)[None, :] * valid  # [N, m]
    return torch.where(valid, y, 0), slot_w


def chunked_head_mce_sum(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor,
                         weights: torch.Tensor | None, chunk: int,
                         ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """``mce_sum(head(hidden), targets, weights)`` without the full logits: hidden ``[..., d]``."""
    y, slot_w = slot_table(targets, weights, ignore_index)
    h = hidden.reshape(-1, hidden.shape[-1])  # [N, d]
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
    loss = ChunkedHeadCrossEntropy.apply(h, head.weight, head.bias, y, slot_w, chunk, dtype)
    return loss, slot_w.sum()
