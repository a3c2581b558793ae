"""Evidence for TST: read runs' ``metrics.jsonl``, compute the headline numbers, write a report.

The numbers are pure functions of the logged curves, so they can be tested on synthetic data
and recomputed from any finished run (``superpose report``):

- **iso-loss speedup**: where TST's validation loss first reaches the reference (baseline) run's
  final validation loss, linearly interpolated between validation points, as ratios of steps,
  training wall-clock and FLOPs; ``None`` ("not reached") when it never does;
- **loss differences** at equal steps (= equal FLOPs: both arms run L positions per sample) and
  at equal data tokens (TST reads s times more tokens per phase-1 step);
- **the switch**: the training-loss spike when phase 2 starts and the steps until the training
  loss is back under its pre-switch level.

Wall-clock means the trainer's ``elapsed``: the sum of step times, without validation or
checkpoints. Plots use matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import itertools
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import Config, ConfigError
from .files import atomic_write_text, writable_dir
from .model import hf_progress_bars
from .regime import regime
from .runs import RESUME_SAFE_KEYS, load_run_config, read_records

FLOPS_FORMULA = (
    "FLOPs per step = 6 * N_active * P + 6 * n_layers * L * d_attn * P, with P = batch_size * L model "
    "positions per step, N_active the matmul weights a position passes through (output head included, "
    "input embedding lookup excluded, MoE experts scaled by top-k / E) and d_attn = heads * head_dim "
    "(attention scores and values, causal mask not discounted). Bag averaging is O(s*d) per position "
    "and not counted, so a phase-1 and a phase-2 step cost the same."
)


# ---------------------------------------------------------------------------- loading runs


@dataclass
class Curve:
    """Validation points of one run, in step order; all arrays have one entry per point."""

    step: np.ndarray
    loss: np.ndarray
    elapsed: np.ndarray  # training seconds so far
    flops: np.ndarray  # model FLOPs so far
    tokens: np.ndarray  # data tokens read so far

    @classmethod
    def from_evals(cls, evals: list[dict]) -> "Curve":
        cols = {k: np.array([float(e[k]) for e in evals]) for k in ("step", "val_loss", "elapsed", "flops", "tokens_seen")}
        return cls(cols["step"], cols["val_loss"], cols["elapsed"], cols["flops"], cols["tokens_seen"])

    def final(self, name: str) -> float:
        return float(getattr(self, name)[-1])


def stage_bag_sizes(stages: list[dict]) -> list[int]:
    """The bag sizes of the superposition stages in order (a curriculum has several)."""
    return [size for size, _ in itertools.groupby(s["bag_size"] for s in stages if s["bag_size"] > 1)]


def switch_step(stages: list[dict]) -> int | None:
    """First step of next-token training after superposition; None for a baseline or a run that never switches."""
    return next((int(a["end_step"]) for a, b in zip(stages, stages[1:]) if b["bag_size"] == 1 and a["bag_size"] > 1), None)


def method_name(stages: list[dict], steps: int) -> str:
    """"baseline", or the bag sizes of the superposition stages, the switch as a fraction r of the
    ``steps`` and the ablation mode when it is not full TST: ``s=4, r=0.3``, ``s=2, r=0.2, output-only``."""
    sizes = stage_bag_sizes(stages)
    if not sizes:
        return "baseline"
    switch = switch_step(stages)
    switch = steps if switch is None else switch
    modes = [s.get("mode", "full") for s in stages if s["bag_size"] > 1]
    mode = "" if set(modes) == {"full"} else f", {'/'.join(dict.fromkeys(modes))}-only"
    return f"s={'->'.join(map(str, sizes))}, r={switch / steps:g}{mode}"


@dataclass
class Run:
    """One run directory: its config and the records of its (last) ``metrics.jsonl`` history."""

    name: str
    path: Path
    config: Config
    start: dict
    evals: list[dict]
    trains: list[dict]
    ended: bool
    curve: Curve = field(init=False)

    def __post_init__(self):
        self.curve = Curve.from_evals(self.evals)

    @property
    def switch_step(self) -> int | None:
        return switch_step(self.start["stages"])

    @property
    def is_baseline(self) -> bool:
        return all(s["bag_size"] == 1 for s in self.start["stages"])

    @property
    def bag_sizes(self) -> list[int]:
        return stage_bag_sizes(self.start["stages"])

    @property
    def ratio(self) -> float:
        """The fraction of steps before the switch to next-token training (0 for a baseline)."""
        if self.is_baseline:
            return 0.0
        switch = self.switch_step if self.switch_step is not None else self.config.train.steps
        return switch / self.config.train.steps

    @property
    def method(self) -> str:
        return method_name(self.start["stages"], self.config.train.steps)

    @property
    def label(self) -> str:
        return self.name if self.is_baseline else f"{self.name} ({self.method})"

    def at_step(self, key: str, step: float) -> float | None:
        """``elapsed`` or ``tokens_seen`` at a step, interpolated over every train and eval record."""
        points = sorted({r["step"]: r[key] for r in self.trains + self.evals}.items())
        return value_at([p[0] for p in points], [p[1] for p in points], step)

    def train_series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """Logged training records as (step, value) arrays; skipped (non-finite) steps dropped."""
        rows = [(r["step"], r[key]) for r in self.trains if r.get("applied", True) and math.isfinite(r[key])]
        return np.array([r[0] for r in rows], dtype=float), np.array([r[1] for r in rows], dtype=float)


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read a run directory written by ``superpose train``; a clear error if it holds no usable run."""
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"{path} is not a run directory (no metrics.jsonl)")
    config = load_run_config(path)
    records = read_records(path)
    starts = [i for i, r in enumerate(records) if r["kind"] == "start"]
    if not starts:
        raise ConfigError(f"{metrics} has no start record")
    records = records[starts[-1]:]  # a run restarted from scratch appends a new history
    # A run resumed from its final checkpoint validates the last step again: keep one point per step.
    evals = sorted({r["step"]: r for r in records if r["kind"] == "eval"}.values(), key=lambda r: r["step"])
    if len(evals) < 2:
        raise ConfigError(f"{path} has {len(evals)} validation point(s); a report needs at least 2")
    return Run(
        name=name or path.name,
        path=path,
        config=config,
        start=records[0],
        evals=evals,
        trains=[r for r in records if r["kind"] == "train"],
        ended=any(r["kind"] == "end" for r in records),
    )


