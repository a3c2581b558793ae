"""A damaged checkpoint is never trained on, a diverged model is never exported, one writer per run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from superpose.cli import main
from superpose.errors import RunInUse
from superpose.files import DirectoryLock
from superpose.integrity import MANIFEST, file_entry, find_damage, write_manifest
from superpose.runs import ABANDONED, checkpoint_dirs, is_finished, read_records

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent


TIMING = {"tokens_per_s", "step_seconds", "elapsed"}


def outcome(run: Path) -> list[dict]:
    """Every record but the resume notes, without the timings (which differ between any two runs)."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_records(run) if r["kind"] != "resume"]


def run_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", f"--data.dir={data}", '--data.corpus=""', "--data.seq_len=16", "--train.batch_size=2",
            "--train.steps=6", "--train.eval_tokens=64", "--train.eval_every=2", "--train.log_every=1",
            "--train.progress=false", "--train.device=cpu", "--train.tensorboard=false", "--tst.ratio=0.5",
            "--train.checkpoint_every=2", "--train.keep_checkpoints=3", f"--train.out_dir={out}", *extra]


def flip(path: Path, offset: int, length: int = 4096) -> None:
    """Invert ``length`` bytes in the middle of a file: same size, other content (a bad block)."""
    raw = bytearray(path.read_bytes())
    raw[offset : offset + length] = bytes(b ^ 0xFF for b in raw[offset : offset + length])
    path.write_bytes(bytes(raw))


