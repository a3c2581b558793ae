"""superpose.files: the one rule for output directories, the staged swap and its recovery, atomic writes.

Every test checks the files it did not own byte for byte afterwards."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from superpose.errors import ConfigError, RunInUse
from superpose.files import MARKER, StagedDir, atomic_write, claim_dir, dir_kind


def tree(root: Path) -> dict[str, str]:
    """Every file below ``root`` (hidden ones included) with its SHA-256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def write(staged: StagedDir, files: dict[str, str]) -> None:
    with staged as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)
        staged.publish()


def test_a_directory_of_other_files_is_refused_and_left_as_it_was(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("alias ll='ls -l'\n")
    (home / "tokenizer.json").write_text("{mine}")
    before = tree(tmp_path)
    with pytest.raises(ConfigError, match=r"holds other files \(\.bashrc, tokenizer\.json\)"):
        write(StagedDir(home, "data", "output directory", force=True), {"meta.json": "{}"})
    with pytest.raises(ConfigError, match="holds other files"):
        claim_dir(home, "run", "train.out_dir")
    assert tree(tmp_path) == before


def test_another_kind_is_named_and_refused_even_with_force(tmp_path):
    model = tmp_path / "model"
    write(StagedDir(model, "model", "OUT_DIR"), {"config.json": "{}"})
    before = tree(tmp_path)
    with pytest.raises(ConfigError, match="holds an exported model: superpose writes prepared data only into"):
        write(StagedDir(model, "data", "output directory", force=True), {"meta.json": "{}"})
    assert tree(tmp_path) == before


def test_its_own_kind_is_replaced_only_with_force_and_no_stale_file_survives(tmp_path):
    report = tmp_path / "report"
    write(StagedDir(report, "report", "report directory"), {"report.md": "old", "stale.png": "old plot"})
    before = tree(tmp_path)
    with pytest.raises(ConfigError, match="already holds a comparison report; pass --force"):
        write(StagedDir(report, "report", "report directory"), {"report.md": "new"})
    assert tree(tmp_path) == before
    write(StagedDir(report, "report", "report directory", force=True), {"report.md": "new"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    assert sorted(tree(report)) == [".lock", MARKER, "report.md"] and (report / "report.md").read_text() == "new"


def test_an_empty_directory_is_used_and_the_current_one_refused(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    write(StagedDir(tmp_path / "empty", "model", "OUT_DIR"), {"config.json": "{}"})
    assert dir_kind(tmp_path / "empty") == "model"
    monkeypatch.chdir(tmp_path / "empty")
    (tmp_path / "empty" / "sub").mkdir()
    for name in (".", str(tmp_path), "sub/..", "sub/../.."):
        with pytest.raises(ConfigError, match="is the current directory or one above it"):
            write(StagedDir(name, "model", "OUT_DIR", force=True), {"config.json": "{}"})
    assert (tmp_path / "empty" / "config.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_a_swap_cut_short_gets_the_only_good_copy_back_first(tmp_path):
    """Killed between the two renames: only .old-NAME holds the export. The next write puts it back
    before anything else, and refuses to replace it without --force."""
    out = tmp_path / "out"
    write(StagedDir(out, "model", "OUT_DIR"), {"model.safetensors": "good weights"})
    good = tree(out)
    os.replace(out, tmp_path / ".old-out")  # the first rename of a swap, then the kill
    with pytest.raises(ConfigError, match="already holds an exported model"):
        write(StagedDir(out, "model", "OUT_DIR"), {"model.safetensors": "new"})
    assert tree(out) == good and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    os.replace(out, tmp_path / ".old-out")
    out.mkdir()  # an empty directory under the name since
    (out / MARKER).write_text("model\n")
    with pytest.raises(RuntimeError, match="disk"):  # the new export fails: the good copy is still there after
        with StagedDir(out, "model", "OUT_DIR", force=True) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("disk full")
    assert tree(out) == good and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_writers_leftover_is_reused_and_a_live_writer_refuses_a_second(tmp_path):
    out = tmp_path / "data"
    leftover = tmp_path / ".tmp-data"
    leftover.mkdir()
    (leftover / MARKER).write_text("data\n")
    (leftover / "train-00000.bin").write_bytes(b"half a shard")
    first = StagedDir(out, "data", "output directory")
    with first as tmp:
        assert tmp == leftover and sorted(p.name for p in tmp.iterdir()) == [".lock", MARKER]
        with pytest.raises(RunInUse, match=f"in use by another superpose process \\(pid {os.getpid()}\\)"):
            write(StagedDir(out, "data", "output directory", force=True), {"meta.json": "second"})
        (tmp / "meta.json").write_text("first")
        first.publish()
    assert (out / "meta.json").read_text() == "first" and not leftover.exists()


def test_a_leftover_that_is_not_ours_is_never_deleted(tmp_path):
    (tmp_path / ".tmp-out").mkdir()
    (tmp_path / ".tmp-out" / "notes.txt").write_text("a user's file")
    before = tree(tmp_path)
    with pytest.raises(ConfigError, match=r"\.tmp-out is in the way of OUT_DIR"):
        write(StagedDir(tmp_path / "out", "model", "OUT_DIR"), {"config.json": "{}"})
    assert tree(tmp_path) == before


def test_atomic_write_leaves_the_old_file_and_no_temporary_on_error(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    with pytest.raises(OSError):
        with atomic_write(path, "wb") as handle:
            handle.write(b"new, half")
            raise OSError(28, "No space left on device")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
