"""The config tree: TOML, overrides, checks next to each field, the [tst] stage tables and the resume check."""

import pytest

from superpose.config import Config, ConfigError, TSTConfig, load_config, validate
from superpose.runs import config_changes, load_run_config, write_run_config
from superpose.schedule import build_stages


def test_toml_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[tst]\nbag_size = 6\nratio = 0.25\n[optim]\nlr = 1\n')
    cfg = load_config(path, ["--tst.ratio=0.4", "--train.out_dir=runs/x", "--optim.weight-decay=0"])
    assert (cfg.tst.bag_size, cfg.tst.ratio, cfg.optim.lr, cfg.optim.weight_decay) == (6, 0.4, 1.0, 0.0)
    assert cfg.train.out_dir == "runs/x" and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("override, message", [
    ("--tst.bagsize=4", "unknown config key tst.bagsize"),
    ("--nope.x=1", "unknown config section [nope]"),
    ("--tst.bag_size=4.5", "tst.bag_size must be int"),
    ("--tst.bag_size=0", "tst.bag_size must be an integer >= 1"),
    ("--tst.ratio=1.5", "tst.ratio must be in [0, 1]"),
    ("--tst.weighting=linear", "tst.weighting = 'linear' is not one of"),
    ("--train.progress=3", "train.progress must be bool"),
    ("--train.batch_size=10", "must be a multiple of train.micro_batch_size"),
])
def test_bad_config_is_rejected_with_the_key(override, message):
    extra = ["--train.micro_batch_size=4"] if "batch_size=10" in override else []
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override, *extra])


def test_an_unknown_corpus_fails_when_the_config_loads():
    """A config check that needs no data: an unknown embedded corpus answers before any work starts."""
    with pytest.raises(ConfigError, match="data.corpus = 'shakespear': only 'shakespeare' is embedded"):
        load_config(None, ["--data.corpus=shakespear"])


def test_resume_check_defaults_missing_keys_and_ignores_tst_between_baselines():
    """A run saved before a config key existed resumes unless the key is set to a non-default;
    two plain next-token runs are the same run whatever their (unused) bag size."""
    saved = Config().to_dict()
    del saved["tst"]["blend_steps"], saved["tst"]["curriculum"]
    assert config_changes(saved, Config()) == []
    assert config_changes(saved, load_config(None, ["--tst.blend_steps=10"])) == ["tst.blend_steps: 0 -> 10"]
    saved["tst"]["ratio"] = 0.0
    assert config_changes(saved, load_config(None, ["--tst.ratio=0", "--tst.bag_size=6"])) == []
    assert config_changes(saved, load_config(None, ["--tst.bag_size=6"])) == ["tst.bag_size: 4 -> 6", "tst.ratio: 0.0 -> 0.3"]


STAGES_TOML = """
[train]
steps = 100
[[tst.stages]]
bag_size = 4
fraction = 0.2
lr_scale = 2.0
[[tst.stages]]
bag_size = 2
steps = 20
blend_steps = 4
lr_scale = 2.0
[[tst.stages]]
bag_size = 1
rewarmup_steps = 5
"""


def test_a_literal_stage_list_is_the_stages_its_shorthand_expands_to(tmp_path):
    """[[tst.stages]] tables give the stages directly; the shorthand (here a curriculum with its
    levers) expands to the same list, and that expanded list is what a run's config.toml records,
    so reading it back gives the same run."""
    path = tmp_path / "stages.toml"
    path.write_text(STAGES_TOML)
    literal = load_config(path)
    shorthand = load_config(None, ["--train.steps=100", "--tst.curriculum=[[4, 0.2], [2, 0.2]]", "--tst.blend_steps=4",
                                   "--tst.rewarmup_steps=5", "--tst.lr_scale=2.0"])
    assert build_stages(literal.tst, 100) == build_stages(shorthand.tst, 100)
    assert [(s.name, s.bag_size, s.start_step, s.end_step, s.lr_scale) for s in build_stages(literal.tst, 100)] == [
        ("superposition-1", 4, 0, 20, 2.0), ("superposition-2", 2, 20, 36, 2.0), ("blend", 2, 36, 40, 2.0),
        ("next-token", 1, 40, 100, 1.0)]
    recorded = tmp_path / "run"
    recorded.mkdir()
    write_run_config(recorded, shorthand)
    assert "[[tst.stages]]" in (recorded / "config.toml").read_text()  # recorded expanded
    again = load_run_config(recorded)
    assert [t.bag_size for t in again.tst.stages] == [4, 2, 1] and again.tst.stages == shorthand.tst.stages
    assert build_stages(again.tst, 100) == build_stages(shorthand.tst, 100)
    assert build_stages(TSTConfig(bag_size=6, ratio=0.3), 100) == build_stages(load_config(None, ["--tst.bag_size=6"]).tst, 100)