def damage(path: Path, how: str) -> None:
    """Damage a file as a bad disk would: a ``flipped`` block, ``truncated`` to a third, or ``deleted``."""
    if how == "flipped":
        flip(path, path.stat().st_size // 2)
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    else:
        path.unlink()


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory):
    """An uninterrupted 6-step TST run with checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("reference") / "run"
    main(run_args(small_data, out))
    return out


# ---------------------------------------------------------------------------- manifests


def test_manifest_detects_every_kind_of_damage(tmp_path):
    directory = tmp_path / "ckpt"
    (directory / "sub").mkdir(parents=True)
    (directory / "a.bin").write_bytes(os.urandom(1 << 16))
    (directory / "sub" / "b.json").write_text("{}")
    write_manifest(directory, {"a.bin": file_entry(directory / "a.bin")})
    assert find_damage(directory) is None
    manifest = json.loads((directory / MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["a.bin", "sub/b.json"]

    damaged = Path(shutil.copytree(directory, tmp_path / "flipped"))
    flip(damaged / "a.bin", 20000, 16)
    assert find_damage(damaged) == "a.bin does not match its sha256 checksum (the file is damaged)"
    damaged = Path(shutil.copytree(directory, tmp_path / "truncated"))
    (damaged / "a.bin").write_bytes((damaged / "a.bin").read_bytes()[:100])
    assert find_damage(damaged) == f"a.bin has 100 bytes, the manifest says {1 << 16}"
    damaged = Path(shutil.copytree(directory, tmp_path / "deleted"))
    (damaged / "sub" / "b.json").unlink()
    assert find_damage(damaged) == "sub/b.json is missing"
    damaged = Path(shutil.copytree(directory, tmp_path / "no-manifest"))
    (damaged / MANIFEST).unlink()
    assert find_damage(damaged) == "manifest.json is missing"
    damaged = Path(shutil.copytree(directory, tmp_path / "bad-manifest"))
    (damaged / MANIFEST).write_text('{"files": ')
    assert find_damage(damaged) == "manifest.json is damaged"


def test_checkpoints_and_export_carry_manifests_that_verify(reference, capsys):
    for directory in [*sorted((reference / "checkpoints").iterdir()), reference / "model"]:
        assert (directory / MANIFEST).is_file() and find_damage(directory) is None, directory
    main(["verify", str(reference)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("ok ") for line in lines), lines


def test_verify_names_the_damaged_file(reference, tmp_path, capsys):
    run = Path(shutil.copytree(reference, tmp_path / "run"))
    flip(run / "model" / "model.safetensors", 10000)
    with pytest.raises(SystemExit) as exc:
        main(["verify", str(run)])
    captured = capsys.readouterr()
    assert exc.value.code == 2
    assert f"DAMAGED  {run / 'model'}: model.safetensors does not match its sha256 checksum" in captured.out
    assert captured.err.strip() == "superpose: error: 1 of 4 directories failed verification"
    main(["verify", str(run / "checkpoints" / "step-00000006")])  # one checkpoint alone: intact
    with pytest.raises(SystemExit) as exc:
        main(["verify", str(tmp_path / "nowhere")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------- resuming past damage


@pytest.mark.parametrize("kind", ["flipped", "truncated", "deleted", "no-manifest"])
def test_resume_auto_falls_back_to_the_newest_good_checkpoint(reference, tmp_path, capsys, kind):
    """Damage the two newest checkpoints, as a bad disk would, and resume: the run continues from
    step 2, says so on stderr and in metrics.jsonl, and ends bit-identical to the uninterrupted run."""
    run = Path(shutil.copytree(reference, tmp_path / "run"))
    for step in (4, 6):
        state = run / "checkpoints" / f"step-{step:08d}" / "state.pt"
        damage(state.parent / MANIFEST if kind == "no-manifest" else state, kind)
    shutil.rmtree(run / "model")
    capsys.readouterr()
    main(["train", str(run / "config.toml"), f"--train.out_dir={run}", "--resume", "auto"])
    err = capsys.readouterr().err
    assert "step-00000006 failed verification" in err and "step-00000004 failed verification" in err, err
    assert "resuming from step 2" in err
    rejected = [r for r in read_records(run) if r["kind"] == "resume"]
    assert len(rejected) == 1 and ([Path(r["checkpoint"]).name for r in rejected[0]["rejected"]]
                                   == ["step-00000006", "step-00000004"])
    assert outcome(run) == outcome(reference)  # every loss, gradient norm, LR and validation loss, bit for bit
    assert (run / "model" / "model.safetensors").read_bytes() == (reference / "model" / "model.safetensors").read_bytes()
    assert find_damage(run / "checkpoints" / "step-00000006") is None  # rewritten by the resumed run


def test_resuming_from_an_older_checkpoint_moves_the_later_ones_out_of_the_way(reference, tmp_path, capsys):
    """Going back (``--resume DIR``, here with another LR and checkpoint interval) leaves a timeline:
    its later checkpoints are kept aside, so retention and a later ``--resume auto`` see only the
    new run's (before, the old step 4 outlived the new step 2 and came between new 3 and 6)."""
    run = Path(shutil.copytree(reference, tmp_path / "run"))
    old = {step: (run / "checkpoints" / f"step-{step:08d}" / "state.pt").read_bytes() for step in (4, 6)}
    capsys.readouterr()
    main(["train", str(run / "config.toml"), f"--train.out_dir={run}", "--resume", str(run / "checkpoints" / "step-00000002"),
          "--allow-config-change", "--optim.lr=1e-3", "--train.checkpoint_every=3"])
    assert "moved the later checkpoints (step-00000004, step-00000006)" in capsys.readouterr().err
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000002", "step-00000003", "step-00000006"]
    for path in checkpoint_dirs(run)[1:]:
        assert torch.load(path / "state.pt", weights_only=False)["trainer"]["config"]["optim"]["lr"] == 1e-3
    [record] = [r for r in read_records(run) if r["kind"] == "resume"]
    assert record["rejected"] == [] and [Path(p).name for p in record["set_aside"]] == ["step-00000004", "step-00000006"]
    for path, step in zip(record["set_aside"], (4, 6)):
        assert (Path(path) / "state.pt").read_bytes() == old[step] and Path(path).parent.parent == run / ABANDONED


# ---------------------------------------------------------------------------- non-finite results


