"""Where TST pays at small scale: a resumable grid of budgets x TST arms, seeds, and the levers.

Every run is an ordinary ``superpose`` run directory under ``--root``; the runs of one budget point
differ only in ``[tst]`` (or, for the LR sweep, in ``optim.lr`` for both arms alike), so they share
seed, data order, optimizer, LR schedule and evaluation. Two plans, each a list of jobs in priority
order: ``--plan small`` (the first map: 3M-25M parameters, the cheap point and its levers first),
``--plan crossover`` (the default: the walk up the model-size axis, ``CROSSOVER``), ``--plan
device`` (the same walk, further, on one CUDA GPU: ``DEVICE``) and ``--plan paper`` (the paper's
shape scaled down on one GPU: ``PAPER``, the runs not yet in the committed tables, so that
successive device calls continue it). A finished run is skipped and a long
run resumes from its last checkpoint, so the script can be killed and started again in a later
session; ``--shard i/n`` lets n processes (one per core) split the list, ``--parallel n`` starts
them itself and tabulates when they are done, and ``--budget-s`` starts no run that would not end
in time (estimated from the runs of the same model before it; the first run of a model always
starts) and, with ``--parallel``, stops the runs still going at the budget (SIGTERM: they
checkpoint) so that the tables are written in time. A run that fails is reported and skipped, so
one bad run does not cost the others; a run that another process holds is skipped, so two processes
started on the same plan (one per core) share it without ``--shard``.

``--table`` only tabulates: it merges the finished runs under ``--root`` into the committed tables
(``TABLES``: runs, map and seeds in ``superpose/regime_data/``, which the regime line of ``compare``
reads; levers and phase 1 in ``docs/regime/``), keeping the rows of runs that are no longer on
disk, and redraws the plots of docs/when-tst-pays.md. ``runs.csv`` keeps one row per run ever
tabulated (its final loss and the epochs of data it read); the map (seed 0) and the seeds table
are derived from it, so seeds run in different sessions pair with their baselines.

    OMP_NUM_THREADS=1 python scripts/regime_map.py --data /tmp/regime-gut --root runs/regime
    OMP_NUM_THREADS=1 python scripts/regime_map.py --data /tmp/regime-gut --root runs/regime --shard 0/2 &  # two cores
    OMP_NUM_THREADS=1 python scripts/regime_map.py --data /tmp/regime-gut --root runs/regime --shard 1/2
    OMP_NUM_THREADS=1 python scripts/regime_map.py --data /tmp/regime-gut --root runs/regime --only medium-n1000   # one point
    python scripts/regime_map.py --data /tmp/regime-gut --root runs/regime --table
    # one H200: 8 runs side by side for 5.5 minutes, then the merged tables to $OUT (docs/when-tst-pays.md)
    python scripts/regime_map.py --plan device --device cuda --data DATA --root /tmp/regime --parallel 8 \
        --budget-s 330 --tables-out $OUT
    # one H200, the paper's shape: whole runs for 7 minutes, 4 side by side (the call: docs/when-tst-pays.md, section 6)
    python scripts/regime_map.py --plan paper --device cuda --data PAPER_DATA --root /tmp/regime --parallel 4 \
        --budget-s 420 --assume-tflops 40 --tables-out $OUT

The device plan's runs are rows of their own (``device`` = cuda, points named ``...-cuda``): bf16
autocast on a GPU is not the CPU's fp32, so they extend the map beside the CPU points, not in them.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# A GPU machine's bare Python lacks tomli-w (pure Python): it travels as a wheel; an installed copy wins.
sys.path += [str(wheel) for wheel in sorted((Path(__file__).resolve().parents[1] / "bench" / "wheels").glob("*.whl"))]

from transformers import LlamaConfig  # noqa: E402

from superpose.compare import run_arm  # noqa: E402
from superpose.config import load_config  # noqa: E402
from superpose.data import TokenData  # noqa: E402
from superpose.errors import Interrupted, RunInUse  # noqa: E402
from superpose.files import atomic_write_text  # noqa: E402
from superpose.model import build_model, flops_per_step  # noqa: E402
from superpose.regime import BEST_COLUMNS, SHAPE_COLUMNS, point_name  # noqa: E402
from superpose.report import phase1_diagnostic  # noqa: E402
from superpose.runs import is_finished, load_run, non_embedding_parameters  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Where each table lives, and the columns that name a row: map and seeds ship with the package (the
# regime line of `compare` reads them), the rest are the docs' data. Tabulating merges the finished
# runs on disk into these files, so rows of earlier sessions (whose run directories are gone) stay.
TABLES = {
    "runs.csv": (REPO / "superpose" / "regime_data", ("point", "seed", "arm")),
    "map.csv": (REPO / "superpose" / "regime_data", ("preset", "steps", "batch", "seq_len", "device")),
    "seeds.csv": (REPO / "superpose" / "regime_data", ("point", "arm")),
    "levers.csv": (REPO / "docs" / "regime", ("lever",)),
    "phase1.csv": (REPO / "docs" / "regime", ("point", "arm")),
}

# TST arms of the map (overrides of [tst]); the baseline is tst.ratio = 0.
ARMS = {
    "s2-r0.2": {"tst.bag_size": 2, "tst.ratio": 0.2},
    "s4-r0.2": {"tst.bag_size": 4, "tst.ratio": 0.2},
    "s2-r0.3": {"tst.bag_size": 2, "tst.ratio": 0.3},
    "s4-r0.3": {"tst.bag_size": 4, "tst.ratio": 0.3},  # the paper's range (s in [4, 8], r in [0.2, 0.4])
    "s6-r0.3": {"tst.bag_size": 6, "tst.ratio": 0.3},  # the paper's own setting at 270M-10B parameters
    "output-s2-r0.2": {"tst.mode": "output", "tst.bag_size": 2, "tst.ratio": 0.2},
}
FULL_ARMS = [name for name in ARMS if not name.startswith("output")]
# Budget points (preset, steps, batch) -> the arms run there, in priority order.
POINTS = [
    (("tiny", 150, 16), list(ARMS)),
    (("tiny", 400, 16), ["s2-r0.2", "s4-r0.2", "output-s2-r0.2"]),
    (("tiny", 150, 64), ["s2-r0.2", "s4-r0.2", "output-s2-r0.2"]),
    (("small", 150, 16), ["s4-r0.2", "s2-r0.2", "output-s2-r0.2"]),
    (("tiny", 1000, 16), ["s4-r0.2", "output-s2-r0.2", "s2-r0.2"]),
    (("small", 400, 16), ["s4-r0.2", "output-s2-r0.2", "s2-r0.2"]),
    (("tiny", 2000, 16), ["s4-r0.2", "output-s2-r0.2"]),
    (("small", 1000, 16), ["output-s2-r0.2", "s2-r0.2"]),
    (("medium", 400, 16), ["output-s2-r0.2", "s2-r0.2"]),
]
# Model sizes that are not superpose presets: Llama configs written under --root/models/<name>.
CUSTOM_MODELS = {
    "medium": {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 6,
               "num_key_value_heads": 6, "max_position_embeddings": 2048, "tie_word_embeddings": False},
    "large": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 8, "max_position_embeddings": 2048, "tie_word_embeddings": False},
    "xl": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
           "num_key_value_heads": 12, "max_position_embeddings": 2048, "tie_word_embeddings": False},
}
# The crossover walk up the model-size axis (issue #16): (point, seed, arms), in order of information
# per CPU-hour. Seed 0 of the best arms at the two larger models first, then the seeds that say
# whether a gap near zero is real, then the near-tie's arm at 2,000 steps (3 seeds), then the
# remaining arms and budgets.
CROSSOVER = [
    (("medium", 1000, 16), 0, ["output-s2-r0.2", "s4-r0.3"]),
    (("large", 1000, 16), 0, ["output-s2-r0.2"]),
    (("medium", 1000, 16), 1, ["output-s2-r0.2"]),
    (("medium", 1000, 16), 2, ["output-s2-r0.2"]),
    (("large", 1000, 16), 1, ["output-s2-r0.2"]),
    (("large", 1000, 16), 2, ["output-s2-r0.2"]),
    (("medium", 2000, 16), 0, ["output-s2-r0.2"]),  # the near-tie's arm at twice the steps, 3 seeds
    (("medium", 2000, 16), 1, ["output-s2-r0.2"]),
    (("medium", 2000, 16), 2, ["output-s2-r0.2"]),
    (("medium", 2000, 16), 0, ["s4-r0.3"]),  # the paper's range at the winning budget: +0.022, +0.006 (a tie)
    (("medium", 2000, 16), 1, ["s4-r0.3"]),
    (("medium", 2000, 16), 2, ["s4-r0.3"]),
    (("large", 1000, 16), 0, ["s4-r0.3"]),  # +0.11 at medium: far behind, so after the seeds of the near-tie
    (("medium", 1000, 16), 0, ["s2-r0.2"]),
    (("large", 1000, 16), 0, ["s2-r0.2"]),
    (("medium", 2000, 16), 0, ["s2-r0.2"]),
    (("large", 2000, 16), 0, ["output-s2-r0.2", "s4-r0.3", "s2-r0.2"]),
]
# The device plan: the crossover walk on one CUDA GPU (bf16 autocast), further up the model-size and
# step axes, every point with 3 seeds of every arm. A run at B = 16 x 64 tokens uses a sliver of the
# GPU, so --parallel runs several side by side (expected to pay: one process leaves the GPU idle
# between its small kernels; not measured yet). Points in order of information per GPU-second: the
# CPU's points first (do they hold in bf16?), then xl (113M non-embedding parameters), then the longer budgets.
DEVICE_ARMS = ["output-s2-r0.2", "s4-r0.3", "s2-r0.2"]
DEVICE = [(("medium", 1000, 16), DEVICE_ARMS), (("large", 1000, 16), DEVICE_ARMS), (("xl", 1000, 16), DEVICE_ARMS),
          (("large", 2000, 16), DEVICE_ARMS), (("xl", 2000, 16), DEVICE_ARMS), (("medium", 2000, 16), DEVICE_ARMS),
          (("xl", 5000, 16), DEVICE_ARMS), (("large", 5000, 16), DEVICE_ARMS)]
# The paper-shape plan (issue #28): the paper's runs scaled down on one GPU, where they differ from the
# map above: windows of 1,024 positions (2,048 at one point), 16k-32k tokens per step, 2,000 steps, on
# the larger Gutenberg corpus (~42M tokens: scripts/paper_data.py), one run per process with its whole
# batch in one micro-batch, compiled, bf16. Points (preset, steps, batch, seq_len) in order of
# information per GPU-second: the cheapest point, then one step up each axis (model size, window,
# tokens per step), then the SmolLM2-135M shape (the paper's smallest model, with our vocabulary)
# and xl, each about 25 PFLOP a run (4.9 at the first point; the plan's seed 0 in all: ~300 PFLOP). A
# baseline reads steps x batch x (L + 1) tokens: at most one epoch of the corpus at every point (16k x
# 2,000 = 0.77 epochs; 32k tokens per step fit 1,250 steps); phase 1 reads s times more per step, so
# the TST arms repeat data (s=6, r=0.3: about 2 epochs), which the tables record (epochs, max_epochs).
# `llama-270m` with the 8k vocabulary is the SmolLM2-135M shape (106M non-embedding parameters).
PAPER_ARMS = ["s6-r0.3", "s4-r0.3", "output-s2-r0.2"]
PAPER = [("medium", 2000, 16, 1024), ("large", 2000, 16, 1024), ("medium", 2000, 8, 2048), ("medium", 1250, 32, 1024),
         ("llama-270m", 2000, 16, 1024), ("xl", 2000, 16, 1024)]
PAPER_EVAL_TOKENS = 262144  # 256 windows of 1,024: validation noise well below the seed noise of a gap
SEEDS = [1, 2]  # extra seeds, for the noise level of gaps (and, at the cheap point, of lever effects)
SEED_ARMS = {("tiny", 150, 16): ["s2-r0.2", "s4-r0.2", "output-s2-r0.2"], ("small", 400, 16): ["output-s2-r0.2"],
             ("small", 1000, 16): ["output-s2-r0.2"]}
# Levers at the cheap point: name -> overrides on top of the reference TST arm REF.
REF = "s2-r0.2"
LEVERS = {
    "output-s3-anneal": {"tst.mode": "output", "tst.bag_size": 3, "tst.slot_weights": [1.0, 0.5, 0.25],
                         "tst.anneal_to_ntp": True},
    "s3-r0.2": {"tst.bag_size": 3},
    "s2-r0.1": {"tst.ratio": 0.1},
    "curriculum-4-2": {"tst.curriculum": [[4, 0.15], [2, 0.15]]},
    "blend15": {"tst.blend_steps": 15},
    "power": {"tst.weighting": "power"},
    "reset-opt": {"tst.reset_optimizer": True},
    "rewarmup15": {"tst.rewarmup_steps": 15},
    "lr-scale0.5": {"tst.lr_scale": 0.5},
    "exp": {"tst.weighting": "exp"},
    "lr-scale2": {"tst.lr_scale": 2.0},
    # combinations of the levers that helped most on their own
    "output+lr-scale0.5": {"tst.mode": "output", "tst.lr_scale": 0.5},
    "s4+lr-scale0.5+power+reset-opt": {"tst.bag_size": 4, "tst.lr_scale": 0.5, "tst.weighting": "power",
                                       "tst.reset_optimizer": True},
}
LEVER_ARMS = {"output": "output-s2-r0.2"}  # levers that are map arms: REF + {"tst.mode": "output"}
SEED_LEVERS = ["output+lr-scale0.5", "lr-scale0.5", "power", "reset-opt"]  # the levers that helped at seed 0
LRS = [1.5e-3, 6e-3]  # LR sweep: baseline and the reference arm, both at each LR (default 3e-3)


def fmt(key: str, value) -> str:
    return f"--{key}={json.dumps(value) if isinstance(value, (list, bool)) else value}"


def point_dir(root: Path, preset: str, steps: int, batch: int, seed: int = 0, device: str = "cpu", seq_len: int = 64) -> Path:
    return root / (point_name(preset, steps, batch, device, seq_len) + (f"-seed{seed}" if seed else ""))


def model_arg(args, name: str) -> str:
    """``model.preset`` for a model name: a superpose preset, or a custom Llama config directory."""
    if name not in CUSTOM_MODELS:
        return name
    directory = Path(args.root) / "models" / name
    if not (directory / "config.json").is_file():
        directory.mkdir(parents=True, exist_ok=True)
        config = LlamaConfig(vocab_size=TokenData(args.data).vocab_size, **CUSTOM_MODELS[name])
        atomic_write_text(directory / "config.json", config.to_json_string())
    return str(directory)


def base_overrides(args, preset: str, steps: int, batch: int, seed: int = 0, seq_len: int | None = None) -> list[str]:
    """Everything but [tst]: identical for every run of one point."""
    paper = args.plan == "paper"  # long windows, whole runs within one device call: compiled, no checkpoints
    eval_tokens = args.eval_tokens or (PAPER_EVAL_TOKENS if paper else 16384)
    return [f"--model.preset={model_arg(args, preset)}", f"--data.dir={args.data}", "--data.corpus=",
            f"--data.seq_len={seq_len or args.seq_len}", f"--train.steps={steps}", f"--train.batch_size={batch}",
            f"--train.eval_tokens={eval_tokens}",
            # ten evals per run: the switch steps round(r * steps) of the arms are among them, so the
            # bag objective is scored at the end of phase 1; long runs checkpoint to resume mid-run
            f"--train.eval_every={max(1, steps // 10)}", f"--train.log_every={max(10, steps // 30)}",
            f"--train.checkpoint_every={200 if steps >= 1000 and not paper else 0}", "--train.keep_checkpoints=1",
            "--train.progress=false",
            "--train.tensorboard=false", f"--train.seed={seed}", f"--optim.warmup_steps={min(50, steps // 10)}",
            # the CPU map keeps its runs' configs (train.device "auto"); on a GPU, bf16 autocast
            *([f"--train.device={args.device}", "--train.precision=bf16"] if args.device != "cpu" else []),
            *(["--train.compile=true"] if paper and args.device != "cpu" else [])]


def jobs(args) -> list[tuple[Path, list[str]]]:
    """Every run of ``args.plan`` as (directory, overrides), in priority order."""
    root, out = Path(args.root), []

    def point(preset, steps, batch, arms, seed=0, seq_len=None, baseline=True):
        d = point_dir(root, preset, steps, batch, seed, args.device, seq_len or args.seq_len)
        base = base_overrides(args, preset, steps, batch, seed, seq_len)
        if baseline:
            out.append((d / "baseline", base + ["--tst.ratio=0"]))
        out.extend((d / arm, base + [fmt(k, v) for k, v in ARMS[arm].items()]) for arm in arms)

    def levers(preset, steps, batch, names, seed=0):
        d, base = point_dir(root, preset, steps, batch, seed), base_overrides(args, preset, steps, batch, seed)
        ref = [fmt(k, v) for k, v in ARMS[REF].items()]
        out.extend((d / "levers" / name, base + ref + [fmt(k, v) for k, v in LEVERS[name].items()]) for name in names)

    if args.plan == "crossover":
        for key, seed, arms in CROSSOVER:
            point(*key, arms, seed)
        return list(dict(out).items())  # each point's baseline once, at its first place
    if args.plan == "device":
        for key, arms in DEVICE:
            for seed in [0, *SEEDS]:
                point(*key, arms, seed)
        return out
    if args.plan == "paper":
        committed = [] if getattr(args, "set", None) else [read_csv(TABLES[name][0] / name) for name in ("runs.csv", "seeds.csv")]
        for (preset, steps, batch, seq_len), seed, arms, baseline in paper_todo(args, *(committed or ([], []))):
            point(preset, steps, batch, arms, seed, seq_len, baseline)
        return out
    (preset, steps, batch), arms = POINTS[0]
    point(preset, steps, batch, arms)
    levers(preset, steps, batch, list(LEVERS))
    for seed in SEEDS:
        point(preset, steps, batch, SEED_ARMS[POINTS[0][0]], seed)
        levers(preset, steps, batch, SEED_LEVERS, seed)
    cheap = point_dir(root, preset, steps, batch)
    base, ref = base_overrides(args, preset, steps, batch), [fmt(k, v) for k, v in ARMS[REF].items()]
    for lr in LRS:
        out.append((cheap / "levers" / f"lr{lr:g}" / "baseline", base + ["--tst.ratio=0", f"--optim.lr={lr}"]))
        out.append((cheap / "levers" / f"lr{lr:g}" / "tst", base + ref + [f"--optim.lr={lr}"]))
    for (preset, steps, batch), arms in POINTS[1:]:
        point(preset, steps, batch, arms)
    for key, arms in SEED_ARMS.items():
        for seed in SEEDS if key != POINTS[0][0] else []:  # the cheap point's seeds ran above
            point(*key, arms, seed)
    return out


def paper_todo(args, runs: list[dict], seeds: list[dict]) -> list[tuple]:
    """The paper-shape plan's runs not yet in ``runs`` (the committed per-run rows, so successive
    device calls continue the map), as (point, seed, arms, baseline too?), in order of information
    per GPU-second: first seeds 1-2 of every arm whose seed-0 gap lies within 2 seed s.d. of zero (they
    decide whether it is a gain, a loss or a tie), then seed 0 of the points not measured yet, in
    ``PAPER``'s order. The seed s.d. is the median of the GPU's seed rows (0.03 before there are any)."""
    done = {(r["point"], r["seed"], r["arm"]): r["val_loss"] for r in runs}
    sds = [r["gap_sd"] for r in seeds if str(r["point"]).endswith("-cuda")] or [r["gap_sd"] for r in seeds]
    noise = statistics.median(sds) if sds else 0.03
    repeats, fresh = [], []
    for key in PAPER:
        name = point_name(key[0], key[1], key[2], args.device, key[3])
        todo = [arm for arm in PAPER_ARMS if (name, 0, arm) not in done]
        if todo:
            fresh.append((key, 0, todo, (name, 0, "baseline") not in done))
        near = [arm for arm in PAPER_ARMS if (name, 0, arm) in done and (name, 0, "baseline") in done
                and abs(done[name, 0, arm] - done[name, 0, "baseline"]) <= 2 * noise]
        for seed in SEEDS:
            if arms := [arm for arm in near if (name, seed, arm) not in done]:
                repeats.append((key, seed, arms, (name, seed, "baseline") not in done))
    data_tokens = TokenData(args.data).tokens("train")
    for (preset, steps, batch, seq_len), *_ in repeats + fresh:
        if (epochs := steps * batch * (seq_len + 1) / data_tokens) > 1:
            print(f"{point_name(preset, steps, batch, args.device, seq_len)}: the baseline reads {epochs:.2f} epochs of "
                  f"{args.data} ({data_tokens:,} tokens): it repeats data", file=sys.stderr)
    return repeats + fresh


def final(out: Path) -> dict | None:
    """The last eval record of a finished run, with the run's parameter counts and shape."""
    if not is_finished(out):
        return None
    run = load_run(out)
    return {**run.evals[-1], "params": run.start["parameters"], "non_embedding_params": non_embedding_parameters(run),
            "seq_len": run.config.data.seq_len, "tokens_per_step": run.start["positions_per_step"]}


