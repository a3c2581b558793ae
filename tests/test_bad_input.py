"""Every bad input gets one clear line on stderr, exit status 2, no traceback, and no damage.

Each test calls the real command line (``superpose.cli.main``) in this process, checks the
exit status and that stderr is exactly one ``superpose: error: ...`` line naming the problem,
and, where files existed before, that they are byte-for-byte unchanged afterwards.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import resource
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from superpose.cli import main
from superpose.corpus import shakespeare_files
from superpose.data import DataError, TokenData
from superpose.evaluation import check_multiple_choice
from superpose.runs import ABANDONED, read_records

pytestmark = pytest.mark.usefixtures("one_thread")
EVAL_DIR = SHARED_DATA / "eval"
GPT2_DIR = SHARED_DATA / "tokenizers" / "gpt2"
PROGRESS_BAR = re.compile(r"^\S.*: +\d+%\|.*\d+/\d+ \[")
# what `train` says before it resumes, and the warnings that precede an error (e.g. each rejected checkpoint)
INFO = re.compile(r"^(\S+: resuming from step \d+ \(|superpose: warning: )")


def fails(argv: list[str], capsys, *fragments: str) -> str:
    """Run the CLI, expect a one-line user error holding every fragment; return that line."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    # transformers draws a "Writing model shards" bar during an export, whatever train.progress says
    lines = [line for line in err.strip().splitlines() if not (PROGRESS_BAR.search(line) or INFO.search(line))]
    assert len(lines) == 1, err
    assert lines[0].startswith("superpose: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(*roots: Path) -> dict:
    """Content hash of every file below ``roots`` (to prove that nothing was touched)."""
    files = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in paths:
            files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def vocab_size(data: Path) -> int:
    return json.loads((data / "meta.json").read_text())["vocab_size"]


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", f"--data.dir={data}", '--data.corpus=""', "--data.seq_len=16", "--train.batch_size=2",
            "--train.steps=4", "--train.eval_tokens=64", "--train.progress=false", "--train.device=cpu",
            "--train.tensorboard=false", f"--train.out_dir={out}", *extra]


@pytest.fixture
def data_copy(small_data, tmp_path):
    """A private copy of the prepared corpus that a test may damage."""
    return Path(shutil.copytree(small_data, tmp_path / "data"))


