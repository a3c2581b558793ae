"""Where a run sits against the budgets where TST has been measured: the regime line of `compare`.

The measurements ship with the package, in ``superpose/regime_data/``: ``map.csv`` (superpose's own
map, one row per budget point and device with every arm's gap at seed 0) and ``seeds.csv`` (arms repeated
over seeds), both written by ``scripts/regime_map.py --table``, and ``paper.csv`` (the paper's
dense runs). A run is placed by its non-embedding parameters (as scaling-law work does: with a
small model and a large vocabulary the embeddings are most of the total but little of the
compute), its steps and its tokens per step; its tokens per non-embedding parameter pick the nearest
point where none decides. GPU points (bf16; ``device`` = cuda) are points of their own beside the
CPU's, and each point says where it was measured. On the map the gap shrank with model size and with
steps and grew with tokens per step at a fixed step count, so a run no larger, no longer and with
no fewer tokens per step than a point without a gain is not expected to gain, and a run at least
as large and as long, with no more tokens per step, as a point with a gain is expected to.
"""
from __future__ import annotations

import csv
import importlib.resources
import math
import statistics
from dataclasses import dataclass

GAP = "TST minus baseline final validation loss at equal FLOPs"
# map.csv: these columns, then one gap column per TST arm, then the best arms
SHAPE_COLUMNS = ("preset", "params", "non_embedding_params", "steps", "batch", "device", "seq_len", "tokens_per_step",
                 "tokens", "tokens_per_param", "baseline", "epochs", "max_epochs")
# what each device's runs computed in: a GPU point (bf16 autocast) is a point of its own
DEVICES = {"cpu": "CPU, fp32", "cuda": "GPU, bf16"}
BEST_COLUMNS = ("best_full", "best_full_gap", "best", "best_gap")


@dataclass(frozen=True)
class Point:
    """One measured budget and the best TST arm there."""

    name: str  # e.g. "medium-n1000-b16" or "paper 270M"
    non_embedding: int
    parameters: int
    steps: int
    tokens_per_step: int
    arm: str
    gap: float  # the arm's gap (nats): the mean over seeds where it was repeated
    stderr: float | None  # standard error of that mean; None for one seed
    seeds: int
    outcome: str  # gain (beyond noise) | no-gain | open (one seed, below zero beyond the typical seed noise)
    source: str = "map"  # map (superpose's own) | paper
    device: str = ""  # cpu | cuda (DEVICES) for the map's points; "" for the paper's

    @property
    def tokens_per_param(self) -> float:
        """Training tokens per non-embedding parameter: how long the run trained for its size."""
        return self.steps * self.tokens_per_step / self.non_embedding

    def describe(self) -> str:
        spread = f" ± {self.stderr:.3f} (s.e. of {self.seeds} seeds)" if self.stderr is not None else ", one seed"
        where = f", {DEVICES[self.device]}" if self.device in DEVICES else ""
        return (f"{self.arm} at {self.name} [{self.non_embedding / 1e6:,.1f}M non-embedding parameters, {self.steps} steps "
                f"of {self.tokens_per_step:,} tokens, {self.tokens_per_param:.3g} tokens per non-embedding parameter{where}]: "
                f"{self.gap:+.3f} nats{spread}")


def point_name(preset: str, steps: int, batch: int, device: str = "cpu", seq_len: int = 64) -> str:
    """A budget point's name, e.g. "medium-n1000-b16"; windows of other than 64 tokens say so
    ("medium-n2000-b16-l1024"), and a GPU point (bf16) is apart: "medium-n1000-b16-cuda"."""
    return (f"{preset}-n{steps}-b{batch}" + ("" if int(seq_len) == 64 else f"-l{seq_len}")
            + ("" if device == "cpu" else f"-{device}"))


def read_table(name: str) -> list[dict]:
    """Rows of one of the package's regime CSVs (an empty list if it is missing)."""
    path = importlib.resources.files("superpose") / "regime_data" / name
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def arm_outcome(gaps: list[float], noise: float) -> tuple[float, float | None, str]:
    """(mean gap, its standard error, outcome) of one arm at one point. Over seeds, a gain is a mean
    below -2 standard errors; one seed cannot show a gain, and its gap counts as no gain unless it
    lies below minus ``noise`` (the typical seed s.d. of a gap), which leaves the point open."""
    mean = statistics.mean(gaps)
    if len(gaps) > 1:
        stderr = statistics.stdev(gaps) / math.sqrt(len(gaps))
        return mean, stderr, "gain" if mean < -2 * stderr else "no-gain"
    return mean, None, "open" if mean < -noise else "no-gain"


