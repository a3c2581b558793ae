"""The evidence tools: iso-loss speedup and switch metrics on synthetic curves (known answers),
then compare / sweep / report end to end on tiny real runs."""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides

from superpose.compare import arm_config, compare, compare_runs, sweep
from superpose.config import Config, ConfigError, load_config
from superpose.regime import Point, map_points, measured_points, regime
from superpose.report import summary_table, write_report
from superpose.runs import Run, config_differences, load_run
from superpose.schedule import build_stages, has_superposition
from superpose.stats import Curve, difference_at, first_at_or_below, iso_loss_speedup, switch_spike, training_gap, value_at

ROOT = Path(__file__).resolve().parents[1]


def test_reading_and_reporting_runs_imports_neither_torch_nor_transformers():
    """A report, the kill-resume parent and the regime tables read runs on machines (and in processes)
    that should not pay for torch: the run directory's reader and the report stay free of it."""
    code = ("import sys\nimport superpose.runs, superpose.report, superpose.stats, superpose.plots, superpose.regime\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def curve(steps, losses, seconds_per_step=1.0, tokens_per_step=100.0):
    steps = np.array(steps, dtype=float)
    return Curve(steps, np.array(losses, dtype=float), steps * seconds_per_step, steps * 1e9, steps * tokens_per_step)


REFERENCE = curve([0, 100, 200, 300, 400], [9.0, 6.0, 5.0, 4.5, 4.2])


# ---------------------------------------------------------------------------- synthetic curves


def test_crossing_is_interpolated_between_validation_points():
    # 4.6 at step 200, 4.0 at step 300: 4.2 is two thirds of the way.
    assert first_at_or_below([0, 100, 200, 300], [9, 8, 4.6, 4.0], 4.2) == pytest.approx(200 + 100 * 0.4 / 0.6)


def test_crossing_exact_hit_and_first_point_and_not_reached():
    assert first_at_or_below([0, 100, 200], [9, 4.2, 4.0], 4.2) == 100.0
    assert first_at_or_below([0, 100], [3.0, 2.0], 4.2) == 0.0
    assert first_at_or_below([0, 100, 200], [9, 5, 4.3], 4.2) is None
    # Only the first crossing counts, even if the curve comes back up and down again.
    assert first_at_or_below([0, 1, 2, 3], [5, 3, 5, 3], 4.0) == pytest.approx(0.5)


def test_iso_loss_speedup_reached_with_interpolation():
    # Candidate steps cost twice the wall-clock of the reference's.
    candidate = curve([0, 100, 200, 300, 400], [9.0, 8.0, 4.6, 4.0, 3.8], seconds_per_step=2.0)
    result = iso_loss_speedup(REFERENCE, candidate)
    crossing = 200 + 100 * 0.4 / 0.6
    assert result["reached"] and result["target_val_loss"] == 4.2
    assert result["step"] == pytest.approx(crossing)
    assert result["step_ratio"] == pytest.approx(400 / crossing)  # 1.5x fewer steps
    assert result["flops_ratio"] == pytest.approx(400 / crossing)
    assert result["seconds"] == pytest.approx(2 * crossing)
    assert result["seconds_ratio"] == pytest.approx(400 / (2 * crossing))  # 0.75x: slower in wall-clock


def test_iso_loss_speedup_exact_hit_and_self():
    candidate = curve([0, 100, 200, 300, 400], [9.0, 7.0, 5.0, 4.2, 4.0])
    assert iso_loss_speedup(REFERENCE, candidate)["step_ratio"] == pytest.approx(400 / 300)
    same = iso_loss_speedup(REFERENCE, REFERENCE)
    assert same["step"] == 400 and same["step_ratio"] == 1.0 and same["seconds_ratio"] == 1.0


def test_iso_loss_speedup_not_reached():
    candidate = curve([0, 100, 200, 300, 400], [9.0, 8.0, 6.0, 5.0, 4.5])
    result = iso_loss_speedup(REFERENCE, candidate)
    assert result["target_val_loss"] == 4.2 and not result["reached"] and result["candidate_best_val_loss"] == 4.5
    assert "step_ratio" not in result
    # Read the other way: the reference was at 4.5 at step 300, so the candidate's 400 steps are worth 0.75x.
    assert result["reference_step_at_candidate_final"] == 300 and result["equivalent_step_ratio"] == 0.75
    slower = curve([0, 100, 200, 300, 400], [9.0, 8.0, 6.0, 5.0, 4.8], seconds_per_step=0.5)
    result = iso_loss_speedup(REFERENCE, slower)  # the reference crosses 4.8 at step 240
    assert result["equivalent_step_ratio"] == pytest.approx(0.6) and result["equivalent_seconds_ratio"] == pytest.approx(1.2)


def test_difference_at_equal_tokens_interpolates_both_curves():
    candidate = curve([0, 100, 200, 300, 400], [9.0, 8.0, 4.6, 4.0, 3.8], tokens_per_step=400.0)
    # 40,000 tokens: the reference's end (4.2) and the candidate's step 100 (8.0).
    result = difference_at(REFERENCE, candidate, "tokens", 40_000)
    assert result["difference"] == pytest.approx(8.0 - 4.2)
    # 30,000 tokens: reference at step 300 (4.5), candidate at step 75 (9 - 0.75 * 1.0 = 8.25).
    assert difference_at(REFERENCE, candidate, "tokens", 30_000)["candidate_val_loss"] == pytest.approx(8.25)
    assert value_at([0, 1], [0, 1], 2.0) is None
    assert difference_at(REFERENCE, candidate, "tokens", 1e9)["difference"] is None


def test_switch_spike_and_recovery():
    steps = np.arange(1, 101, dtype=float)
    losses = np.where(steps <= 30, 5.0, 7.0 - (steps - 31) * 0.1)  # 7.0 at step 31, 5.0 at step 51
    result = switch_spike(steps, losses, switch=30)
    assert result["pre_switch_loss"] == 5.0
    assert result["spike"] == pytest.approx(2.0) and result["peak_step"] == 31
    assert result["recovered"] and result["recovery_steps"] == 21


def test_switch_spike_not_recovered_and_unmeasurable():
    steps = np.arange(1, 41, dtype=float)
    losses = np.concatenate([np.tile([4.0, 5.0, 6.0], 7)[:20], np.full(20, 6.5)])  # pre level: mean(6, 4, 5) = 5
    result = switch_spike(steps, losses, switch=20)
    assert result["pre_switch_loss"] == pytest.approx(5.0)
    assert not result["recovered"] and result["recovery_steps"] is None and result["spike"] == pytest.approx(1.5)
    assert switch_spike(steps, losses, switch=40) == {"measured": False}


def test_training_gap_pairs_the_same_steps_after_the_switch():
    steps = np.arange(1, 21, dtype=float)
    candidate = np.where(steps <= 10, 9.0, np.where(steps <= 15, 5.0, 4.2))
    reference_steps = steps[::2]  # logged every other step: only shared steps are paired
    result = training_gap(reference_steps, np.full(10, 4.0), steps, candidate, switch=10, window=2)
    assert result == {"gap_after_switch": pytest.approx(1.0), "gap_at_end": pytest.approx(0.2)}
    assert training_gap(steps, candidate, steps, candidate, switch=20) == {}


def test_regime_places_a_run_by_non_embedding_parameters_steps_and_tokens_per_step():
    points = [Point("m", 10_000_000, 20_000_000, 1000, 1024, "output-s2-r0.2", 0.01, 0.02, 3, "no-gain"),
              Point("p", 100_000_000, 300_000_000, 20_000, 2_000_000, "s6-r0.3", -0.07, None, 1, "gain", "paper")]
    assert regime(10_000_000, 99_000_000, 1000, 1024, points)["verdict"] == "no-gain"  # the total does not count
    assert regime(5_000_000, 6_000_000, 600, 2048, points)["point"] == "m"  # smaller, shorter, more tokens per step
    assert regime(5_000_000, 6_000_000, 600, 512, points)["verdict"] == "untested"  # fewer tokens per step
    assert regime(10_000_001, 20_000_000, 1000, 1024, points)["verdict"] == "untested"
    gain = regime(200_000_000, 400_000_000, 30_000, 1_000_000, points)
    assert gain["verdict"] == "gain" and "TST with that setting (s6-r0.3) is expected to pay here" in gain["text"]
    assert regime(200_000_000, 400_000_000, 30_000, 4_000_000, points)["verdict"] == "untested"  # more tokens per step
    between = regime(50_000_000, 60_000_000, 5000, 1024, points)
    assert between["point"] == "m" and "nearest point measured: output-s2-r0.2 at m" in between["text"]
    assert "50.0M non-embedding parameters, 60.0M in all; 5000 steps of 1,024 tokens" in between["text"]


def test_map_points_count_a_gain_only_beyond_two_standard_errors_over_seeds():
    row = {"preset": "small", "params": "10", "non_embedding_params": "6", "steps": "1000", "batch": "16", "device": "cpu",
           "tokens_per_step": "1024"}
    seeds = [{"point": "small-n1000-b16", "arm": "a", "gaps": "-0.05 -0.04 -0.06", "gap_sd": "0.01"}]
    (win,) = map_points([{**row, "a": "-0.05", "b": "0.2"}], seeds, ["a", "b"])
    assert (win.outcome, win.arm, win.seeds) == ("gain", "a", 3) and win.stderr == pytest.approx(0.01 / 3 ** 0.5)
    tie = [{**seeds[0], "gaps": "-0.05 0.01 0.0"}]
    assert map_points([{**row, "a": "-0.05"}], tie, ["a"])[0].outcome == "no-gain"
    # one seed: below minus the median seed s.d. it is open, above it noise
    assert map_points([{**row, "b": "-0.02"}], seeds, ["b"])[0].outcome == "open"
    assert map_points([{**row, "b": "-0.005"}], seeds, ["b"])[0].outcome == "no-gain"
    # a GPU point is a point of its own: the CPU point's seeds are not its seeds
    (gpu,) = map_points([{**row, "device": "cuda", "a": "-0.05"}], seeds, ["a"])
    assert (gpu.name, gpu.seeds) == ("small-n1000-b16-cuda", 1)


def test_the_shipped_map_places_the_gpt2_tiny_run_inside_it():
    """The package's CSVs load from an installed package; the `tiny` preset with the GPT-2
    vocabulary (13M of 14M parameters are embeddings) is a 1M-parameter model by compute."""
    points = measured_points()
    assert {p.name for p in points} >= {"tiny-n150-b16", "small-n1000-b16", "medium-n400-b16", "paper 270M"}
    tiny_gpt2 = regime(1_049_728, 14_000_000, 600, 16 * 128, points)
    assert tiny_gpt2["verdict"] == "no-gain" and "TST is not expected to pay here" in tiny_gpt2["text"]
    assert regime(106_203_456, 253_954_368, 20_000, 2_000_000, points)["point"] == "paper 270M"


def test_the_crossover_benchmark_config_is_the_map_point(small_data, tmp_path):
    """configs/gutenberg-medium.toml reruns the map's medium-n2000-b16 point: its two arms are the
    plan's baseline and output-only arm but for the model's path, and its model is the plan's."""
    spec = importlib.util.spec_from_file_location("regime_map", ROOT / "scripts" / "regime_map.py")
    plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan)
    args = argparse.Namespace(root=str(tmp_path), data=str(small_data), seq_len=64, eval_tokens=16384, device="cpu",
                              plan="crossover")
    jobs, point = dict(plan.jobs(args)), plan.point_dir(tmp_path, "medium", 2000, 16)
    shipped = load_config(ROOT / "configs" / "gutenberg-medium.toml", [f"--data.dir={small_data}"])
    for arm, config in [("baseline", arm_config(shipped, "baseline", ratio=0.0)), ("output-s2-r0.2", shipped)]:
        planned = load_config(None, jobs[point / arm])
        tst = arm != "baseline"  # a baseline is any [tst] without superposition
        assert has_superposition(planned.tst, 2000) == has_superposition(config.tst, 2000) == tst
        assert config_differences(planned, config, ignore_tst=not tst) == [
            f"model.preset: {str(tmp_path / 'models' / 'medium')!r} -> 'configs/models/medium'"]
    ours = json.loads((ROOT / "configs" / "models" / "medium" / "config.json").read_text())
    theirs = json.loads((tmp_path / "models" / "medium" / "config.json").read_text())
    incidental = {"vocab_size", "transformers_version"}  # the library that wrote the file is not the model
    assert {k: v for k, v in ours.items() if k not in incidental} == {k: v for k, v in theirs.items() if k not in incidental}
    assert ours["vocab_size"] == 8192


