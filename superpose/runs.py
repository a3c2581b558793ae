"""A run directory: its layout, the writer and readers of what a run wrote, and ``Run``, a finished
run read for analysis (its config, curves and stages), all without importing torch.

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

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import tomli_w

from .config import AUTO_KEYS, SHORTHAND, Config, config_from_dict, read_toml
from .errors import CheckpointError, ConfigError
from .files import atomic_write_text, dir_kind
from .schedule import Stage, has_superposition

if TYPE_CHECKING:  # numpy (through stats) is imported where a run is analysed: a wrong path answers at once
    import numpy as np

    from .stats import Curve

CONFIG, METRICS, CHECKPOINTS, MODEL = "config.toml", "metrics.jsonl", "checkpoints", "model"
STATE_FILE = "state.pt"  # of a gathered checkpoint (written and read by superpose.checkpoint)
TRAINER_FILE = "trainer.pt"  # of a sharded checkpoint, beside DCP's files (superpose.sharded)
CHECKPOINT_FILES = (STATE_FILE, TRAINER_FILE)  # a directory holding one of them is a checkpoint
ABANDONED = "abandoned-checkpoints"  # checkpoints after the one a run resumed from (superpose.checkpoint.set_aside_newer)

# Keys that may change when a run is resumed: they do not alter the trained model.
RESUME_SAFE_KEYS = {
    "train.out_dir", "train.eval_every", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.progress", "train.max_bad_steps", "train.device", "train.micro_batch_size",
    "distributed.strategy", "train.tensorboard", "train.wandb", "train.wandb_project", "train.wandb_mode",
    "train.compile", "model.loss_chunk_size", "train.threads", "distributed.shard_size", "train.activation_checkpointing",
    "train.checkpoint_format", "train.async_checkpoint",
}


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run, oldest first: every ``step-N`` directory (temporary ones are hidden
    and skipped). Whether one is still intact is ``superpose.integrity.find_damage``'s to say."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint directory ``step-NNNNNNNN``."""
    return int(path.name[5:])


def require_checkpoint(path: str | Path, what: str, example: Path) -> Path:
    """``path`` if it is a checkpoint directory (holds one of ``CHECKPOINT_FILES``), else a one-line error."""
    path = Path(path)
    if not any((path / name).is_file() for name in CHECKPOINT_FILES):
        raise CheckpointError(
            f"{what} {path}: expected {'never, auto, or ' if what == '--resume' else ''}a checkpoint directory "
            f"(one holding {' or '.join(CHECKPOINT_FILES)}, e.g. {example})"
        )
    return path


def arm_dirs(path: str | Path) -> list[Path]:
    """The run directories of a comparison or sweep directory (``compare``/``sweep``'s train.out_dir),
    the baseline first; [] for any other directory."""
    path = Path(path)
    if dir_kind(path) != "comparison":
        return []
    arms = sorted(p for p in path.iterdir() if p.is_dir() and (p / METRICS).is_file())
    return sorted(arms, key=lambda p: p.name != "baseline")


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


def write_run_config(run_dir: str | Path, cfg: Config) -> None:
    """Save the resolved config as the run's ``config.toml``, its stage list written out
    (``tst.stages``: the tables the shorthand expands to, when it was not given literally)."""
    resolved = cfg.to_dict()
    resolved["tst"]["stages"] = [dataclasses.asdict(table) for table in cfg.tst.stages]
    atomic_write_text(Path(run_dir) / CONFIG, tomli_w.dumps(resolved))


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


# ---------------------------------------------------------------------------- a run, read for analysis


def stage_bag_sizes(stages: list[Stage]) -> list[int]:
    """The bag sizes of the superposition stages in order (a curriculum has several)."""
    return [size for size, _ in itertools.groupby(s.bag_size for s in stages if s.phase != "next-token")]