def map_points(map_rows: list[dict], seed_rows: list[dict], arms: list[str]) -> list[Point]:
    """The map's budget points with their best arm (lowest mean gap) and the point's outcome: a gain
    if any arm gained, else open if any arm is open, else no gain."""
    noise = statistics.median(float(r["gap_sd"]) for r in seed_rows) if seed_rows else 0.0
    seeded = {(r["point"], r["arm"]): [float(g) for g in r["gaps"].split()] for r in seed_rows}
    points = []
    for row in map_rows:
        name = point_name(row["preset"], row["steps"], row["batch"], row["device"], row.get("seq_len") or 64)
        gaps = {arm: seeded.get((name, arm), [float(row[arm])]) for arm in arms if row.get(arm)}
        if not gaps:
            continue
        results = {arm: arm_outcome(g, noise) for arm, g in gaps.items()}
        best = min(results, key=lambda arm: results[arm][0])
        outcomes = {outcome for _, _, outcome in results.values()}
        outcome = next(o for o in ("gain", "open", "no-gain") if o in outcomes)
        gap, stderr, _ = results[best]
        points.append(Point(name, int(row["non_embedding_params"]), int(row["params"]), int(row["steps"]),
                            int(row["tokens_per_step"]), best, gap, stderr, len(gaps[best]), outcome, device=row["device"]))
    return points


def measured_points() -> list[Point]:
    """The map's points and the paper's (single runs at 2M tokens per step, where the validation
    noise is far below their gaps: each a gain)."""
    map_rows = read_table("map.csv")
    arms = [key for key in (map_rows[0] if map_rows else {}) if key not in SHAPE_COLUMNS + BEST_COLUMNS]
    paper = [Point(r["name"], int(r["non_embedding_params"]), int(r["params"]), int(r["steps"]), int(r["tokens_per_step"]),
                   r["arm"], float(r["gap"]), None, 1, "gain", "paper") for r in read_table("paper.csv")]
    return map_points(map_rows, read_table("seeds.csv"), arms) + paper


def regime(non_embedding: int, parameters: int, steps: int, tokens_per_step: int, points: list[Point] | None = None) -> dict:
    """Place a run (the baseline arm's shape and budget) against the measured points: ``gain``
    (at least as large and long as a point where TST won, with no more tokens per step),
    ``no-gain`` (no larger and no longer than a point without a gain, with no fewer tokens per
    step) or ``untested``; the text names the point that decided, or the nearest point measured (in
    non-embedding size, tokens per step and tokens per non-embedding parameter, on log scales)."""
    points = measured_points() if points is None else points
    per_param = steps * tokens_per_step / non_embedding
    where = (f"{non_embedding / 1e6:,.1f}M non-embedding parameters, {parameters / 1e6:,.1f}M in all; {steps} steps "
             f"of {tokens_per_step:,} tokens, {per_param:.3g} tokens per non-embedding parameter")
    gains = [p for p in points if p.outcome == "gain" and non_embedding >= p.non_embedding and steps >= p.steps
             and tokens_per_step <= p.tokens_per_step]
    no_gains = [p for p in points if p.outcome == "no-gain" and non_embedding <= p.non_embedding and steps <= p.steps
                and tokens_per_step >= p.tokens_per_step]
    if gains:
        point = max(gains, key=lambda p: (p.non_embedding, p.steps))
        verdict, text = "gain", (
            f"This run ({where}) is at least as large and as long as a budget where TST beat the baseline beyond "
            f"noise ({point.describe()}; {GAP}): TST with that setting ({point.arm}) is expected to pay here; "
            "other settings may not (docs/when-tst-pays.md).")
    elif no_gains:
        point = min(no_gains, key=lambda p: (p.non_embedding, p.steps))
        verdict, text = "no-gain", (
            f"This run ({where}) is no larger, no longer and has no fewer tokens per step than a budget of "
            f"superpose's small-scale map where no TST setting tried beat the baseline beyond noise "
            f"(the best: {point.describe()}; {GAP}; "
            "docs/when-tst-pays.md): TST is not expected to pay here.")
    else:
        map_only = [p for p in points if p.source == "map"]
        point = min(map_only, key=lambda p: sum(math.log(a / b) ** 2 for a, b in (
            (non_embedding, p.non_embedding), (tokens_per_step, p.tokens_per_step),
            (per_param, p.tokens_per_param)))) if map_only else None
        closest = f"the nearest point measured: {point.describe()}; " if point else ""
        verdict, text = "untested", (
            f"This run ({where}) lies between the budgets measured ({closest}docs/when-tst-pays.md) and those "
            "of the paper's gains: TST may or may not pay here; this comparison is the evidence.")
    return {"non_embedding_parameters": non_embedding, "parameters": parameters, "steps": steps,
            "tokens_per_step": tokens_per_step, "verdict": verdict, "point": point.name if point else None, "text": text}
