"""torchrun with 2 CPU ranks (gloo): DDP and FSDP2 runs equal one process with the same global batch.

Every run is the ``tiny`` preset for 8 steps through a phase switch (s=2, r=0.5, L=32, global
batch 4), logging the loss of every step. Two ranks change only the order of floating-point
sums (gradient all-reduce / reduce-scatter, the fp32 grad-norm reduction), so the per-step
losses agree to ``TOLERANCE`` nats, not bit for bit; a resume on the same ranks and strategy
repeats the same arithmetic and must agree to ``RESUME_TOLERANCE``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from superpose.config import ConfigError, load_config
from superpose.data import prepare, shakespeare_files
from superpose.model import TSTModel, build_model, router_balance_loss

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 2e-4  # nats, absolute, on losses of 7-9 nats (measured worst: see the README section)
RESUME_TOLERANCE = 1e-6
RUN = [
    "--model.preset=tiny", "--data.seq_len=32", "--train.steps=8", "--tst.ratio=0.5", "--tst.bag_size=2",
    "--train.batch_size=4", "--optim.warmup_steps=2", "--train.log_every=1", "--train.eval_every=100",
    "--train.eval_tokens=256", "--train.checkpoint_every=3", "--train.keep_checkpoints=3", "--train.progress=false",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Four plays with a 512-token BPE: enough for windows of s*L+s tokens, and quick to prepare."""
    path = tmp_path_factory.mktemp("data")
    prepare(path, inputs=[str(f) for f in shakespeare_files()[:4]], vocab_size=512, progress=False)
    return path