def test_arm_configs_derive_a_true_baseline():
    cfg = load_config(None, ["--tst.curriculum=[[8, 0.1], [4, 0.2]]", "--train.out_dir=somewhere"])
    assert has_superposition(cfg.tst, cfg.train.steps)
    base = arm_config(cfg, "baseline", ratio=0.0)
    assert not has_superposition(base.tst, base.train.steps) and base.train.out_dir == str(Path("somewhere") / "baseline")
    assert arm_config(cfg, "s6-r0.3", 6, 0.3).tst.curriculum == []


def test_run_describes_a_curriculum_by_its_stages():
    cfg = load_config(None, ["--tst.curriculum=[[8, 0.1], [4, 0.2], [8, 0.1]]", "--tst.blend_steps=5", "--train.steps=100"])
    stages = [dataclasses.asdict(stage) for stage in build_stages(cfg.tst, cfg.train.steps)]
    run = Run("tst", Path("."), cfg, {"stages": stages},
              [{"step": 0, "val_loss": 9.0, "elapsed": 0.0, "flops": 0.0, "tokens_seen": 0}], [], True)
    assert (run.bag_sizes, run.switch_step, run.ratio, run.method) == ([8, 4, 8], 40, 0.4, "s=8->4->8, r=0.4")
    plain = [dataclasses.asdict(st) for st in build_stages(load_config(None, ["--tst.ratio=0"]).tst, 100)]
    base = Run("baseline", Path("."), Config(), {"stages": plain}, run.evals, [], True)
    assert (base.bag_sizes, base.ratio, base.method) == ([], 0.0, "baseline")
    output = [dataclasses.asdict(st) for st in build_stages(load_config(None, ["--tst.mode=output"]).tst, 100)]
    assert Run("o", Path("."), cfg, {"stages": output}, run.evals, [], True).method == "s=4, r=0.3, output-only"


