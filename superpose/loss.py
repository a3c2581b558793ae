"""The multi-hot cross-entropy (MCE) that scores a bag: the public functions, then the fast
kernels behind them (one normalisation per position for the whole bag, the gradient in one
pass, and a chunked head+loss that never holds the full logits).

The paper scores a bag with a loop of s ``F.cross_entropy`` calls; each call normalises the same
logits again and keeps its own ``[N, V]`` log-probabilities for the backward. Here the forward
takes one fp32 normalisation per row, keeps only what it needs, and the backward writes
``softmax(z) * sum_j w_j - sum_j w_j onehot(y_j)`` straight into the gradient. Two kinds of
kernels do it (``LOSS_KERNELS``): eager ones over blocks of rows, whose fp32 temporaries stay
small (in cache on CPU), and fused ones that ``torch.compile`` turns into one pass over the
logits each way (CUDA): the forward keeps only the fp32 log-sum-exp of each row. Either way the
only ``[N, V]`` allocation is the gradient itself.

Shapes: N positions, V vocabulary, m target slots, d model width. ``targets`` here are already
safe indices (ignored slots point at 0) and ``slot_w`` ``[N, m]`` fp32 is 0 on ignored slots.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch._dynamo
import torch.nn.functional as F

from .config import WEIGHTINGS


def slot_weight_vector(weighting: str | Sequence[float], bag_size: int, device=None) -> torch.Tensor:
    """Weights of the s target slots of a bag, fp32 ``[s]`` (paper, Appendix D).

    uniform: 1; power: 1/j; exp: exp(-j); first: only slot 1 (j = 1..s). A sequence of s floats
    is taken as given. Only ratios matter: the loss divides by the weight sum.
    """
    j = torch.arange(1, bag_size + 1, dtype=torch.float32, device=device)
    if not isinstance(weighting, str):
        weights = torch.as_tensor(weighting, dtype=torch.float32, device=device)
        if weights.shape != (bag_size,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"slot weights must be {bag_size} non-negative floats with a positive sum")
        return weights
    if weighting == "uniform":
        return torch.ones_like(j)
    if weighting == "power":
        return 1.0 / j
    if weighting == "exp":
        return torch.exp(-j)
    if weighting == "first":
        return (j == 1).float()
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")


def multi_hot_cross_entropy_sum(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Un-normalised multi-hot cross-entropy: ``(sum of w*(lse - z[y]), sum of w)`` over valid slots.

    logits ``[..., V]``, targets ``[..., m]`` int64, weights ``[m]`` fp32 (default uniform).
    Returns two fp32 scalars so that a trainer can divide by a *global* weight (all ranks, all
    micro-batches). Slots equal to ``ignore_index`` carry no weight. Each position is normalised
    once in fp32 for all its slots and the gradient is written in one pass (the kernels below).
    """
    y, slot_w = slot_table(targets, weights, ignore_index)  # [N, m], [N, m]
    z = logits.reshape(-1, logits.shape[-1])  # [N, V]
    return MultiHotCrossEntropy.apply(z, y, slot_w), slot_w.sum()


