"""`superpose eval`: lm-evaluation-harness on local files, checked against naive log-likelihood loops."""
import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")
from conftest import SHARED_DATA, tiny_overrides
from transformers import AutoModelForCausalLM, AutoTokenizer

from superpose.cli import main
from superpose.config import load_config
from superpose.train import train

EVAL_DIR = SHARED_DATA / "eval" if (SHARED_DATA / "eval").is_dir() else None
LIMIT = 8


@pytest.fixture(scope="module")
def run_dir(small_data, tmp_path_factory):
    """A run of a few steps, exported to RUN/model like any superpose run."""
    out = tmp_path_factory.mktemp("eval") / "run"
    train(load_config(None, tiny_overrides(small_data, out, **{"train.steps": 4, "train.eval_tokens": 256,
                                                              "train.tensorboard": False, "train.device": "cpu"})))
    return out


def loaded(run_dir):
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(run_dir / "model")


@torch.no_grad()
def loglikelihood(model, ids: list[int], start: int) -> float:
    """Sum of log p(ids[i] | ids[:i]) for i >= start."""
    logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].log_softmax(-1)  # [n-1, V]
    return sum(logits[i - 1, ids[i]].item() for i in range(start, len(ids)))


@pytest.mark.skipif(EVAL_DIR is None, reason="shared/data/eval not found")
def test_eval_reports_arc_easy_and_piqa_as_a_naive_loop_scores_them(run_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    main(["eval", str(run_dir), "--tasks", "arc_easy,piqa", "--eval-dir", str(EVAL_DIR), "--limit", str(LIMIT),
          "--out", str(out)])
    printed = capsys.readouterr().out
    assert "arc_easy" in printed and "piqa" in printed and "acc_norm" in printed
    results = json.loads(out.read_text())
    assert results["model"] == str(run_dir / "model") and set(results["tasks"]) == {"arc_easy", "piqa"}
    model, tok = loaded(run_dir)
    for name, scores in results["tasks"].items():
        assert scores["examples"] == LIMIT
        docs = [json.loads(line) for line in (EVAL_DIR / f"{name}.jsonl").read_text().splitlines()[:LIMIT]]
        acc, acc_norm = [], []
        for doc in docs:  # the harness's prompt: "Question: ...\nAnswer:" + " choice"
            context = doc["query"].strip() + "\nAnswer:"
            n_context = len(tok(context).input_ids)
            lls = [loglikelihood(model, tok(context + " " + c).input_ids, n_context) for c in doc["choices"]]
            acc.append(max(range(len(lls)), key=lls.__getitem__) == doc["gold"])
            acc_norm.append(max(range(len(lls)), key=lambda i: lls[i] / len(doc["choices"][i])) == doc["gold"])
        assert scores["acc"] == pytest.approx(sum(acc) / LIMIT)
        assert scores["acc_norm"] == pytest.approx(sum(acc_norm) / LIMIT)
        p = scores["acc"]
        assert scores["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (LIMIT - 1)))


def test_eval_heldout_text_loss_matches_a_naive_loop(run_dir, tmp_path):
    texts = ["To be, or not to be, that is the question.", "Now is the winter of our discontent.",
             "All the world's a stage, and all the men and women merely players."]
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    out = tmp_path / "results.json"
    main(["eval", str(run_dir / "model"), "--text", str(held), "--text-field", "body", "--max-length", "64", "--out", str(out)])
    result = json.loads(out.read_text())["text"]
    model, tok = loaded(run_dir)
    nll, tokens = 0.0, 0
    for text in texts:  # each document is scored after the EOS token, in one window
        ids = [tok.eos_token_id] + tok(text).input_ids
        assert len(ids) <= 64
        nll -= loglikelihood(model, ids, 1)
        tokens += len(ids) - 1
    assert result["documents"] == 3 and result["tokens"] == tokens and result["max_length"] == 64
    assert result["loss"] == pytest.approx(nll / tokens, rel=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert result["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-4)


def test_eval_bad_inputs_are_one_line_errors(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "Question: ?", "choices": ["a", "b"], "gold": 2}) + "\n")
    for argv, message in [([str(bad)], "'gold' must be the index"), (["nope"], "pass --eval-dir"), ([], "nothing to evaluate")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", str(run_dir), *(["--tasks", ",".join(argv)] if argv else [])])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_eval_text_without_text_or_utf8_is_a_one_line_error(run_dir, tmp_path, capsys):
    """An empty --text file was a StopIteration traceback, one with bytes that are not UTF-8 a UnicodeDecodeError."""
    empty, latin = tmp_path / "empty.txt", tmp_path / "latin1.txt"
    empty.write_text("")
    latin.write_bytes("Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade.".encode("latin-1"))
    for path, message in [(empty, f"input {empty} holds no text"), (latin, f"--text {latin} holds bytes that are not UTF-8")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", str(run_dir), "--text", str(path)])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_eval_text_draws_one_bar_not_one_per_batch_of_windows(run_dir, tmp_path, capsys):
    """A long held-out text used to print a bar per batch of windows (about 1,070), and a "Loading weights" bar."""
    text = tmp_path / "long.txt"
    text.write_text("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 60)
    main(["eval", str(run_dir), "--text", str(text), "--batch-size", "2"])
    err = capsys.readouterr().err
    assert "Running loglikelihood requests" not in err and "Loading weights" not in err, err
