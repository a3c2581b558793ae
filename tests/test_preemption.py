"""Ctrl-C and preemption: SIGINT/SIGTERM finish the step, checkpoint, exit 130/143; the resume is exact."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_overrides

from superpose.runs import logged_step, read_records

ROOT = Path(__file__).resolve().parent.parent
RUN = {"train.steps": 60, "train.batch_size": 4, "tst.ratio": 0.5, "optim.warmup_steps": 2, "train.eval_every": 30,
       "train.eval_tokens": 256, "train.checkpoint_every": 0, "train.tensorboard": False}
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
TIMING = {"tokens_per_s", "step_seconds", "elapsed"}


def command(data: Path, out: Path, ranks: int, *extra: str) -> list[str]:
    runner = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1
              else [sys.executable])
    return [*runner, "-m", "superpose", "train", *tiny_overrides(data, out, **RUN), *extra]


def interrupt(cmd: list[str], run: Path, signals: list[int], after_step: int = 3) -> subprocess.CompletedProcess:
    """Start ``cmd``, send ``signals`` (back to back) once ``after_step`` shows in the log, wait for the exit."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while logged_step(run) < after_step:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    for signum in signals:
        proc.send_signal(signum)
    out, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def outcome(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_records(run)]


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    subprocess.run(command(small_data, out, 1), cwd=ROOT, env=ENV, check=True, capture_output=True)
    return out


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_checkpoints_and_resume_is_exact(small_data, tmp_path, reference, signum, status):
    run = tmp_path / "run"
    done = interrupt(command(small_data, run, 1), run, [signum])
    assert done.returncode == status, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    step = logged_step(run)
    checkpoint = run / "checkpoints" / f"step-{step:08d}"
    assert last == f"superpose: interrupted at step {step}; checkpoint written to {checkpoint}; continue with --resume auto"
    assert "Traceback" not in done.stderr and (checkpoint / "manifest.json").is_file()
    again = subprocess.run(command(small_data, run, 1, "--resume", "auto"), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"train: resuming from step {step} ({checkpoint})" in again.stderr
    assert outcome(run) == outcome(reference)
    assert (run / "model" / "model.safetensors").read_bytes() == (reference / "model" / "model.safetensors").read_bytes()


def test_second_ctrl_c_aborts_at_once(small_data, tmp_path):
    """Two SIGINTs back to back: no waiting for a checkpoint, no traceback, status 130, and the
    run directory still resumes (from the last complete checkpoint, here none: from step 0)."""
    run = tmp_path / "run"
    done = interrupt(command(small_data, run, 1), run, [signal.SIGINT, signal.SIGINT])
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr[-2000:]
    again = subprocess.run(command(small_data, run, 1, "--resume", "auto"), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]


def test_sigterm_under_torchrun_checkpoints_on_all_ranks_and_resumes_exactly(small_data, tmp_path):
    """SIGTERM to torchrun (what SLURM sends): torchrun passes it to both ranks, they agree on the
    step, write one checkpoint and exit 143; a 2-rank resume equals an uninterrupted 2-rank run.
    torchrun itself then exits 1 with its own SignalException report (its behaviour, not ours)."""
    run, reference = tmp_path / "run", tmp_path / "reference"
    ref = subprocess.Popen(command(small_data, reference, 2), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done = interrupt(command(small_data, run, 2), run, [signal.SIGTERM])
    step = logged_step(run)
    assert f"superpose: interrupted at step {step}; checkpoint written to" in done.stderr, done.stderr[-3000:]
    assert done.returncode != 0
    assert (run / "checkpoints" / f"step-{step:08d}" / "manifest.json").is_file()
    again = subprocess.run(command(small_data, run, 2, "--resume", "auto"), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert ref.wait(timeout=300) == 0
    assert outcome(run) == outcome(reference)


def test_ctrl_c_during_compare_says_how_to_continue(small_data, tmp_path):
    root = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "superpose", "compare", *tiny_overrides(small_data, root, **{**RUN, "train.steps": 40})]
    done = interrupt(cmd, root / "baseline", [signal.SIGINT])
    step = logged_step(root / "baseline")
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"superpose: interrupted at step {step}; checkpoint written to {root / 'baseline' / 'checkpoints' / f'step-{step:08d}'}; "
        "continue with the same `superpose compare` command")
    again = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert again.returncode == 0 and f"[1/2] baseline: resuming from step {step}" in again.stderr, again.stderr[-2000:]