def multi_hot_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weighting: str | Sequence[float] = "uniform",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Multi-hot cross-entropy (MCE), the mean over valid (position, slot) weight.

    Per position: ``logsumexp(z) - sum_j w_j z[y_j] / sum_j w_j``, which for uniform weights is
    the mean of the s ordinary cross-entropies on the same logits. Duplicated tokens in a bag
    count once per occurrence; ``ignore_index`` slots drop out; a position without any valid
    slot contributes nothing. Like the paper, the value does NOT include the constant ``log s``
    of the KL form: its minimum for a bag of s distinct tokens is log s, not 0. With s = 1 it is
    exactly ``F.cross_entropy``.

    logits ``[..., V]``, targets ``[..., s]`` -> fp32 scalar.
    """
    weights = slot_weight_vector(weighting, targets.shape[-1], device=logits.device)
    total, weight = multi_hot_cross_entropy_sum(logits, targets, weights, ignore_index)
    return total / weight.clamp(min=torch.finfo(torch.float32).tiny)


# ---------------------------------------------------------------------------- kernels


# Which kernels score the logits, per device type:
#   eager     fp32 blocks of rows (BLOCK_ELEMENTS), F.log_softmax / torch.softmax: fast on CPU,
#             where the blocks stay in cache; the fallback everywhere.
#   compiled  row_nll / row_grad through torch.compile over all rows at once: one read of the
#             logits forward, one read and one write backward, no [N, V] fp32 temporaries. The
#             H200 of 2026-12-04 measured the compiled loss at 0.41x one eager F.cross_entropy
#             (bench/results/gpu_check_h200_2026-12-04.json) and the eager blocks at 1.46x.
#   fused     the same two functions uncompiled (their reference; slow: fp32 [N, V] temporaries).
LOSS_KERNELS = {"cpu": "eager", "cuda": "compiled"}
# fp32 elements of temporaries per row block of the eager kernels. CPU: 1 MiB, which stays in
# cache (measured with bench/bench_step.py); GPUs: 256 MiB (their eager fallback).
BLOCK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 26}


def kernels_for(device: torch.device) -> str:
    """The kernels the loss runs on ``device``: ``LOSS_KERNELS``, else compiled; eager once a
    compile failed in this process."""
    kind = LOSS_KERNELS.get(device.type, "compiled")
    return "eager" if kind == "compiled" and "failed" in _COMPILED else kind


def _block_rows(logits: torch.Tensor) -> int:
    """Rows per block: ``BLOCK_ELEMENTS`` of the device (CPU, else the GPU figure) over V."""
    elements = BLOCK_ELEMENTS["cpu" if logits.device.type == "cpu" else "cuda"]
    return max(1, elements // max(1, logits.shape[-1]))


def _blocks(n: int, rows: int):
    return ((start, min(start + rows, n)) for start in range(0, n, rows))


def row_nll(logits: torch.Tensor, targets: torch.Tensor, slot_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``logsumexp(z)`` ``[r]`` of logits ``[r, V]`` and ``sum_{n,j} w_nj (lse_n - z_n[y_nj])``.

    The log-sum-exp is all the backward needs to rebuild the softmax, so no ``[r, V]``
    probabilities are kept. Compiled, this is one read of the logits (the fp32 cast fused)."""
    lse = torch.logsumexp(logits.float(), dim=-1)  # [r]
    return lse, (slot_w * (lse[:, None] - logits.gather(1, targets).float())).sum()


def row_grad(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, slot_w: torch.Tensor,
             scale: torch.Tensor) -> torch.Tensor:
    """``scale * (softmax(z) * sum_j w_j - sum_j w_j onehot(y_j))`` ``[r, V]`` in the logits' dtype.

    Every entry is computed in fp32 and rounded once: the target entries are rebuilt in fp32 on
    ``[r, m]`` (a token that occurs twice in a bag gets both weights) and scattered over the
    softmax term. Compiled, this is one read of the logits and one write of the gradient."""
    row_scale = slot_w.sum(dim=1, keepdim=True) * scale  # [r, 1]
    grad = (torch.exp(logits.float() - lse[:, None]) * row_scale).to(logits.dtype)  # [r, V]
    same = (targets[:, :, None] == targets[:, None, :]).float()  # [r, m, m]
    picked = torch.exp(logits.gather(1, targets).float() - lse[:, None]) * row_scale  # [r, m]
    at_targets = picked - (same @ (slot_w * scale)[:, :, None]).squeeze(-1)  # [r, m]
    return grad.scatter(1, targets, at_targets.to(logits.dtype))


_COMPILED: dict = {}  # function -> its compiled version; "failed" -> the error that turned compiling off
COMPILE_BACKEND = "inductor"


def _fused(fn, *args):
    """``fn(*args)`` compiled where ``kernels_for`` says so (once per function; dynamic shapes, so
    chunks of any length and any bag size run without a recompile each). Inside an outer compile
    the plain function is traced (it fuses there). A failure to compile warns once and turns the
    loss eager (``kernels_for``) for the rest of the process."""
    if torch.compiler.is_compiling() or kernels_for(args[0].device) != "compiled":
        return fn(*args)
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True, fullgraph=True, backend=COMPILE_BACKEND)
    try:
        return _COMPILED[fn](*args)
    except torch._dynamo.exc.TorchDynamoException as err:  # BackendCompilerFailed (no Triton, ...), Unsupported
        _COMPILED["failed"] = err
        warnings.warn(f"the loss kernels did not compile ({type(err).__name__}); the loss runs eagerly", stacklevel=2)
        return fn(*args)


