"""Experiment trackers fed by ``metrics.jsonl``: TensorBoard event files and Weights & Biases.

Every numeric field of a ``train`` or ``eval`` record becomes a scalar ``<kind>/<field>`` at the
record's step (``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/bag_size``,
``train/tokens_per_s``, ``eval/val_loss``, ``eval/val_bpb``, ...), plus ``train/phase`` from the
record's ``Stage.phase`` (1 = superposition, any stage of a curriculum; 1.5 = the bag steps of a
blend; 2 = next-token). The JSONL stays the run's record; trackers only mirror it.

Defaults: TensorBoard on (a local file under ``RUN/tensorboard``, no account, no network; view
with ``tensorboard --logdir RUN``), W&B off (``train.wandb = true``; ``train.wandb_mode =
"offline"`` works without an account and is uploaded later with ``wandb sync``).
"""
from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

from .config import Config, ConfigError

PHASES = {"superposition": 1, "blend": 1.5, "next-token": 2}  # Stage.phase -> the train/phase scalar


def scalars(record: dict) -> dict[str, float]:
    """The scalars a tracker shows for one metrics record (empty for start/stage/end records)."""
    kind = record.get("kind")
    if kind not in ("train", "eval"):
        return {}
    values = {
        f"{kind}/{key}": float(value)
        for key, value in record.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    phase = record.get("phase", record.get("stage"))  # runs logged before records named their phase
    if phase in PHASES:
        values[f"{kind}/phase"] = float(PHASES[phase])
    return values


class TensorBoard:
    """Event files in ``log_dir``; a resumed run purges the events a killed run wrote after its checkpoint."""

    def __init__(self, log_dir: Path, cfg: Config, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # Readers replay event files in name order, and a name starts with the creation second:
        # a writer opened in the same second as the previous one (a fast restart) could sort
        # before it, so wait for the next second.
        newest = max((int(p.name.split(".")[3]) for p in Path(log_dir).glob("events.out.tfevents.*")), default=0)
        while int(time.time()) <= newest:
            time.sleep(0.05)
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        if purge_step is None:
            self.writer.add_text("config", "```\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```", 0)

    def write(self, record: dict) -> None:
        values = scalars(record)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, record["step"])
        if values:
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """One W&B run per run directory: its id is kept in ``RUN/wandb-id`` so that a resume continues it."""

    def __init__(self, run_dir: Path, cfg: Config):
        try:
            import wandb
        except ImportError:
            raise ConfigError("train.wandb = true needs the wandb package: pip install 'superpose[wandb]'") from None
        id_file = run_dir / "wandb-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        try:
            self.run = wandb.init(project=cfg.train.wandb_project, name=run_dir.name, id=run_id, resume="allow",
                                  dir=str(run_dir), config=cfg.to_dict(), mode=cfg.train.wandb_mode)
        except wandb.errors.UsageError as err:
            raise ConfigError(f"W&B could not start ({err}); run `wandb login` or set train.wandb_mode = \"offline\"") from None

    def write(self, record: dict) -> None:
        values = scalars(record)
        if values:
            self.run.log(values, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_trackers(cfg: Config, run_dir: Path, enabled: bool, resume_step: int | None) -> list:
    """The trackers ``cfg.train`` asks for (none on ranks other than 0)."""
    if not enabled:
        return []
    trackers = []
    if cfg.train.tensorboard:
        purge = None if resume_step is None else resume_step + 1  # records of resume_step itself are kept
        trackers.append(TensorBoard(run_dir / "tensorboard", cfg, purge))
    if cfg.train.wandb:
        trackers.append(WandB(run_dir, cfg))
    return trackers
