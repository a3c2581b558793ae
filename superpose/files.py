"""Writing files and directories so that a crash, a full disk or a second process never loses a user's files.

Every command that writes checks its output directory first (before minutes of work are spent).

**One rule for output directories.** A command writes only into a directory that is new, empty,
or already of its own kind: a prepared data directory, a run, a comparison (the arms of
`compare`/`sweep`), a report or an exported model, each recognised by its marker file
``.superpose`` (which names the kind) or, for directories written before markers existed, by the
file that kind always held. Anything else is refused with one line naming what is there;
``--force`` replaces only a directory of the command's own kind, and nothing outside a
directory's own files is ever deleted.

Runs and comparisons are written in place (a run resumes where it stopped). Data, reports and
exports are written whole beside their final place (``StagedDir``: ``.tmp-NAME``, locked against
a second writer) and swapped in: the old directory is renamed to ``.old-NAME`` only once the new one
is complete, so a kill at any moment leaves one complete directory under the name or under
``.old-NAME``, from which the next write recovers it. Small files are replaced atomically
(``atomic_write``): a hidden temporary file, fsynced, renamed over the old.
A directory being written has one writer at a time (``DirectoryLock``).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from .errors import OutputError, RunInUse

LOCK_FILE = ".lock"
MARKER = ".superpose"  # one line: the kind of directory superpose wrote
KINDS = {
    "data": "prepared data",
    "run": "a training run",
    "comparison": "the runs of a compare or sweep",
    "report": "a comparison report",
    "model": "an exported model",
}
# What a directory of each kind always held before markers existed.
_LEGACY = {"data": "meta.json", "run": "metrics.jsonl", "report": "summary.json", "model": "superpose.json"}


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
        raise OutputError(f"{what} {path} is not a writable directory ({err.strerror or err}); choose another {what}") from None
    return path


def no_space(err: OSError) -> bool:
    """A full disk, quota or file-size limit: the causes a user fixes by freeing space."""
    return err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w"):
    """A handle whose content replaces ``path`` in one step when the block ends: readers see the
    old content or the new, never a part. The temporary name ``.NAME.tmp`` is fixed, so a killed
    write's leftover is replaced by the next; an error removes it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step."""
    with atomic_write(path) as handle:
        handle.write(text)


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dir_kind(path: str | Path) -> str | None:
    """The kind of directory superpose wrote at ``path`` (a key of ``KINDS``), or None."""
    path = Path(path)
    try:
        kind = (path / MARKER).read_text().strip()
    except OSError:
        kind = None
    if kind in KINDS:
        return kind
    legacy = [k for k, name in _LEGACY.items() if (path / name).is_file()]
    if legacy:
        return legacy[0]
    if any((path / arm / _LEGACY["run"]).is_file() for arm in ("baseline", "tst")):
        return "comparison"
    return None


def describe(path: Path) -> str:
    """What a directory holds, in a few words, for an error message."""
    kind = dir_kind(path)
    if kind is not None:
        return f"holds {KINDS[kind]}"
    names = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE)
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"holds other files ({shown})"