def non_embedding_parameters(run: Run) -> int:
    """The run's parameters less the input embedding and an untied output head (the count that
    places a run on the regime map), from its exported model's config; the total if it exported none."""
    from transformers import AutoConfig

    total = int(run.start["parameters"])
    if not (run.path / "model" / "config.json").is_file():
        return total
    config = AutoConfig.from_pretrained(run.path / "model", local_files_only=True)
    config = getattr(config, "text_config", None) or config
    return total - config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)


def config_differences(reference: Config, other: Config, ignore_tst: bool = True) -> list[str]:
    """Keys that make two runs not comparable ("section.key: a -> b"); logging, output directory and
    (by default) the [tst] section are ignored. Data directories count as equal when their
    ``meta.json`` files are identical (the same prepared data under two paths)."""
    ref, oth = reference.to_dict(), other.to_dict()
    skip = set(RESUME_SAFE_KEYS) | {"train.out_dir", "train.eval_every"}
    diffs = []
    for section, values in ref.items():
        if ignore_tst and section == "tst":
            continue
        for key, value in values.items():
            name = f"{section}.{key}"
            if name in skip or oth[section][key] == value:
                continue
            if section == "data" and key in ("dir", "corpus", "vocab_size") and _same_data(reference, other):
                continue
            diffs.append(f"{name}: {value!r} -> {oth[section][key]!r}")
    return diffs


