"""superpose.torchtitan on torchtitan's own Trainer, CPU processes over gloo (tests/torchtitan_on_cpu.py).

References: superpose's own objective (superpose.model.TSTModel on a Hugging Face copy of the
weights) for superposition steps, torchtitan's stock model + cross-entropy for next-token steps
(tests/torchtitan_parity.py), the uninterrupted run for a resume, torchtitan's stock Trainer for
phase 2 after the switch.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchtitan", reason="torchtitan is not installed (pip install 'superpose[torchtitan]')")

HERE = Path(__file__).resolve().parent
STEPS, SWITCH = 8, 4  # --tst.ratio 0.5: steps 1-4 superposition (s = 4), 5-8 next-token
# fp32 parameters (torchtitan's FSDP default is bf16) so that parity is within fp32 rounding
COMMON = ["--module", "superpose.torchtitan", "--training.steps", str(STEPS),
          "--training.mixed_precision_param", "float32", "--debug.seed", "0", "--checkpoint.interval", str(SWITCH)]


def torchtitan_run(script: str, data: Path, dump: Path, config: str = "llama3_tiny_tst", ranks: int = 1, *flags: str) -> dict:
    """Run ``script`` under torchrun; return the run's superpose train records (metrics.jsonl) by step."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", str(HERE / script),
               *COMMON, "--config", config, *(["--tst.ratio", "0.5"] if config.endswith("_tst") else []),
               "--dataloader.dir", str(data), "--hf_assets_path", str(data), "--dump_folder", str(dump), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE.parent}{os.pathsep}{HERE}"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return records(dump) if (dump / "metrics.jsonl").is_file() else {}


def records(dump: Path, kind: str = "train") -> dict:
    lines = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if r["kind"] == kind}


@pytest.fixture(scope="module")
def tst_run(small_data, tmp_path_factory):
    """8 steps of llama3_tiny_tst across the switch, each step also scored by the references."""
    dump = tmp_path_factory.mktemp("titan") / "tst"
    train = torchtitan_run("torchtitan_parity.py", small_data, dump)
    reference = {int(k): v for k, v in json.loads((dump / "reference.json").read_text()).items()}
    return dump, train, reference


def test_one_process_switches_and_matches_references(tst_run):
    dump, train, reference = tst_run
    assert sorted(train) == list(range(1, STEPS + 1))
    assert [r["bag_size"] for r in train.values()] == [4] * SWITCH + [1] * (STEPS - SWITCH)
    stages = records(dump, "stage")
    assert {s: r["stage"] for s, r in stages.items()} == {0: "superposition", SWITCH: "next-token"}
    for step, record in train.items():  # phase 1: superpose's objective; phase 2: torchtitan's baseline step
        assert record["loss"] == pytest.approx(reference[step], rel=1e-6, abs=2e-6), (step, record["stage"])
    # superpose's tokens_seen: whole windows, B x (s*L + s) in phase 1 and B x (L + 1) after
    tokens = [train[s]["tokens_seen"] for s in sorted(train)]
    assert tokens[0] == 4 * (4 * 32 + 4) and tokens[SWITCH] - tokens[SWITCH - 1] == 4 * (32 + 1)
    assert train[STEPS]["loss"] < train[1]["loss"]


def test_validation_scores_superposes_held_out_windows(tst_run, small_data, tmp_path):
    """Every 4 steps and at the end, torchtitan's Validator scores superpose's held-out windows: the
    logged loss equals the next-token loss of the exported checkpoint (a Hugging Face model) on
    ``superpose.data.validation_windows`` of the val split."""
    import torch
    from transformers import AutoModelForCausalLM

    from superpose.data import TokenData, bits_per_byte, validation_windows
    from superpose.torchtitan.export import main

    dump, _, _ = tst_run
    evals = records(dump, "eval")
    assert sorted(evals) == [SWITCH, STEPS]
    out = tmp_path / "hf"
    assert main(["llama3_tiny_tst", str(dump / "checkpoint" / f"step-{SWITCH}"), str(small_data), str(out)]) == 0
    data = TokenData(small_data)
    windows = validation_windows(data.splits["val"], 32, 2048, data.vocab_size)  # [n, L+1]
    assert windows.shape[0] == 64  # not a multiple of anything that would hide a padding error
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    with torch.no_grad():
        logits = model(windows[:, :-1]).logits  # [n, L, V]
    reference = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert evals[SWITCH]["val_loss"] == pytest.approx(reference, rel=1e-5)
    assert evals[SWITCH]["val_bpb"] == pytest.approx(bits_per_byte(reference, data.bytes_per_token("val")))
    assert evals[STEPS]["val_loss"] < evals[SWITCH]["val_loss"]


