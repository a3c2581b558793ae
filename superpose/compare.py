"""Run the evidence: a baseline and a TST arm from one config, or a grid of (s, r) arms.

Arms differ only in ``[tst]``: same seed (same initial weights), same optimizer and LR schedule,
same steps and batch, so the same model FLOPs per step; ``WindowLoader`` draws each step's
windows from (seed, step), so both arms read the same text wherever their window widths agree.
Every arm is one ordinary run directory under ``train.out_dir``; a finished arm (its
``metrics.jsonl`` has an ``end`` record) is not rerun, and a killed one resumes from its last
checkpoint, so an interrupted comparison or sweep continues where it stopped. An arm that fails
(non-finite losses) does not stop the others; the report lists it as failed instead of drawing it.
"""
from __future__ import annotations

import copy
import csv
import io
import sys
import time
from pathlib import Path

from .config import Config, ConfigError, SweepOptions, validate
from .errors import Interrupted, TrainingError
from .files import atomic_write_text, claim_dir
from .launch import is_main_process
from .plots import plot_sweep
from .report import summary_table, write_report
from .runs import arm_dirs, config_changes, config_differences, is_finished, load_run, load_run_config, method_name
from .schedule import build_stages, has_superposition


def arm_config(cfg: Config, name: str, bag_size: int | None = None, ratio: float | None = None) -> Config:
    """``cfg`` with its output in ``train.out_dir/name`` and, if given, another (s, r)."""
    arm = copy.deepcopy(cfg)
    arm.train.out_dir = str(Path(cfg.train.out_dir) / name)
    if bag_size is not None:
        if not cfg.tst.written_as_shorthand:
            raise ConfigError("sweep varies tst.bag_size and tst.ratio, the shorthand of the stage list: give [tst] in "
                              "that form, not as [[tst.stages]] tables (whose other settings the grid could not keep)")
        arm.tst = arm.tst.with_shorthand(bag_size=bag_size)
    if ratio is not None:
        arm.tst = arm.tst.with_shorthand(ratio=ratio, curriculum=[])  # a stage list or curriculum would replace (s, r)
    validate(arm)
    return arm


def run_arm(cfg: Config, label: str) -> None:
    """Train one arm unless it already finished; resume it if a checkpoint exists."""
    from .train import train  # torch: imported once the config has been checked

    run_dir = Path(cfg.train.out_dir)
    if (run_dir / "config.toml").is_file():
        changes = config_changes(load_run_config(run_dir).to_dict(), cfg)
        if changes:
            raise ConfigError(f"{run_dir} holds a run with another config ({'; '.join(changes)}); "
                              "choose another train.out_dir or remove that directory")
    if is_finished(run_dir):
        print(f"{label}: already finished in {run_dir}, not rerun", file=sys.stderr)
        return
    train(cfg, resume="auto", label=label)  # without a checkpoint the arm starts afresh; train says which


def run_arms(arms: list[tuple[str, Config]], command: str) -> dict[str, str]:
    """Train the arms in order; returns ``{name: error}`` of the arms that failed. Each progress bar
    says "[i/n] name s=4, r=0.3" (the arm's method), and between arms an ETA for the rest is
    printed at the pace of the arms trained so far (arms differ little in cost). ``command`` is
    what to rerun after an interrupt. The arms' parent directory must be new, empty or of a
    comparison (``superpose.files``'s rule)."""
    if is_main_process():
        claim_dir(Path(arms[0][1].train.out_dir).parent, "comparison", "train.out_dir")
    trained, spent, failed = 0, 0.0, {}
    for i, (name, cfg) in enumerate(arms):
        method = method_name(build_stages(cfg.tst, cfg.train.steps), cfg.train.steps)
        label = f"[{i + 1}/{len(arms)}] {name}" + ("" if method == "baseline" else f" {method}")
        todo = sum(not is_finished(a.train.out_dir) for _, a in arms[i:])
        if trained and todo:
            print(f"{label}: about {spent / trained * todo / 60:.1f} min left for {todo} arm(s)", file=sys.stderr)
        fresh, started = not is_finished(cfg.train.out_dir), time.perf_counter()
        try:
            run_arm(cfg, label)
        except TrainingError as err:
            print(f"superpose: {label} failed: {err}", file=sys.stderr)
            failed[name] = str(err)
            continue
        except Interrupted as stop:
            raise Interrupted(stop.step, stop.checkpoint, stop.signum, f"the same `superpose {command}` command") from None
        if fresh:
            trained, spent = trained + 1, spent + time.perf_counter() - started
    return failed


def _report_or_fail(arms: list[tuple[str, Config]], failed: dict[str, str], out: Path, paired: bool = True) -> dict:
    """The report over the arms that did not fail, listing the failed ones; an error if that leaves
    no baseline, or nothing to compare it with."""
    ok = [cfg for name, cfg in arms if name not in failed]
    if arms[0][0] in failed or len(ok) < 2:
        raise TrainingError("; ".join(f"{name} failed: {error}" for name, error in failed.items())
                            + "; no report was written (it needs the baseline and at least one other arm)")
    return write_report([load_run(cfg.train.out_dir) for cfg in ok], out, paired, failed=failed, force=True)


def compare(cfg: Config) -> tuple[dict | None, Path]:
    """Baseline then TST into ``train.out_dir/{baseline,tst}``; the report goes to ``.../report``."""
    if not has_superposition(cfg.tst, cfg.train.steps):
        raise ConfigError("compare needs a TST config with at least one superposition step: tst.bag_size >= 2 and "
                          "round(tst.ratio * train.steps) >= 1, a tst.curriculum or [[tst.stages]] with bag_size >= 2 "
                          "(the baseline is derived from it)")
    arms = [("baseline", arm_config(cfg, "baseline", ratio=0.0)), ("tst", arm_config(cfg, "tst"))]
    failed = run_arms(arms, "compare")
    out = Path(cfg.train.out_dir) / "report"
    if not is_main_process():
        return None, out
    return _report_or_fail(arms, failed, out), out