@pytest.mark.parametrize("table, message", [
    ("bag_size = 0\nfraction = 0.2", r"tst.stages\[1\]: bag_size must be an integer >= 1"),
    ("fraction = 0.2", r"tst.stages\[1\]: bag_size must be an integer >= 1"),
    ("bag_size = 4\nfraction = 0.2\nsteps = 3", "give steps or fraction, not both"),
    ("bag_size = 4\nsize = 3\nfraction = 0.2", r"unknown key tst.stages\[1\].size"),
    ("bag_size = 4\nmode = 'both'\nfraction = 0.2", "mode must be one of full, input, output"),
    ("bag_size = 4\nweighting = [1.0]\nfraction = 0.2", "weighting must be one of"),
    ("bag_size = 4\nsteps = 700", "tst.stages cover 700 of train.steps = 600 steps"),
    ("bag_size = 1\nblend_steps = 5", "a bag_size 1 stage has none"),
    ("bag_size = 4\n[[tst.stages]]\nbag_size = 1", r"tst.stages\[1\]: needs steps or fraction"),
])
def test_bad_stage_tables_are_rejected_with_the_key(tmp_path, table, message):
    path = tmp_path / "bad.toml"
    path.write_text("[[tst.stages]]\n" + table + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_a_recorded_shorthand_reads_back_and_a_loaded_config_stays_editable(tmp_path):
    """The expanded list a run records reads back even where the rounded fractions add up to more
    than train.steps (each stage ends by the end of the run, as before); a loaded config keeps its
    shorthand, so changing it in Python changes the stages."""
    cfg = load_config(None, ["--tst.curriculum=[[4, 0.5], [2, 0.5]]", "--train.steps=7"])
    write_run_config(tmp_path, cfg)
    again = load_run_config(tmp_path)
    assert build_stages(again.tst, 7) == build_stages(cfg.tst, 7)
    assert [(s.bag_size, s.start_step, s.end_step) for s in build_stages(again.tst, 7)] == [(4, 0, 4), (2, 4, 7)]
    assert config_changes(again.to_dict(), cfg) == []  # the recorded list is the same stages as the shorthand
    cfg.tst = cfg.tst.with_shorthand(curriculum=[], ratio=0.5)
    validate(cfg)
    assert [s.end_step for s in build_stages(cfg.tst, 7)] == [4, 7]


@pytest.mark.parametrize("tables, message", [
    ("[[tst.stages]]\nbag_size = 4\nsteps = 10", "tst.stages cover 10 of train.steps = 600 steps"),
    ("[[tst.stages]]\nbag_size = 4\nfraction = 0.3\n[[tst.stages]]\nbag_size = 1\nfraction = 0.5", "cover 480 of"),
    ("[[tst.stages]]\nbag_size = 1\nfraction = 0.5\n[[tst.stages]]\nbag_size = 4", r"phase 1 \(bag_size > 1\) comes first"),
    ("[[tst.stages]]\nbag_size = '4'\nweighting = [1.0]\nfraction = 0.5", "bag_size must be an integer >= 1"),
    ("[[tst.stages]]\nbag_size = 2\nweighting = ['a', 'b']\nfraction = 0.5", "weighting must be one of"),
])
def test_a_stage_list_must_cover_the_run_in_order(tmp_path, tables, message):
    path = tmp_path / "stages.toml"
    path.write_text(tables + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_the_last_stage_runs_to_the_end(tmp_path):
    path = tmp_path / "stages.toml"
    path.write_text("[[tst.stages]]\nbag_size = 4\nfraction = 0.25\n[[tst.stages]]\nbag_size = 2\nfraction = 0.25\n"
                    "[[tst.stages]]\nbag_size = 1\nfraction = 0.5\n")
    cfg = load_config(path, ["--train.steps=10"])  # round(2.5) + round(2.5) + round(5) = 9: the last takes the 10th
    assert [(s.bag_size, s.start_step, s.end_step) for s in build_stages(cfg.tst, 10)] == [(4, 0, 2), (2, 2, 4), (1, 4, 10)]


def test_a_stage_list_and_a_conflicting_shorthand_are_rejected(tmp_path):
    path = tmp_path / "stages.toml"
    path.write_text(STAGES_TOML)
    with pytest.raises(ConfigError, match="tst.stages is given, so tst.ratio"):
        load_config(path, ["--tst.ratio=0.5"])


@pytest.mark.parametrize("override", ["--tst.curriculum=[[1, 0.2]]", "--tst.curriculum=[[4, 0.6], [2, 0.6]]",
                                      "--tst.slot_weights=[1.0, 0.5]", "--tst.lr_scale=0"])
def test_bad_levers_are_rejected(override):
    with pytest.raises(ConfigError):
        load_config(None, [override])
