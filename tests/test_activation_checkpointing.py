"""Activation checkpointing (superpose.activation_checkpointing): the same losses, gradients and names as without.

The reference is the unwrapped model of the same seed. Checkpointing changes when activations
are computed, not what is computed, so on one process the results agree to fp tolerance (in
practice bit for bit). What each mode recomputes is read off the ATen ops the backward runs.
"""
from __future__ import annotations

import collections
import json

import pytest
import torch
from conftest import tiny_overrides
from safetensors import safe_open
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.utils._python_dispatch import TorchDispatchMode

from superpose.activation_checkpointing import apply_activation_checkpointing
from superpose.config import load_config
from superpose.meta_init import initialize_like_one_process
from superpose.model import TSTModel, build_model, transformer_blocks
from superpose.runs import STATE_FILE
from superpose.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB, SEQ_LEN, BAG = 1024, 32, 2
MODES = ["full", "selective"]


def model(preset: str, mode: str, meta: bool = False) -> TSTModel:
    torch.manual_seed(0)
    wrapped = TSTModel(build_model(preset, VOCAB, SEQ_LEN, meta=meta))
    apply_activation_checkpointing(wrapped, mode)
    return wrapped


def loss_of(wrapped: TSTModel) -> torch.Tensor:
    """The loss of a fixed phase-1 batch (2 windows, bags of 2); its backward is left to the caller."""
    data = torch.Generator().manual_seed(1)
    inputs, targets = (torch.randint(0, VOCAB, (2, SEQ_LEN, BAG), generator=data) for _ in range(2))  # [B, L, s]
    loss_sum, weight = wrapped(inputs, targets, torch.full((BAG,), 1 / BAG))
    return loss_sum / weight


def gradients(wrapped: TSTModel) -> dict[str, torch.Tensor]:
    """By the plain parameter names (those of the state dict)."""
    return {name.replace("_checkpoint_wrapped_module.", ""): p.grad for name, p in wrapped.named_parameters()}


@pytest.mark.parametrize("preset", ["tiny", "qwen3-moe-tiny"])
@pytest.mark.parametrize("mode", MODES)
def test_same_loss_and_gradients_as_without(preset, mode):
    reference = model(preset, "none")
    expected = loss_of(reference)
    expected.backward()
    wrapped = model(preset, mode)
    assert all(isinstance(block, CheckpointWrapper) for block in transformer_blocks(wrapped))
    found = loss_of(wrapped)
    found.backward()
    torch.testing.assert_close(found, expected)
    torch.testing.assert_close(gradients(wrapped), gradients(reference))


@pytest.mark.parametrize("mode", MODES)
def test_compiled_checkpointed_blocks_match_eager_without(mode):
    """torch.compile traces the wrapped blocks (ATen graphs run by ``aot_eager``: inductor's C++ compile is slow on CPU)."""
    reference = model("tiny", "none")
    loss_of(reference).backward()
    wrapped = model("tiny", mode)
    wrapped.compile(backend="aot_eager")
    loss_of(wrapped).backward()
    torch.testing.assert_close(gradients(wrapped), gradients(reference))


class OpCounts(TorchDispatchMode):
    """How often each ATen op runs inside the block."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_what_each_mode_recomputes():
    """full runs each block's forward again in backward; selective reruns the norms and activations
    (rsqrt, silu) but takes the matmul and attention outputs it kept."""
    counts = {}
    for mode in ["none", *MODES]:
        loss = loss_of(model("tiny", mode))
        with OpCounts() as ops:
            loss.backward()
        counts[mode] = ops.counts
    layers = len(transformer_blocks(model("tiny", "none")))
    attention = "_scaled_dot_product_flash_attention_for_cpu"
    assert counts["none"]["rsqrt"] == counts["none"]["silu"] == counts["none"][attention] == 0
    assert counts["full"]["mm"] > counts["none"]["mm"]  # the projections again (up to the last, which backward does not need)
    assert counts["full"][attention] == layers
    assert counts["selective"]["mm"] == counts["none"]["mm"] and counts["selective"][attention] == 0
    assert counts["selective"]["rsqrt"] == counts["full"]["rsqrt"] == 2 * layers  # two RMSNorms per block
    assert counts["selective"]["silu"] == counts["full"]["silu"] == layers


def test_meta_init_of_wrapped_blocks_is_the_single_process_model():
    expected = model("tiny", "none").state_dict()
    wrapped = model("tiny", "full", meta=True)
    wrapped.to_empty(device="cpu")
    torch.manual_seed(0)
    initialize_like_one_process(wrapped.lm)
    found = wrapped.state_dict()
    assert list(found) == list(expected)
    assert [name for name in expected if not torch.equal(found[name], expected[name])] == []


def test_state_dicts_keep_the_plain_names():
    plain, wrapped = model("tiny", "none"), model("tiny", "selective")
    for m in (plain, wrapped):
        loss_of(m).backward()
    optimizers = [torch.optim.AdamW(m.parameters()) for m in (plain, wrapped)]
    for optimizer in optimizers:
        optimizer.step()
    assert list(get_model_state_dict(wrapped)) == list(get_model_state_dict(plain)) == list(plain.state_dict())
    states = [get_optimizer_state_dict(m, o)["state"] for m, o in zip((plain, wrapped), optimizers)]
    assert list(states[1]) == list(states[0])


def test_training_run_checkpoint_and_export_as_without(small_data, tmp_path):
    """A run with full checkpointing recomputes (more matmuls in all), logs the losses of the run
    without, and its checkpoint and exported HF model hold the same tensor names."""
    runs = {}
    for mode in ["none", "full"]:
        out = tmp_path / mode
        with OpCounts() as ops:
            train(load_config(None, tiny_overrides(small_data, out, **{
                "train.steps": 4, "tst.ratio": 0.5, "tst.bag_size": 2, "train.eval_tokens": 256, "train.checkpoint_every": 4,
                "train.tensorboard": False, "train.activation_checkpointing": mode})))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        state = torch.load(out / "checkpoints" / "step-00000004" / STATE_FILE, weights_only=True)
        with safe_open(out / "model" / "model.safetensors", "pt") as exported:
            names = sorted(exported.keys())
        runs[mode] = (ops.counts["mm"], [r["loss"] for r in records if r["kind"] == "train"], list(state["model"]),
                      sorted(state["optimizer"]["state"]), names)
    matmuls, losses, checkpoint, optimizer, exported = runs["full"]
    assert matmuls > runs["none"][0]
    assert losses == pytest.approx(runs["none"][1], abs=1e-6) and len(losses) == 4
    assert checkpoint == runs["none"][2] and optimizer == runs["none"][3] and exported == runs["none"][4]
    assert "model.layers.0.self_attn.q_proj.weight" in exported