def test_superpose_report_reads_a_torchtitan_comparison(tst_run, small_data, tmp_path):
    """A TST arm and its baseline arm (``--tst.ratio 0``) on torchtitan: ``superpose report`` reads
    both (config.toml and the start/train/eval/end records) and compares them at equal FLOPs."""
    from superpose.cli import main
    from superpose.runs import load_run, load_run_config
    from superpose.torchtitan.export import main as export

    dump, train, _ = tst_run
    baseline = tmp_path / "baseline"
    torchtitan_run("torchtitan_on_cpu.py", small_data, baseline, "llama3_tiny_tst", 1, "--tst.ratio", "0")
    config = load_run_config(dump)
    assert (config.model.preset, config.tst.bag_size, config.tst.ratio, config.train.steps) == ("tiny", 4, 0.5, STEPS)
    assert (config.train.batch_size, config.data.seq_len, config.data.dir) == (4, 32, str(small_data))
    run = load_run(dump)
    assert run.ended and run.method == "s=4, r=0.5" and run.start["framework"] == "torchtitan"
    assert run.start["counted_by"] == "superpose" and run.start["parameters"] == 3146880  # the tiny preset, untied, V=8192
    assert [e["flops"] for e in run.evals] == [s * run.start["flops_per_step"] for s in (SWITCH, STEPS)]
    assert run.evals[-1]["tokens_seen"] == train[STEPS]["tokens_seen"]
    assert 0 < run.trains[0]["elapsed"] <= run.evals[-1]["elapsed"]
    for arm in (baseline, dump):  # each final model where superpose's runs keep it: the paired re-evaluation reads it
        assert export(["llama3_tiny_tst", str(arm / "checkpoint" / f"step-{STEPS}"), str(small_data), str(arm / "model")]) == 0
    main(["report", str(baseline), str(dump), "--out", str(tmp_path / "report")])
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert "trained by torchtitan" in (tmp_path / "report" / "report.md").read_text()
    comparison = summary["comparisons"][0]
    assert comparison["config_differences"] == []
    paired = comparison["paired_final_eval"]  # the same windows as the runs' validation: the same losses
    assert paired["reference_val_loss"] == pytest.approx(load_run(baseline).evals[-1]["val_loss"], rel=1e-5)
    assert paired["candidate_val_loss"] == pytest.approx(run.evals[-1]["val_loss"], rel=1e-5)
    assert [r["method"] for r in summary["runs"]] == ["baseline", "s=4, r=0.5"]
    assert summary["runs"][1]["final_val_loss"] == run.evals[-1]["val_loss"]


def test_held_out_windows_are_split_over_ranks_with_ignored_padding(small_data):
    """3 ranks of 5 windows per batch over 64 windows: every rank serves 5 batches (FSDP needs them
    all), and the labels that are not ignored are every window's targets exactly once."""
    import torch

    from superpose.data import TokenData, validation_windows
    from superpose.torchtitan.validation import HeldOutWindowLoader

    config = HeldOutWindowLoader.Config(dir=str(small_data), tokens=2048)
    ranks = [list(HeldOutWindowLoader(config, dp_world_size=3, dp_rank=r, seq_len=32, local_batch_size=5)) for r in range(3)]
    assert [len(batches) for batches in ranks] == [5, 5, 5]
    served = torch.cat([y for batches in ranks for _, y in batches])  # [75, L]
    real = served[(served != -100).all(dim=1)]
    assert (served == -100).all(dim=1).sum() == 75 - 64
    data = TokenData(small_data)
    windows = validation_windows(data.splits["val"], 32, 2048, data.vocab_size)  # [64, L+1]
    assert sorted(map(tuple, real.tolist())) == sorted(map(tuple, windows[:, 1:].tolist()))
    x, _ = ranks[1][0]
    assert torch.equal(x["input"][0], windows[1, :-1])  # inputs are the windows' first L tokens


