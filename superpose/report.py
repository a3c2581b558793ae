"""The report of a comparison: the summary of runs against a reference, as ``summary.json``, a
Markdown table and prose (``report.md``) and plots (``superpose.plots``).

The numbers come from ``superpose.stats`` (pure functions of the logged curves, so they can be
recomputed from any finished run with ``superpose report``) and the paired re-evaluation of the
exported models (``superpose.paired``). Wall-clock means the trainer's ``elapsed``: the sum of
step times, without validation or checkpoints.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

from .files import StagedDir, atomic_write_text
from .paired import paired_final_eval
from .plots import PLOTS, plot_runs
from .regime import regime
from .runs import Run, config_differences, non_embedding_parameters
from .stats import difference_at, iso_loss_speedup, si, step_count, switch_spike, training_gap

FLOPS_FORMULA = (
    "FLOPs per step = 6 * N_active * P + 6 * n_layers * L * d_attn * P, with P = batch_size * L model "
    "positions per step, N_active the matmul weights a position passes through (output head included, "
    "input embedding lookup excluded, MoE experts scaled by top-k / E) and d_attn = heads * head_dim "
    "(attention scores and values, causal mask not discounted). Bag averaging is O(s*d) per position "
    "and not counted, so a phase-1 and a phase-2 step cost the same."
)
WALL_CLOCK_TOLERANCE = 1.15  # mean next-token step times further apart than this flag a load difference


def summarize(runs: list[Run], paired: bool = True) -> dict:
    """The summary: per-run totals and, for every run after the reference, the comparisons."""
    reference = runs[0]
    rows = []
    for run in runs:
        step_seconds = [r["step_seconds"] for r in run.trains if r["bag_size"] == 1]
        rows.append({
            "name": run.name,
            "path": str(run.path),
            "finished": run.ended,
            "method": run.method,
            "bag_size": max(run.bag_sizes, default=1),
            "ratio": run.ratio,
            "switch_step": run.switch_step,
            "steps": int(run.curve.final("step")),
            "final_val_loss": run.curve.final("loss"),
            "final_val_bpb": float(run.evals[-1]["val_bpb"]),
            "tokens_seen": int(run.curve.final("tokens")),
            "elapsed_s": run.curve.final("elapsed"),
            "mean_next_token_step_s": float(np.mean(step_seconds)) if step_seconds else None,
            "flops": run.curve.final("flops"),
            "flops_per_step": float(run.start["flops_per_step"]),
            "parameters": int(run.start["parameters"]),
        })
    comparisons = []
    for run, row in zip(runs[1:], rows[1:]):
        ref_c, c = reference.curve, run.curve
        equal_tokens = min(ref_c.final("tokens"), c.final("tokens"))
        entry = {
            "run": run.name,
            "reference": reference.name,
            "config_differences": config_differences(reference.config, run.config) + (
                [f"framework: {reference.framework} -> {run.framework}"] if run.framework != reference.framework else []),
            "framework": run.framework,
            "iso_loss": iso_loss_speedup(ref_c, c),
            "equal_steps": difference_at(ref_c, c, "step", min(ref_c.final("step"), c.final("step"))),
            "equal_data": difference_at(ref_c, c, "tokens", equal_tokens),
            "switch": {"measured": False},
            "paired_final_eval": paired_final_eval(reference, run) if paired else None,
            "step_time_ratio": _ratio_or_none(row["mean_next_token_step_s"], rows[0]["mean_next_token_step_s"]),
            "phase1": phase1_diagnostic(run),
        }
        if run.switch_step is not None:
            entry["switch"] = switch_spike(*run.train_series("loss"), run.switch_step)
            entry["switch"].update(training_gap(*reference.train_series("loss"), *run.train_series("loss"), run.switch_step))
            stage = "superposition" if equal_tokens <= run.at_step("tokens_seen", run.switch_step) else "next-token"
            entry["equal_data"]["candidate_stage"] = stage
        entry["wall_clock_comparable"] = not _load_differs(entry)
        if not entry["wall_clock_comparable"]:  # no wall-clock number is recorded that the report calls unusable
            for key in ("seconds", "seconds_ratio", "equivalent_seconds_ratio"):
                if key in entry["iso_loss"]:
                    entry["iso_loss"][key] = None
        comparisons.append(entry)
    return {"reference": reference.name, "runs": rows, "comparisons": comparisons, "flops_formula": FLOPS_FORMULA,
            "regime": regime(non_embedding_parameters(reference), rows[0]["parameters"], rows[0]["steps"],
                             int(reference.start["positions_per_step"])),
            "wall_clock": "training seconds: the sum of step times, without validation and checkpoints"}

def phase1_diagnostic(run: Run) -> dict | None:
    """The last eval after a superposition step: the stage's own objective on held-out bags and the
    unigram level on the same bags (``train.run_validation``). A bag loss near the unigram level means
    phase 1 learned little beyond token frequencies. None when no eval fell inside phase 1."""
    evals = [e for e in run.evals if "val_bag_loss" in e and e["step"] > 0]
    if not evals:
        return None
    last = evals[-1]
    return {"step": last["step"], "val_bag_loss": last["val_bag_loss"], "unigram_loss": last["val_bag_unigram_loss"],
            "beyond_unigram": last["val_bag_unigram_loss"] - last["val_bag_loss"]}

def _load_differs(comparison: dict) -> bool:
    """Did identical next-token steps take noticeably different times in the two runs?"""
    load = comparison["step_time_ratio"]
    return load is not None and not 1 / WALL_CLOCK_TOLERANCE <= load <= WALL_CLOCK_TOLERANCE

def _ratio_or_none(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None

def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)

def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"

def summary_table(summary: dict) -> str:
    """A Markdown table (readable as plain text): one column per run, then one row per headline."""
    rows, comps = summary["runs"], {c["run"]: c for c in summary["comparisons"]}
    header = ["", *(r["name"] for r in rows)]

    def line(label: str, cells: list[str]) -> list[str]:
        return [label, *cells]

    def per_comp(fn) -> list[str]:
        return [fn(comps[r["name"]]) if r["name"] in comps else "(reference)" for r in rows]

    def iso(key):
        def cell(c):
            iso = c["iso_loss"]
            unreliable = key == "seconds_ratio" and _load_differs(c)
            if iso["reached"]:
                return "n/a: machine load differed" if unreliable else _ratio(iso.get(key))
            equivalent = None if unreliable else iso.get(key.replace("step_", "equivalent_step_")
                                                         .replace("seconds_", "equivalent_seconds_"))
            return "not reached" + (f" (equiv. {equivalent:.2f}x)" if equivalent is not None else "")
        return cell

    def diff(key):
        return lambda c: _fmt(c[key]["difference"], "+.4f")

    def spike(c):
        s = c["switch"]
        if not s["measured"]:
            return "-"
        rec = step_count(s["recovery_steps"]) if s["recovered"] else "not recovered"
        return f"{s['spike']:+.2f} nats, {rec}"

    def gap(c):
        s = c["switch"]
        return f"{s['gap_after_switch']:+.2f} -> {s['gap_at_end']:+.2f} nats" if "gap_after_switch" in s else "-"

    def phase1(c):
        p = c["phase1"]
        return "-" if p is None else f"{p['val_bag_loss']:.3f} ({p['unigram_loss']:.3f})"

    def paired(c):
        p = c["paired_final_eval"]
        return "-" if p is None else f"{p['difference']:+.4f} ± {p['stderr']:.4f}"

    table = [
        header,
        line("TST (s, r)", [r["method"] for r in rows]),
        line("steps", [str(r["steps"]) + ("" if r["finished"] else " (unfinished)") for r in rows]),
        line("final val loss (nats)", [_fmt(r["final_val_loss"]) for r in rows]),
        line("final val bits/byte", [_fmt(r["final_val_bpb"]) for r in rows]),
        line("data tokens seen", [f"{r['tokens_seen']:,}" for r in rows]),
        line("training wall-clock (s)", [f"{r['elapsed_s']:.1f}" for r in rows]),
        line("mean next-token step (s)", [_fmt(r["mean_next_token_step_s"], ".3f") for r in rows]),
        line("total model FLOPs", [si(r["flops"]) for r in rows]),
        line("iso-loss speedup: steps (= FLOPs)", per_comp(iso("step_ratio"))),
        line("iso-loss speedup: wall-clock", per_comp(iso("seconds_ratio"))),
        line("val loss diff at equal steps", per_comp(diff("equal_steps"))),
        line("final diff, paired ± s.e.", per_comp(paired)),
        line("val loss diff at equal data", per_comp(diff("equal_data"))),
        line("switch spike / recovery", per_comp(spike)),
        line("train-loss gap: switch -> end", per_comp(gap)),
        line("phase-1 bag loss (unigram)", per_comp(phase1)),
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in table]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)

def _prose(summary: dict) -> list[str]:
    """One paragraph per comparison, in words, with the numbers behind the table."""
    lines = []
    for c in summary["comparisons"]:
        iso, eq, ed, sw = c["iso_loss"], c["equal_steps"], c["equal_data"], c["switch"]
        lines.append(f"### {c['run']} vs {c['reference']}\n")
        if iso["reached"]:
            lines.append(
                f"- **Iso-loss**: {c['run']} reaches the reference's final validation loss {iso['target_val_loss']:.4f} at "
                f"step {iso['step']:.0f} (interpolated) and {si(iso['flops'])} FLOPs: {iso['step_ratio']:.2f}x fewer steps "
                "and FLOPs; " + (f"{iso['seconds']:.1f} training seconds, {iso['seconds_ratio']:.2f}x less wall-clock."
                                 if c["wall_clock_comparable"] else "wall-clock not comparable (the machine's load differed).")
            )
        else:
            lines.append(
                f"- **Iso-loss: not reached.** {c['run']}'s best validation loss is {iso['candidate_best_val_loss']:.4f}, "
                f"above the reference's final {iso['target_val_loss']:.4f}."
                + (f" The reference was already at {c['run']}'s final loss at step "
                   f"{iso['reference_step_at_candidate_final']:.0f} "
                   f"(interpolated): {c['run']} needed {1 / iso['equivalent_step_ratio']:.2f}x the steps and FLOPs "
                   f"(equivalent speedup {iso['equivalent_step_ratio']:.2f}x)."
                   if iso.get("equivalent_step_ratio") else
                   f" The reference's untrained model (step 0) was already as good: {c['run']} ended worse than where "
                   "the reference started." if "equivalent_step_ratio" in iso else "")
            )
        if eq["difference"] is not None:
            word = "lower" if eq["difference"] < 0 else "higher"
            lines.append(f"- **Equal steps (= equal FLOPs)**, step {eq['at']:.0f}: {eq['candidate_val_loss']:.4f} vs "
                         f"{eq['reference_val_loss']:.4f}, {abs(eq['difference']):.4f} nats {word}.")
        p = c["paired_final_eval"]
        if p is not None:
            sigma = abs(p["difference"]) / p["stderr"] if p["stderr"] > 0 else math.inf
            lines.append(
                f"- **Noise check** (both final models on the same {p['windows']} validation windows): difference "
                f"{p['difference']:+.4f} ± {p['stderr']:.4f} (standard error; {sigma:.1f} s.e.), {c['run']} better on "
                f"{100 * p['candidate_better_fraction']:.0f}% of windows."
            )
        if ed["difference"] is not None:
            word = "lower" if ed["difference"] < 0 else "higher"
            where = f" ({c['run']} still in its {ed['candidate_stage']} stage there)" if "candidate_stage" in ed else ""
            lines.append(f"- **Equal data**, {ed['at']:,.0f} tokens{where}: {ed['candidate_val_loss']:.4f} vs "
                         f"{ed['reference_val_loss']:.4f}, {abs(ed['difference']):.4f} nats {word}.")
        if sw["measured"]:
            rec = (f"back under it {step_count(sw['recovery_steps'])} after the switch" if sw["recovered"]
                   else "never back under it")
            lines.append(
                f"- **Switch** at step {sw['switch_step']}: training loss {sw['pre_switch_loss']:.3f} before (phase-1 MCE, "
                f"without log s) -> peak {sw['peak_loss']:.3f} at step {sw['peak_step']:.0f} ({sw['spike']:+.3f} nats), {rec}."
            )
            if "gap_after_switch" in sw:
                lines.append(
                    f"- **Training loss vs {c['reference']}** on the same batches: {sw['gap_after_switch']:+.3f} nats just after "
                    f"the switch (first 5 logged steps), {sw['gap_at_end']:+.3f} at the end (last 5)."
                )
        if c["phase1"] is not None:
            p = c["phase1"]
            lines.append(
                f"- **Phase 1 on held-out bags** (step {p['step']}, its last eval): bag objective {p['val_bag_loss']:.3f} "
                f"(MCE without log s) vs {p['unigram_loss']:.3f} for the train split's token frequencies on the same bags: "
                f"{p['beyond_unigram']:.3f} nats learned beyond unigram statistics.")
        elif c["switch"]["measured"] and c["framework"] == "torchtitan":
            lines.append("- **Phase 1 on held-out bags**: not measured (a torchtitan run validates next-token windows only).")
        elif c["switch"]["measured"]:
            lines.append("- **Phase 1 on held-out bags**: not measured (no eval at or before the switch step; set "
                         "train.eval_every to a divisor of the switch step).")
        if _load_differs(c):
            load = c["step_time_ratio"]
            lines.append(
                f"- **Wall-clock is not comparable here:** identical next-token steps took {load:.2f}x as long in "
                f"{c['run']} as in {c['reference']} (mean of the logged steps), so the machine's load differed between the runs; "
                "read the speedup in steps / FLOPs."
            )
        if c["config_differences"]:
            lines.append("- **Config differences from the reference** (besides [tst]): " + "; ".join(c["config_differences"]))
        lines.append("")
    return lines

def write_report(runs: list[Run], out_dir: str | Path, paired: bool = True, failed: dict[str, str] | None = None,
                 force: bool = False) -> dict:
    """Write ``report.md``, ``summary.json``, the PNG plots and a copy of each run's metrics.
    ``failed`` names the arms that stopped with an error: listed, neither drawn nor compared.

    The report is written whole and swapped in (``superpose.files.StagedDir``): ``out_dir`` must be
    new, empty or a report (replaced, files of the old one included, only with ``force``), and an
    error half-way leaves the old report as it was."""
    staged = StagedDir(out_dir, "report", "report directory", force)
    with staged as out:
        summary = _write_report(runs, out, paired, failed)
        staged.publish()
    return summary


def _write_report(runs: list[Run], out: Path, paired: bool, failed: dict[str, str] | None) -> dict:
    (out / "metrics").mkdir()
    for run in runs:
        shutil.copyfile(run.path / "metrics.jsonl", out / "metrics" / f"{run.name.replace('/', '-')}.jsonl")
    summary = summarize(runs, paired)
    summary["failed"] = dict(failed or {})
    summary["provenance"] = [{"run": run.name, **run.start.get("provenance", {})} for run in runs]
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=_json_default))
    comparable = all(c["wall_clock_comparable"] for c in summary["comparisons"])
    plot_runs(runs, out, None if comparable else "not comparable: the machine's load differed between the runs")
    ref = runs[0]
    text = [
        "# Baseline vs TST\n",
        f"Reference: `{ref.name}` ({ref.path}). Model `{ref.config.model.preset}` ({runs[0].start['parameters']:,} "
        f"parameters), L = {ref.config.data.seq_len}, batch {ref.config.train.batch_size}, {ref.config.train.steps} steps, "
        f"data `{ref.config.data.dir}`, seed {ref.config.train.seed}, trained by {ref.framework}. Validation loss is "
        "next-token cross-entropy in nats on the same held-out windows for every run. Differences are run minus "
        "reference: negative = better.\n",
        summary_table(summary) + "\n",
        *(f"**Failed: {name}** (not drawn, not compared): {error}\n" for name, error in summary["failed"].items()),
        f"**Regime.** {summary['regime']['text']}\n",
        *_prose(summary),
        "## Plots\n",
        *(f"![{title}]({name})\n" for name, title in PLOTS.items()),
        "## Definitions\n",
        f"- {FLOPS_FORMULA}",
        f"- Wall-clock is {summary['wall_clock']}; it depends on the machine's load while each run trained: both arms "
        "run identical next-token steps, so their mean next-token step times should agree (the report says so "
        f"when they differ by more than {WALL_CLOCK_TOLERANCE - 1:.0%}).",
        "- Iso-loss speedup: the first point (linear interpolation between validation points) where the run's "
        "validation loss is at or below the reference's final validation loss; reference cost / run cost there.",
        "- Equal data: both curves interpolated at the smaller of the two runs' final token counts.",
        "- Switch: pre-switch loss = mean of the last 3 logged phase-1 training losses; recovery = first logged "
        "next-token training loss at or under it. Phase-1 MCE and next-token loss are different quantities, so "
        "the gap to the reference's training loss at the same steps (same batches) is shown as well.",
        "- Metrics of every run are copied under `metrics/`; `summary.json` holds every number above.",
    ]
    atomic_write_text(out / "report.md", "\n".join(text) + "\n")
    return summary

def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"cannot serialise {type(value).__name__}")