def launch(out_dir: Path, data_dir: Path, ranks: int, *overrides: str, resume: Path | None = None) -> str:
    """Run ``superpose train`` in 1 process, or under torchrun with ``ranks`` processes; returns stdout."""
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else [sys.executable]
    command = [*runner, "-m", "superpose", "train", *RUN, f"--data.dir={data_dir}", f"--train.out_dir={out_dir}", *overrides]
    if resume is not None:
        command.append(f"--resume={resume}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun sets per rank; spare the shared cores
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == len({r["step"] for r in train}), "a step was logged twice (two ranks writing?)"
    return {r["step"]: r["loss"] for r in train}


def worst_difference(a: dict[int, float], b: dict[int, float], steps) -> float:
    assert all(step in a and step in b for step in steps)
    return max(abs(a[step] - b[step]) for step in steps)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir) -> dict[str, Path]:
    """The uninterrupted runs: one process, 2-rank DDP, 2-rank FSDP with 2 micro-batches per rank."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, ranks, overrides in [
        ("single", 1, []),
        ("ddp", 2, ["--distributed.strategy=ddp"]),
        ("fsdp", 2, ["--distributed.strategy=fsdp", "--train.micro_batch_size=1"]),
    ]:
        stdout = launch(root / name, data_dir, ranks, *overrides)
        assert stdout.count("done:") == 1, stdout  # only rank 0 reports
        out[name] = root / name
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(runs, strategy):
    single, parallel = losses(runs["single"]), losses(runs[strategy])
    assert sorted(parallel) == list(range(1, 9))
    assert worst_difference(single, parallel, range(1, 9)) < TOLERANCE
    assert single[8] < single[1] - 0.5  # it trains, through the switch to next-token prediction
    records = [json.loads(line) for line in (runs[strategy] / "metrics.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in records if r["kind"] == "start"] == [2]


@pytest.mark.parametrize("strategy", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp"])
def test_two_rank_resume_continues_exactly(runs, data_dir, tmp_path, strategy):
    """Resume a copy of the run from its step-3 checkpoint (phase 1) and cross the switch: steps 4..8 repeat."""
    resumed = tmp_path / "resumed"
    shutil.copytree(runs[strategy], resumed)
    overrides = [f"--distributed.strategy={strategy}"] + (["--train.micro_batch_size=1"] if strategy == "fsdp" else [])
    launch(resumed, data_dir, 2, *overrides, resume=resumed / "checkpoints" / "step-00000003")
    assert worst_difference(losses(runs[strategy]), losses(resumed), range(4, 9)) < RESUME_TOLERANCE


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_rank_checkpoint_resumes_on_one_process(runs, data_dir, tmp_path, strategy):
    """A gathered checkpoint of 2 ranks continues on 1 process as the 2-rank run did."""
    resumed = tmp_path / "resumed"
    shutil.copytree(runs[strategy], resumed)
    launch(resumed, data_dir, 1, resume=resumed / "checkpoints" / "step-00000003")
    assert worst_difference(losses(runs[strategy]), losses(resumed), range(4, 9)) < TOLERANCE


def test_moe_trains_under_fsdp(data_dir, tmp_path):
    launch(tmp_path / "moe", data_dir, 2, "--model.preset=qwen3-moe-tiny", "--distributed.strategy=fsdp",
           "--train.checkpoint_every=0")
    moe = losses(tmp_path / "moe")
    assert sorted(moe) == list(range(1, 9)) and moe[8] < moe[1] - 0.5
    assert (tmp_path / "moe" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_moe_two_ranks_equal_one_process(data_dir, tmp_path):
    """The load-balancing loss is taken over the global batch, so an MoE run does not depend on the world size."""
    moe = ["--model.preset=qwen3-moe-tiny", "--train.checkpoint_every=0"]
    launch(tmp_path / "single", data_dir, 1, *moe)
    launch(tmp_path / "ddp", data_dir, 2, *moe, "--distributed.strategy=ddp")
    assert worst_difference(losses(tmp_path / "single"), losses(tmp_path / "ddp"), range(1, 9)) < TOLERANCE


@pytest.mark.slow
def test_fsdp_bf16_mixed_precision_tracks_fp32(runs, data_dir, tmp_path):
    launch(tmp_path / "bf16", data_dir, 2, "--distributed.strategy=fsdp", "--distributed.param_dtype=bf16",
           "--distributed.reduce_dtype=bf16")
    assert worst_difference(losses(runs["single"]), losses(tmp_path / "bf16"), range(1, 9)) < 0.05


@pytest.mark.slow
def test_tied_embeddings_under_fsdp(data_dir, tmp_path):
    """A tied model (local config directory) trains under FSDP as on one process and exports one shared matrix."""
    from safetensors import safe_open

    from superpose.model import model_config

    config = model_config("tiny", 512)
    config.tie_word_embeddings = True
    config.save_pretrained(tmp_path / "tied")
    tied = [f"--model.preset={tmp_path / 'tied'}", "--train.checkpoint_every=0"]
    launch(tmp_path / "single", data_dir, 1, *tied)
    launch(tmp_path / "fsdp", data_dir, 2, *tied, "--distributed.strategy=fsdp")
    assert worst_difference(losses(tmp_path / "single"), losses(tmp_path / "fsdp"), range(1, 9)) < TOLERANCE
    for run in ("single", "fsdp"):
        with safe_open(tmp_path / run / "model" / "model.safetensors", "pt") as weights:
            assert "lm_head.weight" not in weights.keys()


def test_moe_gives_every_parameter_a_gradient():
    """Fused 3-D experts: even one token (2 of 8 experts) reaches every parameter, so DDP needs no
    find_unused_parameters and the FSDP2 reduce-scatters of all ranks hold the same tensors."""
    torch.manual_seed(0)
    model = TSTModel(build_model("qwen3-moe-tiny", 512, 32))
    loss, _ = model(torch.tensor([[[5]]]), torch.tensor([[[7]]]), torch.ones(1))
    loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


def test_router_balance_loss_is_the_transformers_loss_on_one_process():
    torch.manual_seed(0)
    lm = build_model("qwen3-moe-tiny", 512, 32)
    out = lm.base_model(input_ids=torch.randint(0, 512, (3, 16)), output_router_logits=True, use_cache=False)
    module = sys.modules[type(lm).__module__]
    expected = module.load_balancing_loss_func(out.router_logits, lm.config.num_experts, lm.config.num_experts_per_tok, None)
    torch.testing.assert_close(router_balance_loss(lm, out), expected)


def test_mixed_precision_dtypes_need_fsdp():
    with pytest.raises(ConfigError, match="fsdp only"):
        load_config(None, ["--distributed.param_dtype=bf16"])
    assert load_config(None, ["--distributed.strategy=fsdp", "--distributed.reduce_dtype=bf16"]).distributed.reduce_dtype == "bf16"
