"""Trackers mirror metrics.jsonl: TensorBoard scalars equal the JSONL values; W&B runs offline."""
import json
import shutil

import pytest
from conftest import tiny_overrides
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from superpose.config import load_config
from superpose.schedule import build_stages, stage_at
from superpose.tracking import scalars
from superpose.train import train


def run(data_dir, out, *extra, resume="never"):
    cfg = load_config(None, tiny_overrides(data_dir, out, **{"train.steps": 6, "train.eval_every": 3, "tst.ratio": 0.5,
                                                             "train.eval_tokens": 256, "train.device": "cpu"}) + list(extra))
    train(cfg, resume=resume)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_tensorboard(run_dir, records):
    events = EventAccumulator(str(run_dir / "tensorboard"))
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


def test_tensorboard_event_files_hold_the_metrics(small_data, tmp_path):
    out = tmp_path / "run"
    check_tensorboard(out, run(small_data, out, "--train.checkpoint_every=3"))
    # A run killed after step 6 but before its checkpoint resumes from step 3: the events the
    # killed run wrote after step 3 are purged, so every step appears once.
    shutil.rmtree(out / "checkpoints" / "step-00000006")
    check_tensorboard(out, run(small_data, out, "--train.checkpoint_every=3", resume="auto"))


def test_tensorboard_can_be_switched_off(small_data, tmp_path):
    run(small_data, tmp_path / "run", "--train.tensorboard=false", "--train.steps=1")
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_wandb_offline_run_without_account(small_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    run(small_data, out, "--train.wandb=true", "--train.wandb_mode=offline", "--train.steps=2")
    run_id = (out / "wandb-id").read_text()
    [offline] = (out / "wandb").glob(f"offline-run-*-{run_id}")
    assert (offline / f"run-{run_id}.wandb").stat().st_size > 0
    # A resumed run logs into the same W&B run.
    run(small_data, out, "--train.wandb=true", "--train.wandb_mode=offline", "--train.steps=2", resume="auto")
    assert (out / "wandb-id").read_text() == run_id
    assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1


def test_curriculum_and_blend_steps_get_a_phase_scalar():
    """Stage.phase, not the stage's name, gives train/phase: a curriculum's stages are all phase 1."""
    cfg = load_config(None, ["--tst.curriculum=[[4, 0.2], [2, 0.2]]", "--tst.blend_steps=4", "--train.steps=40"])
    stages = build_stages(cfg.tst, cfg.train.steps)  # s=4 for steps 0-7, s=2 for 8-11, blend 12-15, then next-token
    steps = [stage_at(stages, step) for step in range(40)]
    assert {s.name for s in steps} == {"superposition-1", "superposition-2", "blend", "next-token"}
    phases = [scalars({"kind": "train", "step": i + 1, "stage": s.name, "phase": s.phase, "loss": 1.0})["train/phase"]
              for i, s in enumerate(steps)]
    assert phases[:12] == [1.0] * 12 and phases[16:] == [2.0] * 24
    assert set(phases[12:16]) == {1.5, 2.0}  # the blend's bag steps, and its next-token steps