def switch_step(stages: list[Stage]) -> int | None:
    """First step of next-token training after superposition; None for a baseline or a run that never switches."""
    return next((a.end_step for a, b in zip(stages, stages[1:]) if b.phase == "next-token" and a.phase != "next-token"), None)


def method_name(stages: list[Stage], steps: int) -> str:
    """"baseline", or the bag sizes of the superposition stages, the switch as a fraction r of the
    ``steps`` and the ablation mode when it is not full TST: ``s=4, r=0.3``, ``s=2, r=0.2, output-only``."""
    sizes = stage_bag_sizes(stages)
    if not sizes:
        return "baseline"
    switch = switch_step(stages)
    switch = steps if switch is None else switch
    modes = [s.mode for s in stages if s.phase != "next-token"]
    mode = "" if set(modes) == {"full"} else f", {'/'.join(dict.fromkeys(modes))}-only"
    return f"s={'->'.join(map(str, sizes))}, r={switch / steps:g}{mode}"


@dataclass
class Run:
    """One run directory: its config and the records of its (last) ``metrics.jsonl`` history."""

    name: str
    path: Path
    config: Config
    start: dict
    evals: list[dict]
    trains: list[dict]
    ended: bool
    curve: Curve = field(init=False)
    stages: list[Stage] = field(init=False)

    def __post_init__(self):
        from .stats import Curve

        self.curve = Curve.from_evals(self.evals)
        self.stages = [Stage.from_record(s) for s in self.start["stages"]]

    @property
    def switch_step(self) -> int | None:
        return switch_step(self.stages)

    @property
    def framework(self) -> str:
        """The trainer that wrote the run: superpose's own, or torchtitan (``superpose.torchtitan``)."""
        return self.start.get("framework", "superpose")

    @property
    def is_baseline(self) -> bool:
        return all(s.phase == "next-token" for s in self.stages)

    @property
    def bag_sizes(self) -> list[int]:
        return stage_bag_sizes(self.stages)

    @property
    def ratio(self) -> float:
        """The fraction of steps before the switch to next-token training (0 for a baseline)."""
        if self.is_baseline:
            return 0.0
        switch = self.switch_step if self.switch_step is not None else self.config.train.steps
        return switch / self.config.train.steps

    @property
    def method(self) -> str:
        return method_name(self.stages, self.config.train.steps)

    @property
    def label(self) -> str:
        return self.name if self.is_baseline else f"{self.name} ({self.method})"

    def at_step(self, key: str, step: float) -> float | None:
        """``elapsed`` or ``tokens_seen`` at a step, interpolated over every train and eval record."""
        from .stats import value_at

        points = sorted({r["step"]: r[key] for r in self.trains + self.evals}.items())
        return value_at([p[0] for p in points], [p[1] for p in points], step)

    def train_series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """Logged training records as (step, value) arrays; skipped (non-finite) steps dropped."""
        import numpy as np

        rows = [(r["step"], r[key]) for r in self.trains if r.get("applied", True) and math.isfinite(r[key])]
        return np.array([r[0] for r in rows], dtype=float), np.array([r[1] for r in rows], dtype=float)


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read a run directory written by ``superpose train``; a clear error if it holds no usable run."""
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"{path} is not a run directory (no metrics.jsonl)")
    config = load_run_config(path)
    records = read_records(path)
    starts = [i for i, r in enumerate(records) if r["kind"] == "start"]
    if not starts:
        raise ConfigError(f"{metrics} has no start record")
    records = records[starts[-1]:]  # a run restarted from scratch appends a new history
    # A run resumed from its final checkpoint validates the last step again: keep one point per step.
    evals = sorted({r["step"]: r for r in records if r["kind"] == "eval"}.values(), key=lambda r: r["step"])
    if len(evals) < 2:
        raise ConfigError(f"{path} has {len(evals)} validation point(s); a report needs at least 2")
    return Run(
        name=name or path.name,
        path=path,
        config=config,
        start=records[0],
        evals=evals,
        trains=[r for r in records if r["kind"] == "train"],
        ended=any(r["kind"] == "end" for r in records),
    )


def non_embedding_parameters(run: Run) -> int:
    """The run's parameters less the input embedding and an untied output head (the count that
    places a run on the regime map), from its exported model's ``config.json``; the total if it
    exported none."""
    total = int(run.start["parameters"])
    path = run.path / MODEL / "config.json"
    if not path.is_file():
        return total
    config = json.loads(path.read_text())
    config = config.get("text_config") or config  # a multimodal config nests the language model's
    tied = config.get("tie_word_embeddings", True)  # the transformers default
    return total - config["vocab_size"] * config["hidden_size"] * (1 if tied else 2)


def config_diff(before: Config, after: Config, skip: set[str] = frozenset()) -> list[str]:
    """Where two configs differ ("section.key: a -> b"), outside ``skip`` (keys and whole sections).
    [tst] counts as the stages it gives: between two plain next-token runs (no superposition stage)
    it makes no difference, and a stage list counts, not how it was written (a list or the
    shorthand it expands to); other stages written in the shorthand name the shorthand keys that
    differ, not the whole list. A key of ``AUTO_KEYS`` still "auto" in ``after`` matches the value
    ``before`` resolved it to (train checks again once it has resolved them for its device)."""
    plain = not has_superposition(before.tst, before.train.steps) and not has_superposition(after.tst, after.train.steps)
    same_stages = before.tst.stages == after.tst.stages
    stage_keys = {f"tst.{name}" for name in (*SHORTHAND, "stages")}
    old, new = before.to_dict(), after.to_dict()
    changes = [
        (f"{section}.{key}", f"{section}.{key}: {old[section][key]!r} -> {value!r}")
        for section, values in new.items() if section not in skip and not (plain and section == "tst")
        for key, value in values.items()
        if f"{section}.{key}" not in skip and old[section][key] != value
        and not (same_stages and f"{section}.{key}" in stage_keys) and not (value == "auto" and f"{section}.{key}" in AUTO_KEYS)
    ]
    shorthand = any(key in stage_keys - {"tst.stages"} for key, _ in changes)
    return [text for key, text in changes if not (shorthand and key == "tst.stages")]


def config_changes(saved: dict, cfg: Config) -> list[str]:
    """Keys (outside ``RESUME_SAFE_KEYS``) where ``cfg`` differs from a run's saved config. A key the
    saved config lacks (a run saved before the key existed) counts as its default value."""
    return config_diff(config_from_dict(saved), cfg, RESUME_SAFE_KEYS)


def check_resume_config(saved: dict, cfg: Config) -> None:
    """Refuse to resume with a config that would change the run (``--allow-config-change`` skips)."""
    try:
        changed = config_changes(saved, cfg)
    except ConfigError as err:  # e.g. a key this version does not know
        raise ConfigError(f"the checkpoint's config cannot be checked ({err}); "
                          "pass --allow-config-change to resume anyway") from None
    if changed:
        raise ConfigError(
            "resuming with a config that changes the run (" + "; ".join(changed) + "); "
            "restore the saved config or pass --allow-config-change"
        )


def config_differences(reference: Config, other: Config, ignore_tst: bool = True) -> list[str]:
    """Keys that make two runs not comparable; logging, output directory and (by default) the [tst]
    section are ignored. Data directories count as equal when their ``meta.json`` files are
    identical (the same prepared data under two paths)."""
    skip = RESUME_SAFE_KEYS | {"train.out_dir", "train.eval_every"} | ({"tst"} if ignore_tst else set())
    if _same_data(reference, other):
        skip |= {"data.dir", "data.corpus", "data.vocab_size"}
    return config_diff(reference, other, skip)


def _same_data(a: Config, b: Config) -> bool:
    meta_a, meta_b = Path(a.data.dir) / "meta.json", Path(b.data.dir) / "meta.json"
    return meta_a.is_file() and meta_b.is_file() and meta_a.read_text() == meta_b.read_text()