@pytest.fixture(scope="module")
def finished_run(small_data, tmp_path_factory):
    """A completed 4-step TST run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("finished") / "run"
    main(train_args(small_data, out, "--train.checkpoint_every=2", "--tst.ratio=0.5"))
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def resume_args(run: Path, *extra) -> list:
    """Train again in ``run`` with its saved config (a copied run resumes where it lies)."""
    return ["train", run / "config.toml", f"--train.out_dir={run}", *extra]


# ---------------------------------------------------------------------------- config


def test_debug_shows_the_traceback(small_data, tmp_path):
    from superpose.config import ConfigError

    with pytest.raises(ConfigError, match="tst.bag_size"):
        main(["--debug", *train_args(small_data, tmp_path / "run", "--tst.bag_size=0")])


def test_bag_size_below_one(small_data, tmp_path, capsys):
    fails(train_args(small_data, tmp_path / "run", "--tst.bag_size=0"), capsys, "tst.bag_size", ">= 1")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["2.5", "four", "true"])
def test_bag_size_not_an_integer(small_data, tmp_path, capsys, value):
    fails(train_args(small_data, tmp_path / "run", f"--tst.bag_size={value}"), capsys, "tst.bag_size must be int")


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_ratio_outside_unit_interval(small_data, tmp_path, capsys, value):
    fails(train_args(small_data, tmp_path / "run", f"--tst.ratio={value}"), capsys, "tst.ratio must be in [0, 1]")


def test_unknown_config_key_in_file(small_data, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text("[train]\nstep = 10\n")
    fails(["train", config, f"--train.out_dir={tmp_path / 'run'}"], capsys, "unknown config key train.step", "known: out_dir")


def test_unknown_config_section(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text("[optimizer]\nlr = 0.1\n")
    fails(["train", config], capsys, "unknown config section [optimizer]")


def test_unknown_config_key_on_command_line(small_data, tmp_path, capsys):
    fails(train_args(small_data, tmp_path / "run", "--tst.bagsize=4"), capsys, "unknown config key tst.bagsize")


def test_wrong_value_type_in_file(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('[train]\nsteps = "ten"\n')
    fails(["train", config], capsys, "train.steps must be int", "'ten'")


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_non_finite_number(small_data, tmp_path, capsys, value):
    fails(train_args(small_data, tmp_path / "run", f"--optim.lr={value}"), capsys, "optim.lr must be a finite number")


def test_config_file_not_toml(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text("[train\nsteps = 3\n")
    fails(["train", config], capsys, "is not valid TOML")


def test_config_file_missing(tmp_path, capsys):
    fails(["train", tmp_path / "nope.toml"], capsys, "nope.toml does not exist")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(small_data, tmp_path, capsys):
    fails(train_args(small_data, tmp_path / "run", "--train.device=cuda"), capsys, "no CUDA device")


# ---------------------------------------------------------------------------- data and model


@pytest.mark.parametrize("extra, fragment",
                         [(["--distributed.shard_size=8"], "distributed.shard_size applies to strategy hsdp only"),
                          (["--distributed.strategy=hsdp"], "hsdp needs distributed.shard_size >= 1")])
def test_shard_size_without_hsdp_or_hsdp_without_it(small_data, tmp_path, capsys, extra, fragment):
    fails(train_args(small_data, tmp_path / "run", *extra), capsys, fragment)
    assert not (tmp_path / "run").exists()


def test_phase1_window_longer_than_data(small_data, tmp_path, capsys):
    tokens = json.loads((small_data / "meta.json").read_text())["splits"]["train"]["tokens"]
    bag = tokens // 16 + 1  # s*L + s tokens per phase-1 window > the whole training split
    fails(train_args(small_data, tmp_path / "run", f"--tst.bag_size={bag}"), capsys,
          f"superposition window of {bag * 17} tokens is longer than the training data")


def test_seq_len_above_max_positions(small_data, tmp_path, capsys):
    fails(train_args(small_data, tmp_path / "run", "--data.seq_len=4096"), capsys,
          "data.seq_len = 4096 exceeds the model's max_position_embeddings = 2048")


def test_token_id_at_or_above_vocab_in_shard(data_copy, tmp_path, capsys):
    shard = data_copy / "train-00000.bin"
    vocab = vocab_size(data_copy)
    tokens = np.memmap(shard, dtype=np.uint16, mode="r+")
    tokens[:] = vocab  # one past the last id
    tokens.flush()
    del tokens
    fails(train_args(data_copy, tmp_path / "run"), capsys, f"train-00000.bin: token id {vocab}", f"vocabulary size {vocab}")


def test_token_id_out_of_range_in_validation_shard(data_copy, tmp_path, capsys):
    tokens = np.memmap(data_copy / "val-00000.bin", dtype=np.uint16, mode="r+")
    tokens[100] = 60000
    tokens.flush()
    del tokens
    fails(train_args(data_copy, tmp_path / "run", "--train.eval_tokens=0"), capsys,
          "val-00000.bin: token id 60000 at position 100")


def test_model_vocab_smaller_than_tokenizer(small_data, tmp_path, capsys):
    from transformers import LlamaConfig

    model_dir = tmp_path / "model"
    LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=64).save_pretrained(model_dir)
    fails(train_args(small_data, tmp_path / "run", f"--model.preset={model_dir}"), capsys,
          f"the tokenizer has {vocab_size(small_data)} tokens but the model's vocabulary has 100")


@pytest.mark.skipif(not GPT2_DIR.is_dir(), reason="needs the shared GPT-2 tokenizer")
def test_tokenizer_not_matching_shards(data_copy, tmp_path, capsys):
    from superpose.data import load_tokenizer

    load_tokenizer(GPT2_DIR).save(str(data_copy / "tokenizer.json"))
    before = snapshot(data_copy)
    fails(train_args(data_copy, tmp_path / "run"), capsys, "has 50257 tokens", f"written with {vocab_size(data_copy)}",
          "does not belong to this data")
    assert snapshot(data_copy) == before


def test_tokenizer_missing(data_copy, tmp_path, capsys):
    (data_copy / "tokenizer.json").unlink()
    fails(train_args(data_copy, tmp_path / "run"), capsys, "tokenizer", "not found")


def test_empty_shard(data_copy, tmp_path, capsys):
    (data_copy / "train-00000.bin").write_bytes(b"")
    fails(train_args(data_copy, tmp_path / "run"), capsys, "train-00000.bin is missing, truncated or too long (0 bytes")


def test_truncated_shard(data_copy, tmp_path, capsys):
    shard = data_copy / "val-00000.bin"
    shard.write_bytes(shard.read_bytes()[:1001])
    fails(train_args(data_copy, tmp_path / "run"), capsys, "val-00000.bin is missing, truncated or too long (1001 bytes")


def test_missing_shard(data_copy, tmp_path, capsys):
    (data_copy / "train-00000.bin").unlink()
    fails(train_args(data_copy, tmp_path / "run"), capsys, "train-00000.bin is missing")


def test_split_without_shards(data_copy, tmp_path, capsys):
    meta = json.loads((data_copy / "meta.json").read_text())
    meta["splits"]["val"]["shards"] = []
    (data_copy / "meta.json").write_text(json.dumps(meta))
    fails(train_args(data_copy, tmp_path / "run"), capsys, "lists no val shards")


def test_corrupt_meta(data_copy, tmp_path, capsys):
    (data_copy / "meta.json").write_text('{"format": 1, "vocab_')
    fails(train_args(data_copy, tmp_path / "run"), capsys, "meta.json is malformed")


def test_data_dir_not_prepared(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    fails(train_args(tmp_path / "empty", tmp_path / "run"), capsys, "is not a prepared data directory", "superpose prepare")


def test_unknown_model_preset(small_data, tmp_path, capsys):
    fails(train_args(small_data, tmp_path / "run", "--model.preset=llama-9000"), capsys, "is neither a preset")


# ---------------------------------------------------------------------------- prepare inputs


def prepare_args(out: Path, *inputs: Path, extra: tuple = ()) -> list:
    return ["prepare", "--out", out, "--quiet", "--vocab-size", "300", *[x for i in inputs for x in ("--input", i)], *extra]


def two_docs(tmp_path: Path) -> list[Path]:
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for i, path in enumerate(files):
        path.write_text(f"Document {i}: the quick brown fox jumps over the lazy dog. " * 20)
    return files


def test_missing_input_file(tmp_path, capsys):
    fails(prepare_args(tmp_path / "out", tmp_path / "missing.txt"), capsys, "input", "missing.txt does not exist")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,content", [("empty.txt", b""), ("blank.md", b" \n\n\t"), ("empty.jsonl", b"\n")])
def test_empty_input_file(tmp_path, capsys, name, content):
    (tmp_path / name).write_bytes(content)
    fails(prepare_args(tmp_path / "out", *two_docs(tmp_path), tmp_path / name), capsys, f"{name} holds no text")


def test_jsonl_line_not_json(tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken\n')
    fails(prepare_args(tmp_path / "out", path), capsys, "c.jsonl:2: line is not valid JSON")


@pytest.mark.parametrize("line", ['{"body": "no text field"}', '{"text": 42}', '["text"]'])
def test_jsonl_line_without_text_field(tmp_path, capsys, line):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    fails(prepare_args(tmp_path / "out", path), capsys, "c.jsonl:2: no string field 'text'", "--text-field")


def test_corrupt_gzip(tmp_path, capsys):
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "a document"}\n' * 200)[:60])
    fails(prepare_args(tmp_path / "out", path), capsys, "c.jsonl.gz: cannot read", "damaged")


def test_unsupported_input_type(tmp_path, capsys):
    path = tmp_path / "book.pdf"
    path.write_bytes(b"%PDF-1.4")
    fails(prepare_args(tmp_path / "out", path), capsys, "book.pdf: unsupported file type")


def test_non_utf8_text_is_replaced_and_counted(tmp_path, capsys):
    """Decision: bytes that are not UTF-8 are replaced with U+FFFD (not refused), and counted."""
    files = two_docs(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade. ".encode("latin-1") * 20)
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "ok \xff\xfe bytes"}\n{"text": "clean line"}\n')
    main([str(a) for a in prepare_args(tmp_path / "out", *files, tmp_path / "latin1.txt", tmp_path / "c.jsonl")])
    assert "2 documents held bytes that are not UTF-8; they were replaced with U+FFFD" in capsys.readouterr().out
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["non_utf8_documents_replaced"] == 2
    from superpose.data import TokenData

    data = TokenData(tmp_path / "out")
    text = "".join(data.tokenizer().decode([int(t) for t in s]) for split in ("train", "val") for s in data.splits[split])
    assert "Caf\ufffd cr\ufffdme" in text and "ok \ufffd\ufffd bytes" in text


def test_non_utf8_text_is_replaced_in_parallel_too(tmp_path, capsys):
    """`--num-proc 2` (Hugging Face datasets) used to stop with a UnicodeDecodeError instead."""
    files = two_docs(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade. ".encode("latin-1") * 20)
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "ok \xff\xfe bytes"}\n{"text": "clean line"}\n')
    main([str(a) for a in prepare_args(tmp_path / "out", *files, tmp_path / "latin1.txt", tmp_path / "c.jsonl",
                                       extra=("--num-proc", "2"))])
    from superpose.data import TokenData

    data = TokenData(tmp_path / "out")
    text = "".join(data.tokenizer().decode([int(t) for t in s]) for split in ("train", "val") for s in data.splits[split])
    assert "Caf\ufffd cr\ufffdme" in text and "ok \ufffd\ufffd bytes" in text


def test_prepare_refuses_existing_data_dir(small_data, tmp_path, capsys):
    out = Path(shutil.copytree(small_data, tmp_path / "data"))
    before = snapshot(out)
    fails(prepare_args(out, *two_docs(tmp_path)), capsys, "already holds prepared data")
    assert snapshot(out) == before


@pytest.mark.parametrize("extra,fragment", [(("--val-fraction", "1.5"), "validation fraction must be in (0, 1)"),
                                            (("--vocab-size", "100"), "vocab size 100 is too small")])
def test_prepare_bad_option(tmp_path, capsys, extra, fragment):
    fails(prepare_args(tmp_path / "out", *two_docs(tmp_path), extra=extra), capsys, fragment)


def test_tokenizer_without_end_of_document_token(tmp_path, capsys):
    from tokenizers import Tokenizer, models

    path = tmp_path / "tok.json"
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(path))
    fails(prepare_args(tmp_path / "out", *two_docs(tmp_path), extra=("--tokenizer", path)), capsys,
          "has none of <|endoftext|>, <|end_of_text|>")


def test_prepare_output_not_writable(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    fails(prepare_args(blocker / "out", *two_docs(tmp_path)), capsys, "is not a writable directory")
    assert blocker.read_text() == "keep me"


# ---------------------------------------------------------------------------- output and disk


def test_output_dir_not_writable(small_data, tmp_path, capsys):
    """A path below a regular file cannot be created, even by root (chmod would not stop root)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    fails(train_args(small_data, blocker / "run"), capsys, "train.out_dir", "is not a writable directory")
    assert blocker.read_text() == "keep me"


