"""Sharded (DCP) checkpoints in one process: the guarantees of the gathered format, async save, export.

The multi-rank cases (resume at the same world size, resharding N -> M and across strategies)
are in test_distributed.py; everything here runs in this process, as the CLI would.
"""
from __future__ import annotations

import json
import resource
import shutil
from pathlib import Path

import pytest
from test_bad_input import fails, snapshot
from test_integrity import damage, flip, outcome, run_args

from superpose.cli import main
from superpose.config import ConfigError
from superpose.integrity import MANIFEST, find_damage
from superpose.runs import read_records

pytestmark = pytest.mark.usefixtures("one_thread")
SHARDED = "--train.checkpoint_format=sharded"


@pytest.fixture(scope="module")
def gathered(small_data, tmp_path_factory):
    """The 6-step run of test_integrity (checkpoints at steps 2, 4, 6) with gathered checkpoints."""
    out = tmp_path_factory.mktemp("gathered") / "run"
    main(run_args(small_data, out))
    return out


@pytest.fixture(scope="module")
def sharded(small_data, tmp_path_factory):
    """The same run with sharded checkpoints."""
    out = tmp_path_factory.mktemp("sharded") / "run"
    main(run_args(small_data, out, SHARDED))
    return out


def manifest(checkpoint: Path) -> dict:
    return json.loads((checkpoint / MANIFEST).read_text())["files"]


