"""The command line answers at once, accepts both override forms, and turns bad arguments into one line."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from superpose import __version__
from superpose.cli import main, split_overrides

ROOT = Path(__file__).resolve().parent.parent


def user_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("superpose: error: "), err
    return err


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["train", "--train.stepz=1"], ["train", "--tst.ratio", "2"],
                                  ["compare", "--train.stepz=1"], ["sweep", "--tst.ratio=2"], ["sweep", "--ratios=x"],
                                  ["report", "no-such-run"], ["compare", "--runs", "no-base", "no-tst"],
                                  ["export", "no-checkpoint", "out"], ["verify", "no-such-dir"], ["train", "--help"],
                                  ["prepare", "--out", "x", "--val-fraction", "2"], ["prepare", "--out", "x", "--num-proc", "0"],
                                  ["eval", "no-model"], ["generate", "no-model"]])
def test_help_version_and_config_errors_do_not_import_torch(argv):
    """What makes `superpose --help` take seconds is importing torch and transformers (and numpy, a
    tenth of a second): it must not happen, for any command's bad config or arguments."""
    code = ("import sys\nfrom superpose.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('exit', e.code)\n"
            "print('heavy:', sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1] == "heavy: []", done.stdout + done.stderr
    if argv == ["--version"]:
        assert f"superpose {__version__}" in done.stdout


def test_overrides_take_both_forms():
    assert split_overrides(["train", "--train.steps", "100", "--optim.lr=1e-3", "--out", "x", "--tst.ratio", "-0.5"]) == (
        ["train", "--out", "x"], ["--train.steps=100", "--optim.lr=1e-3", "--tst.ratio=-0.5"])
    assert split_overrides(["train", "cfg.toml", "--resume", "auto", "--train.progress"]) == (
        ["train", "cfg.toml", "--resume", "auto", "--train.progress"], [])


def test_an_override_value_may_hold_spaces(capsys):
    """A list written as TOML with spaces reaches the config (argparse alone would take it for the config file)."""
    err = user_error(["train", "--tst.curriculum=[[4, 0.2], [2, 0.9]]"], capsys)
    assert err == "superpose: error: tst.curriculum ratios must sum to at most 1"


def test_space_form_override_reaches_the_config(capsys):
    err = user_error(["train", "--train.steps", "0"], capsys)  # parsed as train.steps = 0, then validated
    assert err == "superpose: error: train.steps must be >= 1"


def test_config_path_that_is_a_directory(tmp_path, capsys):
    err = user_error(["train", tmp_path], capsys)
    assert f"config file {tmp_path} is a directory" in err


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_model_path_that_does_not_exist(command, tmp_path, capsys):
    extra = ["--text", str(tmp_path / "t.txt")] if command == "eval" else []
    err = user_error([command, tmp_path / "nowhere", *extra], capsys)
    assert f"{tmp_path / 'nowhere'} does not exist" in err


@pytest.mark.parametrize("flag, value, message", [("--max-new-tokens", "0", "--max-new-tokens must be >= 1"),
                                                  ("--samples", "0", "--samples must be >= 1"),
                                                  ("--temperature", "-1", "--temperature must be >= 0")])
def test_generate_arguments_are_checked(flag, value, message, tmp_path, capsys):
    err = user_error(["generate", tmp_path, flag, value], capsys)
    assert message in err


def test_progress_bar_ends_with_the_final_validation(small_data, tmp_path, capsys):
    """The bar's last `val=` is the validation of the last step, not the one before it."""
    run = tmp_path / "run"
    main(["train", f"--data.dir={small_data}", '--data.corpus=""', "--data.seq_len=16", "--train.batch_size=2",
          "--train.steps=4", "--train.eval_every=2", "--train.eval_tokens=64", "--train.tensorboard=false",
          f"--train.out_dir={run}"])
    err = capsys.readouterr().err
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert re.findall(r"val=([\d.]+)", err)[-1] == f"{final['val_loss']:.3f}", err[-500:]


def test_pace_estimates_the_rest_of_the_run_once():
    """After one warm-up step and five timed ones, one line with the pace and the time left."""
    from superpose.progress import Pace

    pace = Pace(start_step=10, steps=110)
    lines = [pace.update(done, 2.0 if done == 11 else 0.5) for done in range(11, 30)]
    assert [line for line in lines if line] == [
        "0.500 s/step over steps 12-16: about 0.8 min for the remaining 94 steps (validation not included)"]


@pytest.mark.parametrize("cores, load, ranks, threads", [(2, 0.1, 1, 2), (2, 1.0, 1, 1), (2, 3.5, 1, 1),
                                                          (16, 4.0, 1, 12), (16, 0.0, 8, 2), (2, 0.0, 2, 1)])
def test_default_threads_take_the_free_cores(monkeypatch, cores, load, ranks, threads):
    """train.threads = 0: all free cores when the machine is idle, 1 thread when others use it."""
    from superpose import threads as train_mod

    monkeypatch.setattr(train_mod, "machine_load", lambda: (cores, load))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    assert train_mod.default_threads() == threads


def test_train_help_names_the_config_sections_and_the_reference(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "[model] [data] [tst] [optim] [train] [distributed]" in text and "docs/reference.md" in text
    assert (ROOT / "docs" / "reference.md").is_file()


def test_a_config_key_without_a_value_says_so(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--train.steps"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--train.steps needs a value: --train.steps=VALUE" in err and "unrecognized" not in err