def test_disk_full_while_writing_checkpoint(run_copy, capsys):
    """RLIMIT_FSIZE makes the kernel refuse writes past 2 MB (EFBIG), as a full disk would
    (Python ignores SIGXFSZ). Resuming from step 2 writes checkpoint 4 again (~14 MB), which fails:
    step 2 stays as it was, and the old step 4, moved aside by the resume, too."""
    checkpoints = run_copy / "checkpoints"
    before = {name: snapshot(checkpoints / name) for name in ("step-00000002", "step-00000004")}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, hard))
    try:
        fails(resume_args(run_copy, "--resume", checkpoints / "step-00000002"), capsys,
              "could not write checkpoint", "step-00000004", "File too large", "earlier checkpoints are intact")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002"]
    assert snapshot(checkpoints / "step-00000002") == before["step-00000002"]
    [aside] = (run_copy / ABANDONED).glob("*/step-00000004")
    assert sorted(snapshot(aside).values()) == sorted(before["step-00000004"].values())


def test_disk_full_while_exporting_the_model(run_copy, capsys):
    """Resuming a finished run only re-exports the model (~5 MB), which fails under a 2 MB limit;
    the previous export and the checkpoints stay as they were."""
    before = snapshot(run_copy / "checkpoints", run_copy / "model")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, hard))
    try:
        fails(resume_args(run_copy, "--resume", "auto"), capsys, "could not write the model export", "checkpoints are intact")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert snapshot(run_copy / "checkpoints", run_copy / "model") == before
    assert not (run_copy / ".tmp-model").exists()