def test_sharded_run_equals_gathered_and_verifies(gathered, sharded, capsys):
    """The format changes the files, not the run: a DCP directory plus trainer.pt, all in the manifest."""
    assert outcome(sharded) == outcome(gathered)
    assert (sharded / "model" / "model.safetensors").read_bytes() == (gathered / "model" / "model.safetensors").read_bytes()
    checkpoints = sorted((sharded / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step-00000002", "step-00000004", "step-00000006"]
    for checkpoint in checkpoints:
        assert sorted(manifest(checkpoint)) == [".metadata", "__0_0.distcp", "trainer.pt"], checkpoint
        assert find_damage(checkpoint) is None
    main(["verify", str(sharded)])
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["ok"] * 4


@pytest.mark.parametrize("kind", ["flipped", "truncated", "deleted"])
def test_damaged_shard_falls_back_to_the_newest_good_checkpoint(sharded, tmp_path, capsys, kind):
    """A bad block in the shard file of the two newest checkpoints: --resume auto continues from
    step 2 and ends bit-identical to the uninterrupted run."""
    run = Path(shutil.copytree(sharded, tmp_path / "run"))
    for step in (4, 6):
        damage(run / "checkpoints" / f"step-{step:08d}" / "__0_0.distcp", kind)
    shutil.rmtree(run / "model")
    capsys.readouterr()
    main(["train", str(run / "config.toml"), f"--train.out_dir={run}", "--resume", "auto"])
    err = capsys.readouterr().err
    assert "step-00000006 failed verification (__0_0.distcp" in err and "resuming from step 2" in err, err
    rejected = [r for r in read_records(run) if r["kind"] == "resume"][0]["rejected"]
    assert [Path(r["checkpoint"]).name for r in rejected] == ["step-00000006", "step-00000004"]
    assert outcome(run) == outcome(sharded)
    assert (run / "model" / "model.safetensors").read_bytes() == (sharded / "model" / "model.safetensors").read_bytes()


def test_async_checkpoints_equal_synchronous_ones(small_data, sharded, tmp_path):
    """Written in the background, the checkpoints hold the same shards (the state of their own step,
    not of a later one) and the run is the same; a resume from one continues exactly."""
    run = tmp_path / "async"
    main(run_args(small_data, run, SHARDED, "--train.async_checkpoint=true"))
    assert outcome(run) == outcome(sharded)
    for step in (2, 4, 6):
        name = f"step-{step:08d}"
        assert find_damage(run / "checkpoints" / name) is None
        assert manifest(run / "checkpoints" / name)["__0_0.distcp"] == manifest(sharded / "checkpoints" / name)["__0_0.distcp"]
    shutil.rmtree(run / "model")
    main(["train", str(run / "config.toml"), f"--train.out_dir={run}", "--resume", str(run / "checkpoints" / "step-00000002")])
    assert outcome(run) == outcome(sharded)


@pytest.mark.parametrize("fmt", ["gathered", "sharded"])
def test_export_of_a_checkpoint_equals_the_runs_own_export(gathered, sharded, tmp_path, capsys, fmt):
    run = {"gathered": gathered, "sharded": sharded}[fmt]
    out = tmp_path / "exported"
    main(["export", str(run / "checkpoints" / "step-00000006"), str(out), "--quiet"])
    assert f"wrote {out}: the model at step 6" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == (run / "model" / "model.safetensors").read_bytes()
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (out / name).read_text() == (run / "model" / name).read_text(), name
    info, own = json.loads((out / "superpose.json").read_text()), json.loads((run / "model" / "superpose.json").read_text())
    assert info.pop("checkpoint") == str(run / "checkpoints" / "step-00000006") and info == own
    assert find_damage(out) is None
    main(["export", str(run / "checkpoints" / "step-00000002"), str(out), "--force"])  # replaces the export
    assert json.loads((out / "superpose.json").read_text())["steps"] == 2


def test_export_bad_input(sharded, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    checkpoint = sharded / "checkpoints" / "step-00000006"
    fails(["export", checkpoint, blocker / "out"], capsys, "OUT_DIR's parent", "is not a writable directory")
    fails(["export", sharded, tmp_path / "out"], capsys, f"CHECKPOINT_DIR {sharded}: expected a checkpoint directory")
    damaged = Path(shutil.copytree(checkpoint, tmp_path / "damaged"))
    flip(damaged / "__0_0.distcp", 1000)
    fails(["export", damaged, tmp_path / "out"], capsys, "failed verification: __0_0.distcp does not match")
    unlisted = Path(shutil.copytree(checkpoint, tmp_path / "unlisted"))
    (unlisted / "manifest.json").unlink()  # every sharded checkpoint is written with one: its loss is damage
    fails(["export", unlisted, tmp_path / "out"], capsys, "has lost its manifest.json")
    assert not (tmp_path / "out").exists() and blocker.read_text() == "keep me"


@pytest.mark.parametrize("asynchronous", [False, True])
def test_disk_full_while_writing_a_sharded_checkpoint(sharded, tmp_path, capsys, asynchronous):
    """RLIMIT_FSIZE refuses writes past 2 MB (EFBIG) as a full disk would: the 16 MB shard file of
    checkpoint 6, the first the resumed run writes, is cut short in DCP's writer; one line, the
    earlier checkpoints as they were, no partial directory."""
    run = Path(shutil.copytree(sharded, tmp_path / "run"))
    checkpoints = run / "checkpoints"
    shutil.rmtree(checkpoints / "step-00000006")
    before = snapshot(checkpoints)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, hard))
    try:
        fails(["train", run / "config.toml", f"--train.out_dir={run}", f"--train.async_checkpoint={str(asynchronous).lower()}",
               "--resume", "auto"], capsys,
              "could not write checkpoint", "step-00000006", "a full disk, a quota or a file-size limit",
              "earlier checkpoints are intact")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert snapshot(checkpoints) == before
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002", "step-00000004"]


def test_async_checkpoint_needs_the_sharded_format(small_data, tmp_path, capsys):
    with pytest.raises(ConfigError, match="async_checkpoint needs sharded"):
        main(["--debug", *run_args(small_data, tmp_path / "a", "--train.checkpoint_format=gathered",
                                   "--train.async_checkpoint=true")])
    # 'auto' on one process means gathered: the same refusal, before any step
    fails(run_args(small_data, tmp_path / "b", "--train.async_checkpoint=true"), capsys, "'auto' gives gathered ones here")
    assert not (tmp_path / "b").exists()