def _same_data(a: Config, b: Config) -> bool:
    meta_a, meta_b = Path(a.data.dir) / "meta.json", Path(b.data.dir) / "meta.json"
    return meta_a.is_file() and meta_b.is_file() and meta_a.read_text() == meta_b.read_text()


# ---------------------------------------------------------------------------- pure computations


def value_at(xs: np.ndarray, ys: np.ndarray, x: float) -> float | None:
    """Piecewise-linear ``y(x)`` through the points; None outside ``[xs[0], xs[-1]]``."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if len(xs) == 0 or x < xs[0] or x > xs[-1]:
        return None
    return float(np.interp(x, xs, ys))


def first_at_or_below(xs: np.ndarray, ys: np.ndarray, target: float) -> float | None:
    """The smallest x where the piecewise-linear curve through (xs, ys) is <= target, or None.

    An exact hit at a point returns that point's x; a crossing between two points is
    interpolated linearly."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    for i in range(len(xs)):
        if ys[i] <= target:
            if i == 0:
                return float(xs[0])
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return float(x0 + (y0 - target) / (y0 - y1) * (x1 - x0))
    return None


def iso_loss_speedup(reference: Curve, candidate: Curve) -> dict:
    """How much sooner ``candidate`` reaches the reference's final validation loss.

    Ratios are reference cost / candidate cost at the crossing, in steps, training seconds and
    FLOPs (>1: the candidate is faster). ``reached`` is False when it never gets there; then the
    ``equivalent_*_ratio`` keys say where the reference already was as good as the candidate's
    final loss, as reference cost there / candidate's total cost (< 1)."""
    target = reference.final("loss")
    step = first_at_or_below(candidate.step, candidate.loss, target)
    out = {"target_val_loss": target, "reached": step is not None, "candidate_best_val_loss": float(candidate.loss.min())}
    if step is None:
        # Read the other way: where the reference was as good as the candidate ends (a ratio < 1).
        ref_step = first_at_or_below(reference.step, reference.loss, candidate.final("loss"))
        if ref_step is not None and candidate.final("step") > 0:
            out.update(reference_step_at_candidate_final=ref_step,
                       equivalent_step_ratio=ref_step / candidate.final("step"),
                       equivalent_seconds_ratio=value_at(reference.step, reference.elapsed, ref_step) / candidate.final("elapsed"))
        return out
    seconds = value_at(candidate.step, candidate.elapsed, step)
    flops = value_at(candidate.step, candidate.flops, step)
    out.update(
        step=step,
        seconds=seconds,
        flops=flops,
        step_ratio=reference.final("step") / step if step > 0 else math.inf,
        seconds_ratio=reference.final("elapsed") / seconds if seconds > 0 else math.inf,
        flops_ratio=reference.final("flops") / flops if flops > 0 else math.inf,
    )
    return out


def difference_at(reference: Curve, candidate: Curve, axis: str, at: float) -> dict:
    """Candidate minus reference validation loss at the same ``axis`` value (step | tokens | elapsed)."""
    ref = value_at(getattr(reference, axis), reference.loss, at)
    cand = value_at(getattr(candidate, axis), candidate.loss, at)
    diff = None if ref is None or cand is None else cand - ref
    return {"axis": axis, "at": at, "reference_val_loss": ref, "candidate_val_loss": cand, "difference": diff}


