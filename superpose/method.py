"""Token Superposition Training as pure functions: bag the inputs and split windows into
(inputs, targets) for a stage; the bags are scored by ``superpose.loss``.

Shapes: B batch, L model positions, s bag size, k tokens per input position (s when inputs are
bagged, else 1), m target tokens per position (s when targets are bags, else 1), V vocabulary,
d model width. A position with k = m = 1 is ordinary next-token prediction.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MODES


def embed_bags(embedding: nn.Module | torch.Tensor, bags: torch.Tensor) -> torch.Tensor:
    """Mean input embedding of each bag: ids ``[B, L, k]`` -> ``[B, L, d]``.

    Accumulates in fp32 and casts back to the embedding dtype. With k = 1 it is a plain lookup,
    so a next-token batch costs exactly what it costs without TST. ``embedding`` may be any
    module mapping ids to vectors (``model.get_input_embeddings()``) or a weight ``[V, d]``. A
    plain fp32 ``nn.Embedding`` (no options, no hooks) or weight takes one ``F.embedding_bag``
    (gather and mean in one kernel, no ``[B, L, k, d]`` intermediate); other modules get their own
    lookup, then the mean.
    """
    weight = _plain_weight(embedding)
    if bags.shape[-1] == 1:
        return F.embedding(bags[..., 0], weight) if weight is not None else embedding(bags[..., 0])
    if weight is not None and weight.dtype == torch.float32:
        flat = F.embedding_bag(bags.reshape(-1, bags.shape[-1]), weight, mode="mean")  # [B*L, d]
        return flat.view(*bags.shape[:-1], weight.shape[1])
    vectors = F.embedding(bags, weight) if weight is not None else embedding(bags)  # [B, L, k, d]
    return vectors.float().mean(dim=-2).to(vectors.dtype)


def _plain_weight(embedding: nn.Module | torch.Tensor) -> torch.Tensor | None:
    """The weight of a tensor or of an exact ``nn.Embedding`` without lookup options or hooks, else None.

    Exact type: a subclass, e.g. the ``FSDPEmbedding`` of an embedding that FSDP2 shards as a unit
    of its own, is called as a module instead, so that its hooks gather its weight first. No hooks:
    an embedding hooked by others (the Trainer's NEFTune noise, a user's hook) is called too, so its
    hooks run on every lookup."""
    if isinstance(embedding, torch.Tensor):
        return embedding
    hooked = embedding._forward_hooks or embedding._forward_pre_hooks
    plain = type(embedding) is nn.Embedding and not hooked and embedding.padding_idx is None and embedding.max_norm is None
    return embedding.weight if plain and not (embedding.scale_grad_by_freq or embedding.sparse) else None


def window_length(seq_len: int, bag_size: int, mode: str = "full") -> int:
    """Data tokens one sample of a stage reads: full s*L+s, input s*L+1, output L+s (s=1: L+1)."""
    if mode == "full":
        return bag_size * seq_len + bag_size
    if mode == "input":
        return bag_size * seq_len + 1
    if mode == "output":
        return seq_len + bag_size
    raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")


def split_window(window: torch.Tensor, bag_size: int, mode: str = "full") -> tuple[torch.Tensor, torch.Tensor]:
    """Turn token windows into model inputs and targets for one stage.

    window ``[B, W]`` with W = ``window_length(L, s, mode)`` -> inputs ``[B, L, k]``, targets ``[B, L, m]``:

    - full:   position i holds bag i (tokens s*i .. s*i+s-1) and predicts bag i+1
              (tokens s*(i+1) .. s*(i+2)-1): k = m = s. Every bag, the last included, has s targets.
    - input:  bagged inputs, predict the single next token s*(i+1): k = s, m = 1.
    - output: token inputs, position i predicts the next s tokens i+1 .. i+s: k = 1, m = s.

    With s = 1 every mode is next-token prediction: inputs ``window[:, :L]``, targets ``window[:, 1:]``.
    """
    batch, width = window.shape
    s = bag_size
    if mode == "full":
        seq_len = width // s - 1
        _check_width(width, window_length(seq_len, s, mode), s, mode)
        bags = window.view(batch, seq_len + 1, s)  # [B, L+1, s]
        return bags[:, :-1], bags[:, 1:]
    if mode == "input":
        seq_len = (width - 1) // s
        _check_width(width, window_length(seq_len, s, mode), s, mode)
        inputs = window[:, : s * seq_len].view(batch, seq_len, s)  # [B, L, s]
        targets = window[:, s::s].unsqueeze(-1)  # [B, L, 1]: tokens s, 2s, ..., s*L
        return inputs, targets
    if mode == "output":
        seq_len = width - s
        _check_width(width, window_length(seq_len, s, mode), s, mode)
        inputs = window[:, :seq_len].unsqueeze(-1)  # [B, L, 1]
        targets = window[:, 1:].unfold(1, s, 1)  # [B, L, s]: row i = tokens i+1 .. i+s
        return inputs, targets
    raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")


def _check_width(width: int, expected: int, bag_size: int, mode: str) -> None:
    if width != expected or width <= bag_size:
        raise ValueError(f"window of {width} tokens does not fit mode {mode!r} with bag_size {bag_size}")
