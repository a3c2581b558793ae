"""Trainer's FSDP2 on CPU processes, for tests: accelerate enables FSDP only on accelerator devices.

On CPU, accelerate silently keeps a ``torchrun`` job as DDP (``DistributedType.MULTI_CPU``, so
``Trainer.is_fsdp_enabled`` is false). ``allow_fsdp_on_cpu`` lifts that one gate, so that Trainer
and accelerate take their real FSDP paths over gloo (``fully_shard`` of each decoder layer and the
root, sharded optimizer, DCP checkpoints); nothing else is patched. accelerate's FSDP1 asks for an
accelerator device outright, so only FSDP2 runs on CPU.

    torchrun --nproc-per-node 2 tests/fsdp_on_cpu.py SCRIPT ARGS...   # SCRIPT with the gate lifted
"""
from __future__ import annotations

import runpy
import sys


def allow_fsdp_on_cpu() -> None:
    import accelerate.state as state

    init = state.AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == state.DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = state.DistributedType.FSDP, fsdp_plugin

    state.AcceleratorState.__init__ = patched


if __name__ == "__main__":
    allow_fsdp_on_cpu()
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