# A point's directory name, e.g. medium-n1000-b16, medium-n2000-b16-l1024-cuda-seed1 (point_dir)
POINT_DIR = re.compile(r"(?P<point>(?P<preset>.+)-n(?P<steps>\d+)-b(?P<batch>\d+)(?:-l(?P<seq_len>\d+))?(?:-(?P<device>cuda))?)"
                       r"(?:-seed(?P<seed>\d+))?")


def map_runs(root: Path):
    """(point, seed, arm, run directory, name fields) of every finished baseline and map arm under ``root``."""
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if (m := POINT_DIR.fullmatch(d.name)) and d.is_dir():
            for arm in ["baseline", *ARMS]:
                if is_finished(d / arm):
                    yield m["point"], int(m["seed"] or 0), arm, d / arm, m


def train_tokens(data_dir: str | None) -> int | None:
    """Training tokens of a prepared data directory (None where it is not on this machine)."""
    return TokenData(data_dir).tokens("train") if data_dir and (Path(data_dir) / "meta.json").is_file() else None


def run_rows(root: Path, data: str | None) -> list[dict]:
    """One row per finished run: its point, seed, arm, shape, final validation loss, the tokens it
    read and the epochs of its training split that makes (``data`` when the run's own data
    directory is not on this machine), and its training seconds. The committed rows keep every run
    ever tabulated, so the seeds of one arm run in different sessions still pair with their baselines."""
    rows = []
    for point, seed, arm, out, m in map_runs(root):
        f, run = final(out), load_run(out)
        tokens = train_tokens(run.config.data.dir) or train_tokens(data)
        exported = (out / "model" / "config.json").is_file()  # without it the non-embedding count is unknown
        rows.append({"point": point, "seed": seed, "arm": arm, "preset": m["preset"], "steps": run.config.train.steps,
                     "batch": run.config.train.batch_size, "seq_len": run.config.data.seq_len, "device": m["device"] or "cpu",
                     "params": f["params"], "non_embedding_params": f["non_embedding_params"] if exported else None,
                     "tokens_per_step": f["tokens_per_step"], "val_loss": round(f["val_loss"], 6),
                     "tokens_seen": f["tokens_seen"], "epochs": float(f"{f['tokens_seen'] / tokens:.4g}") if tokens else None,
                     "train_s": round(f["elapsed"], 1), "flops": run.start["flops_per_step"] * run.config.train.steps})
    return rows


