"""A run directory: its layout, and reading what a run wrote, without importing torch.

    RUN/config.toml       the resolved config
    RUN/metrics.jsonl     one JSON record per line (start, stage, resume, train, eval, failed, end)
    RUN/checkpoints/step-NNNNNNNN/   state.pt + manifest.json (superpose.checkpoint, superpose.integrity)
    RUN/model/            the Hugging Face export + manifest.json
    RUN/.lock             held by the process that writes the run (superpose.files.DirectoryLock)

A run killed while it appends to ``metrics.jsonl`` can leave its last line cut short; every
reader here skips such a line instead of failing on it.
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import Config, config_from_dict, read_toml
from .errors import ConfigError

CONFIG, METRICS, CHECKPOINTS, MODEL = "config.toml", "metrics.jsonl", "checkpoints", "model"


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
