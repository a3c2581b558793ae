"""Meta-device initialisation: a sharded model gets the initial weights one process would give it.

Under FSDP every rank builds the model on the ``meta`` device (no memory), shards it
(``fully_shard``), allocates only its shards (``to_empty``) and then runs ``initialize_like_one_process``.
That replays what ``from_config`` does on one process, with the model's own code and the global
generator, in the same order: torch's default init of each module as it is constructed, then,
as each Hugging Face (sub-)model's construction ends, its ``initialize_weights`` (post_init).
Each step runs on full-size CPU scratch tensors of one module's own parameters, and the rank
keeps its shard of each. Every rank draws the same numbers as one process (all seeded alike), so
the initial weights do not depend on the world size, and at most one module's parameters exist
in full at a time (the largest: the embedding, ``V x d``, or an MoE layer's fused experts). The
price is time: every rank draws every parameter, on CPU.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import PreTrainedModel

from .errors import ModelError


def is_on_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


@torch.no_grad()
def initialize_like_one_process(lm: PreTrainedModel) -> None:
    """Fill the (sharded, ``to_empty``-allocated) parameters and buffers of ``lm`` as
    ``from_config`` would on one process right after ``torch.manual_seed`` of the same state."""
    owners = {}  # id(parameter) -> the module that registered it first (a tied copy's draws are dropped, as tying does)
    for module in lm.modules():
        module.__dict__.pop("_is_hf_initialized", None)  # post_init's "done" marks: none yet, as on one process
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), module)
    models = [m for m in lm.modules() if isinstance(m, PreTrainedModel)]
    for model in models:  # the model's own _init_weights, on scratch tensors of the module it initialises
        model._init_weights = functools.partial(_on_scratch, functools.partial(type(model)._init_weights, model), owners=owners)
    try:
        _construct(lm, owners)
    finally:
        for model in models:
            del model._init_weights


def _construct(module: nn.Module, owners: dict) -> None:
    """What constructing ``module`` draws: its children in order, then its own torch default init
    (``reset_parameters``), then, for a Hugging Face model, post_init's ``initialize_weights`` and tying."""
    for child in module.children():
        _construct(child, owners)
    if hasattr(module, "reset_parameters") and not isinstance(module, PreTrainedModel):
        _on_scratch(lambda m: m.reset_parameters(), module, owners=owners)
    if isinstance(module, PreTrainedModel):
        module.initialize_weights()
        module.tie_weights(recompute_mapping=False)  # post_init ties too (to_empty allocated tied copies apart)


def _on_scratch(init, module: nn.Module, owners: dict) -> None:
    """``init(module)`` with the module's own parameters swapped for full-size CPU tensors filled
    with NaN; then each parameter the module owns that ``init`` wrote is copied, this rank's
    shard of it, into the real one. A parameter written only in part is an error: its other
    values would be whatever ``to_empty`` left."""
    params = {name: p for name, p in module._parameters.items() if p is not None}
    scratch = {name: torch.full(p.shape, math.nan, dtype=p.dtype) for name, p in params.items()}
    with _swapped(module, scratch):
        init(module)
    for name, full in scratch.items():
        param = params[name]
        if owners[id(param)] is not module:
            continue
        unwritten = int(full.isnan().count_nonzero())  # its [*shape] bool mask lives for this line only
        if unwritten == full.numel():
            continue
        if unwritten:
            raise ModelError(f"the init of {type(module).__name__}.{name} writes only part of it, so it cannot be built on "
                             "the meta device; save the initial model with save_pretrained and give that directory as "
                             "model.preset")
        _copy_shard(param, full)


@contextlib.contextmanager
def _swapped(module: nn.Module, tensors: dict):
    originals = {name: module._parameters[name] for name in tensors}
    module._parameters.update(tensors)
    try:
        yield
    finally:
        module._parameters.update(originals)


def _copy_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    """This rank's part of ``full`` into ``param``: its FSDP shard (a DTensor), or all of it."""
    if isinstance(param, DTensor):
        mine = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)  # local slicing, no communication
        param.to_local().copy_(mine.to_local())
    else:
        param.copy_(full)