def test_exported_model_loads(tst_run, small_data, tmp_path, capsys):
    """The HF export of the last checkpoint (torchtitan's state-dict adapter) loads with no missing
    keys; the parity test above scored every superposition step on such a copy of the weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from superpose.torchtitan.export import main

    dump, _, _ = tst_run
    out = tmp_path / "hf"
    assert main(["llama3_tiny_tst", str(dump / "checkpoint" / f"step-{STEPS}"), str(small_data), str(out)]) == 0
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, local_files_only=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert AutoTokenizer.from_pretrained(out, local_files_only=True).vocab_size == 1024
    assert main(["llama3_tiny_tst", str(tmp_path / "no-checkpoint"), str(small_data), str(tmp_path / "x")]) == 1
    assert not (tmp_path / "x").exists()
    notes = tmp_path / "notes"  # a user's directory: refused before any weight is read, and left as it was
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    assert main(["llama3_tiny_tst", str(tmp_path / "no-checkpoint"), str(small_data), str(notes)]) == 1
    assert "OUT_DIR" in capsys.readouterr().err and [p.name for p in notes.iterdir()] == ["todo.txt"]


@pytest.mark.slow
def test_resume_at_the_switch_equals_uninterrupted(tst_run, small_data, tmp_path):
    """A run killed after its checkpoint at the switch (its records went on to step 6) and resumed:
    the same losses bit for bit, and the records superpose report reads are those of one run."""
    from superpose.runs import load_run

    dump, train, _ = tst_run
    resumed = tmp_path / "resumed"
    shutil.copytree(dump / "checkpoint" / f"step-{SWITCH}", resumed / "checkpoint" / f"step-{SWITCH}")
    shutil.copy(dump / "config.toml", resumed)
    lines = (dump / "metrics.jsonl").read_text().splitlines()
    killed = [line for line in lines if json.loads(line)["step"] <= 6 and json.loads(line)["kind"] != "end"]
    (resumed / "metrics.jsonl").write_text("\n".join(killed) + "\n")
    after = torchtitan_run("torchtitan_on_cpu.py", small_data, resumed)
    assert [after[s]["loss"] for s in sorted(after)] == [train[s]["loss"] for s in sorted(after)]
    one, two = load_run(dump), load_run(resumed)
    assert [r["step"] for r in two.trains] == list(range(1, STEPS + 1)) and two.ended
    assert [(e["step"], e["val_loss"], e["tokens_seen"]) for e in two.evals] == [
        (e["step"], e["val_loss"], e["tokens_seen"]) for e in one.evals]
    assert two.evals[0]["elapsed"] == one.evals[0]["elapsed"] < two.evals[1]["elapsed"]  # elapsed went on from the checkpoint


@pytest.mark.slow
def test_phase_two_equals_torchtitans_stock_trainer(tst_run, small_data, tmp_path):
    """From the checkpoint at the switch, torchtitan's unmodified Trainer (stock embedding and loss,
    same optimizer state and LR schedule) trains the next-token steps exactly as the TST run does."""
    dump, train, _ = tst_run
    stock = tmp_path / "stock"
    shutil.copytree(dump / "checkpoint" / f"step-{SWITCH}", stock / "checkpoint" / f"step-{SWITCH}")
    torchtitan_run("torchtitan_on_cpu.py", small_data, stock, "llama3_tiny_baseline")
    losses = tensorboard_losses(stock)  # the stock Trainer writes no superpose records
    assert losses == pytest.approx([train[s]["loss"] for s in range(SWITCH + 1, STEPS + 1)], rel=1e-6)


def tensorboard_losses(dump: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in (dump / "tb").rglob("events.*")}
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return [e.value for e in accumulator.Scalars("loss_metrics/global_avg_loss")]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["llama3_tiny_tst", "qwen3_moe_tiny_tst"])
def test_two_ranks_fsdp_match_references(small_data, tmp_path, config):
    """2-rank gloo FSDP2 (local batch 2, the same global batch of 4) across the switch: every step
    equals the references on the gathered weights and both ranks' windows (the MoE: the router's
    choices made on each rank's tokens)."""
    dump = tmp_path / "fsdp"
    train = torchtitan_run("torchtitan_parity.py", small_data, dump, config, 2, "--training.local_batch_size", "2")
    reference = {int(k): v for k, v in json.loads((dump / "reference.json").read_text()).items()}
    assert [r["bag_size"] for r in train.values()] == [4] * SWITCH + [1] * (STEPS - SWITCH)
    for step, record in train.items():
        assert record["loss"] == pytest.approx(reference[step], rel=1e-6, abs=2e-6), step


