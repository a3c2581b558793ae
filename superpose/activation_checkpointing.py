"""Activation checkpointing per decoder block: keep less of the forward for the backward, recompute the rest.

- ``full``: a block keeps only its inputs; backward runs its forward again.
- ``selective``: a block also keeps the outputs of its matrix products (the attention and MLP
  projections, attention itself, MoE expert matmuls) and recomputes only the cheap ops between
  them (norms, RoPE, activation functions, residual adds, reshapes): less memory than ``none``,
  less recompute than ``full``.

Each block is wrapped in torch's ``checkpoint_wrapper`` (non-reentrant ``torch.utils.checkpoint``;
``create_selective_checkpoint_contexts`` for ``selective``) before FSDP2 shards it, so one
wrapped block is one FSDP unit, and before meta init and ``torch.compile``, which see the wrapper
as any other module. The wrapper adds ``_checkpoint_wrapped_module.`` to the names that
``named_parameters`` gives; ``state_dict`` and torch.distributed.checkpoint's state dicts strip
it, so checkpoints and the exported Hugging Face model keep the plain names.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from .model import transformer_blocks

_aten = torch.ops.aten
# What ``selective`` keeps: the ops whose recompute would cost FLOPs (matmuls, attention).
# The ops are looked up by name: an older torch lacks some of them (_grouped_mm: torch >= 2.8).
SAVED_OPS = frozenset(getattr(_aten, name).default for name in (
    "mm", "addmm", "bmm", "_grouped_mm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention") if hasattr(_aten, name))


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Wrap every decoder block of ``model`` (a ``TSTModel``) in place for ``mode`` (none | full | selective)."""
    if mode == "none":
        return
    options = {} if mode == "full" else {"context_fn": functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)}
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block, **options)
