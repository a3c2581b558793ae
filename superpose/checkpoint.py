"""Checkpoints that survive a crash, and the export to an ordinary Hugging Face model directory.

A checkpoint is a directory ``checkpoints/step-NNNNNNNN/`` in one of two formats, chosen by
``train.checkpoint_format`` (``resolve_format``) and recognised from its files when it is read:
- gathered: one file, ``state.pt``, holding the full model and optimizer state keyed by
  parameter name, the trainer state (step, data position, RNG, last eval) and the resolved
  config. Rank 0 gathers and writes it: simple, and fine while the model fits one process.
- sharded (``superpose.sharded``): every rank writes its own shards with
  torch.distributed.checkpoint, rank 0 a small ``trainer.pt``. The default under FSDP and HSDP.
Either kind resumes under any strategy and world size (the sharded one through DCP's
resharding), and ``superpose.export.export_checkpoint`` turns either into a model directory.

Both are written into a hidden temporary directory, fsynced, listed with each file's size and
SHA-256 in ``manifest.json`` (``superpose.integrity``) and renamed into place by rank 0 after
every rank has written its part, so a directory named ``step-*`` was complete when written; it
is verified against its manifest before it is loaded, so one damaged since is never trained
on. Every rank reads it from the run directory (a filesystem shared by the nodes).
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .distributed import Runtime, all_gather_object, broadcast_object, on_main, raise_together, shards_parameters
from .errors import CheckpointError, ConfigError
from .files import atomic_write, fsync_dir
from .integrity import MANIFEST, NO_MANIFEST, HashingWriter, find_damage, write_manifest
from .runs import ABANDONED, CHECKPOINTS, STATE_FILE, TRAINER_FILE, checkpoint_dirs, checkpoint_step, require_checkpoint
from .sharded import ShardedWriter, is_sharded, load_sharded

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


def resolve_format(checkpoint_format: str, runtime: Runtime, strategy: str) -> str:
    """``train.checkpoint_format``: ``auto`` is sharded where the model is (FSDP, HSDP on > 1 rank), else gathered."""
    if checkpoint_format != "auto":
        return checkpoint_format
    return "sharded" if shards_parameters(runtime, strategy) else "gathered"


def select_checkpoint(run_dir: Path, resume: str, runtime: Runtime) -> tuple[Path | None, list[dict]]:
    """The checkpoint to resume from, and the newer ones rejected because they failed verification.

    ``never``: none. ``auto``: the newest that verifies (older ones are tried in turn; an error if
    there are checkpoints but none verifies). A directory: that one, which must verify; one
    without a manifest (written before checksums existed) is loaded with a warning. Collective:
    rank 0 reads and hashes, the others receive its choice."""
    return broadcast_object(on_main(runtime, lambda: _select(Path(run_dir), resume), CheckpointError))


def _select(run_dir: Path, resume: str) -> tuple[Path | None, list[dict]]:
    if resume == "never":
        return None, []
    if resume != "auto":
        return verified(Path(resume), "--resume", run_dir / CHECKPOINTS / "step-00000100"), []
    rejected = []
    for path in reversed(checkpoint_dirs(run_dir)):
        found = find_damage(path)
        if found is None:
            return path, rejected
        print(f"superpose: warning: checkpoint {path} failed verification ({found}); trying the one before", file=sys.stderr)
        rejected.append({"checkpoint": str(path), "problem": found})
    if rejected:
        raise CheckpointError(
            f"no checkpoint of {run_dir} verifies (newest: {rejected[0]['checkpoint']}: {rejected[0]['problem']}); "
            "move the checkpoints directory away to start over, or restore it from a copy"
        )
    return None, []


def set_aside_newer(run_dir: Path, step: int) -> list[str]:
    """Move the run's checkpoints after ``step``, the one it resumes from, into
    ``abandoned-checkpoints/<UTC time>/``; returns their new paths.

    They belong to a timeline the run has left (a deliberate ``--resume DIR`` back, or checkpoints
    that failed verification). Left in place, retention would keep them over the new ones (it keeps
    the highest steps) and a later ``--resume auto`` would continue the abandoned timeline."""
    newer = [path for path in checkpoint_dirs(run_dir) if checkpoint_step(path) > step]
    if not newer:
        return []
    root = Path(run_dir) / ABANDONED
    aside = root / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"
    try:
        aside.mkdir(parents=True)
        for path in newer:
            os.replace(path, aside / path.name)
    except OSError as err:
        raise CheckpointError(f"cannot move the checkpoints after step {step} out of the way into {root}: {err}") from None
    print(f"superpose: warning: resuming from step {step}: moved the later checkpoints "
          f"({', '.join(path.name for path in newer)}) to {aside}, out of this run's way", file=sys.stderr)
    return [str(aside / path.name) for path in newer]


def verified(path: Path, what: str, example: Path) -> Path:
    """``path``, a checkpoint directory that verifies (one without a manifest: with a warning)."""
    require_checkpoint(path, what, example)
    found = find_damage(path)
    if found == NO_MANIFEST and is_sharded(path):  # every sharded checkpoint was written with one
        raise CheckpointError(f"checkpoint {path} has lost its {MANIFEST}, so its shards cannot be checked; "
                              "pass an older checkpoint directory")
    if found == NO_MANIFEST:
        print(f"superpose: warning: {path} has no {MANIFEST} (written before checkpoints had checksums); "
              "loading it unverified", file=sys.stderr)
    elif found is not None:
        raise CheckpointError(f"checkpoint {path} failed verification: {found}; pass an older checkpoint directory")
    return path


class Checkpoints:
    """The writer of a run's checkpoints in one format; holds the asynchronous save in flight.

    Collective: every rank calls ``save`` and ``wait``. A save publishes its directory (manifest,
    rename, retention) once every rank's part is on disk: at once, or with ``asynchronous``
    (sharded only) in the next ``save`` or ``wait``, so the loop goes on while the shards are
    written."""

    def __init__(self, run_dir: Path, checkpoint_format: str, keep: int, asynchronous: bool, runtime: Runtime,
                 every: int = 0):
        if asynchronous and checkpoint_format != "sharded":  # "auto" on one process or under DDP
            raise ConfigError("train.async_checkpoint needs sharded checkpoints, and train.checkpoint_format = 'auto' "
                              "gives gathered ones here (sharded only under FSDP/HSDP); set train.checkpoint_format = 'sharded'")
        self.root, self.format, self.keep, self.runtime = Path(run_dir) / CHECKPOINTS, checkpoint_format, keep, runtime
        self.sharded = ShardedWriter(asynchronous) if checkpoint_format == "sharded" else None
        self.pending = None  # (step, rank 0's manifest entries, future of this rank's) of the save in flight
        self.every = every  # a periodic checkpoint every this many steps (0: only at the end or when stopped)

    def due(self, done: int, steps: int, stopping: bool, healthy: bool) -> bool:
        """After the last step, when the run stops, and every ``every`` steps, but not inside a run of
        skipped (non-finite) steps: the newest ``keep`` checkpoints stay ones from good steps."""
        return done == steps or stopping or bool(self.every and done % self.every == 0 and healthy)

    def save(self, step: int, model: nn.Module, optimizer, trainer_state: dict) -> None:
        """Checkpoint ``step``, after publishing the save before it (so one is in flight at most)."""
        self.wait()
        if self.format == "gathered":
            state = {"model": get_model_state_dict(model, options=_GATHER),
                     "optimizer": get_optimizer_state_dict(model, optimizer, options=_GATHER), "trainer": trainer_state}
            on_main(self.runtime, lambda: self._publish(step, self._write(step, STATE_FILE, state)), CheckpointError)
            return
        # rank 0 makes the temporary directory (and writes trainer.pt); every rank then writes its shards into it
        entries = on_main(self.runtime, lambda: self._write(step, TRAINER_FILE, trainer_state), CheckpointError) or {}
        self.pending = (step, entries, self.sharded.start(self._tmp(step), model, optimizer))
        if not self.sharded.asynchronous:
            self.wait()

    def wait(self) -> None:
        """Publish the save in flight, if any, once its write is complete; a failed write is a
        ``CheckpointError`` on every rank and leaves the earlier checkpoints as they were."""
        if self.pending is None:
            return
        (step, entries, future), self.pending = self.pending, None
        error = None
        try:
            share = future.result()
        except (Exception, CheckpointException) as err:  # any rank's failure, on every rank: none waits alone
            error = write_failed(self._tmp(step), f"checkpoint {self._final(step)}", _write_reason(err),
                                 "earlier checkpoints are intact")
            share = {}
        raise_together(error)
        for part in all_gather_object(share):
            entries.update(part)
        on_main(self.runtime, lambda: self._publish(step, entries), CheckpointError)

    def close(self) -> None:
        """Publish the save in flight and stop the background writer."""
        self.wait()
        if self.sharded is not None:
            self.sharded.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """After an error (or a second Ctrl-C) in the run: wait for the write in flight without
        publishing it (the next save removes its temporary directory), then stop the writer."""
        if self.pending is not None:
            future, self.pending = self.pending[2], None
            try:
                future.result()
            except (Exception, CheckpointException):
                pass
        if self.sharded is not None:
            self.sharded.close()

    def _final(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def _tmp(self, step: int) -> Path:
        return self.root / f".tmp-step-{step:08d}"

    def _write(self, step: int, name: str, state: dict) -> dict[str, dict]:
        """Rank 0: a fresh temporary directory holding ``name``; its manifest entry."""
        tmp = self._tmp(step)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step-*"):  # left by a process killed while writing
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
            with atomic_write(tmp / name, "wb") as handle:
                writer = HashingWriter(handle)  # the checksum costs no second read of the file
                _save(state, writer)
        except OSError as err:
            raise write_failed(tmp, f"checkpoint {self._final(step)}", err, "earlier checkpoints are intact") from None
        return {name: writer.entry()}

    def _publish(self, step: int, entries: dict[str, dict]) -> None:
        """Rank 0: manifest, rename into place, drop the oldest beyond ``keep``."""
        tmp, final = self._tmp(step), self._final(step)
        try:
            write_manifest(tmp, entries)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(self.root)
        except OSError as err:
            raise write_failed(tmp, f"checkpoint {final}", err, "earlier checkpoints are intact") from None
        for old in checkpoint_dirs(self.root.parent)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def _cause(err: BaseException) -> BaseException:
    """The first ``OSError`` behind DCP's ``CheckpointException`` (which wraps each rank's error), else its first error."""
    if isinstance(err, CheckpointException):
        causes = [failure[0] if isinstance(failure, tuple) else failure for failure in err.failures.values()]
        return next((c for c in causes if isinstance(c, OSError)), causes[0] if causes else err)
    return err


def _write_reason(err: BaseException) -> str:
    """Why a DCP write failed, in words. A full disk (or quota, or file-size limit) cuts a write
    short; torch.save's zip writer, which DCP writes through, then reports only the position."""
    cause = _cause(err)
    if isinstance(cause, OSError):
        return cause.strerror or str(cause)
    if "unexpected pos" in str(cause):
        return "the file system took only part of a write: a full disk, a quota or a file-size limit"
    return _first_line(cause)