# ---------------------------------------------------------------------------- resuming


def test_existing_run_without_resume(run_copy, capsys):
    before = snapshot(run_copy)
    fails(resume_args(run_copy), capsys, "already holds a run", "--resume auto")
    assert snapshot(run_copy) == before


def test_resume_with_changed_config(run_copy, capsys):
    before = snapshot(run_copy)
    fails(resume_args(run_copy, "--resume", "auto", "--optim.lr=0.01"), capsys,
          "changes the run", "optim.lr: 0.003 -> 0.01", "--allow-config-change")
    assert snapshot(run_copy) == before


def test_resume_value_not_a_checkpoint(run_copy, capsys):
    before = snapshot(run_copy)
    fails(resume_args(run_copy, "--resume", "autp"), capsys, "--resume autp: expected never, auto")
    assert snapshot(run_copy) == before


def test_resume_truncated_checkpoint_by_path(run_copy, capsys):
    """A checkpoint named on the command line must verify; the error names the file and the run is untouched."""
    state = run_copy / "checkpoints" / "step-00000004" / "state.pt"
    state.write_bytes(state.read_bytes()[: 4096])
    before = snapshot(run_copy)
    fails(resume_args(run_copy, "--resume", state.parent), capsys, "step-00000004 failed verification",
          "state.pt has 4096 bytes, the manifest says")
    assert snapshot(run_copy) == before


