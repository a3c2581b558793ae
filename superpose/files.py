"""Writing files so that a crash or a full disk never leaves a half-written one behind.

Every command that writes checks its output directory first (before minutes of work are spent)
and replaces small files atomically: write a hidden temporary file, fsync, rename over the old.
A run directory has one writer at a time (``DirectoryLock``).
"""
from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

from .errors import ConfigError, RunInUse

LOCK_FILE = ".lock"


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


class DirectoryLock:
    """An exclusive ``flock`` on ``DIR/.lock`` for as long as a process writes into ``DIR``.

    A second process (a job submitted twice) fails at once with the holder's pid. The kernel
    releases the lock when the holder exits, however it dies, so a killed run never blocks its
    own resume; the file itself stays (removing it would race with a process opening it)."""

    def __init__(self, directory: str | Path, what: str):
        self.path, self.what, self.handle = Path(directory) / LOCK_FILE, what, None

    def __enter__(self) -> "DirectoryLock":
        handle = open(self.path, "a+")  # not "w": that would erase the holder's pid before we know we hold it
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RunInUse(f"{self.what} {self.path.parent} is in use by another superpose process (pid {holder}); "
                           f"wait for it to finish, stop it, or choose another {self.what}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()
