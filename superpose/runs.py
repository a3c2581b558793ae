"""A run directory: its layout, and reading what a run wrote, without importing torch.

    RUN/config.toml       the resolved config
    RUN/metrics.jsonl     one JSON record per line (start, stage, resume, train, eval, failed, end)
    RUN/checkpoints/step-NNNNNNNN/   a checkpoint + manifest.json (superpose.checkpoint, superpose.integrity):
                          gathered: state.pt; sharded: trainer.pt + DCP's .metadata and *.distcp (superpose.sharded)
    RUN/model/            the Hugging Face export + manifest.json
    RUN/.lock             held by the process that writes the run (superpose.files.DirectoryLock)

``metrics.jsonl`` holds one JSON object per line; ``kind`` says which, ``step`` is the number of
steps done when it was written:
    start    parameters, active_matmul_parameters, flops_per_step, positions_per_step, world_size, stages
    stage    stage, bag_size, mode (the first step of a stage)
    resume   checkpoint, rejected: [{checkpoint, problem}] (newer checkpoints that failed verification)
    train    stage, phase, bag_size, loss, lr, grad_norm, applied, tokens_seen, tokens_per_s, step_seconds, elapsed
    eval     val_loss, val_bpb, tokens_seen, elapsed, flops (+ diagnostics of a superposition stage)
    failed   error (the run stopped: non-finite losses)
    end      val_loss, val_bpb, tokens_seen, elapsed, stages, steps
A run killed while it appends to ``metrics.jsonl`` can leave its last line cut short; every
reader here skips such a line instead of failing on it. ``MetricsLog`` is the one writer.
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import Config, config_from_dict, read_toml
from .errors import ConfigError
from .files import atomic_write_text

CONFIG, METRICS, CHECKPOINTS, MODEL = "config.toml", "metrics.jsonl", "checkpoints", "model"
STATE_FILE = "state.pt"  # of a gathered checkpoint (written and read by superpose.checkpoint)
TRAINER_FILE = "trainer.pt"  # of a sharded checkpoint, beside DCP's files (superpose.sharded)
CHECKPOINT_FILES = (STATE_FILE, TRAINER_FILE)  # a directory holding one of them is a checkpoint

# Keys that may change when a run is resumed: they do not alter the trained model.
RESUME_SAFE_KEYS = {
    "train.out_dir", "train.eval_every", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.progress", "train.max_bad_steps", "train.device", "train.micro_batch_size",
    "distributed.strategy", "train.tensorboard", "train.wandb", "train.wandb_project", "train.wandb_mode",
    "train.compile", "model.loss_chunk_size", "train.threads", "train.checkpoint_format", "train.async_checkpoint",
}


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run, oldest first: every ``step-N`` directory (temporary ones are hidden
    and skipped). Whether one is still intact is ``superpose.integrity.problem``'s to say."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def read_records(run_dir: str | Path) -> list[dict]:
    """Every record of ``metrics.jsonl`` in order; a cut-off last line is skipped, any other bad line is an error."""
    path = Path(run_dir) / METRICS
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break  # the last line of a killed run may be cut off
            raise ConfigError(f"{path}:{number} is not valid JSON") from None
    return records


def logged_step(run_dir: str | Path) -> int:
    """The newest step with a ``train`` record (0 before the first), readable while the run writes."""
    if not (Path(run_dir) / METRICS).is_file():
        return 0
    return max((r["step"] for r in read_records(run_dir) if r.get("kind") == "train"), default=0)


def is_finished(run_dir: str | Path) -> bool:
    """Does ``run_dir`` hold a run that logged its ``end`` record (among its last three)?"""
    if not (Path(run_dir) / METRICS).is_file():
        return False
    return any(r.get("kind") == "end" for r in read_records(run_dir)[-3:])


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config a run saved (``config.toml``)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no {CONFIG})")
    return config_from_dict(read_toml(path))


class MetricsLog:
    """The writer of ``metrics.jsonl`` (the schema is this module's docstring); records are mirrored to ``trackers``."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None, trackers: list = ()):
        """``resume_step=None`` starts the log afresh (a killed run without a checkpoint starts over)."""
        self.path, self.enabled, self.trackers = path, enabled, trackers
        if enabled and resume_step is not None and path.exists():
            # Drop what a killed run logged after the checkpoint we resume from, and a last line
            # that the kill cut short.
            keep = [line for line in path.read_text().splitlines() if _before(_parse(line), resume_step)]
            atomic_write_text(path, "".join(line + "\n" for line in keep))
        self.handle = open(path, "a" if resume_step is not None else "w") if enabled else None

    def write(self, record: dict) -> None:
        """Append one record and flush, so a killed run loses at most the line being written."""
        if self.handle:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()
        for tracker in self.trackers:
            tracker.write(record)

    def close(self) -> None:
        if self.handle:
            self.handle.close()
        for tracker in self.trackers:
            tracker.close()


def _parse(line: str) -> dict | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _before(record: dict | None, step: int) -> bool:
    """Was this record logged before the checkpoint of ``step`` was written?"""
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return False
    return record["step"] < step or (record["step"] == step and record.get("kind") in ("start", "train", "eval"))