def map_rows(runs: list[dict]) -> list[dict]:
    """A map row per point with a seed-0 baseline and arm among ``runs``: every arm's gap at seed 0,
    and the epochs of data the baseline and the most-reading arm read."""
    at = {(r["point"], r["arm"]): r for r in runs if r["seed"] == 0}
    rows = []
    for (point, arm), b in at.items():
        done = {a: at[point, a] for a in ARMS if (point, a) in at}
        if arm != "baseline" or not done:
            continue
        epochs = [r["epochs"] for r in done.values() if r.get("epochs") is not None]
        rows.append({**{k: b.get(k) for k in ("preset", "params", "non_embedding_params", "steps", "batch", "device", "seq_len",
                                          "tokens_per_step")},
                     "tokens": b["tokens_seen"], "tokens_per_param": round(b["tokens_seen"] / b["params"], 4),
                     "baseline": round(b["val_loss"], 4), "epochs": b.get("epochs"),
                     "max_epochs": max(epochs) if epochs else None,
                     **{a: round(r["val_loss"] - b["val_loss"], 4) for a, r in done.items()}})
    return rows


MAP_COLUMNS = [*SHAPE_COLUMNS, *ARMS, *BEST_COLUMNS]


def best_arms(row: dict) -> dict:
    """A map row in MAP_COLUMNS order with its best full-TST arm and best arm (lowest seed-0 gap)."""
    gaps = {arm: row[arm] for arm in ARMS if row.get(arm) is not None}
    full = {a: g for a, g in gaps.items() if a in FULL_ARMS}
    best_full = min(full, key=full.get) if full else None
    best = min(gaps, key=gaps.get)
    row = {**row, "best_full": best_full, "best_full_gap": full.get(best_full), "best": best, "best_gap": gaps[best]}
    return {key: row.get(key) for key in MAP_COLUMNS}