@pytest.mark.slow
def test_two_ranks_resume_the_one_process_run_at_the_switch(tst_run, small_data, tmp_path):
    """The 1-process checkpoint at the switch, resharded over 2 FSDP ranks (each reads half of
    every global batch), trains the same phase 2 as the 1-process run, within fp32 reduction order.
    (A fresh 2-rank run draws other initial weights than 1 process: torchtitan's sharded init.)"""
    dump, one, _ = tst_run
    resumed = tmp_path / "resharded"
    shutil.copytree(dump / "checkpoint" / f"step-{SWITCH}", resumed / "checkpoint" / f"step-{SWITCH}")
    train = torchtitan_run("torchtitan_on_cpu.py", small_data, resumed, "llama3_tiny_tst", 2, "--training.local_batch_size", "2")
    assert sorted(train) == list(range(SWITCH + 1, STEPS + 1))
    for step, record in train.items():
        assert record["loss"] == pytest.approx(one[step]["loss"], rel=1e-5), step


@pytest.fixture(scope="module")
def moe_run(small_data, tmp_path_factory):
    """8 steps of qwen3_moe_tiny_tst across the switch, each step also scored by the references (the
    experts in fp32 and the expert bias at zero: HF's Qwen3Moe is the reference, tests/torchtitan_parity.py)."""
    dump = tmp_path_factory.mktemp("titan") / "moe"
    train = torchtitan_run("torchtitan_parity.py", small_data, dump, "qwen3_moe_tiny_tst")
    reference = {int(k): v for k, v in json.loads((dump / "reference.json").read_text()).items()}
    return dump, train, reference


def test_qwen3_moe_switches_and_matches_references(moe_run):
    """torchtitan's qwen3 MoE (grouped experts, top-k router) under TSTTrainer: phase 1 equals superpose's
    objective on an HF Qwen3Moe copy of the weights, phase 2 torchtitan's stock step."""
    dump, train, reference = moe_run
    assert [r["bag_size"] for r in train.values()] == [4] * SWITCH + [1] * (STEPS - SWITCH)
    assert {s: r["stage"] for s, r in records(dump, "stage").items()} == {0: "superposition", SWITCH: "next-token"}
    for step, record in train.items():
        assert record["loss"] == pytest.approx(reference[step], rel=1e-6, abs=2e-6), (step, record["stage"])