def picked_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """fp32 ``log_softmax(z)[y]`` ``[N, m]`` for logits ``[N, V]``: one normalisation per row,
    computed a block of rows at a time so no ``[N, V]`` log-probabilities are ever stored."""
    out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    for a, b in _blocks(logits.shape[0], _block_rows(logits)):
        out[a:b] = F.log_softmax(logits[a:b], dim=-1, dtype=torch.float32).gather(1, targets[a:b])
    return out


def mce_grad_(out: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, slot_w: torch.Tensor,
              scale: torch.Tensor) -> torch.Tensor:
    """Write ``scale * (softmax(z) * sum_j w_j - sum_j w_j onehot(y_j))`` into ``out`` ``[N, V]``.

    Computed in fp32 a block of rows at a time and rounded once into ``out``, which may be
    ``logits`` itself (the chunked path overwrites its recomputed logits). Duplicate targets add
    up (scatter_add), so a token that occurs twice in a bag gets twice the weight.
    """
    row_scale = slot_w.sum(dim=1, keepdim=True) * scale  # [N, 1]
    slot_scale = slot_w * scale  # [N, m]
    direct = out.dtype == torch.float32  # else: an fp32 block, rounded once into out
    for a, b in _blocks(logits.shape[0], _block_rows(logits)):
        p = torch.softmax(logits[a:b], dim=-1, dtype=torch.float32)  # [r, V]
        g = torch.mul(p, row_scale[a:b], out=out[a:b] if direct else p)
        g.scatter_add_(1, targets[a:b], -slot_scale[a:b])
        if not direct:
            out[a:b].copy_(g)
    return out


def _weighted_nll_sum(logits: torch.Tensor, targets: torch.Tensor, slot_w: torch.Tensor) -> torch.Tensor:
    return -(slot_w * picked_log_probs(logits, targets)).sum()


def _nll(logits: torch.Tensor, targets: torch.Tensor, slot_w: torch.Tensor):
    """``(lse [r] or None, weighted NLL sum)`` of logits ``[r, V]`` by the device's kernels (eager: no lse)."""
    if kernels_for(logits.device) == "eager":
        return None, _weighted_nll_sum(logits, targets, slot_w)
    return _fused(row_nll, logits, targets, slot_w)


def _grad(out: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor | None, targets: torch.Tensor,
          slot_w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """dL/dz ``[r, V]`` by the kernels that ran the forward: written into ``out`` (eager, which may
    be ``logits`` itself) or a fresh tensor (fused)."""
    if lse is None:
        return mce_grad_(out, logits, targets, slot_w, scale)
    return _fused(row_grad, logits, lse, targets, slot_w, scale)


class MultiHotCrossEntropy(torch.autograd.Function):
    """``sum_{n,j} w_nj * (logsumexp(z_n) - z_n[y_nj])`` for logits ``[N, V]`` -> fp32 scalar."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, slot_w: torch.Tensor) -> torch.Tensor:
        lse, total = _nll(logits, targets, slot_w)
        ctx.save_for_backward(logits, targets, slot_w, lse)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, slot_w, lse = ctx.saved_tensors
        out = torch.empty_like(logits, memory_format=torch.contiguous_format) if lse is None else None
        return _grad(out, logits, lse, targets, slot_w, grad), None, None


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
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            lse = None if kernels_for(h.device) == "eager" else torch.empty(n, dtype=torch.float32, device=h.device)
            buf = torch.empty(min(chunk, n), w.shape[0], dtype=dtype, device=h.device)  # [C, V]
            for a, c in _blocks(n, chunk):
                z = _logits_into(buf[: c - a], h[a:c], w, b)
                chunk_lse, chunk_total = _nll(z, targets[a:c], slot_w[a:c])
                total += chunk_total
                if lse is not None:
                    lse[a:c] = chunk_lse
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
                g = _grad(g, g, None if lse is None else lse[a:c], targets[a:c], slot_w[a:c], grad)  # dL/dz
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
    """``multi_hot_cross_entropy_sum(head(hidden), ...)`` without the full logits: hidden ``[..., d]``."""
    y, slot_w = slot_table(targets, weights, ignore_index)
    h = hidden.reshape(-1, hidden.shape[-1])  # [N, d]
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
    loss = ChunkedHeadCrossEntropy.apply(h, head.weight, head.bias, y, slot_w, chunk, dtype)
    return loss, slot_w.sum()
