"""torchrun with 2 CPU ranks (gloo), and 4 as 2 x 2 HSDP: DDP, FSDP2 and HSDP runs equal one process with the same global batch.

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from superpose.cli import main
from superpose.config import ConfigError, load_config
from superpose.distributed import Runtime, check_world
from superpose.model import TSTModel, build_model, router_balance_loss

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # nats, absolute, on losses of 6-7 nats (measured worst: 1.5e-6; see docs/results/distributed.md)
RESUME_TOLERANCE = 1e-6
GRAD_NORM_RTOL = 1e-3  # the MoE's fp32 grad norm moves by up to 2e-4 with the thread count alone
RUN = {  # 8 steps, phase 1 (s=2) for 4 of them, checkpoints after steps 3, 6 and 8
    "train.steps": 8, "train.batch_size": 4, "tst.bag_size": 2, "tst.ratio": 0.5, "optim.warmup_steps": 2,
    "train.eval_every": 100, "train.eval_tokens": 256, "train.checkpoint_every": 3, "train.keep_checkpoints": 3,
}


def launch(out_dir: Path, data_dir: Path, ranks: int, *overrides: str, resume: Path | None = None,
           env: dict | None = None) -> str:
    """Run ``superpose train`` in 1 process, or under torchrun with ``ranks`` processes; returns stdout.
    ``env`` adds environment variables."""
    runner = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1
              else [sys.executable])
    command = [*runner, "-m", "superpose", "train", *tiny_overrides(data_dir, out_dir, **RUN), *overrides]
    if resume is not None:
        command.append(f"--resume={resume}")
    # This checkout's package in every process; one thread each, as torchrun sets per rank.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def steps(run_dir: Path) -> dict[int, dict]:
    """The train records of a run, by step; a step logged twice would mean two ranks writing."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == len({r["step"] for r in train}), "a step was logged twice"
    return {r["step"]: r for r in train}


