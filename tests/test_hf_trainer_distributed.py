"""TSTTrainer under torchrun (2 gloo ranks, Trainer's own DDP) equals one process with the same
global batch: the same per-step losses and gradient norms (within the tolerances of
tests/test_distributed.py), the switch at the same optimizer step, and a resume from a Trainer
checkpoint taken at the switch equals the uninterrupted 2-rank run. Each run is
tests/trainer_run.py: 6 steps, phase 1 (s=4) for 3 of them, windows read in order."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE, GRAD_NORM_RTOL = 1e-4, 1e-3  # as tests/test_distributed.py (two ranks reorder fp sums)


def run(tmp: Path, name: str, ranks: int, *args: str) -> list[dict]:
    """The per-step training records of one run of tests/trainer_run.py."""
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else [sys.executable]
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


def test_ddp_with_gradient_accumulation_equals_one_process_and_resumes_across_the_switch(tmp_path):
    one = run(tmp_path, "one", 1, "--batch", "2", "--grad-accum", "2")
    ddp = run(tmp_path, "ddp", 2, "--batch", "1", "--grad-accum", "2")
    assert [r["tst_bag_size"] for r in one] == [4, 4, 4, 1, 1, 1]  # the switch after optimizer step 3
    assert_same(one, ddp)
    first = run(tmp_path, "split", 2, "--batch", "1", "--grad-accum", "2", "--stop-at", "3")
    assert [r["step"] for r in first] == [1, 2, 3]
    resumed = run(tmp_path, "split", 2, "--batch", "1", "--grad-accum", "2", "--resume", str(tmp_path / "split" / "checkpoint-3"))
    assert_same(ddp[3:], [r for r in resumed if r["step"] > 3])


@pytest.mark.slow
def test_ddp_moe_equals_one_process(tmp_path):
    """The MoE's load-balancing loss is taken over the global batch, so 2 ranks train as 1 process."""
    one = run(tmp_path, "one", 1, "--batch", "4", "--preset", "qwen3-moe-tiny")
    assert_same(one, run(tmp_path, "ddp", 2, "--batch", "2", "--preset", "qwen3-moe-tiny"))
