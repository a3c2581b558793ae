"""A superpose.torchtitan run that also scores each step's batch with the reference objective.

    torchrun --nproc-per-node N tests/torchtitan_parity.py --module superpose.torchtitan --config NAME [FLAGS]

Before each step, on the weights the step starts from and the batch it trains on (the data
loader's windows of that step, all ranks): a superposition step is scored by superpose's own
objective (``superpose.model.TSTModel`` on a Hugging Face copy of the weights made by the HF
export path), a next-token step by torchtitan's stock model (its plain ``Embedding``) and its
``cross_entropy_loss``. Rank 0 writes the values to DUMP/reference.json as {step: loss}, beside the
losses the run logs to DUMP/metrics.jsonl.

A qwen3 MoE run differs from its config in two ways, both so that HF's Qwen3Moe can be the reference:
its experts compute in fp32 (``fp32_experts``: torchtitan's cast them to bf16), and torchtitan's
load-balancing expert bias is never updated (no ``post_optimizer_build_fn``), so it stays zero and
the run routes as HF does. torchtitan's MoE adds no auxiliary loss, so the objective is the same.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path

from torchtitan_on_cpu import apply_shims, cpu_config, fp32_experts

apply_shims()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torchtitan.components.loss import cross_entropy_loss  # noqa: E402
from torchtitan.config import ConfigManager  # noqa: E402
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING  # noqa: E402

from superpose.model import TSTModel  # noqa: E402
from superpose.progress import hf_progress_bars  # noqa: E402
from superpose.schedule import stage_at  # noqa: E402
from superpose.torchtitan.embedding import with_stock_embedding  # noqa: E402
from superpose.torchtitan.export import hf_config  # noqa: E402


def hf_copy(model_config, adapter, weights):
    """The HF model of torchtitan ``weights`` by the export's path: ``hf_config``, the adapter's ``to_hf``,
    then transformers' own loading (which fuses a MoE's per-expert tensors), every key used. The copy
    owns its tensors: loading may adopt a tensor it is given, and these are the run's parameters."""
    config = hf_config(model_config)
    state = adapter.to_hf({name: t.clone() for name, t in weights.items()})
    with hf_progress_bars(False):
        lm, info = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(
            None, config=config, state_dict=state, dtype=torch.float32, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    return lm


def superpose_loss(model_config, adapter, weights, inputs, labels, stage, step):
    lm = hf_copy(model_config, adapter, weights)
    x = inputs if inputs.ndim == 3 else inputs[..., None]  # [b, L, k]
    y = labels if labels.ndim == 3 else labels[..., None]  # [b, L, m]
    loss_sum, _ = TSTModel(lm).eval()(x, y, stage.weights(step, y.shape[-1]))
    return loss_sum, x.shape[0] * x.shape[1]  # the weights of a position sum to 1


def stock_loss(model_config, weights, inputs, labels):
    model = with_stock_embedding(model_config).build()
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.load_state_dict(weights, strict=True)
    positions = torch.arange(inputs.shape[1]).expand(inputs.shape[0], -1)
    return cross_entropy_loss(model(inputs, positions=positions), labels), labels.numel()


@torch.no_grad()
def reference_loss(trainer, step: int) -> float:
    stage = stage_at(trainer.stages, step)
    inputs, labels = trainer.dataloader.step_batch(step)  # this rank's batch of the step
    weights = {name: t.full_tensor() if isinstance(t, DTensor) else t  # gathered from every rank
               for name, t in trainer.model_parts[0].state_dict().items()}
    model_config = trainer.model_config
    if stage.bag_size > 1:
        adapter = trainer.config.model_spec.state_dict_adapter(model_config, None)
        total, count = superpose_loss(model_config, adapter, weights, inputs, labels, stage, step)
    else:
        total, count = stock_loss(model_config, weights, inputs, labels)
    totals = torch.stack([total.double(), torch.tensor(float(count), dtype=torch.float64)])
    dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


def main() -> None:
    config = cpu_config(ConfigManager().parse_args(sys.argv[1:]))
    moe = any(layer.moe is not None for layer in config.model_spec.model.layers)
    if moe:
        config.model_spec = dataclasses.replace(config.model_spec, post_optimizer_build_fn=None)  # the expert bias stays 0
    with fp32_experts() if moe else contextlib.nullcontext():
        run(config)
    dist.destroy_process_group()


def run(config) -> None:
    trainer = config.build()
    reference = {}
    train_step = trainer.train_step

    def checked_step(data_iterator):
        reference[trainer.step] = reference_loss(trainer, trainer.step - 1)  # torchtitan's steps count from 1
        return train_step(data_iterator)

    trainer.train_step = checked_step
    try:
        trainer.train()
    finally:
        trainer.close()
    if dist.get_rank() == 0:
        (Path(config.dump_folder) / "reference.json").write_text(json.dumps(reference))


if __name__ == "__main__":
    main()