def write_failed(tmp: Path, what: str, err: Exception | str, intact: str,
                 advice: str = "free disk space (or lower train.keep_checkpoints) and resume with --resume auto",
                 ) -> CheckpointError:
    """Remove the partial ``tmp`` and say what to do; a full disk is the usual cause."""
    shutil.rmtree(tmp, ignore_errors=True)
    return CheckpointError(f"could not write {what} ({getattr(err, 'strerror', None) or err}); {intact}: {advice}")


def _save(state: dict, writer: HashingWriter) -> None:
    try:
        torch.save(state, writer)
    except RuntimeError:  # torch.save's writer hides the errno of a full disk
        if writer.error is None:
            raise
        raise writer.error from None


def load_checkpoint(path: Path, model: nn.Module, optimizer) -> dict:
    """Restore model and optimizer in place (any strategy, either format: the files say which)
    and return the trainer state. Collective. ``path`` comes from ``select_checkpoint``, which verified it."""
    path = Path(path)
    try:
        if is_sharded(path):
            state = {"trainer": _read(path / TRAINER_FILE)}
            load_sharded(path, model, optimizer)
        else:
            state = _read(path / STATE_FILE)
            set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=True))
            set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    except (KeyError, RuntimeError, ValueError, CheckpointException) as err:
        first = _first_line(_cause(err))
        raise CheckpointError(f"checkpoint {path} does not fit this model ({first}); "
                              "it was written for another model config") from None
    return state["trainer"]


def _read(file: Path) -> dict:
    """A checkpoint's torch.save file; mmap: the ranks of one node share its pages instead of each holding a copy."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a damaged file can fail in many ways inside the unpickler
        raise CheckpointError(
            f"checkpoint {file.parent} cannot be read ({_first_line(err)}); delete it to resume from the one before, "
            "or pass --resume with an older checkpoint directory"
        ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
