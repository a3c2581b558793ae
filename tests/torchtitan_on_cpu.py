"""torchtitan 0.3.0 on CPU processes with gloo, for tests: the shims, each with why. Nothing of
torchtitan's files is edited and the plugin (superpose.torchtitan) carries none of them; it carries
only the shims of a released torch (``superpose.torchtitan.train``), which these add to.

    torchrun --nproc-per-node N tests/torchtitan_on_cpu.py --module superpose.torchtitan --config NAME [FLAGS]

runs torchtitan's own entry point (``torchtitan.train.main``) after ``apply_shims()``, with the
config made CPU-ready by ``cpu_config`` (applied to whatever ConfigManager parses).
"""
from __future__ import annotations

import sys
import types
from contextlib import contextmanager


def apply_shims() -> None:
    """Call before anything imports torchtitan."""
    import torch._utils

    # 1. torchtitan picks its device type when torchtitan.tools.utils is imported and falls back to
    #    "cuda" when no accelerator is found; make that "cpu", with a device module that adds the
    #    memory-statistics functions torch.cpu lacks (DeviceMemoryMonitor calls them).
    cpu = types.SimpleNamespace(**{name: getattr(torch.cpu, name) for name in dir(torch.cpu) if not name.startswith("__")})
    cpu.get_device_name = lambda *a: "cpu"
    cpu.get_device_properties = lambda *a: types.SimpleNamespace(total_memory=1 << 40)
    cpu.reset_peak_memory_stats = cpu.empty_cache = lambda *a: None
    cpu.memory_stats = lambda *a: {}
    cpu.current_device = lambda: 0  # torch.cpu's is the string "cpu"; barrier(device_ids=[...]) wants an index
    torch._utils._get_available_device_type = lambda: "cpu"
    get_module = torch._utils._get_device_module
    torch._utils._get_device_module = lambda kind: cpu if kind == "cpu" else get_module(kind)
    # 2. what a released torch lacks (dist.set_timeout, ...), as on a GPU: superpose.torchtitan.train's shims
    from superpose.torchtitan.train import torch_shims, torchtitan_shims

    torch_shims()
    # 3. gloo has no PREMUL_SUM reduction, which FSDP2 uses to pre-divide gradients: ask each FSDP
    #    module for a plain sum (then divided) instead.
    import torchtitan.distributed.fsdp as fsdp

    fully_shard = fsdp.fully_shard

    def fully_shard_with_sum(*args, **kwargs):
        sharded = fully_shard(*args, **kwargs)  # a module, or the list of modules sharded as one group
        for module in sharded if isinstance(sharded, list) else [sharded]:
            module.set_force_sum_reduction_for_comms(True)
        return sharded

    fsdp.fully_shard = fully_shard_with_sum
    torchtitan_shims()  # wraps the sum-reducing fully_shard where this torch's FSDP needs one module per group


def cpu_config(config):
    """4. FlexAttention has no CPU backward: SDPA (plain causal, which is what our one-document
    windows mean) in every layer. 5. torchtitan's default spmd_types backend needs a newer
    ``fully_shard`` than torch 2.13's: the partial_dtensor backend."""
    with_sdpa(config.model_spec.model)
    config.parallelism.spmd_backend = "partial_dtensor"
    return config


def with_sdpa(model_config):
    """4. (of ``cpu_config``) SDPA in every layer of a torchtitan model config, in place."""
    from torchtitan.models.common.attention import ScaledDotProductAttention

    for layer in model_config.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    return model_config


@contextmanager
def fp32_experts():
    """Not a CPU shim but the precision of the MoE parity checks. torchtitan's ``GroupedExperts`` casts
    tokens and weights to bf16 for its grouped matmuls whatever the parameters' dtype; HF's Qwen3Moe
    experts compute in the parameters' dtype. Inside this context the
    same grouped matmuls (``torch._grouped_mm``, which runs fp32 on CPU) take fp32, so the two models
    agree to fp32 rounding and a mismatch of the objective cannot hide under bf16's."""
    import torch
    import torch.nn.functional as F
    from torchtitan.models.common.moe import GroupedExperts

    def forward(self, x_RD, num_tokens_per_expert_E):  # GroupedExperts.forward without its bf16 casts
        offsets_E = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)

        def grouped(a, w):  # a [R, in], w [E, out, in] -> [R, out], rows grouped by expert
            return self._grouped_mm(A=a, B_t=w.transpose(-2, -1), offs=offsets_E)

        return grouped(F.silu(grouped(x_RD, self.w1_EFD)) * grouped(x_RD, self.w3_EFD), self.w2_EDF)

    stock, GroupedExperts.forward = GroupedExperts.forward, forward
    try:
        yield
    finally:
        GroupedExperts.forward = stock


def main() -> None:
    apply_shims()
    from torchtitan.config import ConfigManager
    from torchtitan.train import main as torchtitan_main

    parse = ConfigManager.parse_args
    ConfigManager.parse_args = lambda self, args=None: cpu_config(parse(self, args))
    torchtitan_main()


if __name__ == "__main__":
    sys.exit(main())