def test_resume_auto_when_no_checkpoint_verifies(run_copy, capsys):
    for name in ("step-00000002", "step-00000004"):
        (run_copy / "checkpoints" / name / "manifest.json").unlink()
    before = snapshot(run_copy)
    fails(resume_args(run_copy, "--resume", "auto"), capsys, "no checkpoint of", "verifies", "manifest.json is missing")
    assert snapshot(run_copy) == before


def test_resume_checkpoint_of_another_model(run_copy, capsys):
    before = snapshot(run_copy)
    fails(resume_args(run_copy, "--resume", "auto", "--allow-config-change", "--model.preset=qwen3-moe-tiny"),
          capsys, "does not fit this model")
    assert snapshot(run_copy) == before


# ---------------------------------------------------------------------------- eval files
# `superpose eval` checks every {"query", "choices", "gold"} file with check_multiple_choice before it
# loads a model; its command-line path is tested in test_evaluation.py.


def write_eval(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = '{"query": "Q?", "choices": ["a", "b"], "gold": 1}'


@pytest.mark.parametrize("line,fragment", [
    ("{not json", "eval.jsonl:2: line is not valid JSON"),
    ('["query", "choices", "gold"]', "eval.jsonl:2: needs a string field 'query'"),
    ('{"question": "Q?", "answers": ["a", "b"], "label": 0}', "eval.jsonl:2: needs a string field 'query'"),
    ('{"query": 3, "choices": ["a", "b"], "gold": 0}', "needs a string field 'query'"),
    ('{"query": "Q?", "gold": 0}', "'choices' must be a list of at least 2 strings"),
    ('{"query": "Q?", "choices": "a b", "gold": 0}', "'choices' must be a list of at least 2 strings"),
    ('{"query": "Q?", "choices": ["a"], "gold": 0}', "'choices' must be a list of at least 2 strings"),
    ('{"query": "Q?", "choices": ["a", 2], "gold": 0}', "'choices' must be a list of at least 2 strings"),
    ('{"query": "Q?", "choices": ["a", "b"]}', "'gold' must be the index of the correct choice (0..1)"),
    ('{"query": "Q?", "choices": ["a", "b"], "gold": 2}', "'gold' must be the index of the correct choice (0..1)"),
    ('{"query": "Q?", "choices": ["a", "b"], "gold": "1"}', "'gold' must be the index"),
    ('{"query": "Q?", "choices": ["a", "b"], "gold": true}', "'gold' must be the index"),
])
def test_eval_file_wrong_schema(tmp_path, line, fragment):
    with pytest.raises(DataError) as exc:
        check_multiple_choice(write_eval(tmp_path, GOOD, line))
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("content,fragment", [(None, "No such file"), (b"\n \n", "no examples"),
                                              (b'{"query": "\xff"}', "can't decode")])
def test_eval_file_missing_empty_or_not_text(tmp_path, content, fragment):
    path = tmp_path / "eval.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as exc:
        check_multiple_choice(path)
    assert fragment in str(exc.value)


def test_eval_file_valid(tmp_path):
    assert check_multiple_choice(write_eval(tmp_path, GOOD, "", GOOD)) == 2
    if (EVAL_DIR / "arc_easy.jsonl").is_file():
        assert check_multiple_choice(EVAL_DIR / "arc_easy.jsonl") > 1000


# ---------------------------------------------------------------------------- never lose a user's files (#25)


def cli(argv) -> None:
    main([str(a) for a in argv])


def test_export_refuses_a_run_directory_a_users_directory_and_the_current_one(run_copy, tmp_path, capsys, monkeypatch):
    """Each used to be replaced by the export (the run's checkpoints, metrics and config gone), and
    `export CKPT .` was a traceback."""
    checkpoint = run_copy / "checkpoints" / "step-00000004"
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "notes.txt").write_text("a user's notes")
    (work / "paper.tex").write_text("\\documentclass{article}")
    before = snapshot(run_copy, work)
    fails(["export", checkpoint, run_copy], capsys, f"OUT_DIR {run_copy} holds a training run")
    fails(["export", checkpoint, work], capsys, "holds other files (data, paper.tex)", "choose another OUT_DIR")
    monkeypatch.chdir(work)
    fails(["export", checkpoint, "."], capsys, "OUT_DIR . holds other files")
    fails(["export", checkpoint, work / "data" / ".."], capsys, "OUT_DIR")
    assert snapshot(run_copy, work) == before