def phase1_rows(root: Path) -> list[dict]:
    """Every finished TST run's phase 1 on held-out bags (its last eval inside phase 1) beside the
    unigram level, at every point and seed."""
    rows = []
    for point, seed, arm, out, _ in map_runs(root):
        if arm != "baseline" and (p := phase1_diagnostic(load_run(out))):
            rows.append({"point": out.parent.name, "arm": arm, "step": p["step"], "val_bag_loss": round(p["val_bag_loss"], 4),
                         "unigram_loss": round(p["unigram_loss"], 4), "beyond_unigram": round(p["beyond_unigram"], 4)})
    return rows


def seed_rows(runs: list[dict]) -> list[dict]:
    """The gap of each arm per seed (paired with the baseline of the same seed), with mean and sample
    s.d., for every arm of a point that ran with 2 or more seeds."""
    loss = {(r["point"], r["seed"], r["arm"]): r["val_loss"] for r in runs}
    rows = []
    for point, arm in dict.fromkeys((p, a) for p, _, a in sorted(loss) if a != "baseline"):
        seeds = sorted(s for p, s, a in loss if (p, a) == (point, arm) and (point, s, "baseline") in loss)
        if len(seeds) >= 2:
            gaps = [loss[point, s, arm] - loss[point, s, "baseline"] for s in seeds]
            rows.append({"point": point, "arm": arm, "seeds": len(gaps), "gaps": " ".join(f"{g:+.3f}" for g in gaps),
                         "gap_mean": round(statistics.mean(gaps), 4), "gap_sd": round(statistics.stdev(gaps), 4),
                         "baseline_sd": round(statistics.stdev(loss[point, s, "baseline"] for s in seeds), 4)})
    return rows


