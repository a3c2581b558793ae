"""TSTTrainer under torchrun (2 gloo ranks, Trainer's own DDP or FSDP2) equals one process with the
same global batch: the same per-step losses and gradient norms (within the tolerances of
tests/test_distributed.py), the switch at the same optimizer step, and a resume from a Trainer
checkpoint taken at the switch (sharded, under FSDP) equals the uninterrupted 2-rank run. Each run
is tests/trainer_run.py: 6 steps, phase 1 (s=4) for 3 of them, windows read in order."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE, GRAD_NORM_RTOL = 1e-4, 1e-3  # as tests/test_distributed.py (two ranks reorder fp sums)


def run(tmp: Path, name: str, ranks: int, *args: str) -> list[dict]:
    """The per-step training records of one run of tests/trainer_run.py."""
    runner = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1
              else [sys.executable])
    records = tmp / f"{name}.json"
    command = [*runner, str(ROOT / "tests" / "trainer_run.py"), "--run-dir", str(tmp / name), "--records", str(records), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(records.read_text())


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x["tst_bag_size"] == y["tst_bag_size"], x["step"]
        assert x["loss"] == pytest.approx(y["loss"], abs=TOLERANCE), x["step"]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=GRAD_NORM_RTOL), x["step"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> list[dict]:
    """The reference: one process, micro-batches of 2, 2 per optimizer step."""
    return run(tmp_path_factory.mktemp("one"), "one", 1, "--batch", "2", "--grad-accum", "2")


@pytest.mark.parametrize("strategy", [[], ["--fsdp"]], ids=["ddp", "fsdp2"])
def test_two_ranks_with_gradient_accumulation_equal_one_process_and_resume_across_the_switch(tmp_path, one_process, strategy):
    one = one_process
    two = run(tmp_path, "two", 2, "--batch", "1", "--grad-accum", "2", *strategy)
    assert [r["tst_bag_size"] for r in one] == [4, 4, 4, 1, 1, 1]  # the switch after optimizer step 3
    assert_same(one, two)
    first = run(tmp_path, "split", 2, "--batch", "1", "--grad-accum", "2", "--stop-at", "3", *strategy)
    assert [r["step"] for r in first] == [1, 2, 3]
    resumed = run(tmp_path, "split", 2, "--batch", "1", "--grad-accum", "2", "--resume", str(tmp_path / "split" / "checkpoint-3"),
                  *strategy)
    assert_same(two[3:], [r for r in resumed if r["step"] > 3])


@pytest.mark.slow
def test_moe_on_two_ranks_equals_one_process(tmp_path):
    """The MoE's load-balancing loss is taken over the global batch, so 2 ranks (DDP or FSDP2)
    train as 1 process."""
    one = run(tmp_path, "one", 1, "--batch", "4", "--preset", "qwen3-moe-tiny")
    assert_same(one, run(tmp_path, "ddp", 2, "--batch", "2", "--preset", "qwen3-moe-tiny"))
    assert_same(one, run(tmp_path, "fsdp", 2, "--batch", "2", "--preset", "qwen3-moe-tiny", "--fsdp"))


@pytest.mark.slow
def test_example_under_fsdp2_writes_sharded_checkpoints_and_merges_the_trained_model(tmp_path):
    """examples/hf_trainer_pretrain.py --fsdp on 2 ranks: each rank writes its checkpoint shards,
    and the final model, merged from the last checkpoint, is an ordinary HF model that has learnt."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from superpose.corpus import shakespeare_files

    plays = [str(p) for p in shakespeare_files() if "tragedies" in p.parts][:3]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(ROOT / "tests" / "fsdp_on_cpu.py"), str(ROOT / "examples" / "hf_trainer_pretrain.py"), "--fsdp",
               "--out", str(tmp_path), "--input", *plays, "--vocab-size", "512", "--seq-len", "32", "--bag-size", "4",
               "--ratio", "0.5", "--steps", "24", "--batch-size", "4", "--grad-accum", "2", "--eval-steps", "12",
               "--save-steps", "12", "--eval-samples", "64", "--report-to", "none"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    shards = tmp_path / "checkpoint-24" / "pytorch_model_fsdp_0"
    assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "model", local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # every weight merged, none left at init
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "model")
    ids = tokenizer(Path(plays[0]).read_text()[:4000], return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < math.log(512) - 0.8  # the trained weights, not the initialisation
    final = float(done.stdout.split("final validation loss ")[1].split()[0])
    assert final < math.log(512) - 0.8
