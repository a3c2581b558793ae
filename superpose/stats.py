"""The statistics of a comparison: pure functions of logged curves, testable on synthetic data.

- **iso-loss speedup**: where a run's validation loss first reaches the reference (baseline) run's
  final validation loss, linearly interpolated between validation points, as ratios of steps,
  training wall-clock and FLOPs; ``None`` ("not reached") when it never does;
- **loss differences** at equal steps (= equal FLOPs: both arms run L positions per sample) and
  at equal data tokens (TST reads s times more tokens per phase-1 step);
- **the switch**: the training-loss spike when phase 2 starts and the steps until the training
  loss is back under its pre-switch level, and the training-loss gap to the reference after it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


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
                       equivalent_seconds_ratio=(value_at(reference.step, reference.elapsed, ref_step)
                                                 / candidate.final("elapsed")))
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


def si(value: float) -> str:
    """A number with an SI suffix, 3 significant digits: 1.23G."""
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def step_count(count: float) -> str:
    return f"{count:.0f} step" + ("" if round(count) == 1 else "s")