def lever_rows(root: Path) -> list[dict]:
    """Each lever at the cheap point: its loss and gap at seed 0, and its effect against the
    reference arm of the same seed, averaged over the seeds it ran with."""
    (preset, steps, batch), _ = POINTS[0]
    cheap = point_dir(root, preset, steps, batch)
    b, ref = final(cheap / "baseline"), final(cheap / REF)
    rows = []
    if not (b and ref):
        return rows
    def lever_dir(d: Path, name: str) -> Path:
        return d / LEVER_ARMS[name] if name in LEVER_ARMS else d / "levers" / name

    arm_levers = {name: {k: v for k, v in ARMS[arm].items() if ARMS[REF].get(k) != v} for name, arm in LEVER_ARMS.items()}
    for name, extra in {**arm_levers, **LEVERS}.items():
        if f := final(lever_dir(cheap, name)):
            effects = []
            for seed in [0] + SEEDS:
                d = point_dir(root, preset, steps, batch, seed)
                r, lf = final(d / REF), final(lever_dir(d, name))
                if r and lf:
                    effects.append(lf["val_loss"] - r["val_loss"])
            rows.append({"lever": name, "overrides": " ".join(fmt(k, v) for k, v in extra.items()),
                         "val_loss": round(f["val_loss"], 4), "gap_vs_baseline": round(f["val_loss"] - b["val_loss"], 4),
                         "effect_vs_ref": round(effects[0], 4), "seeds": len(effects),
                         "effect_mean": round(statistics.mean(effects), 4),
                         "effect_sd": round(statistics.stdev(effects), 4) if len(effects) > 1 else None})
    for lr in LRS:
        fb, ft = final(cheap / "levers" / f"lr{lr:g}" / "baseline"), final(cheap / "levers" / f"lr{lr:g}" / "tst")
        if fb and ft:
            rows.append({"lever": f"lr={lr:g} (both arms)", "overrides": f"--optim.lr={lr:g}",
                         "val_loss": round(ft["val_loss"], 4), "gap_vs_baseline": round(ft["val_loss"] - fb["val_loss"], 4),
                         "baseline_at_lr": round(fb["val_loss"], 4)})
    return rows