def test_qwen3_moe_trains_with_torchtitans_load_balancing(small_data, tmp_path):
    """The config as it is (bf16 experts, the expert bias updated every step) trains across the switch
    on CPU; the bias it learned routes tokens where HF's Qwen3Moe would not, so its export is refused."""
    import torch

    from superpose.torchtitan.export import EXPERT_BIAS, main, read_model_weights

    dump = tmp_path / "moe"
    train = torchtitan_run("torchtitan_on_cpu.py", small_data, dump, "qwen3_moe_tiny_tst")
    assert [r["bag_size"] for r in train.values()] == [4] * SWITCH + [1] * (STEPS - SWITCH)
    assert all(math.isfinite(r["loss"]) for r in train.values())
    checkpoint = dump / "checkpoint" / f"step-{STEPS}"
    bias = read_model_weights(checkpoint, [f"layers.0.{EXPERT_BIAS}"])[f"layers.0.{EXPERT_BIAS}"]  # [E]
    assert bias.abs().max() > 0 and torch.allclose(bias.sum(), torch.zeros(()), atol=1e-6)  # moved, centred
    assert main(["qwen3_moe_tiny_tst", str(checkpoint), str(small_data), str(tmp_path / "hf")]) == 1
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("config", ["llama3_tiny_tst", "qwen3_moe_tiny_tst"])
def test_exported_model_gives_torchtitans_logits(config, request, small_data, tmp_path):
    """The HF export of a run's last checkpoint (llama3: LlamaForCausalLM; qwen3 MoE: Qwen3MoeForCausalLM)
    loads with every key and gives the torchtitan model's logits on the same ids, to fp32 rounding
    (the MoE's experts in fp32 on both sides; torchtitan's own bf16 experts stay within bf16's)."""
    import torch
    from torchtitan_on_cpu import fp32_experts, with_sdpa
    from transformers import AutoModelForCausalLM

    from superpose.torchtitan import config_registry
    from superpose.torchtitan.embedding import with_stock_embedding
    from superpose.torchtitan.export import main, read_model_weights

    dump = request.getfixturevalue("tst_run" if config.startswith("llama3") else "moe_run")[0]
    checkpoint, out = dump / "checkpoint" / f"step-{STEPS}", tmp_path / "hf"
    assert main([config, str(checkpoint), str(small_data), str(out)]) == 0
    hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, local_files_only=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    titan = with_sdpa(with_stock_embedding(getattr(config_registry, config)().model_spec.model)).build()
    with torch.no_grad():
        titan.init_weights(buffer_device=None)
    titan.load_state_dict(read_model_weights(checkpoint, list(titan.state_dict())), strict=True)
    ids = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(0))  # [B, L]
    with torch.no_grad():
        expected = hf.eval()(ids).logits  # [B, L, V]
        stock = titan.eval()(ids, positions=torch.arange(32).expand(2, -1))
        with fp32_experts():
            exact = titan(ids, positions=torch.arange(32).expand(2, -1))
    assert (exact - expected).abs().max() < 1e-5
    assert (stock - expected).abs().max() < (1e-5 if config.startswith("llama3") else 1e-2)


def test_hf_config_is_the_presets_config():
    """hf_config of each preset's torchtitan model is the HF config superpose builds for the preset, and
    its meta-device model counts the torchtitan model's parameters; what HF's Llama / Qwen3Moe cannot
    express is refused in one line."""
    import dataclasses

    import torch
    from torchtitan.models.qwen3 import model_registry as qwen3_registry
    from transformers import AutoModelForCausalLM

    from superpose.errors import ConfigError
    from superpose.model import PRESETS, count_parameters, model_config
    from superpose.torchtitan.export import hf_config
    from superpose.torchtitan.models import llama3_spec, qwen3_moe_spec

    for preset, fields in PRESETS.items():
        spec = (llama3_spec if fields["kind"] == "llama" else qwen3_moe_spec)(preset, vocab_size=1024)
        assert hf_config(spec.model).to_dict() == model_config(preset, 1024).to_dict(), preset
        with torch.device("meta"):
            counted = count_parameters(AutoModelForCausalLM.from_config(hf_config(spec.model)))["total"]
            assert counted == sum(p.numel() for p in spec.model.build().parameters()), preset
    moe = qwen3_moe_spec("qwen3-moe-tiny", vocab_size=1024).model
    with pytest.raises(ConfigError, match="tied embeddings"):
        hf_config(dataclasses.replace(moe, enable_weight_tying=True))
    moe.layers[1].moe.num_experts = moe.layers[1].moe.routed_experts.inner_experts.num_experts = 4
    with pytest.raises(ConfigError, match="qwen3 MoE model does not handle layers of different shapes"):
        hf_config(moe)
    for layer in moe.layers:
        layer.moe.router.score_func = "sigmoid"
    with pytest.raises(ConfigError, match="layers of different shapes, a router other than softmax top-k"):
        hf_config(moe)
    with pytest.raises(ConfigError, match="qwen3 MoE models, not Qwen3Model.Config without MoE layers"):
        hf_config(qwen3_registry("debugmodel").model)