def switch_spike(steps: np.ndarray, losses: np.ndarray, switch: int, before: int = 3) -> dict:
    """Training-loss spike when phase 2 starts at step ``switch`` and the recovery after it.

    ``steps`` are the trainer's logged steps (a record at step k holds the loss of the k-th
    update, so records with k > switch are next-token updates). The pre-switch level is the mean
    of the last ``before`` records at or before the switch (phase-1 MCE without log s); recovery
    is the first later record at or under it. The peak is taken up to recovery (or the end); a
    negative spike means the next-token loss started below the phase-1 level."""
    steps, losses = np.asarray(steps, dtype=float), np.asarray(losses, dtype=float)
    pre_mask, post_mask = steps <= switch, steps > switch
    if not pre_mask.any() or not post_mask.any():
        return {"measured": False}
    pre = float(losses[pre_mask][-before:].mean())
    post_steps, post_losses = steps[post_mask], losses[post_mask]
    below = np.nonzero(post_losses <= pre)[0]
    recovered = below.size > 0
    peak = int(np.argmax(post_losses[: below[0] + 1 if recovered else len(post_losses)]))
    return {
        "measured": True,
        "switch_step": switch,
        "pre_switch_loss": pre,
        "peak_loss": float(post_losses[peak]),
        "peak_step": float(post_steps[peak]),
        "spike": float(post_losses[peak] - pre),
        "recovered": recovered,
        "recovery_steps": float(post_steps[below[0]] - switch) if recovered else None,
    }


def training_gap(ref_steps: np.ndarray, ref_losses: np.ndarray, steps: np.ndarray, losses: np.ndarray,
                 switch: int, window: int = 5) -> dict:
    """Candidate minus reference training loss at the steps both logged after the switch, averaged
    over the first and the last ``window`` of them. After the switch both arms draw the same
    next-token windows at a step, so the gap is paired: it shows the switch's cost relative to the
    baseline, and what is left of it at the end."""
    ref_at = dict(zip(np.asarray(ref_steps).tolist(), np.asarray(ref_losses).tolist()))
    pairs = [(loss, ref_at[step]) for step, loss in zip(np.asarray(steps).tolist(), np.asarray(losses).tolist())
             if step > switch and step in ref_at]
    if not pairs:
        return {}
    gaps = np.array([a - b for a, b in pairs])
    return {"gap_after_switch": float(gaps[:window].mean()), "gap_at_end": float(gaps[-window:].mean())}


# ---------------------------------------------------------------------------- paired evaluation


