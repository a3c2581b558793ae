"""Trackers mirror metrics.jsonl: TensorBoard scalars equal the JSONL values; W&B runs offline."""
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from superpose.config import load_config
from superpose.data import prepare, shakespeare_files
from superpose.tracking import scalars
from superpose.train import train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    prepare(out, inputs=[str(p) for p in shakespeare_files()[:2]], vocab_size=300, progress=False)
    return out


def run(data_dir, out, *extra, resume="never"):
    cfg = load_config(None, [f"--data.dir={data_dir}", "--data.seq_len=16", "--train.steps=6", "--train.batch_size=4",
                             "--train.eval_every=3", "--train.log_every=1", f"--train.out_dir={out}", "--tst.ratio=0.5",
                             "--train.progress=false", "--train.eval_tokens=256", "--optim.warmup_steps=1",
                             "--train.device=cpu", *extra])
    train(cfg, resume=resume)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_event_files_hold_the_metrics(data_dir, tmp_path):
    records = run(data_dir, tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/bag_size", "train/phase", "train/tokens_per_s",
            "eval/val_loss", "eval/val_bpb"} <= tags
    for tag in tags:
        expected = [(r["step"], scalars(r)[tag]) for r in records if tag in scalars(r)]
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in expected], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), tag
    assert [e.value for e in events.Scalars("train/bag_size")] == [4, 4, 4, 1, 1, 1]
    assert [e.value for e in events.Scalars("train/phase")] == [1, 1, 1, 2, 2, 2]
    assert [e.step for e in events.Scalars("eval/val_loss")] == [0, 3, 6]


def test_tensorboard_can_be_switched_off(data_dir, tmp_path):
    run(data_dir, tmp_path / "run", "--train.tensorboard=false", "--train.steps=1")
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_wandb_offline_run_without_account(data_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    run(data_dir, out, "--train.wandb=true", "--train.wandb_mode=offline", "--train.steps=2")
    run_id = (out / "wandb-id").read_text()
    [offline] = (out / "wandb").glob(f"offline-run-*-{run_id}")
    assert (offline / f"run-{run_id}.wandb").stat().st_size > 0
    # A resumed run logs into the same W&B run.
    run(data_dir, out, "--train.wandb=true", "--train.wandb_mode=offline", "--train.steps=2", resume="auto")
    assert (out / "wandb-id").read_text() == run_id
    assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1