def test_importing_superpose_does_not_import_torchtitan():
    code = "import sys, superpose, superpose.cli; assert 'torchtitan' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_unsupported_stage_levers_are_rejected_up_front(tmp_path):
    from superpose.errors import ConfigError
    from superpose.torchtitan.trainer import TSTOptions

    config = tmp_path / "c.toml"
    config.write_text("[tst]\nbag_size = 4\nratio = 0.5\nlr_scale = 0.5\n")
    with pytest.raises(ConfigError, match="lr_scale"):
        TSTOptions(config=str(config)).stages(10)
    assert [s.bag_size for s in TSTOptions(bag_size=4, ratio=0.5).stages(10)] == [4, 1]


def test_loader_serves_each_stage_and_splits_ranks(small_data, tmp_path):
    """A curriculum (s=4 input-only, then s=2 full, then next-token) served by the windows of
    superpose's own trainer; two ranks' micro-batches make up one rank's batch; the state resumes."""
    import torch

    from superpose.torchtitan.data import TokenWindowDataLoader
    from superpose.torchtitan.trainer import TSTOptions

    config = tmp_path / "c.toml"
    config.write_text('[tst]\nstages = [{bag_size = 4, steps = 1, mode = "input"}, {bag_size = 2, steps = 1}, {bag_size = 1}]\n')
    stages = TSTOptions(config=str(config)).stages(3)
    def make(rank, world, batch):
        return TokenWindowDataLoader(TokenWindowDataLoader.Config(dir=str(small_data), seed=3),
                                     dp_world_size=world, dp_rank=rank, seq_len=8, local_batch_size=batch)

    one = make(0, 1, 4)
    one.plan(stages, accumulation=1)
    served = iter(one)
    shapes = []
    for _ in range(3):
        batch, labels = next(served)
        shapes.append((tuple(batch["input"].shape), tuple(labels.shape)))
    assert shapes == [((4, 8, 4), (4, 8)), ((4, 8, 2), (4, 8, 2)), ((4, 8), (4, 8))]
    assert one.state_dict()["steps_served"] == 3
    halves = [make(rank, 2, 1) for rank in (0, 1)]
    for loader in halves:
        loader.plan(stages, accumulation=2)  # 1 window per micro-batch, 2 micro-batches, 2 ranks = 4
        loader.load_state_dict({"steps_served": 1})
    parts = [[next(it) for _ in range(2)] for it in map(iter, halves)]  # step 1 (s=2), both micro-batches
    inputs = torch.cat([b["input"] for rank in parts for b, _ in rank])
    assert torch.equal(inputs, one.step_batch(1)[0])


