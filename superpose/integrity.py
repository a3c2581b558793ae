"""Manifests: what a directory the run wrote holds, checked before anything in it is trusted.

A shared filesystem can hand back a file that is complete and the right size but holds other
bytes (a flipped block, a bad disk, a copy gone wrong). Every checkpoint and every exported model
directory therefore gets ``manifest.json``, written last: each file's size and SHA-256. Nothing
is loaded from a checkpoint that does not verify. SHA-256 because it is strong and, with the
SHA extensions of current x86 and ARM CPUs, the fastest strong hash in ``hashlib`` (1.5 GiB/s
per core here, BLAKE2b 0.64 GiB/s). A gathered checkpoint's state file is hashed as it is written
(no second read), a sharded one's files by all ranks together after the write; verification
reads every byte once.

This module owns the manifest format: its writer and its reader.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import ConfigError
from .files import LOCK_FILE, MARKER, atomic_write_text
from .runs import CHECKPOINT_FILES, CHECKPOINTS, CONFIG, METRICS, MODEL, arm_dirs, checkpoint_dirs

MANIFEST = "manifest.json"
NO_MANIFEST = f"{MANIFEST} is missing"  # what ``find_damage`` says of a directory without one
ALGORITHM = "sha256"
_CHUNK = 1 << 20


class HashingWriter:
    """A binary file handle that hashes what passes through it, for ``torch.save``.

    It also remembers the ``OSError`` (disk full, quota) that torch.save's writer would turn
    into a RuntimeError without an errno, so the caller can report the real cause."""

    def __init__(self, handle):
        self.handle, self.error = handle, None
        self.hash, self.size = hashlib.new(ALGORITHM), 0

    def write(self, data) -> int:
        try:
            written = self.handle.write(data)
        except OSError as err:
            self.error = err
            raise
        self.hash.update(data)
        self.size += len(data)
        return written

    def flush(self) -> None:
        self.handle.flush()

    def entry(self) -> dict:
        return {"size": self.size, ALGORITHM: self.hash.hexdigest()}


def file_entry(path: Path) -> dict:
    """Size and digest of one file, read in 1 MiB blocks."""
    digest, size = hashlib.new(ALGORITHM), 0
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
            size += len(block)
    return {"size": size, ALGORITHM: digest.hexdigest()}


def _files(directory: Path) -> list[str]:
    """Every regular file under ``directory`` but the manifest and superpose's own lock and marker
    (which carry no data; the lock's content changes), as sorted relative POSIX paths."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name not in (MANIFEST, LOCK_FILE, MARKER))


def write_manifest(directory: str | Path, known: dict[str, dict] | None = None) -> None:
    """List every file of ``directory`` with its size and digest, fsynced; call it last.

    ``known`` holds entries computed while the files were written (``HashingWriter.entry``);
    the other files are read back and hashed."""
    directory, known = Path(directory), known or {}
    files = {name: known.get(name) or file_entry(directory / name) for name in _files(directory)}
    atomic_write_text(directory / MANIFEST, json.dumps({"algorithm": ALGORITHM, "files": files}, indent=1))


def find_damage(directory: str | Path) -> str | None:
    """What is wrong with ``directory`` against its manifest (one phrase naming the file), or None."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        return NO_MANIFEST
    try:
        manifest = json.loads(path.read_text())
        files, algorithm = manifest["files"], manifest["algorithm"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is damaged"
    if algorithm != ALGORITHM:
        return f"{MANIFEST} uses {algorithm!r}; this version checks {ALGORITHM}"
    for name, want in files.items():
        target = directory / name
        if not target.is_file():
            return f"{name} is missing"
        if (size := target.stat().st_size) != want["size"]:
            return f"{name} has {size} bytes, the manifest says {want['size']}"
        if file_entry(target)[ALGORITHM] != want[ALGORITHM]:
            return f"{name} does not match its {ALGORITHM} checksum (the file is damaged)"
    return None


def verify_targets(path: str | Path) -> list[tuple[Path, str | None]]:
    """``superpose verify``: every checkpoint and the model of a run directory (of every arm of a
    comparison or sweep directory), or one checkpoint, model or prepared data directory, each with
    its problem (None = verified)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} does not exist" if not path.exists()
                          else f"{path} is a file; give a run, checkpoint or model directory")
    if arms := arm_dirs(path):
        return [target for arm in arms for target in verify_targets(arm)]
    if (path / CONFIG).is_file() or (path / METRICS).is_file():
        dirs = checkpoint_dirs(path) + ([path / MODEL] if (path / MODEL).is_dir() else [])
        if not dirs:
            raise ConfigError(f"run {path} has no checkpoint in {CHECKPOINTS}/ and no {MODEL}/ to verify")
    elif any((path / name).is_file() for name in (MANIFEST, *CHECKPOINT_FILES, "config.json", "meta.json")):
        dirs = [path]
    else:
        raise ConfigError(f"{path} is none of: a run, comparison, checkpoint, model or prepared data directory")
    return [(d, find_damage(d)) for d in dirs]