def assert_same(a: Path, b: Path, step_range, loss_tolerance: float = TOLERANCE) -> None:
    """Equal losses (absolute, nats) and gradient norms (relative) at every step of the range.

    The gradient norm catches what the loss cannot: AdamW is nearly blind to a constant factor
    on the gradients (a missing world-size scale), the norm before clipping is not."""
    first, second = steps(a), steps(b)
    for step in step_range:
        assert abs(first[step]["loss"] - second[step]["loss"]) < loss_tolerance, (step, first[step], second[step])
        assert first[step]["grad_norm"] == pytest.approx(second[step]["grad_norm"], rel=GRAD_NORM_RTOL), step


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data) -> dict[str, Path]:
    """The uninterrupted runs, launched side by side (most of a launch is imports): one process,
    2-rank DDP, 2-rank FSDP with 2 micro-batches per rank, and 2-rank FSDP of the MoE preset."""
    root = tmp_path_factory.mktemp("runs")
    plan = {
        "single": (1, []),
        "ddp": (2, ["--distributed.strategy=ddp"]),
        "fsdp": (2, ["--distributed.strategy=fsdp", "--train.micro_batch_size=1"]),
        "moe": (2, ["--model.preset=qwen3-moe-tiny", "--distributed.strategy=fsdp", "--train.checkpoint_every=0"]),
    }
    with ThreadPoolExecutor(len(plan)) as pool:
        stdout = dict(zip(plan, pool.map(lambda name: launch(root / name, small_data, plan[name][0], *plan[name][1]), plan)))
    assert all(text.count("done:") == 1 for text in stdout.values()), stdout  # only rank 0 reports
    return {name: root / name for name in plan}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(runs, strategy):
    assert sorted(steps(runs[strategy])) == list(range(1, 9))
    assert_same(runs["single"], runs[strategy], range(1, 9))
    single = steps(runs["single"])
    assert single[8]["loss"] < single[1]["loss"] - 0.5  # it trains, through the switch to next-token prediction
    records = [json.loads(line) for line in (runs[strategy] / "metrics.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in records if r["kind"] == "start"] == [2]
    assert len(list((runs[strategy] / "tensorboard").glob("events.*"))) == 1  # rank 0's only
    # the step-0 eval also scores phase 1's objective on held-out bags, split over the ranks
    first = [next(r for r in map(json.loads, (runs[name] / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval")
             for name in ("single", strategy)]
    assert first[1]["val_bag_loss"] == pytest.approx(first[0]["val_bag_loss"], abs=TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_compiled_two_ranks_equal_eager_one_process(runs, small_data, tmp_path, strategy):
    """``train.compile`` (model and loss in one compiled forward) under DDP and FSDP2 trains like the
    eager single process. Dynamo and AOTAutograd trace as on a GPU; the graphs run as ATen ops
    (``aot_eager``), since inductor's C++ compile would take minutes per rank on CPU."""
    out = tmp_path / strategy
    launch(out, small_data, 2, f"--distributed.strategy={strategy}", "--train.compile=true",
           env={"TORCH_COMPILE_OVERRIDE_BACKENDS": ">=0:aot_eager"})
    assert_same(runs["single"], out, range(1, 9))


def assert_identical(a: Path, b: Path, step_range) -> None:
    """The same losses and gradient norms, bit for bit, and the same exported weights."""
    first, second = steps(a), steps(b)
    for step in step_range:
        assert (first[step]["loss"], first[step]["grad_norm"]) == (second[step]["loss"], second[step]["grad_norm"]), step
    assert (a / "model" / "model.safetensors").read_bytes() == (b / "model" / "model.safetensors").read_bytes()


def shard_files(checkpoint: Path) -> list[str]:
    return sorted(p.name for p in checkpoint.glob("*.distcp"))


@pytest.mark.parametrize("strategy", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp"])
def test_two_rank_resume_continues_exactly(runs, small_data, tmp_path, strategy):
    """Resume a copy of the run from its step-3 checkpoint (phase 1) and cross the switch: steps 4..8
    repeat bit for bit. FSDP writes sharded checkpoints by default (one shard file per rank), DDP gathered ones."""
    checkpoint = runs[strategy] / "checkpoints" / "step-00000003"
    assert shard_files(checkpoint) == (["__0_0.distcp", "__1_0.distcp"] if strategy == "fsdp" else [])
    assert (checkpoint / "state.pt").is_file() == (strategy == "ddp")
    resumed = tmp_path / "resumed"
    shutil.copytree(runs[strategy], resumed)
    overrides = [f"--distributed.strategy={strategy}"] + (["--train.micro_batch_size=1"] if strategy == "fsdp" else [])
    launch(resumed, small_data, 2, *overrides, resume=resumed / "checkpoints" / checkpoint.name)
    assert_identical(runs[strategy], resumed, range(4, 9))


@pytest.mark.parametrize(("source", "ranks", "strategy"), [
    ("ddp", 1, "ddp"),  # gathered, 2 ranks -> 1 process
    ("fsdp", 1, "ddp"),  # sharded, FSDP 2 -> 1 process: DCP reshards
    pytest.param("fsdp", 2, "ddp", marks=pytest.mark.slow),  # sharded FSDP 2 -> DDP 2
    pytest.param("ddp", 2, "fsdp", marks=pytest.mark.slow),  # gathered DDP 2 -> FSDP 2 (which then writes sharded)
])
def test_checkpoint_resumes_on_other_ranks_and_strategy(runs, small_data, tmp_path, source, ranks, strategy):
    """A checkpoint of a 2-rank run continues on another world size or strategy as the run did."""
    resumed = tmp_path / "resumed"
    shutil.copytree(runs[source], resumed)
    launch(resumed, small_data, ranks, f"--distributed.strategy={strategy}", resume=resumed / "checkpoints" / "step-00000003")
    assert_same(runs[source], resumed, range(4, 9))


def test_sharded_checkpoint_reshards_model_and_optimizer_state_onto_one_process(runs, small_data):
    """The 2-rank FSDP checkpoint at step 3, loaded into one process, holds the one-process run's
    weights and AdamW moments (to fp tolerance: 2 ranks sum gradients in another order), name by
    name. This checks the resharded state itself, which the resumed losses see only through the
    steps after it."""
    from superpose.checkpoint import load_checkpoint
    from superpose.data import TokenData
    from superpose.optim import make_optimizer

    cfg = load_config(runs["fsdp"] / "config.toml")
    model = TSTModel(build_model(cfg.model.preset, TokenData(small_data).vocab_size, cfg.data.seq_len))
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    trainer = load_checkpoint(runs["fsdp"] / "checkpoints" / "step-00000003", model, optimizer)
    expected = torch.load(runs["single"] / "checkpoints" / "step-00000003" / "state.pt", weights_only=False)
    assert trainer["step"] == expected["trainer"]["step"] == 3
    # AdamW's first steps move a weight of near-zero gradient by ~lr whatever its size, so a reordered
    # fp sum shows in a few weights as up to ~1e-5; a wrongly placed slice would differ by ~0.02.
    torch.testing.assert_close(model.state_dict(), expected["model"], rtol=1e-3, atol=1e-4)
    names = dict(zip(map(id, model.parameters()), (name for name, _ in model.named_parameters())))
    moments = {names[id(p)]: state for p, state in optimizer.state.items()}
    reference = expected["optimizer"]["state"]
    assert sorted(moments) == sorted(reference)
    for name, state in moments.items():
        assert state["step"].item() == reference[name]["step"].item() == 3
        torch.testing.assert_close(state["exp_avg"], reference[name]["exp_avg"], rtol=1e-3, atol=1e-7)
        torch.testing.assert_close(state["exp_avg_sq"], reference[name]["exp_avg_sq"], rtol=1e-3, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 4])
def test_sharded_checkpoint_of_another_world_size_resumes_on_two_fsdp_ranks(small_data, tmp_path, ranks):
    """Sharded checkpoints of 1 process and of 4 FSDP ranks continue on 2 FSDP ranks (DCP reshards)."""
    source = tmp_path / "source"
    launch(source, small_data, ranks, "--distributed.strategy=fsdp", "--train.checkpoint_format=sharded")
    assert len(shard_files(source / "checkpoints" / "step-00000003")) == ranks
    resumed = tmp_path / "resumed"
    shutil.copytree(source, resumed)
    launch(resumed, small_data, 2, "--distributed.strategy=fsdp", resume=resumed / "checkpoints" / "step-00000003")
    assert_same(source, resumed, range(4, 9))


@pytest.mark.slow
def test_async_sharded_checkpoints_under_fsdp(runs, small_data, tmp_path):
    """Written in the background (DCP async_save on a gloo group of its own), the checkpoints of a
    2-rank FSDP run hold the same shards as synchronous ones and the run is the same."""
    run = tmp_path / "async"
    launch(run, small_data, 2, "--distributed.strategy=fsdp", "--train.micro_batch_size=1", "--train.async_checkpoint=true")
    assert_identical(runs["fsdp"], run, range(1, 9))
    for step in (3, 6, 8):
        entries = [json.loads((r / "checkpoints" / f"step-{step:08d}" / "manifest.json").read_text())["files"]
                   for r in (runs["fsdp"], run)]
        assert all(entries[0][name] == entries[1][name] for name in ("__0_0.distcp", "__1_0.distcp")), step


@pytest.mark.parametrize("name", ["fsdp", "moe"])
def test_export_of_a_two_rank_sharded_checkpoint(runs, tmp_path, name):
    """`superpose export`, in this process, turns the final sharded checkpoint of 2 FSDP ranks
    into the same weights as the run's own (gathered) export."""
    out = tmp_path / "exported"
    main(["export", str(runs[name] / "checkpoints" / "step-00000008"), str(out), "--quiet"])
    assert (out / "model.safetensors").read_bytes() == (runs[name] / "model" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def hsdp_runs(tmp_path_factory, small_data) -> dict[str, Path]:
    """4 ranks as 2 x 2 HSDP with 2 micro-batches per rank (so gradient sync skipping is exercised),
    beside one process with the same global batch of 8."""
    root = tmp_path_factory.mktemp("hsdp")
    plan = {
        "single": (1, []),
        "hsdp": (4, ["--distributed.strategy=hsdp", "--distributed.shard_size=2", "--train.micro_batch_size=1"]),
    }
    with ThreadPoolExecutor(len(plan)) as pool:
        list(pool.map(lambda name: launch(root / name, small_data, plan[name][0], "--train.batch_size=8", *plan[name][1]), plan))
    return {name: root / name for name in plan}


def test_hsdp_two_by_two_equals_one_process(hsdp_runs):
    assert_same(hsdp_runs["single"], hsdp_runs["hsdp"], range(1, 9))
    records = [json.loads(line) for line in (hsdp_runs["hsdp"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in records if r["kind"] == "start"] == [4]


def test_hsdp_checkpoint_resumes_on_two_fsdp_ranks(hsdp_runs, small_data, tmp_path):
    """The 4-rank HSDP checkpoint of step 3 (phase 1) continues on 2 FSDP ranks as the HSDP run did, across the switch."""
    resumed = tmp_path / "resumed"
    shutil.copytree(hsdp_runs["hsdp"], resumed)
    launch(resumed, small_data, 2, "--train.batch_size=8", "--distributed.strategy=fsdp",
           resume=resumed / "checkpoints" / "step-00000003")
    assert_same(hsdp_runs["hsdp"], resumed, range(4, 9))


def test_moe_trains_under_fsdp(runs):
    moe = steps(runs["moe"])
    assert sorted(moe) == list(range(1, 9)) and moe[8]["loss"] < moe[1]["loss"] - 0.5
    assert (runs["moe"] / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_moe_two_ranks_equal_one_process(runs, small_data, tmp_path):
    """The load-balancing loss is taken over the global batch, so an MoE run does not depend on the world size."""
    moe = ["--model.preset=qwen3-moe-tiny", "--train.checkpoint_every=0"]
    launch(tmp_path / "single", small_data, 1, *moe)
    launch(tmp_path / "ddp", small_data, 2, *moe, "--distributed.strategy=ddp")
    assert_same(tmp_path / "single", tmp_path / "ddp", range(1, 9))
    assert_same(tmp_path / "single", runs["moe"], range(1, 9))


@pytest.mark.slow
@pytest.mark.parametrize("ranks, layout", [(2, ["--distributed.strategy=fsdp"]),
                                           (4, ["--distributed.strategy=hsdp", "--distributed.shard_size=2"])],
                         ids=["fsdp", "hsdp"])
def test_bf16_mixed_precision_tracks_fp32(runs, small_data, tmp_path, ranks, layout):
    launch(tmp_path / "bf16", small_data, ranks, *layout, "--distributed.param_dtype=bf16", "--distributed.reduce_dtype=bf16")
    single, bf16 = steps(runs["single"]), steps(tmp_path / "bf16")
    assert max(abs(single[step]["loss"] - bf16[step]["loss"]) for step in range(1, 9)) < 0.05


@pytest.mark.slow
def test_tied_embeddings_under_fsdp(small_data, tmp_path):
    """A tied model (local config directory) trains under FSDP as on one process and exports one
    shared matrix, also through `superpose export` of its sharded checkpoint (which reads it once)."""
    from safetensors import safe_open

    from superpose.model import model_config

    config = model_config("tiny", 1024)
    config.tie_word_embeddings = True
    config.save_pretrained(tmp_path / "tied")
    tied = [f"--model.preset={tmp_path / 'tied'}", "--train.checkpoint_every=0"]
    launch(tmp_path / "single", small_data, 1, *tied)
    launch(tmp_path / "fsdp", small_data, 2, *tied, "--distributed.strategy=fsdp")
    assert_same(tmp_path / "single", tmp_path / "fsdp", range(1, 9))
    for run in ("single", "fsdp"):
        with safe_open(tmp_path / run / "model" / "model.safetensors", "pt") as weights:
            assert "lm_head.weight" not in weights.keys()
    main(["export", str(tmp_path / "fsdp" / "checkpoints" / "step-00000008"), str(tmp_path / "exported"), "--quiet"])
    assert ((tmp_path / "exported" / "model.safetensors").read_bytes()
            == (tmp_path / "fsdp" / "model" / "model.safetensors").read_bytes())


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


@pytest.mark.parametrize("mode", ["full", pytest.param("selective", marks=pytest.mark.slow)])
def test_activation_checkpointing_under_fsdp_equals_one_process(runs, small_data, tmp_path, mode):
    """Checkpointed blocks, built on meta and sharded by FSDP2, train as the plain single process."""
    launch(tmp_path / mode, small_data, 2, "--distributed.strategy=fsdp", f"--train.activation_checkpointing={mode}")
    assert_same(runs["single"], tmp_path / mode, range(1, 9))


def test_mixed_precision_dtypes_need_fsdp():
    with pytest.raises(ConfigError, match="fsdp and hsdp only"):
        load_config(None, ["--distributed.param_dtype=bf16"])
    assert load_config(None, ["--distributed.strategy=fsdp",
                              "--distributed.reduce_dtype=bf16"]).distributed.reduce_dtype == "bf16"
    assert load_config(None, ["--distributed.strategy=hsdp", "--distributed.shard_size=8",
                              "--distributed.param_dtype=bf16"]).distributed.param_dtype == "bf16"


@pytest.mark.parametrize("overrides, message", [
    (["--distributed.strategy=hsdp"], "needs distributed.shard_size >= 1"),
    (["--distributed.strategy=hsdp", "--distributed.shard_size=-2"], "needs distributed.shard_size >= 1"),
    (["--distributed.strategy=fsdp", "--distributed.shard_size=2"], "applies to strategy hsdp only"),
])
def test_shard_size_is_checked_with_the_config(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_batch_and_shard_size_must_divide_the_world_size():
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match=r"shard_size \(3\) must divide the world size \(4\)"):
        check_world(Runtime(0, 4, cpu), 16, "hsdp", 3)
    for world, shard_size in [(4, 2), (4, 4), (4, 1), (1, 8)]:  # one process: hsdp, like fsdp, does not apply
        check_world(Runtime(0, world, cpu), 16, "hsdp", shard_size)
    with pytest.raises(ConfigError, match=r"train.batch_size \(16\) must be divisible by the world size \(3\)"):
        check_world(Runtime(0, 3, cpu), 16, "ddp", 0)
