"""Writing files so that a crash or a full disk never leaves a half-written one behind.

Every command that writes checks its output directory first (before minutes of work are spent)
and replaces small files atomically: write a hidden temporary file, fsync, rename over the old.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .config import ConfigError


def writable_dir(path: str | Path, what: str) -> Path:
    """Create ``path`` if needed and prove that a file can be written there.

    A real write is the only reliable test: ``os.access`` says yes to root, and to read-only
    mounts. ``what`` names the setting in the error (e.g. ``train.out_dir``).
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(f"{what} {path} is not a writable directory ({err.strerror or err}); choose another {what}") from None
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: readers see the old content or the new, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