@pytest.fixture
def diverges_after(monkeypatch):
    """Validation of the runs whose out_dir ends with ``name`` turns NaN after ``step`` steps,
    as a diverged model's does (the real validation runs first, so the run is otherwise real)."""
    import superpose.validation as train_mod

    def arm(name: str, step: int):
        real = train_mod.validation_loss
        calls = {}

        def validation_loss(model, windows, cfg, runtime, *stage_args):
            loss = real(model, windows, cfg, runtime, *stage_args)
            if stage_args:  # a diagnostic of a superposition stage, not the validation loss
                return loss
            calls[cfg.train.out_dir] = calls.get(cfg.train.out_dir, -1) + 1  # 0 = the step-0 validation
            return float("nan") if cfg.train.out_dir.endswith(name) and calls[cfg.train.out_dir] * 2 > step else loss

        monkeypatch.setattr(train_mod, "validation_loss", validation_loss)

    return arm


def test_diverged_run_fails_and_is_not_exported(small_data, tmp_path, capsys, diverges_after):
    """The validation at step 4 is NaN: the run stops with status 2 naming the step and the newest
    checkpoint (step 2; none is written at step 4), exports nothing and logs why."""
    diverges_after("run", 2)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(run_args(small_data, run))
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    assert "the validation loss at step 4 is nan" in err and "not exported" in err
    assert f"the newest checkpoint is {run / 'checkpoints' / 'step-00000002'}" in err
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]
    assert not (run / "model").exists()
    assert read_records(run)[-1]["kind"] == "failed" and read_records(run)[-1]["step"] == 4


def test_compare_reports_a_failed_arm_and_exits_non_zero(small_data, tmp_path, capsys, diverges_after):
    """The TST arm diverges; compare finishes the baseline, says which arm failed and writes no comparison."""
    diverges_after("tst", 2)
    with pytest.raises(SystemExit) as exc:
        main(["compare", *run_args(small_data, tmp_path / "cmp")[1:]])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "[2/2] tst s=4, r=0.5 failed: the validation loss at step 4" in err
    assert err.strip().splitlines()[-1].startswith("superpose: error: tst failed: the validation loss at step 4")
    assert (tmp_path / "cmp" / "baseline" / "model").is_dir() and not (tmp_path / "cmp" / "tst" / "model").exists()
    assert not (tmp_path / "cmp" / "report").exists()


# ---------------------------------------------------------------------------- one writer per run


def test_second_writer_fails_at_once_and_a_killed_holder_never_blocks(small_data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from superpose.files import DirectoryLock\n"
         f"with DirectoryLock({str(run)!r}, 'train.out_dir'):\n    print('held', flush=True); time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as exc:
            main(run_args(small_data, run, "--train.steps=2"))
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and err == (f"superpose: error: train.out_dir {run} is in use by another superpose "
                                               f"process (pid {holder.pid}); wait for it to finish, stop it, or choose "
                                               "another train.out_dir")
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written by the second process
        with pytest.raises(RunInUse), DirectoryLock(run, "train.out_dir"):  # a ConfigError that plans can tell apart
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    main(run_args(small_data, run, "--train.steps=2"))  # the kernel released the dead holder's lock
    assert read_records(run)[-1]["kind"] == "end"


def test_failed_train_removes_the_directory_it_created(tmp_path, capsys):
    run = tmp_path / "new-run"
    with pytest.raises(SystemExit):
        main(["train", f"--data.dir={tmp_path / 'no-data'}", '--data.corpus=""', f"--train.out_dir={run}",
              "--train.progress=false"])
    assert "no-data" in capsys.readouterr().err
    assert not run.exists()


def test_a_log_cut_off_by_a_kill_reads_as_unfinished(reference, tmp_path):
    """A kill in the middle of a metrics.jsonl write leaves half a line: readers skip it, and
    `compare` sees an unfinished arm to resume instead of failing on the JSON."""
    run = Path(shutil.copytree(reference, tmp_path / "run"))
    assert is_finished(run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    assert not is_finished(run)
    assert read_records(run) == [json.loads(line) for line in lines[:-1]]