# ---------------------------------------------------------------------------- tiny real runs


@pytest.fixture(scope="module")
def tiny_config(small_data, tmp_path_factory):
    """Overrides for two arms of 8 tiny steps (switch at step 4) on the shared small corpus."""
    root = tmp_path_factory.mktemp("evidence")
    overrides = tiny_overrides(small_data, root / "cmp", **{
        "data.seq_len": 16, "train.steps": 8, "train.batch_size": 4, "train.eval_every": 2,
        "train.eval_tokens": 512, "optim.warmup_steps": 2, "tst.bag_size": 2, "tst.ratio": 0.5,
    })
    return root, overrides


@pytest.fixture(scope="module")
def compared(tiny_config):
    root, overrides = tiny_config
    summary, out = compare(load_config(None, overrides))
    return root, overrides, summary, out


def test_compare_writes_a_consistent_report(compared):
    root, _, summary, out = compared
    for name in ("report.md", "summary.json", "val_loss_vs_step.png", "val_loss_vs_seconds.png",
                 "val_loss_vs_tokens.png", "train_loss_switch.png", "metrics/baseline.jsonl", "metrics/tst.jsonl"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "val_loss_vs_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text())["reference"] == "baseline"
    ends = {arm: json.loads((root / "cmp" / arm / "metrics.jsonl").read_text().splitlines()[-1]) for arm in ("baseline", "tst")}
    base, tst = summary["runs"]
    assert (base["bag_size"], tst["bag_size"], tst["switch_step"]) == (1, 2, 4)
    assert base["final_val_loss"] == ends["baseline"]["val_loss"] and tst["final_val_loss"] == ends["tst"]["val_loss"]
    assert tst["tokens_seen"] == ends["tst"]["tokens_seen"] == 4 * 4 * (2 * 16 + 2) + 4 * 4 * 17
    assert base["flops"] == tst["flops"]  # equal FLOPs per step, equal steps
    comp = summary["comparisons"][0]
    assert comp["equal_steps"]["difference"] == pytest.approx(tst["final_val_loss"] - base["final_val_loss"])
    assert comp["config_differences"] == []
    # The exported models, re-evaluated window by window, reproduce the trainer's final losses.
    paired = comp["paired_final_eval"]
    assert paired["reference_val_loss"] == pytest.approx(base["final_val_loss"], abs=1e-4)
    assert paired["candidate_val_loss"] == pytest.approx(tst["final_val_loss"], abs=1e-4)
    assert paired["windows"] == 512 // 16
    assert comp["switch"]["measured"] and comp["switch"]["switch_step"] == 4
    text = (out / "report.md").read_text()
    assert "iso-loss speedup" in text and "![Training loss around the switch](train_loss_switch.png)" in text
    # 4 x 16 tokens per step is fewer than any point of the map: not placed inside it
    assert summary["regime"]["verdict"] == "untested" and summary["regime"]["text"] in text
    # eval_every = 2 puts evals at steps 2 and 4 inside phase 1 (steps 0-3): the last one is reported
    evals = [json.loads(line) for line in (root / "cmp" / "tst" / "metrics.jsonl").read_text().splitlines()]
    at_switch = next(r for r in evals if r["kind"] == "eval" and r["step"] == 4)
    assert comp["phase1"] == {"step": 4, "val_bag_loss": at_switch["val_bag_loss"],
                              "unigram_loss": at_switch["val_bag_unigram_loss"],
                              "beyond_unigram": at_switch["val_bag_unigram_loss"] - at_switch["val_bag_loss"]}
    assert "phase-1 bag loss (unigram)" in text and f"{at_switch['val_bag_loss']:.3f}" in text


def test_wall_clock_speedup_is_not_reported_when_the_load_differed(compared):
    summary = copy.deepcopy(compared[2])
    comp = summary["comparisons"][0]

    def table() -> str:
        return next(line for line in summary_table(summary).splitlines() if "iso-loss speedup: wall-clock" in line)

    comp["step_time_ratio"] = 3.0
    comp["iso_loss"] = {"reached": False, "equivalent_seconds_ratio": 2.5}
    assert "not reached" in table() and "2.5" not in table()
    comp["iso_loss"] = {"reached": True, "seconds_ratio": 2.5}
    assert "n/a: machine load differed" in table()
    comp["step_time_ratio"] = 1.0
    assert "2.50x" in table()


def test_summary_records_no_wall_clock_ratio_when_the_load_differed(compared, tmp_path):
    """Identical next-token steps that took 3x as long in one run: summary.json must not carry a
    wall-clock speedup the report calls unusable, and the wall-clock plot must say why."""
    root = compared[0]
    base, tst = load_run(root / "cmp" / "baseline"), load_run(root / "cmp" / "tst")
    for run, seconds in ((base, 0.1), (tst, 0.3)):  # fixed times: the real ones vary with the machine's load
        for record in run.trains:
            record["step_seconds"] = seconds
    summary = write_report([base, tst], tmp_path / "report", paired=False)
    comp = summary["comparisons"][0]
    assert comp["wall_clock_comparable"] is False and comp["step_time_ratio"] > 2
    assert all(comp["iso_loss"].get(key) is None for key in ("seconds", "seconds_ratio", "equivalent_seconds_ratio"))
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["comparisons"][0]["wall_clock_comparable"] is False


def test_compare_does_not_rerun_finished_arms_and_refuses_a_changed_config(compared):
    root, overrides, _, _ = compared
    metrics = root / "cmp" / "tst" / "metrics.jsonl"
    before = metrics.read_text()
    compare(load_config(None, overrides))
    assert metrics.read_text() == before
    with pytest.raises(ConfigError, match="another config"):
        compare(load_config(None, [*overrides, "--optim.lr=0.001"]))


def test_compare_runs_checks_the_runs_are_comparable(compared, tmp_path):
    root, _, _, _ = compared
    base, tst = root / "cmp" / "baseline", root / "cmp" / "tst"
    summary, out = compare_runs(base, tst, out=tmp_path / "again")
    assert (out / "report.md").is_file() and summary["comparisons"][0]["run"] == "tst"
    with pytest.raises(ConfigError, match="not a baseline"):
        compare_runs(tst, base)
    other = load_run(base).config
    other.train.seed, other.optim.lr = 1, 1e-3
    diffs = config_differences(load_run(base).config, other)
    assert diffs == ["optim.lr: 0.003 -> 0.001", "train.seed: 0 -> 1"]


def test_runs_of_two_trainers_are_flagged_as_not_comparable(compared, tmp_path):
    """A run that torchtitan trained (superpose.torchtitan: its start record names the framework)
    has other initial weights and weight decay than superpose's own: the report says so."""
    root, _, _, _ = compared
    base, titan = root / "cmp" / "baseline", tmp_path / "titan"
    shutil.copytree(root / "cmp" / "tst", titan, ignore=shutil.ignore_patterns("checkpoints", "model"))
    lines = (titan / "metrics.jsonl").read_text().splitlines()
    start = json.loads(lines[0])
    assert start["kind"] == "start"
    lines[0] = json.dumps({**start, "framework": "torchtitan"})
    (titan / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    summary, out = compare_runs(base, titan, out=tmp_path / "report")
    assert summary["comparisons"][0]["config_differences"] == ["framework: superpose -> torchtitan"]
    assert "framework: superpose -> torchtitan" in (out / "report.md").read_text()


def test_sweep_reuses_the_baseline_and_writes_csv_and_plot(compared):
    root, overrides, _, _ = compared
    baseline_metrics = (root / "cmp" / "baseline" / "metrics.jsonl").read_text()
    rows, out, failed = sweep(load_config(None, overrides), [2], [0.25, 0.5])
    assert failed == {}
    assert (root / "cmp" / "baseline" / "metrics.jsonl").read_text() == baseline_metrics
    with open(out / "sweep.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["run"], r["bag_size"], r["ratio"]) for r in table] == [
        ("baseline", "1", "0.0"), ("s2-r0.25", "2", "0.25"), ("s2-r0.5", "2", "0.5")]
    tst_end = json.loads((root / "cmp" / "tst" / "metrics.jsonl").read_text().splitlines()[-1])
    same_as_tst = json.loads((root / "cmp" / "s2-r0.5" / "metrics.jsonl").read_text().splitlines()[-1])
    assert same_as_tst["val_loss"] == pytest.approx(tst_end["val_loss"], abs=1e-5)  # same config, same seed
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_report_command_picks_the_baseline_as_reference(compared, capsys):
    from superpose.cli import main

    root, _, _, _ = compared
    out = root / "cli-report"
    main(["report", str(root / "cmp" / "s2-r0.25"), str(root / "cmp" / "baseline"), str(root / "cmp" / "tst"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in printed and "iso-loss speedup" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference"] == "baseline" and [c["run"] for c in summary["comparisons"]] == ["s2-r0.25", "tst"]
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(root / "cmp" / "tst")])
    assert exit_info.value.code == 2 and "none of the runs is a baseline" in capsys.readouterr().err


def test_load_run_tolerates_a_restart_a_repeated_final_eval_and_a_cut_off_line(compared, tmp_path):
    root, _, _, _ = compared
    source = root / "cmp" / "baseline"
    (tmp_path / "config.toml").write_text((source / "config.toml").read_text())
    lines = (source / "metrics.jsonl").read_text().splitlines()
    final_eval = [line for line in lines if '"kind": "eval"' in line][-1]
    # A killed first attempt (restarted from scratch), then the full run, its final eval twice, a torn line.
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:3] + lines + [final_eval, '{"kind": "tra']) + "\n")
    run = load_run(tmp_path)
    assert run.curve.step.tolist() == [0, 2, 4, 6, 8]
    assert run.ended and run.curve.final("loss") == load_run(source).curve.final("loss")
    (tmp_path / "metrics.jsonl").write_text('{"kind": "tra\n' + "\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_run(tmp_path)


def test_compare_resumes_a_killed_arm_from_its_checkpoint(compared, tmp_path, capsys):
    import shutil

    root, overrides, summary, _ = compared
    cfg = load_config(None, [*overrides, f"--train.out_dir={tmp_path}", "--train.checkpoint_every=4"])
    compare(cfg)
    tst = tmp_path / "tst"
    # Make the TST arm look killed after its step-4 checkpoint: no final checkpoint, no end record.
    shutil.rmtree(tst / "checkpoints" / "step-00000008")
    lines = (tst / "metrics.jsonl").read_text().splitlines()
    (tst / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    capsys.readouterr()
    again, _ = compare(cfg)
    printed = capsys.readouterr().err
    assert "[1/2] baseline: already finished" in printed and "resuming from" in printed and "step-00000004" in printed
    assert again["runs"][1]["final_val_loss"] == pytest.approx(summary["runs"][1]["final_val_loss"], abs=1e-6)
    assert [json.loads(line)["kind"] for line in (tst / "metrics.jsonl").read_text().splitlines()].count("end") == 1


def test_a_candidate_worse_than_the_untrained_reference_gets_a_report(compared, tmp_path):
    """A candidate ending above the reference's step-0 loss used to be a ZeroDivisionError in the
    prose, after a half-written report."""
    root = compared[0]
    base, tst = load_run(root / "cmp" / "baseline"), load_run(root / "cmp" / "tst")
    start = base.evals[0]["val_loss"]
    for record in tst.evals:
        record["val_loss"] = start + 1.0
    tst.curve = Curve.from_evals(tst.evals)
    summary = write_report([base, tst], tmp_path / "report", paired=False)
    assert summary["comparisons"][0]["iso_loss"]["equivalent_step_ratio"] == 0
    assert "ended worse than where the reference started" in (tmp_path / "report" / "report.md").read_text()


def test_report_and_verify_take_a_compare_directory_and_replace_a_report_only_with_force(compared, capsys):
    """`report runs/quickstart` and `verify runs/quickstart` were refused; `report` then replaced
    the comparison's report without asking and left stale files in it."""
    from superpose.cli import main

    root = compared[0]
    report = root / "cmp" / "report"
    before = {p.name: p.read_bytes() for p in report.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exc:
        main(["report", str(root / "cmp")])
    assert exc.value.code == 2 and "already holds a comparison report; pass --force" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in report.rglob("*") if p.is_file()} == before
    (report / "stale.png").write_bytes(b"an old plot")
    main(["report", str(root / "cmp"), "--force"])
    assert not (report / "stale.png").exists()
    summary = json.loads((report / "summary.json").read_text())
    arms = ["baseline", *sorted(p.name for p in (root / "cmp").iterdir()
                                if (p / "metrics.jsonl").is_file() and p.name != "baseline")]
    assert "tst" in arms and [r["name"] for r in summary["runs"]] == arms  # the sweep test adds its grid's arms
    assert [p["run"] for p in summary["provenance"]] == arms and summary["provenance"][0]["cpu_capability"]
    main(["verify", str(root / "cmp")])
    checked = capsys.readouterr().out
    assert (f"ok       {root / 'cmp' / 'baseline' / 'model'}" in checked
            and f"ok       {root / 'cmp' / 'tst' / 'model'}" in checked)
