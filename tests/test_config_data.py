"""Config tree (TOML, overrides, validation), schedule, data preparation and the window loader."""
import gzip
import json

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from superpose.config import Config, ConfigError, OptimConfig, TSTConfig, load_config, validate
from superpose.data import TokenData, WindowLoader, prepare, validation_windows
from superpose.runs import config_changes, load_run_config, write_run_config
from superpose.schedule import build_stages, lr_at, stage_at

GPT2 = str(SHARED_DATA / "tokenizers" / "gpt2")


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


def test_stages_and_wsd_schedule():
    stages = build_stages(TSTConfig(bag_size=6, ratio=0.3), 100)
    assert [(s.bag_size, s.end_step) for s in stages] == [(6, 30), (1, 100)]
    assert stage_at(stages, 29).bag_size == 6 and stage_at(stages, 30).bag_size == 1
    assert [s.bag_size for s in build_stages(TSTConfig(bag_size=1, ratio=0.3), 10)] == [1]
    assert [s.bag_size for s in build_stages(TSTConfig(ratio=0.0), 10)] == [1]
    assert [s.bag_size for s in build_stages(TSTConfig(ratio=1.0), 10)] == [4]
    optim = OptimConfig(lr=1.0, warmup_steps=10, decay_fraction=0.1, min_lr_ratio=0.0)
    lrs = [lr_at(t, optim, 100) for t in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[50] == 1.0 and lrs[89] == 1.0
    assert lrs[90] == pytest.approx(0.9) and lrs[99] == pytest.approx(0.0)


def test_prepare_jsonl_and_text_with_an_existing_tokenizer(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with gzip.open(src / "a.jsonl.gz", "wt") as handle:
        for i in range(6):
            handle.write(json.dumps({"text": f"Document number {i}. " * 20, "title": str(i)}) + "\n")
    (src / "b.txt").write_text("A plain text file with one document.\n" * 10)
    meta = prepare(tmp_path / "out", inputs=[str(src)], tokenizer=GPT2, val_fraction=0.3, progress=False)
    data = TokenData(tmp_path / "out")
    assert meta["vocab_size"] == 50257 and meta["dtype"] == "uint16" and data.eos_id == 50256
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 7
    train_tokens = np.concatenate([np.asarray(s) for s in data.splits["train"]])
    assert (train_tokens == 50256).sum() == meta["splits"]["train"]["documents"]  # one EOS per document
    assert data.tokens("train") == meta["splits"]["train"]["tokens"]
    text = data.tokenizer().decode(train_tokens[: int(np.argmax(train_tokens == 50256))].tolist())
    assert text.startswith(("Document number", "A plain text"))


def test_window_loader_is_seeded_per_step_and_ranks_partition_the_batch(small_data):
    shards = TokenData(small_data).splits["train"]
    whole = WindowLoader(shards, 8, seed=3).batch(5, 17)
    assert whole.shape == (8, 17)
    halves = [WindowLoader(shards, 8, seed=3, rank=r, world=2).batch(5, 17) for r in range(2)]
    assert (np.concatenate(halves) == whole.numpy()).all()
    loader = WindowLoader(shards, 8, seed=3)
    first = loader.batch(0, 17)
    assert loader.state_dict() == {"tokens_seen": 8 * 17}
    other = WindowLoader(shards, 8, seed=3)
    other.load_state_dict(loader.state_dict())
    assert (other.batch(1, 17) == loader.batch(1, 17)).all() and not (loader.batch(2, 17) == first).all()
    flat = np.concatenate([np.asarray(s) for s in shards])
    row = whole[0].numpy()
    starts = np.flatnonzero(flat[: flat.size - 16] == row[0])
    assert any((flat[s : s + 17] == row).all() for s in starts)  # a window is contiguous text


def test_validation_windows_cover_each_target_once(small_data):
    val = TokenData(small_data).splits["val"]
    windows = validation_windows(val, 32, 0)
    assert windows.shape[1] == 33
    assert (windows[1:, 0] == windows[:-1, -1]).all()  # stride L: window i+1 starts where i's targets end
    assert validation_windows(val, 32, 320).shape[0] == 10


def test_research_levers_are_stages():
    tst = TSTConfig(curriculum=[[4, 0.2], [2, 0.2]], blend_steps=4, rewarmup_steps=5, lr_scale=2.0)
    stages = build_stages(tst, 100)
    assert [(s.name, s.bag_size, s.start_step, s.end_step) for s in stages] == [
        ("superposition-1", 4, 0, 20), ("superposition-2", 2, 20, 36), ("blend", 2, 36, 40), ("next-token", 1, 40, 100)]
    blend = [stage_at(stages, t).bag_size for t in range(36, 40)]
    assert blend.count(1) == 2 and blend[0] == 2  # half of the K blend steps are next-token, later ones more often
    optim = OptimConfig(lr=1.0, warmup_steps=0, decay_fraction=0.0)
    assert lr_at(10, optim, 100, stages[0]) == 2.0
    assert [lr_at(t, optim, 100, stages[-1]) for t in (40, 44, 45)] == [0.2, 1.0, 1.0]
    annealed = build_stages(TSTConfig(bag_size=4, ratio=0.5, mode="output", slot_weights=[1, 0.5, 0.25, 0.0],
                                      anneal_to_ntp=True), 10)[0]
    assert annealed.weights(0, 4).tolist() == pytest.approx([1 / 1.75, 0.5 / 1.75, 0.25 / 1.75, 0.0])
    assert annealed.weights(5, 4).tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])
    assert annealed.weights(3, 1).tolist() == [1.0]  # input mode scores one target slot


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


def test_llama3_style_tokenizer_ends_documents_with_end_of_text(tmp_path):
    """Llama 3's tokenizer (the paper's) has <|end_of_text|>, not <|endoftext|>: prepare, the data
    check and the exported tokenizer all use it, and the vocabulary keeps its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    from superpose.distributed import Runtime
    from superpose.export import export_model
    from superpose.model import TSTModel, build_model

    texts = [f"Document number {i}: the quick brown fox jumps over the lazy dog." for i in range(20)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    end = tok.token_to_id("<|end_of_text|>")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    meta = prepare(tmp_path / "out", inputs=[str(tmp_path / "docs.jsonl")], tokenizer=str(tmp_path / "tokenizer.json"),
                   val_fraction=0.3, progress=False)
    data = TokenData(tmp_path / "out")
    assert meta["eos_id"] == data.eos_id == end and meta["vocab_size"] == tok.get_vocab_size()
    train_tokens = np.concatenate([np.asarray(s) for s in data.splits["train"]])
    assert (train_tokens == end).sum() == meta["splits"]["train"]["documents"]

    lm = build_model("tiny", data.vocab_size, 32)
    export_model(TSTModel(lm), lm, data.tokenizer(), data.eos_id, tmp_path / "model", {}, Runtime(0, 1, torch.device("cpu")))
    exported = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert exported.eos_token == "<|end_of_text|>" and exported.eos_token_id == end and len(exported) == data.vocab_size