def window_losses(model_dir: Path, windows, batch: int = 16) -> np.ndarray:
    """Mean next-token loss of each held-out window ``[n, L+1]`` under an exported HF model."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    with hf_progress_bars(False):  # no "Loading weights" bar in the middle of a report
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    out = []
    with torch.no_grad():
        for rows in windows.split(batch):
            logits = model(input_ids=rows[:, :-1]).logits  # [b, L, V]
            loss = F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten(), reduction="none")
            out.append(loss.view(rows.shape[0], -1).mean(dim=1))  # [b]
    return torch.cat(out).numpy()


def paired_final_eval(reference: Run, candidate: Run) -> dict | None:
    """Both exported final models on the same validation windows: the mean per-window loss
    difference and its standard error, which says whether a final difference is above the
    noise of the validation set. None when a model or the data directory is missing."""
    from .data import TokenData, validation_windows

    dirs = [reference.path / "model", candidate.path / "model"]
    if not all((d / "config.json").is_file() for d in dirs) or not (Path(reference.config.data.dir) / "meta.json").is_file():
        return None
    data = TokenData(reference.config.data.dir)
    windows = validation_windows(data.splits["val"], reference.config.data.seq_len, reference.config.train.eval_tokens)
    ref, cand = (window_losses(d, windows) for d in dirs)
    diff = cand - ref
    return {
        "windows": int(diff.size),
        "reference_val_loss": float(ref.mean()),
        "candidate_val_loss": float(cand.mean()),
        "difference": float(diff.mean()),
        "stderr": float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else math.nan,
        "candidate_better_fraction": float((diff < 0).mean()),
    }


# ---------------------------------------------------------------------------- report


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
            "config_differences": config_differences(reference.config, run.config),
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
    unigram level on the same bags (``train.validate``). A bag loss near the unigram level means
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


def _si(value: float) -> str:
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _steps(count: float) -> str:
    return f"{count:.0f} step" + ("" if round(count) == 1 else "s")


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
            equivalent = None if unreliable else iso.get(key.replace("step_", "equivalent_step_").replace("seconds_", "equivalent_seconds_"))
            return "not reached" + (f" (equiv. {equivalent:.2f}x)" if equivalent is not None else "")
        return cell

    def diff(key):
        return lambda c: _fmt(c[key]["difference"], "+.4f")

    def spike(c):
        s = c["switch"]
        if not s["measured"]:
            return "-"
        rec = _steps(s["recovery_steps"]) if s["recovered"] else "not recovered"
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
        line("total model FLOPs", [_si(r["flops"]) for r in rows]),
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
                f"step {iso['step']:.0f} (interpolated) and {_si(iso['flops'])} FLOPs: {iso['step_ratio']:.2f}x fewer steps "
                "and FLOPs; " + (f"{iso['seconds']:.1f} training seconds, {iso['seconds_ratio']:.2f}x less wall-clock."
                                 if c["wall_clock_comparable"] else "wall-clock not comparable (the machine's load differed).")
            )
        else:
            lines.append(
                f"- **Iso-loss: not reached.** {c['run']}'s best validation loss is {iso['candidate_best_val_loss']:.4f}, "
                f"above the reference's final {iso['target_val_loss']:.4f}."
                + (f" The reference was already at {c['run']}'s final loss at step {iso['reference_step_at_candidate_final']:.0f} "
                   f"(interpolated): {c['run']} needed {1 / iso['equivalent_step_ratio']:.2f}x the steps and FLOPs "
                   f"(equivalent speedup {iso['equivalent_step_ratio']:.2f}x)."
                   if "equivalent_step_ratio" in iso else "")
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
            rec = (f"back under it {_steps(sw['recovery_steps'])} after the switch" if sw["recovered"]
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


WALL_CLOCK_TOLERANCE = 1.15  # mean next-token step times further apart than this flag a load difference

PLOTS = {
    "val_loss_vs_step.png": "Validation loss vs step (= FLOPs)",
    "val_loss_vs_seconds.png": "Validation loss vs training wall-clock",
    "val_loss_vs_tokens.png": "Validation loss vs data tokens seen",
    "train_loss_switch.png": "Training loss around the switch",
}


def write_report(runs: list[Run], out_dir: str | Path, paired: bool = True, failed: dict[str, str] | None = None) -> dict:
    """Write ``report.md``, ``summary.json``, the PNG plots and a copy of each run's metrics.
    ``failed`` names the arms that stopped with an error: listed, neither drawn nor compared."""
    out = writable_dir(out_dir, "report directory")
    (out / "metrics").mkdir(exist_ok=True)
    for run in runs:
        shutil.copyfile(run.path / "metrics.jsonl", out / "metrics" / f"{run.name.replace('/', '-')}.jsonl")
    summary = summarize(runs, paired)
    summary["failed"] = dict(failed or {})
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=_json_default))
    comparable = all(c["wall_clock_comparable"] for c in summary["comparisons"])
    plot_runs(runs, out, None if comparable else "not comparable: the machine's load differed between the runs")
    ref = runs[0]
    text = [
        "# Baseline vs TST\n",
        f"Reference: `{ref.name}` ({ref.path}). Model `{ref.config.model.preset}` ({runs[0].start['parameters']:,} "
        f"parameters), L = {ref.config.data.seq_len}, batch {ref.config.train.batch_size}, {ref.config.train.steps} steps, "
        f"data `{ref.config.data.dir}`, seed {ref.config.train.seed}. Validation loss is next-token cross-entropy in "
        f"nats on the same held-out windows for every run. Differences are run minus reference: negative = better.\n",
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


# ---------------------------------------------------------------------------- plots


def _switch_x(run: Run, axis: str) -> float | None:
    """Where the switch sits on an axis (step, elapsed seconds, data tokens)."""
    if run.switch_step is None:
        return None
    if axis == "step":
        return float(run.switch_step)
    return run.at_step({"elapsed": "elapsed", "tokens": "tokens_seen"}[axis], run.switch_step)


def plot_runs(runs: list[Run], out: Path, wall_clock_note: str | None = None) -> None:
    """The validation curves against step, wall-clock and data; ``wall_clock_note`` goes under the
    wall-clock plot's title when its x-axis cannot be compared between the runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    target = runs[0].curve.final("loss")
    # The step-0 loss (~ln V) would squash every curve: the y-axis starts at the highest later point.
    top = max(r.curve.loss[1:].max() for r in runs) + 0.1
    bottom = min(r.curve.loss.min() for r in runs) - 0.1
    axes = {"step": ("step", "training step (= model FLOPs)"),
            "seconds": ("elapsed", "training wall-clock (s, validation excluded)"),
            "tokens": ("tokens", "data tokens seen")}
    for name, (axis, xlabel) in axes.items():
        fig, ax = plt.subplots(figsize=(8, 5))
        for i, run in enumerate(runs):
            color = colors[i % len(colors)]
            ax.plot(getattr(run.curve, axis), run.curve.loss, "o-", ms=3, color=color, label=run.label)
            switch = _switch_x(run, axis)
            if switch is not None:
                ax.axvline(switch, color=color, ls="--", lw=1, label=f"{run.name}: switch to next-token")
            crossing = first_at_or_below(run.curve.step, run.curve.loss, target) if i else None
            if crossing is not None:
                at = value_at(run.curve.step, getattr(run.curve, axis), crossing)
                ax.plot([at], [target], "*", ms=12, color=color, label=f"{run.name}: reaches {runs[0].name}'s final loss")
        ax.axhline(target, color="grey", ls=":", lw=1, label=f"{runs[0].name} final ({target:.3f})")
        ax.set_ylim(bottom, top)
        if axis == "tokens":
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: _si(v)))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        note = wall_clock_note if name == "seconds" and wall_clock_note else None
        ax.set_title(PLOTS[f"val_loss_vs_{name}.png"] + (f"\n({note})" if note else ""), color="firebrick" if note else "black")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"val_loss_vs_{name}.png", dpi=120)
        plt.close(fig)
    plot_switch(runs, out, plt, colors)