def compare_runs(baseline_dir: str | Path, tst_dir: str | Path, out: str | Path | None = None,
                 force: bool = False) -> tuple[dict, Path]:
    """Report on two existing runs, after checking that they differ only in their [tst] section."""
    base, tst = load_run(baseline_dir, "baseline"), load_run(tst_dir, "tst")
    if not base.is_baseline:
        raise ConfigError(f"{baseline_dir} is not a baseline run (it has a superposition stage)")
    if tst.is_baseline:
        raise ConfigError(f"{tst_dir} is not a TST run (it has no superposition stage)")
    diffs = config_differences(base.config, tst.config)
    if diffs:
        raise ConfigError(f"the runs are not comparable, they differ in: {'; '.join(diffs)}")
    out = Path(out) if out else Path(tst_dir).parent / "report"
    return write_report([base, tst], out, force=force), out


def report_runs(run_dirs: list[str | Path], out: str | Path | None = None, force: bool = False) -> tuple[dict, Path]:
    """Report on any runs: the first baseline among them is the reference, the rest are compared to it.
    A comparison or sweep directory stands for its arms (and its report is the default ``out``)."""
    default_out = Path(run_dirs[0]) / "report" if arm_dirs(run_dirs[0]) else Path(run_dirs[0]).parent / "report"
    run_dirs = [arm for d in run_dirs for arm in (arm_dirs(d) or [Path(d)])]
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # e.g. a/tst and b/tst
        for run in runs:
            run.name = f"{run.path.parent.name}/{run.path.name}"
    baselines = [r for r in runs if r.is_baseline]
    if not baselines:
        raise ConfigError("none of the runs is a baseline (a run without a superposition stage) to compare against")
    runs.remove(baselines[0])
    out = Path(out) if out else default_out
    return write_report([baselines[0], *runs], out, force=force), out


# ---------------------------------------------------------------------------- sweeps


def sweep(cfg: Config, bag_sizes: list[int] | None = None,
          ratios: list[float] | None = None) -> tuple[list[dict], Path, dict[str, str]]:
    """Train one baseline and every (s, r) of the grid at ``cfg``'s budget (default: ``SweepOptions``);
    write sweep.csv and sweep.png. Returns the rows, the sweep directory and ``{arm: error}`` of the
    arms that failed."""
    bag_sizes = SweepOptions().bag_sizes if bag_sizes is None else bag_sizes
    ratios = SweepOptions().ratios if ratios is None else ratios
    if any(s < 2 for s in bag_sizes):
        raise ConfigError("--bag-sizes must all be >= 2 (the baseline is run anyway)")
    if any(not 0 < r < 1 for r in ratios):
        raise ConfigError("--ratios must all be in (0, 1)")
    arms = [("baseline", arm_config(cfg, "baseline", ratio=0.0))]
    arms += [(f"s{s}-r{r:g}", arm_config(cfg, f"s{s}-r{r:g}", s, r)) for s in bag_sizes for r in ratios]
    failed = run_arms(arms, "sweep")
    root = Path(cfg.train.out_dir)
    if not is_main_process():
        return [], root, {}
    summary = _report_or_fail(arms, failed, root / "report", paired=False)
    rows = sweep_rows(summary)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(root / "sweep.csv", table.getvalue())
    plot_sweep(rows, root / "sweep.png")
    return rows, root, summary["failed"]


def sweep_rows(summary: dict) -> list[dict]:
    """One CSV row per run: its (s, r), final losses and the comparison with the baseline."""
    comps = {c["run"]: c for c in summary["comparisons"]}
    rows = []
    for r in summary["runs"]:
        c = comps.get(r["name"])
        iso = c["iso_loss"] if c else {}
        rows.append({
            "run": r["name"], "bag_size": r["bag_size"], "ratio": r["ratio"], "steps": r["steps"],
            "final_val_loss": round(r["final_val_loss"], 5), "final_val_bpb": round(r["final_val_bpb"], 5),
            "diff_vs_baseline": round(c["equal_steps"]["difference"], 5) if c else 0.0,
            "iso_loss_step_speedup": round(iso["step_ratio"], 4) if iso.get("reached") else "",
            "tokens_seen": r["tokens_seen"], "elapsed_s": round(r["elapsed_s"], 2), "flops": r["flops"],
        })
    return rows


def print_summary(summary: dict, report_dir: Path) -> None:
    print(summary_table(summary))
    for name, error in summary["failed"].items():
        print(f"\nFAILED: {name}: {error}")
    print(f"\nregime: {summary['regime']['text']}")
    print(f"report: {report_dir / 'report.md'}")


def print_sweep(rows: list[dict], root: Path, failed: dict[str, str]) -> None:
    width = max(len(r["run"]) for r in rows)
    print(f"{'run':<{width}}  final val loss  diff vs baseline  iso-loss speedup (steps)")
    for r in rows:
        if r["bag_size"] == 1:
            speedup = "(reference)"
        else:
            speedup = f"{r['iso_loss_step_speedup']:.2f}x" if r["iso_loss_step_speedup"] != "" else "not reached"
        print(f"{r['run']:<{width}}  {r['final_val_loss']:>14.4f}  {r['diff_vs_baseline']:>+16.4f}  {speedup:>24}")
    for name, error in failed.items():
        print(f"FAILED: {name}: {error}")
    print(f"\nsweep: {root / 'sweep.csv'}, {root / 'sweep.png'}; report: {root / 'report' / 'report.md'}")
