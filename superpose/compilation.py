"""Regional compilation (``train.compile``): each decoder block compiled on its own.

Compiling the whole model makes one graph as deep as the model, and its compile time grows with
the depth. The decoder blocks are alike, so compiled one by one they share one compiled graph
(dynamo treats each block's parameters as inputs): the compile costs one block, whatever the
depth. The loss compiles its own kernels (``superpose.loss.LOSS_KERNELS``); the embedding, the
final norm and the head matmuls stay eager, which costs nothing measurable.

Both phases give the blocks the same ``[B, L, d]`` hidden states (the bags are averaged before
the first block), so the switch from phase 1 to phase 2 recompiles no block; the loss's kernels
are compiled with dynamic shapes, so a new bag size does not recompile them either.

Each block is compiled in place (``nn.Module.compile``): parameter names and checkpoints stay
those of the plain model, and FSDP2 shards and activation checkpointing wrap the blocks as before.
A block that fails to compile (no working compiler, an unsupported op) falls back to eager with one
warning line for the run, and training goes on.
"""
from __future__ import annotations

import warnings

import torch
import torch._dynamo
from torch import nn

from .model import transformer_blocks


def compile_blocks(model: nn.Module, **options) -> int:
    """Compile every decoder block of ``model`` (a ``TSTModel``) in place; returns how many.
    ``options`` go to ``torch.compile`` (e.g. ``backend="aot_eager"`` in tests)."""
    blocks = transformer_blocks(model)
    fallback = _Fallback()
    for wrapper in blocks:
        # A block wrapped for activation checkpointing: the block inside compiles (dynamo does not
        # trace a top-level frame of torch's own wrapper); the wrapper recomputes the compiled block.
        block = getattr(wrapper, "_checkpoint_wrapped_module", wrapper)
        block.compile(**options)
        block._compiled_call_impl = _OrEager(block, block._compiled_call_impl, fallback)
    return len(blocks)


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far (dynamo's own accounting): the run's records
    carry it, so the cost of ``train.compile`` is on file next to the time it saved."""
    metrics = torch._dynamo.utils.compilation_time_metrics
    return float(sum(sum(times) for name, times in metrics.items() if name.endswith("compile_inner")))


class _Fallback:
    """Shared by the blocks of one model: once one failed to compile, all run eagerly."""

    def __init__(self):
        self.error: Exception | None = None


class _OrEager:
    """A block's compiled call that falls back to its eager call when compiling fails."""

    def __init__(self, block: nn.Module, compiled, fallback: _Fallback):
        self.block, self.compiled, self.fallback = block, compiled, fallback

    def __call__(self, *args, **kwargs):
        if self.fallback.error is None:
            try:
                return self.compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as err:  # BackendCompilerFailed, Unsupported, ...
                self.fallback.error = err
                first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
                warnings.warn(f"train.compile: a decoder block did not compile ({type(err).__name__}: {first_line}); "
                              "the blocks run eagerly", stacklevel=2)
        return self.block._call_impl(*args, **kwargs)
