"""End-to-end: tiny runs learn, s=1 is plain next-token training, runs are reproducible and resumable."""
import json
import shutil

import pytest
import torch
from conftest import tiny_overrides
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from superpose.config import load_config
from superpose.data import TokenData, unigram_log_probs, validation_windows
from superpose.distributed import Runtime
from superpose.method import split_window
from superpose.model import TSTModel, build_model
from superpose.optim import make_optimizer
from superpose.progress import hf_progress_bars
from superpose.schedule import Stage
from superpose.train import train, train_step
from superpose.validation import validation_loss


def records(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_a_run_without_omp_num_threads_chooses_and_names_its_threads(small_data, tmp_path, monkeypatch, capsys):
    """train.threads = 0 and no OMP_NUM_THREADS (a user's shell, unlike these tests): the run picks
    its threads from the machine's load and says so in one line before it starts, then trains."""
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS")
    threads = torch.get_num_threads()
    train(load_config(None, tiny_overrides(small_data, tmp_path / "run", **{"train.steps": 2, "train.eval_every": 2})))
    assert "CPU thread(s) per process" in capsys.readouterr().err
    assert torch.get_num_threads() == threads  # the run's choice ends with the run
    assert records(tmp_path / "run", "eval")[-1]["step"] == 2


@pytest.mark.parametrize("arm", ["tst", "baseline"])
def test_tiny_model_learns(small_data, tmp_path, arm):
    ratio = 0.3 if arm == "tst" else 0.0
    info = train(load_config(None, tiny_overrides(small_data, tmp_path / arm, **{"tst.ratio": ratio})))
    evals = records(tmp_path / arm, "eval")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0  # ln(1024) = 6.93 at init
    stages = [(r["step"], r["bag_size"]) for r in records(tmp_path / arm, "stage")]
    assert stages == ([(0, 4), (12, 1)] if arm == "tst" else [(0, 1)])
    train_losses = [r["loss"] for r in records(tmp_path / arm, "train")]
    assert train_losses[-1] < train_losses[0]
    assert info["val_loss"] == evals[-1]["val_loss"]


def test_s1_step_equals_plain_transformers_training(small_data):
    """Our step with s=1 matches `model(input_ids, labels=...)` + AdamW, parameter for parameter."""
    cfg = load_config(None, tiny_overrides(small_data, "unused", **{"optim.grad_clip": 0.0}))
    vocab = TokenData(small_data).vocab_size
    torch.manual_seed(0)
    ours = build_model("tiny", vocab, 32)
    plain = build_model("tiny", vocab, 32)
    plain.load_state_dict(ours.state_dict())
    model = TSTModel(ours)
    opt_ours = make_optimizer(model, cfg, torch.device("cpu"))
    opt_plain = torch.optim.AdamW(
        [{"params": [p for p in plain.parameters() if p.ndim >= 2], "weight_decay": 0.1},
         {"params": [p for p in plain.parameters() if p.ndim < 2], "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    runtime = Runtime(0, 1, torch.device("cpu"))
    stage = Stage("next-token", 1, "full", "uniform", 10)
    for step in range(3):
        window = torch.randint(0, vocab, (4, 33), generator=torch.Generator().manual_seed(step))
        if step == 0:  # the gradients themselves agree tightly
            loss_sum, weight = model(*split_window(window, 1, "full"), torch.ones(1))
            ours_grads = torch.autograd.grad(loss_sum / weight, list(ours.parameters()))
            plain_grads = torch.autograd.grad(plain(input_ids=window, labels=window).loss, list(plain.parameters()))
            for a, b in zip(ours_grads, plain_grads):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        result = train_step(model, opt_ours, window, stage, step, 1e-3, cfg, runtime)
        loss = plain(input_ids=window, labels=window).loss  # HF shifts labels; the last position is unscored
        loss.backward()
        opt_plain.step()
        opt_plain.zero_grad()
        assert result.loss == pytest.approx(loss.item(), rel=1e-5)
    # Adam divides by sqrt(v): a gradient element near 0 turns float-order noise into an
    # update of up to lr, so parameters agree to a fraction of lr (1e-3), not to 1e-6.
    for a, b in zip(ours.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_same_config_same_losses_and_resume_equals_uninterrupted(small_data, tmp_path):
    full = tmp_path / "full"
    overrides = tiny_overrides(small_data, full, **{"train.checkpoint_every": 20})
    train(load_config(None, overrides))
    again = tmp_path / "again"
    train(load_config(None, tiny_overrides(small_data, again, **{"train.checkpoint_every": 20})))
    losses = [r["loss"] for r in records(full, "train")]
    assert losses == [r["loss"] for r in records(again, "train")]

    # Resume a copy from its step-20 checkpoint, as if the run had been killed after writing it.
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000040")
    shutil.rmtree(resumed / "model")
    train(load_config(None, tiny_overrides(small_data, resumed, **{"train.checkpoint_every": 20})), resume="auto")
    assert [r["loss"] for r in records(resumed, "train")] == losses
    assert [r["val_loss"] for r in records(resumed, "eval")] == [r["val_loss"] for r in records(full, "eval")]


def test_phase1_evals_score_the_bag_objective_beside_the_unigram_level(small_data, tmp_path, one_thread):
    """Evals after a superposition step also score that stage's MCE on held-out bags and the MCE
    of the train split's token frequencies on the same bags; next-token evals do not."""
    run = tmp_path / "tst"
    cfg = load_config(None, tiny_overrides(small_data, run, **{"train.eval_every": 12}))
    train(cfg)
    evals = {r["step"]: r for r in records(run, "eval")}
    assert [t for t, r in evals.items() if "val_bag_loss" in r] == [0, 12]  # steps 0-11 are phase 1 (s=4)
    assert evals[0]["val_bag_loss"] == pytest.approx(6.93, abs=0.3)  # ln(1024) at init
    assert evals[12]["val_bag_loss"] < evals[0]["val_bag_loss"] - 0.5  # phase 1 learned on held-out bags
    data = TokenData(small_data)
    logp = unigram_log_probs(data.splits["train"], data.vocab_size)  # [V]
    assert torch.logsumexp(logp, 0).item() == pytest.approx(0.0, abs=1e-5)
    n, width = 4096 // 32, 4 * 32 + 4  # as many windows as the next-token eval, s*L+s tokens each
    bags = validation_windows(data.splits["val"], width - 1, n * (width - 1))  # [n, s*L+s]
    targets = split_window(bags, 4, "full")[1]  # [n, L, 4]
    assert evals[12]["val_bag_unigram_loss"] == pytest.approx(-logp[targets].mean().item(), rel=1e-5)
    # validation_loss() with a stage is exactly the training objective on those windows
    model = TSTModel(build_model("tiny", data.vocab_size, 32))
    stage = Stage("superposition", 4, "full", "power", 12)
    loss_sum, weight = model(*split_window(bags, 4, "full"), stage.weights(0, 4))
    measured = validation_loss(model, bags, cfg, Runtime(0, 1, torch.device("cpu")), stage, 0)
    assert measured == pytest.approx((loss_sum / weight).item(), rel=1e-5)


def test_export_loads_with_transformers_and_generates(small_data, tmp_path):
    train(load_config(None, tiny_overrides(small_data, tmp_path / "run", **{"train.steps": 10})))
    model_dir = tmp_path / "run" / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    assert (model_dir / "model.safetensors").is_file()
    ids = tokenizer("ROMEO:", return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] > ids.shape[1]
    assert tokenizer.decode(out[0]).startswith("ROMEO:")


def test_research_levers_train_end_to_end(small_data, tmp_path):
    """Curriculum 4 -> 2, a blend into next-token steps, optimizer reset and LR re-warmup."""
    run = tmp_path / "levers"
    train(load_config(None, tiny_overrides(small_data, run, **{
        "train.steps": 30, "tst.curriculum": [[4, 0.2], [2, 0.2]], "tst.blend_steps": 4,
        "tst.reset_optimizer": True, "tst.rewarmup_steps": 3, "tst.mode": "output"})))
    bags = {r["step"]: r["bag_size"] for r in records(run, "train")}
    assert [bags[t] for t in (1, 6, 7, 8)] == [4, 4, 2, 2] and bags[30] == 1  # record t = step t-1
    assert sorted(set(bags[t] for t in range(9, 13))) == [1, 2]  # the blend mixes both kinds of step
    evals = records(run, "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]


def test_hf_progress_bars_are_silenced_only_inside_the_block_and_only_when_asked():
    assert hf_logging.is_progress_bar_enabled()
    with hf_progress_bars(False):
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the user's choice stands either way
    try:
        with hf_progress_bars(True):
            assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