def cell(text: str):
    """A CSV cell as int, float or text (empty = None)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text or None


def read_csv(path: Path) -> list[dict]:
    """The rows of a table (none if it is missing), cells as numbers where they are numbers."""
    if not path.is_file():
        return []
    with open(path, newline="") as h:
        return [{k: cell(v) for k, v in row.items()} for row in csv.DictReader(h)]


def merge(path: Path, rows: list[dict], key: tuple[str, ...]) -> list[dict]:
    """The table at ``path`` with ``rows`` merged in: a row of the same key is updated cell by cell
    (unless it averages over fewer seeds than the row on file), new rows are appended."""
    merged = {tuple(row[k] for k in key): row for row in read_csv(path)}
    for row in rows:
        old = merged.setdefault(tuple(row[k] for k in key), {})
        if (old.get("seeds") or 0) <= (row.get("seeds") or 0):
            old.update({k: v for k, v in row.items() if v is not None})
    return list(merged.values())


def write_csv(path: Path, rows: list[dict]) -> None:
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as h:
            writer = csv.DictWriter(h, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)


def markdown(rows: list[dict]) -> str:
    """A Markdown table of rows (the union of their keys; missing cells as "-")."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    signed = set(ARMS) | {"best_full_gap", "best_gap", "gap_mean", "gap_vs_baseline", "effect_vs_ref", "effect_mean"}

    def cell(key, value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:+.3f}" if key in signed else f"{value:.3f}"
        return str(value)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(k, r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


PRESET_STYLES = (("tiny", "o", "-"), ("small", "s", "--"), ("medium", "^", ":"), ("large", "D", "-."), ("xl", "v", "-"),
                 ("llama-270m", "P", "--"))
DEVICE_LABEL = {"cpu": "", "cuda": " (GPU, bf16)"}


def plot(rows: list[dict], seeds: list[dict], out: Path) -> None:
    """Best full-TST gap and output-only gap against tokens per parameter, steps and non-embedding
    parameters (one line per step count there, with the seed means ± 2 standard errors), written
    beside docs/when-tst-pays.md."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    for xkey, xlabel, fname in (("tokens_per_param", "training tokens per parameter (baseline arm)",
                                 "when-tst-pays-tokens-per-param.png"),
                                ("steps", "optimizer steps", "when-tst-pays-steps.png")):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for series, key, color in (("best full TST", "best_full_gap", "C0"), ("output-only s=2 r=0.2", "output-s2-r0.2", "C1")):
            for (preset, marker, line), device in itertools.product(PRESET_STYLES, ("cpu", "cuda")):
                pts = sorted((r[xkey], r[key], r["batch"], r.get("seq_len") or 64) for r in rows
                             if r["preset"] == preset and r["device"] == device and r.get(key) is not None)
                b16 = [p for p in pts if p[2:] == (16, 64)]  # the B=16 x 64 points of one model form a line over the budget
                if b16:
                    ax.plot([p[0] for p in b16], [p[1] for p in b16], line, marker=marker, color=color,
                            fillstyle="full" if device == "cpu" else "none", label=f"{series}, {preset}{DEVICE_LABEL[device]}")
                for x, y, batch, seq_len in pts:
                    if (batch, seq_len) != (16, 64):
                        ax.scatter([x], [y], marker=marker, facecolors="none", edgecolors=color)
                        ax.annotate(f"B={batch}" + (f"xL={seq_len}" if seq_len != 64 else "")
                                    + ("" if device == "cpu" else " GPU"),
                                    (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("TST - baseline final val loss (nats)")
        ax.set_title("TST vs baseline at equal FLOPs (below 0: TST wins)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for series, key, color in (("best full TST", "best_full_gap", "C0"), ("output-only s=2 r=0.2", "output-s2-r0.2", "C1")):
        for (steps, marker), device in itertools.product(zip(sorted({r["steps"] for r in rows}), "osD^v<>p"), ("cpu", "cuda")):
            pts = sorted((r["non_embedding_params"], r[key]) for r in rows
                         if r["steps"] == steps and r["batch"] == 16 and (r.get("seq_len") or 64) == 64 and r["device"] == device
                         and r.get(key) is not None)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], "-" if device == "cpu" else "--", marker=marker, color=color,
                        alpha=0.8, fillstyle="full" if device == "cpu" else "none",
                        label=f"{series}, {steps} steps{DEVICE_LABEL[device]}")
    at = {point_name(r["preset"], r["steps"], r["batch"], r["device"]): r["non_embedding_params"] for r in rows
          if r["batch"] == 16 and (r.get("seq_len") or 64) == 64}
    for k, r in enumerate(r for r in seeds if r["point"] in at):
        ax.errorbar([at[r["point"]]], [r["gap_mean"]], yerr=[2 * r["gap_sd"] / math.sqrt(r["seeds"])], fmt="x", capsize=4,
                    color="C1" if r["arm"].startswith("output") else "C0", label=None if k else "seed mean ± 2 s.e.")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters (B=16 x 64 tokens per step)")
    ax.set_ylabel("TST - baseline final val loss (nats)")
    ax.set_title("The gap along the model-size axis (seed 0; below 0: TST wins)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "when-tst-pays-params.png", dpi=120)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a directory written by `superpose prepare`")
    p.add_argument("--root", default="runs/regime")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--eval-tokens", type=int, help=f"held-out tokens per validation (16384; the paper plan: {PAPER_EVAL_TOKENS})")
    p.add_argument("--plan", choices=["crossover", "small", "device", "paper"], default="crossover",
                   help="crossover: the walk up the model-size axis (issue #16); small: the first map, 3M-25M "
                        "parameters; device: the crossover walk further, on a GPU (with --device cuda); paper: the "
                        "paper's shape scaled down on a GPU (PAPER: 1,024-token windows, 16k-32k tokens per step)")
    p.add_argument("--assume-tflops", type=float, default=0,
                   help="with --budget-s: start a model's first run only if its FLOPs at this rate (per process) end in time")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: train.device=cuda, bf16 autocast")
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th job starting at job i")
    p.add_argument("--parallel", type=int, default=1, help="run the plan as this many shards side by side, then tabulate")
    p.add_argument("--budget-s", type=float, default=0, help="start no run that would end after this many seconds")
    p.add_argument("--only", default="", help="run only the jobs whose directory contains this text, e.g. small-n400")
    p.add_argument("--table", action="store_true", help="do not train; tabulate finished runs only")
    p.add_argument("--tables-out", help="also write the merged tables (CSV, tables.md) into this directory (no plots)")
    p.add_argument("--merge-tables", help="with --table: merge the tables in this directory (a device's --tables-out) too")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run, after the plan's (a smoke test of a plan: --set train.steps=4); "
                        "such runs are not the plan's measurements: they go under ROOT/smoke, their tables to --tables-out only")
    args = p.parse_args()
    index, count = (int(x) for x in args.shard.split("/"))
    if not 0 <= index < count:
        p.error(f"--shard {args.shard}: expected i/n with 0 <= i < n")
    if args.set and not args.tables_out:
        p.error("--set: runs with other settings are not the plan's measurements; give --tables-out for their tables")
    if (args.plan in ("device", "paper")) != (args.device == "cuda") and not args.set:
        p.error(f"--plan {args.plan}: device and paper are the GPU plans (--device cuda; --device cpu only to rehearse "
                "them with --set), and the CPU plans' points are CPU rows")
    given_root = args.root  # what the shards are given: each adds smoke/ itself
    if args.set:
        args.root = str(Path(args.root) / "smoke")
    root = Path(args.root)
    if args.parallel > 1 and not args.table:
        started = time.monotonic()
        shard = [sys.executable, __file__, "--data", args.data, "--root", given_root, "--seq-len", str(args.seq_len),
                 *(["--eval-tokens", str(args.eval_tokens)] if args.eval_tokens else []), "--plan", args.plan,
                 "--device", args.device, "--only", args.only, "--assume-tflops", str(args.assume_tflops),
                 *(f"--set={item}" for item in args.set), *(["--tables-out", args.tables_out] if args.tables_out else [])]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        children = [subprocess.Popen(shard + ["--shard", f"{i}/{args.parallel}", "--budget-s", str(args.budget_s)], env=env)
                    for i in range(args.parallel)]
        codes = [wait_until(child, started + args.budget_s if args.budget_s else None) for child in children]
        print(f"regime map: {args.parallel} shards ended ({codes}) after {time.monotonic() - started:.0f} s", file=sys.stderr)
    elif not args.table:
        run_jobs(args, root, index, count)
        if count > 1:
            return  # the shards do not race to write the tables: run --table once they are all done
    root.mkdir(parents=True, exist_ok=True)
    given = {name: read_csv(Path(args.merge_tables) / name) if args.merge_tables else [] for name in TABLES}
    tables = {"runs.csv": merge(TABLES["runs.csv"][0] / "runs.csv", given["runs.csv"] + run_rows(root, args.data),
                                TABLES["runs.csv"][1])}
    # map and seeds: derived from every run ever tabulated; their rows on file (and the given
    # tables', first: what is derived here updates them) stand for runs tabulated before runs.csv
    found = {"map.csv": map_rows(tables["runs.csv"]), "seeds.csv": seed_rows(tables["runs.csv"]),
             "levers.csv": lever_rows(root), "phase1.csv": phase1_rows(root)}
    for name, rows in found.items():
        directory, key = TABLES[name]
        tables[name] = merge(directory / name, given[name] + rows, key)
    tables["map.csv"] = [best_arms(row) for row in tables["map.csv"]]
    if args.tables_out:
        Path(args.tables_out).mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        if not args.set:
            write_csv(TABLES[name][0] / name, rows)
        if args.tables_out:
            write_csv(Path(args.tables_out) / name, rows)
    text = "\n\n".join(f"## {name}\n\n{markdown(rows)}" for name, rows in tables.items() if rows)
    for directory in [root] + ([Path(args.tables_out)] if args.tables_out else []):
        (directory / "tables.md").write_text(text + "\n")
    print(text)
    if tables["map.csv"] and not (args.set or args.tables_out):  # a device's tables are plotted where they are merged
        plot(tables["map.csv"], tables["seeds.csv"], REPO / "docs")


def wait_until(child: subprocess.Popen, deadline: float | None) -> int:
    """The exit status of a shard; at ``deadline`` it is stopped (SIGTERM: its run checkpoints), and
    killed a minute later, so that the tables of what finished are written in time."""
    try:
        return child.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        child.terminate()
        try:
            return child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            return child.wait()


def run_flops(cfg) -> float:
    """A run's training FLOPs (superpose.model.flops_per_step of its model, built on the meta device)."""
    lm = build_model(cfg.model.preset, TokenData(cfg.data.dir).vocab_size, cfg.data.seq_len, meta=True)
    return cfg.train.steps * flops_per_step(lm, cfg.data.seq_len, cfg.train.batch_size * cfg.data.seq_len)


def committed_rates(args) -> dict[tuple, float]:
    """(model, window length) -> the median FLOP/s of its runs on this device in the committed runs.csv
    (their training seconds): what a model's first run here is expected to take."""
    seen = {}
    for r in [] if args.set else read_csv(TABLES["runs.csv"][0] / "runs.csv"):
        if r["device"] == args.device and r.get("flops") and r.get("train_s"):
            seen.setdefault((r["preset"], r["seq_len"]), []).append(r["flops"] / r["train_s"])
    return {key: statistics.median(rates) for key, rates in seen.items()}


def run_jobs(args, root: Path, index: int, count: int) -> None:
    """This shard's jobs in order: each one that fits ``--budget-s`` (its FLOPs at the rate of the same
    model's runs before it here, start-up and validation included; a model's first run at the rate of
    its committed runs of the same window length on this device, else at ``--assume-tflops``, else
    always started), and past one that fails. A run stopped by a signal (the parent's at the budget)
    checkpoints and ends the shard with one line."""
    todo = [(out, overrides) for out, overrides in jobs(args) if args.only in str(out.relative_to(root))]
    started, rate, prior = time.monotonic(), {}, committed_rates(args)  # rate: model -> FLOP/s of its runs here
    for out, overrides in todo[index::count]:
        cfg = load_config(None, overrides + [f"--{item}" for item in args.set] + [f"--train.out_dir={out}"])
        flops = run_flops(cfg) if args.budget_s else 0.0
        model = Path(cfg.model.preset).name  # a custom model's directory is named as the preset of runs.csv
        speed = rate.get(model) or prior.get((model, cfg.data.seq_len)) or args.assume_tflops * 1e12
        estimate = flops / speed if speed else 0.0
        if args.budget_s and time.monotonic() - started + estimate > args.budget_s:
            print(f"{out}: not started, {estimate:.0f} s would end past the budget of {args.budget_s:.0f} s", file=sys.stderr)
            continue
        fresh, begun = not (out / "metrics.jsonl").exists(), time.monotonic()  # a resumed run's time says less
        try:
            run_arm(cfg, str(out))
        except Interrupted as stop:
            print(f"{out}: stopped at step {stop.step} by signal {stop.signum}, checkpoint {stop.checkpoint}: "
                  "the plan resumes it when started again", file=sys.stderr)
            raise SystemExit(128 + stop.signum) from None
        except RunInUse as err:  # another process of the plan runs it (one per core): not a failure
            print(f"{out}: skipped: {err}", file=sys.stderr)
            continue
        except Exception as err:  # noqa: BLE001 -- a bad run is reported; the other runs of the plan go on
            print(f"{out}: FAILED: {type(err).__name__}: {err}", file=sys.stderr)
            continue
        if fresh and flops:
            rate[model] = flops / (time.monotonic() - begun)


if __name__ == "__main__":
    main()
