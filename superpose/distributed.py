"""Process groups and parallel wrappers: one code path for 1 process, DDP and FSDP2.

Launch with ``torchrun --nproc-per-node N -m superpose train ...``; rank and world size come
from the environment. CUDA ranks use NCCL, CPU ranks gloo.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from . import launch
from .config import ConfigError
from .meta_init import initialize_like_one_process, is_on_meta


@dataclass(frozen=True)
class Runtime:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self, precision: str):
        """The forward's precision (``train.precision``): bf16 autocast, or fp32 as the weights are."""
        if precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def init_runtime(device: str = "auto") -> Runtime:
    """Read torchrun's environment, pick this rank's device and join the process group."""
    world, rank, local_rank = launch.world_size(), launch.rank(), launch.local_rank()
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but PyTorch sees no CUDA device; use train.device = 'auto' or 'cpu'")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Runtime(rank, world, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value):
    """Rank 0's ``value`` on every rank (a decision one rank makes for all, e.g. which checkpoint)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(value) -> list:
    """Every rank's ``value``, by rank (e.g. each rank's share of a checkpoint's manifest)."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def any_rank(flag: bool, device: torch.device) -> bool:
    """Is ``flag`` true on any rank? (so that all ranks take the same branch, e.g. stop at one step)"""
    if not dist.is_initialized():
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item())


def raise_together(error: Exception | None) -> None:
    """Collective: if any rank hit ``error``, every rank raises the first one (by rank) instead of
    the others waiting forever in the next collective."""
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise error


def on_main(runtime: Runtime, work, catch: type[Exception] | tuple[type[Exception], ...]):
    """Collective: ``work()`` on rank 0 alone; its result there (None on the other ranks). If it
    raised one of ``catch``, every rank raises it (``raise_together``), so none waits alone."""
    result, error = None, None
    if runtime.is_main:
        try:
            result = work()
        except catch as err:
            error = err
    raise_together(error)
    return result


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def shards_parameters(runtime: Runtime, strategy: str) -> bool:
    """Does ``parallelize`` shard the model (so that it can be built on the meta device)?"""
    return runtime.world > 1 and strategy in ("fsdp", "hsdp")


def check_world(runtime: Runtime, batch_size: int, strategy: str, shard_size: int) -> None:
    """The world-size part of the config checks, made first thing in a run (a saved config stays
    readable whatever the world size of the process that reads it)."""
    if batch_size % runtime.world:
        raise ConfigError(f"train.batch_size ({batch_size}) must be divisible by the world size ({runtime.world})")
    if shards_parameters(runtime, strategy) and strategy == "hsdp" and runtime.world % shard_size:
        raise ConfigError(f"distributed.shard_size ({shard_size}) must divide the world size ({runtime.world}): "
                          "hsdp replicates the model across WORLD_SIZE / shard_size groups of shard_size ranks")


def parallelize(model: nn.Module, runtime: Runtime, strategy: str, param_dtype: str, reduce_dtype: str,
                shard_size: int = 0) -> nn.Module:
    """The model on ``runtime.device``: as it is (1 process), in DDP, or in FSDP2 with every
    transformer block sharded on its own and the rest (embeddings, head, final norm: tied weights
    included) in the root group. DDP and FSDP average gradients over ranks, so the trainer scales
    each rank's loss by the world size (see ``train.train_step``).

    ``hsdp`` is FSDP2 on a 2-D mesh ``(replicate, shard)`` of ``WORLD_SIZE / shard_size`` groups
    of ``shard_size`` ranks: parameters are sharded within a group and replicated across groups,
    so the all-gathers and reduce-scatters stay inside a group (one node) and only one gradient
    all-reduce per step crosses groups. Its gradients are still the mean over all ranks.

    A model built on the meta device (``build_model(meta=True)``) is sharded first, then each rank
    allocates its shards and fills them as one process would (``superpose.meta_init``): no rank
    ever holds the whole model, and the initial weights do not depend on the world size.

    Every parameter gets a gradient in every step (MoE experts are fused 3-D tensors in
    transformers >= 5), so DDP runs without ``find_unused_parameters`` and the FSDP2
    reduce-scatters of all ranks carry the same tensors. Mixed precision applies to FSDP and HSDP only."""
    if not shards_parameters(runtime, strategy):
        model = _materialize(model, runtime.device)
        if runtime.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from .model import transformer_blocks  # superpose.model imports this module

    if strategy == "hsdp":
        mesh = init_device_mesh(runtime.device.type, (runtime.world // shard_size, shard_size),
                                mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(runtime.device.type, (runtime.world,), mesh_dim_names=("shard",))
    if not is_on_meta(model):
        model = model.to(runtime.device)
    policy = MixedPrecisionPolicy(param_dtype=_DTYPES[param_dtype], reduce_dtype=_DTYPES[reduce_dtype])
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    return _materialize(fully_shard(model, mesh=mesh, mp_policy=policy), runtime.device)


def _materialize(model: nn.Module, device: torch.device) -> nn.Module:
    """A model on the meta device allocated on ``device`` (only its shards, once sharded) and
    initialised as one process would; any other model moved to ``device``."""
    if not is_on_meta(model):
        return model.to(device)
    model.to_empty(device=device)
    initialize_like_one_process(model.lm)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool, strategy: str):
    """Skip the gradient communication that can wait on all but the last micro-batch of a step.

    DDP and FSDP2 skip all of it. HSDP (a 2-D mesh) keeps the reduce-scatter within each shard
    group, so the accumulated gradients stay sharded, and skips only the all-reduce across the
    groups (between nodes, the slow link): FSDP2 adds the held partial sums into the last one."""
    if enabled or not dist.is_initialized():
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    else:  # FSDP2
        toggle = model.set_requires_all_reduce if strategy == "hsdp" else model.set_requires_gradient_sync
        toggle(False)
        try:
            yield
        finally:
            toggle(True)