def check_target(path: str | Path, kind: str, what: str) -> bool:
    """Enforce the rule for an output directory without writing anything; True if it already holds
    a directory of ``kind`` (to be continued, or with ``--force`` replaced)."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputError(f"{what} {path} is {'a link' if path.is_symlink() else 'a file'}; give a directory")
    if not path.exists() or not [p for p in path.iterdir() if p.name != LOCK_FILE]:
        return False
    if dir_kind(path) == kind:
        return True
    raise OutputError(f"{what} {path} {describe(path)}: superpose writes {KINDS[kind]} only into a new or empty "
                      f"directory or one of that kind; choose another {what}")


def check_replace(path: str | Path, kind: str, what: str, force: bool) -> None:
    """The rule for a directory written whole: new, empty, or of ``kind`` and ``force`` given."""
    if check_target(path, kind, what) and not force:
        raise OutputError(f"{what} {path} already holds {KINDS[kind]}; pass --force to replace it, or choose another {what}")


def claim_dir(path: str | Path, kind: str, what: str, stack: contextlib.ExitStack | None = None) -> bool:
    """Check ``path`` by the rule, create it, lock it for as long as ``stack`` lasts (if given) and
    mark it as ``kind``; True if it already held one. For directories written in place (runs,
    comparisons); one process (rank 0) calls it."""
    existed = check_target(path, kind, what)
    path = writable_dir(path, what)
    if stack is not None:
        stack.enter_context(DirectoryLock(path, what))  # before the marker: a second process writes nothing
    if dir_kind(path) != kind or not (path / MARKER).is_file():
        atomic_write_text(path / MARKER, kind + "\n")
    return existed


class StagedDir:
    """A directory of ``kind`` written whole in ``.tmp-NAME`` beside ``out`` and swapped in by ``publish``.

    ``with StagedDir(out, kind, what, force) as tmp: ...write into tmp...; staged.publish()``.
    Entering recovers from a killed swap (a lone ``.old-NAME`` is the only good copy: it is put
    back), locks ``.tmp-NAME`` against a second writer, checks ``out`` by the rule (a directory
    of ``kind`` only with ``force``) and empties the staging directory (a killed write's
    leftover). Leaving without ``publish`` removes it, so an error or a full disk leaves nothing."""

    def __init__(self, out: str | Path, kind: str, what: str, force: bool = False):
        self.out, self.kind, self.what, self.force = Path(out), kind, what, force
        if self.out.name in ("", ".", ".."):  # the directory's own name is needed for .tmp-NAME
            self.out = self.out.resolve()
        self.tmp = self.out.with_name(f".tmp-{self.out.name}")
        self.old = self.out.with_name(f".old-{self.out.name}")
        self.lock, self.published = None, False

    def check(self) -> None:
        """What entering checks, ``force`` included, without creating the staging directory: for a
        command to refuse ``out`` before its long work (reading a checkpoint's weights)."""
        self._check_unlocked()
        check_replace(self.out, self.kind, self.what, self.force)

    def _check_unlocked(self) -> None:
        out = self.out.resolve()
        if out == Path.cwd().resolve() or out in Path.cwd().resolve().parents:
            raise OutputError(f"{self.what} {self.out} is the current directory or one above it; give a new directory")
        check_target(self.out, self.kind, self.what)  # fail before any write; force is checked under the lock
        writable_dir(self.out.parent, f"{self.what}'s parent")
        for leftover in (self.tmp, self.old):
            if leftover.exists() and (leftover.is_symlink() or dir_kind(leftover) not in (self.kind, None)
                                      or dir_kind(leftover) is None and _has_files(leftover)):
                raise OutputError(f"{leftover} is in the way of {self.what} {self.out} and {describe(leftover)}; move it away")

    def __enter__(self) -> Path:
        self._check_unlocked()
        self.tmp.mkdir(exist_ok=True)
        self.lock = DirectoryLock(self.tmp, self.what).__enter__()
        try:
            if not _same_file(self.lock.handle, self.tmp / LOCK_FILE):  # another writer published it meanwhile
                self.lock.__exit__()
                self.lock = None  # nothing here is ours to remove
                raise RunInUse(f"{self.what} {self.out} was just written by another superpose process; run the command again")
            self._recover()
            check_replace(self.out, self.kind, self.what, self.force)
            for entry in self.tmp.iterdir():  # a killed write's leftover: ours, and locked
                if entry.name != LOCK_FILE:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            atomic_write_text(self.tmp / MARKER, self.kind + "\n")
        except BaseException:
            self.__exit__()
            raise
        return self.tmp

    def _recover(self) -> None:
        if self.old.is_dir() and dir_kind(self.old) == self.kind:
            if self.out.exists() and _has_files(self.out):
                shutil.rmtree(self.old)  # the swap had finished: the old copy is no longer needed
            else:
                if self.out.exists():  # an empty directory made since (at most our lock and marker in it)
                    for name in (LOCK_FILE, MARKER):
                        (self.out / name).unlink(missing_ok=True)
                    self.out.rmdir()
                os.replace(self.old, self.out)  # the swap was cut short: the old copy is the only one

    def publish(self) -> None:
        """Make the staging directory durable and swap it in for ``out`` (whose old content is removed after)."""
        for file in self.tmp.rglob("*"):
            if file.is_file() and file.name != LOCK_FILE:
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        fsync_dir(self.tmp)
        if self.out.exists():
            os.replace(self.out, self.old)
        os.replace(self.tmp, self.out)
        fsync_dir(self.out.parent)
        self.published = True
        shutil.rmtree(self.old, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        if not self.published and self.lock is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self.lock is not None:
            self.lock.__exit__()
            self.lock = None


def _same_file(handle, path: Path) -> bool:
    try:
        return os.fstat(handle.fileno()).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


def _has_files(path: Path) -> bool:
    return path.is_dir() and any(p.name not in (LOCK_FILE, MARKER) for p in path.iterdir())


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