def test_bad_setups_fail_before_torchtitan_starts(small_data, tmp_path):
    """One-line errors before any process group, model or file exists."""
    import dataclasses

    from superpose.errors import ConfigError, DataError
    from superpose.torchtitan.config_registry import llama3_tiny_tst, tst_config
    from superpose.torchtitan.models import llama3_spec
    from superpose.torchtitan.trainer import TSTOptions, TSTTrainer, check_parts

    small_vocab = tst_config(llama3_spec("tiny", vocab_size=512), lr=1e-3, steps=4, warmup=1, global_batch=4, local_batch=4,
                             seq_len=32, tst=TSTOptions(bag_size=4), data_dir=str(small_data))
    small_vocab.dump_folder = str(tmp_path / "a")
    with pytest.raises(ConfigError, match="vocabulary is 512"):
        TSTTrainer(small_vocab)
    no_data = llama3_tiny_tst()
    no_data.dataloader.dir = str(tmp_path / "missing")
    with pytest.raises(DataError, match="not a prepared data directory"):
        TSTTrainer(no_data)
    bad_mode = dataclasses.replace(llama3_tiny_tst(), tst=TSTOptions(mode="sideways"))
    with pytest.raises(ConfigError, match="tst.mode"):
        TSTTrainer(bad_mode)
    for degree in ("tensor_parallel_degree", "context_parallel_degree"):  # bag stages cannot run there: refused up front
        sharded = llama3_tiny_tst()
        sharded.dataloader.dir = str(small_data)
        setattr(sharded.parallelism, degree, 2)
        with pytest.raises(ConfigError, match=f"superposition bag tokens, which {degree.split('_')[0]} parallelism"):
            TSTTrainer(sharded)
        check_parts(sharded, TSTOptions(ratio=0).stages(20))  # a baseline arm (no bag stage) may use it
    assert not (tmp_path / "a").exists()


def test_records_count_a_model_without_a_hugging_face_twin_by_torchtitan(small_data, tmp_path):
    """A model ``hf_config`` cannot mirror (here: tied embeddings) still trains with records: its start
    record carries torchtitan's parameter count and FLOPs per token, and says so."""
    import dataclasses

    from superpose.torchtitan.config_registry import llama3_tiny_tst
    from superpose.torchtitan.records import RunRecords

    config = llama3_tiny_tst()
    tied = dataclasses.replace(config.model_spec.model, enable_weight_tying=True)
    config = dataclasses.replace(config, model_spec=dataclasses.replace(config.model_spec, model=tied),
                                 dump_folder=str(tmp_path / "run"))
    config.dataloader.dir = config.validator.dataloader.dir = str(small_data)
    log = RunRecords(config, global_batch=4, world=1, resume_step=0, elapsed=0.0, titan_counts=(1000, 6e4))
    log.start([], {"bag_size": 4, "ratio": 0.3}, {})
    log.close()
    start = records(tmp_path / "run", "start")[0]
    assert (start["parameters"], start["flops_per_step"], start["counted_by"]) == (1000, 6e4 * 4 * 32, "torchtitan")
    assert start["active_matmul_parameters"] is None


@pytest.mark.parametrize("name, toml", [("llama3_270m_tst", "llama-270m"), ("llama3_600m_tst", "llama-600m"),
                                        ("llama3_3b_tst", "llama-3b"), ("qwen3_moe_10b_a1b_tst", "qwen3-moe-10b-a1b")])
def test_paper_configs_mirror_configs_paper(name, toml):
    """The torchtitan paper configs take the recipe of configs/paper/*.toml, and the model has the
    preset's parameter count (built on the meta device: no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    from superpose.config import load_config
    from superpose.model import model_config
    from superpose.torchtitan import config_registry

    titan, paper = getattr(config_registry, name)(), load_config(HERE.parent / "configs" / "paper" / f"{toml}.toml")
    assert (titan.tst.bag_size, titan.tst.ratio) == (paper.tst.bag_size, paper.tst.ratio)
    assert titan.model_spec.flavor == paper.model.preset
    assert titan.optimizer.param_groups[0].optimizer_kwargs["lr"] == paper.optim.lr
    assert (titan.training.steps, titan.lr_scheduler.warmup_steps, titan.lr_scheduler.decay_ratio) == (
        paper.train.steps, paper.optim.warmup_steps, paper.optim.decay_fraction)
    assert (titan.training.global_batch_size, titan.training.seq_len) == (paper.train.batch_size, paper.data.seq_len)
    with torch.device("meta"):
        ours = sum(p.numel() for p in titan.model_spec.model.build().parameters())
        hf = sum(p.numel() for p in AutoModelForCausalLM.from_config(model_config(paper.model.preset, 128256)).parameters())
    assert ours == hf
