"""Exact resume after SIGKILL, and what happens to a step whose loss or gradient is not finite."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from superpose.checkpoint import checkpoint_dirs
from superpose.cli import main
from superpose.config import Config
from superpose.distributed import Runtime
from superpose.model import TSTModel, build_model
from superpose.optim import make_optimizer
from superpose.schedule import Stage
from superpose.train import train_step

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent


def records(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def run_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", f"--data.dir={data}", '--data.corpus=""', "--data.seq_len=16", "--train.batch_size=2",
            "--train.steps=4", "--train.eval_tokens=64", "--train.eval_every=2", "--train.log_every=1",
            "--train.progress=false", "--train.device=cpu", "--train.tensorboard=false", "--tst.ratio=0.5",
            f"--train.out_dir={out}", *extra]


@pytest.mark.parametrize("fmt", ["auto", pytest.param("sharded", marks=pytest.mark.slow)])
def test_kill_resume_short_form(small_data, tmp_path, fmt):
    """SIGKILL in the last phase-1 step, the first phase-2 step, halfway through a checkpoint
    write and halfway through the export; each resume with --resume auto must reproduce every
    logged number and the exported weights bit for bit. One process: gathered checkpoints
    unless the format says sharded."""
    out = subprocess.run(
        [sys.executable, ROOT / "scripts" / "kill_resume.py", "--trials", "1", "--kills", "0", "--format", fmt,
         "--data", small_data, "--work", tmp_path / "work"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1] == "trials=1 kills=4 mismatches=0", out.stdout + out.stderr


# ---------------------------------------------------------------------------- non-finite steps


def test_non_finite_step_is_not_applied():
    """A batch that reaches a NaN embedding row gives a NaN loss: no parameter and no optimizer
    state may change. A clean batch afterwards is applied as usual."""
    torch.manual_seed(0)
    lm = build_model("tiny", 64, 8)
    model = TSTModel(lm)
    cfg = Config()
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    runtime = Runtime(0, 1, torch.device("cpu"))
    stage = Stage("next-token", 1, "full", "uniform", 10)
    with torch.no_grad():
        lm.get_input_embeddings().weight[7] = float("nan")
    poisoned = torch.randint(8, 64, (2, 9))
    poisoned[1, 3] = 7  # [B, L+1]
    clean = torch.randint(8, 64, (2, 9))

    def params():
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    def moments():
        return [{k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters() if p in optimizer.state]

    before = params()
    result = train_step(model, optimizer, poisoned, stage, 0, 1e-3, cfg, runtime)
    assert not result.applied and not torch.isfinite(torch.tensor(result.loss))
    assert all(torch.equal(before[n].nan_to_num(), p.detach().nan_to_num()) for n, p in model.named_parameters())
    assert not optimizer.state  # AdamW never stepped

    result = train_step(model, optimizer, clean, stage, 0, 1e-3, cfg, runtime)
    assert result.applied and torch.isfinite(torch.tensor(result.loss))
    applied, state = params(), moments()
    assert any(not torch.equal(before[n].nan_to_num(), applied[n].nan_to_num()) for n in before)

    result = train_step(model, optimizer, poisoned, stage, 0, 1e-3, cfg, runtime)
    assert not result.applied
    assert all(torch.equal(applied[n].nan_to_num(), p.detach().nan_to_num()) for n, p in model.named_parameters())
    assert all(torch.equal(a[k], b[k]) for a, b in zip(state, moments()) for k in a)


def test_run_stops_after_max_bad_steps_keeping_last_good_checkpoint(small_data, tmp_path, capsys):
    """A learning rate of 1e30 makes step 1 blow the weights up to ~1e28 and every later
    gradient non-finite: steps 2-4 are skipped, the run stops, and the only checkpoint left is
    the one of step 1 (none is written inside a run of skipped steps, so none was rotated out)."""
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(run_args(small_data, run, "--optim.lr=1e30", "--optim.warmup_steps=0", "--train.checkpoint_every=1",
                      "--train.max_bad_steps=3", "--train.keep_checkpoints=2", "--train.steps=10"))
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "steps 2-4 had a non-finite loss or gradient and were skipped (train.max_bad_steps = 3)" in err
    assert f"the newest checkpoint, {run / 'checkpoints' / 'step-00000001'}, predates them" in err
    assert [(r["step"], r["applied"]) for r in records(run, "train")] == [(1, True), (2, False), (3, False), (4, False)]
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000001"]
    state = torch.load(run / "checkpoints" / "step-00000001" / "state.pt", weights_only=True)
    assert state["trainer"]["step"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values())


# ---------------------------------------------------------------------------- resume bookkeeping


def test_killed_before_first_checkpoint_starts_over(small_data, tmp_path):
    """A run killed before its first checkpoint restarts from step 0 and logs each step once."""
    run = tmp_path / "run"
    main(run_args(small_data, run, "--train.checkpoint_every=0"))
    uninterrupted = [r["loss"] for r in records(run, "train")]
    for path in (run / "checkpoints").iterdir():  # as if killed while writing the only checkpoint
        path.rename(path.with_name(".tmp-" + path.name))
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + '{"kind": "train", "st')
    main(run_args(small_data, run, "--train.checkpoint_every=0", "--resume", "auto"))
    assert len(records(run, "start")) == 1
    assert [r["loss"] for r in records(run, "train")] == uninterrupted


def test_resume_finished_run_and_partial_log_line(small_data, tmp_path):
    """Resuming from the final checkpoint re-exports without logging a second final eval, and a
    log line cut short by a kill is dropped."""
    run = tmp_path / "run"
    main(run_args(small_data, run, "--train.checkpoint_every=2"))
    evals = records(run, "eval")
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "eval", "step": 4, "val_lo')
    main(run_args(small_data, run, "--train.checkpoint_every=2", "--resume", "auto"))
    assert records(run, "eval") == evals
    assert len(records(run, "end")) == 1
