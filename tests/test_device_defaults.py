"""The "auto" defaults resolve per device (a CUDA device object needs no CUDA), explicit values
stand, and a run records the resolved values in its config.toml."""
import pytest
import torch

from superpose.config import ConfigError, load_config, read_toml
from superpose.device_defaults import resolve_auto
from superpose.train import train
from tests.conftest import tiny_overrides


@pytest.mark.parametrize("device,vocab,expected", [
    ("cpu", 8192, ("fp32", False, 0)),
    ("cpu", 128256, ("fp32", False, 4096)),
    ("cuda", 8192, ("bf16", True, 0)),
    ("cuda:1", 32768, ("bf16", True, 4096)),
])
def test_auto_resolves_per_device(device, vocab, expected):
    cfg = load_config()
    lines = []
    out = resolve_auto(cfg, torch.device(device), vocab, lines.append)
    assert (out.train.precision, out.train.compile, out.model.loss_chunk_size) == expected
    assert cfg.train.precision == "auto"  # the given config is left as it was
    if expected == ("fp32", False, 0):  # nothing turned on: nothing to say
        assert lines == []
    else:
        assert len(lines) == 1 and "train.precision" in lines[0] and "model.loss_chunk_size" in lines[0]


def test_explicit_values_win():
    cfg = load_config(overrides=["--train.precision=fp32", "--train.compile=false", "--model.loss_chunk_size=512"])
    lines = []
    out = resolve_auto(cfg, torch.device("cuda"), 128256, lines.append)
    assert (out.train.precision, out.train.compile, out.model.loss_chunk_size) == ("fp32", False, 512)
    assert lines == []


@pytest.mark.parametrize("override", ["--train.compile=maybe", "--train.precision=fp16", "--model.loss_chunk_size=-1",
                                      "--model.loss_chunk_size=big"])
def test_bad_values_are_one_line_errors(override):
    with pytest.raises(ConfigError):
        load_config(overrides=[override])


def test_a_run_records_the_resolved_values(small_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(load_config(overrides=tiny_overrides(small_data, out, **{"train.steps": 2, "train.eval_every": 2})))
    saved = read_toml(out / "config.toml")
    assert (saved["train"]["precision"], saved["train"]["compile"], saved["model"]["loss_chunk_size"]) == ("fp32", False, 0)
    assert "train.precision" not in capsys.readouterr().err  # plain fp32 on CPU: said by the config only


def test_a_saved_run_matches_auto_but_not_another_explicit_value():
    """compare checks an arm's directory before train resolves "auto": a saved run's resolved
    values match "auto" (train checks them again after resolving), an explicit other value does not."""
    from superpose.runs import config_changes

    saved = resolve_auto(load_config(), torch.device("cpu"), 8192).to_dict()
    assert config_changes(saved, load_config()) == []
    assert config_changes(saved, load_config(overrides=["--train.precision=bf16"])) == ["train.precision: 'fp32' -> 'bf16'"]
