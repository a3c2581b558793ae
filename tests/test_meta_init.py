"""Meta-device initialisation (superpose.meta_init): sharded initial weights equal one process's, bit for bit.

The reference is today's single-process path, ``torch.manual_seed(seed)`` then ``build_model``
(transformers' ``from_config`` on CPU). Under torchrun this file is also the worker: each rank
builds on meta, shards with FSDP2 (gloo, CPU) and rank 0 saves the gathered weights.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from superpose.errors import ModelError
from superpose.meta_init import initialize_like_one_process, is_on_meta
from superpose.model import TSTModel, build_model, model_config

ROOT = Path(__file__).resolve().parents[1]
SEED, VOCAB, SEQ_LEN = 7, 1000, 32


def one_process(preset: str) -> tuple[dict, torch.Tensor]:
    """Today's path: the weights and buffers, and the generator's state after the build."""
    torch.manual_seed(SEED)
    lm = build_model(preset, VOCAB, SEQ_LEN)
    return {**lm.state_dict(), **dict(lm.named_buffers())}, torch.get_rng_state()


def tied_preset(directory: Path) -> str:
    config = model_config("tiny", VOCAB)
    config.tie_word_embeddings = True
    config.save_pretrained(directory)
    return str(directory)


def assert_identical(expected: dict, found: dict) -> None:
    assert sorted(found) == sorted(expected)
    assert [name for name in expected if not torch.equal(expected[name], found[name])] == []


@pytest.mark.parametrize("preset", ["tiny", "qwen3-moe-tiny", "tied"])
def test_meta_build_initialised_in_place_is_the_single_process_model(preset, tmp_path, one_thread):
    preset = tied_preset(tmp_path / "tied") if preset == "tied" else preset
    expected, rng_after = one_process(preset)
    lm = build_model(preset, VOCAB, SEQ_LEN, meta=True)
    assert is_on_meta(lm) and all(b.is_meta for b in lm.buffers())
    lm.to_empty(device="cpu")
    torch.manual_seed(SEED)
    initialize_like_one_process(lm)
    assert_identical(expected, {**lm.state_dict(), **dict(lm.named_buffers())})
    assert torch.equal(torch.get_rng_state(), rng_after)  # what the run draws next is unchanged too


def test_a_model_with_weights_loads_them_instead_of_building_on_meta(tmp_path, one_thread):
    torch.manual_seed(SEED)
    saved = build_model("tiny", VOCAB, SEQ_LEN)
    saved.save_pretrained(tmp_path / "weights")
    lm = build_model(str(tmp_path / "weights"), VOCAB, SEQ_LEN, meta=True)
    assert not is_on_meta(lm)
    assert_identical(saved.state_dict(), lm.state_dict())


def test_an_init_that_writes_part_of_a_parameter_is_refused():
    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(4, 3, device="meta"))

        def reset_parameters(self):
            self.weight[0].zero_()

    model = nn.Sequential(Partial())
    model.to_empty(device="cpu")
    with pytest.raises(ModelError, match="writes only part of it"):
        initialize_like_one_process(model)


def test_two_fsdp_ranks_start_from_the_single_process_weights(tmp_path):
    """The world-size independence: 2 gloo ranks build on meta, shard and initialise; gathered,
    their weights equal one process's for a dense, an MoE and a tied model."""
    presets = ["tiny", "qwen3-moe-tiny", tied_preset(tmp_path / "tied")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
               str(tmp_path), *presets]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for index, preset in enumerate(presets):
        saved = torch.load(tmp_path / f"{index}.pt")
        assert saved["built_on_meta"] and saved["local_numel"] < saved["total_numel"]  # each rank holds a shard only
        expected, rng_after = one_process(preset)
        assert_identical(expected, saved["weights"])
        assert torch.equal(saved["rng"], rng_after)


def _fsdp_worker(out_dir: Path, presets: list[str]) -> None:
    """One rank: for each preset, the training path's build (train._train) and rank 0 saves the gathered weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from superpose.distributed import init_runtime, parallelize, shards_parameters, shutdown

    runtime = init_runtime("cpu")
    for index, preset in enumerate(presets):
        torch.manual_seed(SEED)
        lm = build_model(preset, VOCAB, SEQ_LEN, meta=shards_parameters(runtime, "fsdp"))
        built_on_meta = is_on_meta(lm)
        model = parallelize(TSTModel(lm), runtime, "fsdp", "fp32", "fp32")
        local_numel = sum(p.to_local().numel() for p in model.parameters())
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if runtime.is_main:
            weights = {name.removeprefix("lm."): tensor for name, tensor in full.items()}
            weights.update({name: buffer.cpu() for name, buffer in lm.named_buffers()})
            torch.save({"weights": weights, "rng": torch.get_rng_state(), "built_on_meta": built_on_meta,
                        "local_numel": local_numel, "total_numel": sum(p.numel() for p in model.parameters())},
                       out_dir / f"{index}.pt")
    shutdown()


if __name__ == "__main__":
    _fsdp_worker(Path(sys.argv[1]), sys.argv[2:])