def test_export_replaces_an_export_only_with_force_quietly_and_with_the_users_umask(run_copy, tmp_path, capsys):
    out = tmp_path / "exported"
    cli(["export", run_copy / "checkpoints" / "step-00000004", out])
    err = capsys.readouterr().err
    assert "Writing model shards" not in err and not PROGRESS_BAR.search(err), err  # no third-party bars
    umask = os.umask(0o022)
    os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file() and p.name != ".lock"} == {
        p.name: 0o666 & ~umask for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    before = snapshot(out)
    fails(["export", run_copy / "checkpoints" / "step-00000002", out], capsys, "already holds an exported model; pass --force")
    assert snapshot(out) == before
    cli(["export", run_copy / "checkpoints" / "step-00000002", out, "--force"])
    assert json.loads((out / "superpose.json").read_text())["steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "run"]  # no .tmp- or .old- left


def test_an_export_killed_between_its_renames_keeps_the_only_good_copy(run_copy, tmp_path, capsys):
    """Killed after `OUT -> .old-OUT`: the next export used to delete .old-OUT, the only good copy, first."""
    out = tmp_path / "exported"
    cli(["export", run_copy / "checkpoints" / "step-00000004", out])
    good = {Path(k).name: v for k, v in snapshot(out).items()}
    out.rename(tmp_path / ".old-exported")
    fails(["export", run_copy / "checkpoints" / "step-00000002", out], capsys, "already holds an exported model")
    assert {Path(k).name: v for k, v in snapshot(out).items()} == good and not (tmp_path / ".old-exported").exists()


def test_disk_full_during_export_says_so_and_leaves_nothing(run_copy, tmp_path, capsys):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        line = fails(["export", run_copy / "checkpoints" / "step-00000004", tmp_path / "exported"], capsys,
                     "could not write the model export", "File too large", "free disk space and export again")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert "--resume" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_prepare_refuses_a_users_directory_and_an_exported_model(run_copy, tmp_path, capsys):
    """It used to overwrite a user's tokenizer.json and train-00000.bin, and an export's tokenizer."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "tokenizer.json").write_text('{"mine": true}')
    (mine / "train-00000.bin").write_bytes(bytes(range(256)))
    (mine / ".bashrc").write_text("export PATH")
    before = snapshot(mine, run_copy / "model")
    fails(prepare_args(mine, *two_docs(tmp_path)), capsys, "holds other files (.bashrc, tokenizer.json, train-00000.bin)")
    fails(prepare_args(mine, *two_docs(tmp_path), extra=("--force",)), capsys, "holds other files")
    fails(prepare_args(run_copy / "model", *two_docs(tmp_path), extra=("--force",)), capsys, "holds an exported model")
    assert snapshot(mine, run_copy / "model") == before


def test_prepare_force_replaces_prepared_data_whole(tmp_path, capsys):
    out = tmp_path / "data"
    cli(prepare_args(out, *two_docs(tmp_path)))
    first = json.loads((out / "meta.json").read_text())
    other = [tmp_path / "c.txt", tmp_path / "d.txt"]
    for path in other:
        path.write_text(f"Another text entirely ({path.name}), with other words in it. " * 40)
    cli(prepare_args(out, *other, extra=("--force",)))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["sources"] == [str(p) for p in other] != first["sources"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "c.txt", "d.txt", "data"]
    assert json.loads((out / "manifest.json").read_text())["files"].keys() == {
        "meta.json", "tokenizer.json", "train-00000.bin", "val-00000.bin"}


def test_a_second_prepare_on_one_directory_is_refused_while_the_first_writes(tmp_path, capsys):
    """Two writers used to mix one's meta and shards with the other's tokenizer."""
    from superpose.files import StagedDir

    out = tmp_path / "data"
    with StagedDir(out, "data", "output directory"):  # the first prepare, still writing
        fails(prepare_args(out, *two_docs(tmp_path)), capsys, "in use by another superpose process")
    assert not out.exists()


def test_disk_full_during_prepare_says_no_space_and_leaves_nothing(tmp_path, capsys):
    """It used to say '1847668 requested and 1044480 written' and leave a .tmp shard filling the disk."""
    text = tmp_path / "big.jsonl"
    text.write_text("".join(json.dumps({"text": f"Line {i}: the quick brown fox jumps over the {i * 7} lazy dogs."}) + "\n"
                            for i in range(20000)))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        fails(prepare_args(tmp_path / "data", text), capsys, "could not write the prepared data", "no space left",
              "free disk space and prepare again")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]


def test_prepare_takes_an_existing_path_literally_even_if_it_reads_as_a_glob(tmp_path):
    literal, lookalike = tmp_path / "run[1]" / "a.jsonl", tmp_path / "run1" / "a.jsonl"
    for path, word in ((literal, "literal"), (lookalike, "glob")):
        path.parent.mkdir()
        path.write_text("".join(json.dumps({"text": f"The {word} file says {word} {i} times over. " * 20}) + "\n"
                                for i in range(4)))
    cli(prepare_args(tmp_path / "data", literal))
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["sources"] == [str(literal)]


def test_verify_checks_prepared_data_against_its_checksums(tmp_path, capsys):
    """Half a shard overwritten with valid token ids used to train without a word."""
    data = tmp_path / "data"
    cli(prepare_args(data, *two_docs(tmp_path)))
    capsys.readouterr()
    cli(["verify", data])
    assert capsys.readouterr().out == f"ok       {data}\n"
    shard = data / "train-00000.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[: tokens.size // 2] = tokens[0]  # valid ids, the same size
    tokens.tofile(shard)
    with pytest.raises(SystemExit) as exc:
        cli(["verify", data])
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and "1 of 1 directories failed verification" in err
    assert out == f"DAMAGED  {data}: train-00000.bin does not match its sha256 checksum (the file is damaged)\n"


# ---------------------------------------------------------------------------- never train on the wrong data silently (#25)


@pytest.fixture
def run_on_own_data(small_data, tmp_path):
    """A finished 4-step run (checkpoints at 2 and 4) on a private copy of the data."""
    data = Path(shutil.copytree(small_data, tmp_path / "data"))
    run = tmp_path / "run"
    cli(train_args(data, run, "--train.checkpoint_every=2"))
    return data, run


def test_resume_and_export_against_other_data_are_refused_unless_allowed(run_on_own_data, tmp_path, capsys):
    """The data directory prepared again from other text with the same vocabulary size: the run used
    to continue on the new tokens and export the new tokenizer with its old weights."""
    data, run = run_on_own_data
    plays = [str(p) for p in shakespeare_files()[4:6]]
    cli(["prepare", "--out", data, "--force", "--quiet", "--vocab-size", str(vocab_size(data)), "--val-fraction", "0.25",
          *[x for p in plays for x in ("--input", p)]])
    before = snapshot(run)
    fails(resume_args(run, "--resume", "auto"), capsys, f"the run in {run} was trained on other data than {data}",
          "tokenizer and shards differ", "--allow-data-change")
    fails(["export", run / "checkpoints" / "step-00000002", tmp_path / "exported"], capsys,
          "was trained on other data", "--allow-data-change")
    assert snapshot(run) == before and not (tmp_path / "exported").exists()
    cli(resume_args(run, "--resume", "auto", "--allow-data-change"))
    [resumed] = [r for r in read_records(run) if r["kind"] == "resume"]
    assert resumed["data_changed"]["now"] == TokenData(data).identity() != resumed["data_changed"]["trained_on"]
    cli(["export", run / "checkpoints" / "step-00000002", tmp_path / "exported", "--allow-data-change"])
    assert json.loads((tmp_path / "exported" / "superpose.json").read_text())["data_changed"]["now"] == TokenData(data).identity()


def test_a_run_records_its_data_and_provenance(run_on_own_data):
    data, run = run_on_own_data
    start = read_records(run)[0]
    assert start["data"] == TokenData(data).identity() == json.loads((run / "model" / "superpose.json").read_text())["data"]
    prov = start["provenance"]
    assert prov["torch"] == torch.__version__.split("+")[0] or prov["torch"].startswith(torch.__version__.split("+")[0])
    assert prov["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and prov["world_size"] == 1 and prov["threads"] >= 1


def test_a_resume_never_falls_back_to_the_embedded_corpus(run_on_own_data, capsys):
    """The custom data directory deleted, data.corpus at its default: the run used to continue on Shakespeare."""
    data, run = run_on_own_data
    shutil.rmtree(data)
    config = run / "config.toml"
    config.write_text(config.read_text().replace('corpus = ""', 'corpus = "shakespeare"'))
    fails(resume_args(run, "--resume", "auto", "--allow-config-change"), capsys,
          f"data.dir {data}, the data this run was trained on, is not there")
    assert not data.exists()


# ---------------------------------------------------------------------------- bounded generation (#25)


def test_generate_refuses_more_tokens_than_the_model_has_positions(run_copy, capsys):
    """It used to run for 24 minutes past the model's 2,048 positions with only a warning."""
    fails(["generate", run_copy, "--max-new-tokens", "100000"], capsys,
          "--max-new-tokens 100000 is beyond the model's 2048 positions")
    fails(["generate", run_copy, "--max-new-tokens", "2047", "--prompt", "To be, or not to be"], capsys,
          "exceed the model's 2048 positions")


@pytest.mark.parametrize("name,valid", [("empty.jsonl", False), ("empty.txt", True)])
def test_parallel_prepare_of_files_without_text(tmp_path, capsys, name, valid):
    """`--num-proc 2` used to stop with a StopIteration (empty JSONL) or a KeyError (an empty train split)."""
    (tmp_path / name).write_text("")
    extra = ("--num-proc", "2", *(("--valid", two_docs(tmp_path)[0]) if valid else ()))
    fails(prepare_args(tmp_path / "out", tmp_path / name, extra=extra), capsys, f"{tmp_path / name}: hold no text")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".tmp-out").exists()