def plot_switch(runs: list[Run], out: Path, plt, colors) -> None:
    """Training loss (every logged step) around the first TST run's switch, all runs overlaid."""
    switches = [r.switch_step for r in runs if r.switch_step is not None]
    fig, ax = plt.subplots(figsize=(8, 5))
    if switches:
        steps = runs[0].config.train.steps
        lo, hi = max(0, min(switches) - 0.15 * steps), min(steps, max(switches) + 0.35 * steps)
        ys = []
        for i, run in enumerate(runs):
            x, y = run.train_series("loss")
            keep = (x >= lo) & (x <= hi)
            ax.plot(x[keep], y[keep], "-", lw=1.2, color=colors[i % len(colors)], label=f"{run.label} training loss")
            ys.append(y[keep])
            if run.switch_step is not None:
                ax.axvline(run.switch_step, color=colors[i % len(colors)], ls="--", lw=1, label=f"{run.name}: switch")
                spike = switch_spike(x, y, run.switch_step)
                if spike["measured"]:
                    ax.axhline(spike["pre_switch_loss"], color=colors[i % len(colors)], ls=":", lw=1,
                               label=f"{run.name}: pre-switch level {spike['pre_switch_loss']:.2f}")
                    if spike["recovered"]:
                        at = run.switch_step + spike["recovery_steps"]
                        ax.plot([at], [spike["pre_switch_loss"]], "v", ms=8, color=colors[i % len(colors)],
                                label=f"{run.name}: back under it after {_steps(spike['recovery_steps'])}")
        ax.set_xlim(lo, hi)
        ax.set_xlabel("training step")
        ax.set_ylabel("training loss (nats; phase 1 = MCE without log s)")
        ax.set_title(PLOTS["train_loss_switch.png"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no run has a superposition stage", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(out / "train_loss_switch.png", dpi=120)
    plt.close(fig)
