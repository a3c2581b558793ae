"""torchtitan's entry point (``torchtitan.train``) on a released torch: the shims it needs, each with why.

    torchrun --nproc-per-node 8 -m superpose.torchtitan.train --module superpose.torchtitan --config NAME [FLAGS]
    python -m superpose.torchtitan.train --check     # does torchtitan.train import here? exit 1 if not

takes the flags of ``-m torchtitan.train``; on a PyTorch nightly that has what torchtitan needs,
no shim applies and it is ``-m torchtitan.train``. Each shim is applied only where torch lacks the
feature, and none changes what a step computes.

torchtitan 0.3.0 is written against a PyTorch nightly. On torch 2.11.0 (checked on CPU processes,
tests/test_torchtitan.py passing, slow tests included, with these shims and the CPU ones) it needs:

1. ``torch.distributed.set_timeout``, which torchtitan calls after the first step of every run
   (torchtitan/distributed/utils.py:595, from trainer.py:1062); no release up to 2.13 has it: the
   private ``distributed_c10d._set_pg_timeout`` does the same.
2. ``torch.distributed.fsdp.DataParallelMeshDims``, imported when torchtitan.train is imported
   (torchtitan/distributed/fsdp.py:13, full_dtensor.py:23); torch 2.11 lacks it and its
   ``fully_shard`` has no ``dp_mesh_dims``. A stand-in lets the import succeed. It is passed on only
   with a data-parallel mesh over more than one GPU under the default ``spmd_types`` backend
   (full_dtensor.py:86-106): there, use ``--parallelism.spmd_backend partial_dtensor``.
3. torchtitan shards ``[norm, lm_head]`` as one FSDP group (fsdp.py:204) while its chunked loss calls
   ``lm_head`` outside ``model.forward`` and reshards it (components/loss.py:729-771); torch 2.13's
   FSDP completes such a half-run group (``FSDPState._force_complete_incomplete_states``), 2.11's
   does not, so the final norm's weight is freed before its backward ("The tensor has a non-zero
   number of elements, but its data is not allocated yet", also for torchtitan's own llama3). Each
   module of a group is sharded on its own instead (one more FSDP unit; on one GPU nothing is
   gathered either way). Tied weights cannot be split: refused.

The MoE path also uses ``ShardPlacementResult`` (fsdp.py:263, expert parallelism) and
``torch.compiler._is_non_strict_tracing`` (models/common/token_dispatcher.py:259), both missing in
2.11 and not shimmed.
"""
from __future__ import annotations

import dataclasses
import sys


def torch_shims() -> list[str]:
    """Shims 1 and 2 (torch only): call before anything imports torchtitan. Returns what was shimmed."""
    import torch.distributed as dist
    import torch.distributed.fsdp as fsdp

    applied = []
    if not hasattr(dist, "set_timeout"):
        dist.set_timeout = lambda timeout, group=None: dist.distributed_c10d._set_pg_timeout(timeout, group)
        applied.append("dist.set_timeout")
    if not hasattr(fsdp, "DataParallelMeshDims"):
        @dataclasses.dataclass(frozen=True)
        class DataParallelMeshDims:  # the fields torchtitan sets (torch 2.13's has the same two)
            shard: str | tuple[str, ...] | None = None
            replicate: str | None = None

        fsdp.DataParallelMeshDims = DataParallelMeshDims
        applied.append("fsdp.DataParallelMeshDims")
    return applied


def torchtitan_shims() -> list[str]:
    """Shim 3: after ``torch_shims``. Returns what was shimmed."""
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    if hasattr(FSDPState, "_force_complete_incomplete_states"):
        return []
    import torchtitan.distributed.fsdp as titan_fsdp

    fully_shard = titan_fsdp.fully_shard

    def fully_shard_each(module, **kwargs):
        if not isinstance(module, (list, tuple)):
            return fully_shard(module, **kwargs)
        params = [id(p) for m in module for p in m.parameters()]
        if len(params) != len(set(params)):
            raise RuntimeError("tied weights share one FSDP group; this torch's FSDP cannot run torchtitan's chunked "
                               "loss over it (needs FSDPState._force_complete_incomplete_states, torch >= 2.13)")
        return [fully_shard(m, **kwargs) for m in module]

    titan_fsdp.fully_shard = fully_shard_each
    return ["fully_shard per module"]


def check() -> int:
    """Print whether torchtitan.train and the plugin import on this torch (with the shims); 0 if they do."""
    import torch

    try:
        applied = torch_shims()
        import torchtitan.train  # noqa: F401

        applied += torchtitan_shims()
        import superpose.torchtitan.config_registry  # noqa: F401
    except Exception as error:  # any failure here is the answer the check exists to give
        print(f"torchtitan.train does not import on torch {torch.__version__}: {type(error).__name__}: {error}")
        return 1
    from importlib.metadata import version

    print(f"torchtitan {version('torchtitan')} imports on torch {torch.__version__} "
          f"(shims: {', '.join(applied) or 'none'}); cuda: {torch.cuda.is_available()}")
    return 0


def main() -> None:
    torch_shims()
    import torchtitan.train

    torchtitan_shims()
    torchtitan.train.main()


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(check())
    main()
