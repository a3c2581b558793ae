"""Where TST pays at small scale: a resumable grid of budgets x (s, r), then the levers.

Every run is an ordinary ``superpose`` run directory under ``--root``; arms of one budget point
differ only in ``[tst]`` (or, for the LR sweep, in ``optim.lr`` for both arms alike), so they
share seed, data order, optimizer, LR schedule and evaluation. A finished run is skipped, so the
script can be killed and started again. Runs go in priority order (the map first, then the levers),
so a partial run still yields a usable map. ``--table`` only prints/plots what has finished.

    python scripts/regime_map.py --data /tmp/regime-gut --root runs/regime            # run + table
    python scripts/regime_map.py --data /tmp/regime-gut --root runs/regime --table    # table only
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from superpose.compare import run_arm  # noqa: E402
from superpose.config import load_config  # noqa: E402
from superpose.report import is_finished  # noqa: E402

# (preset, steps, batch): the map's budget points, cheapest first.
# Run order (priority): the cheap point with its (s, r) arms, the levers there, then larger budgets.
POINTS = [("tiny", 150, 16), ("tiny", 400, 16), ("tiny", 150, 64), ("small", 150, 16)]
# (s, r) arms: all of them at the first point, the first one only at the others (time on 2 shared cores).
ARMS = [(2, 0.2), (4, 0.2), (2, 0.3)]
# Levers: name -> overrides on top of the reference TST arm s=4, r=0.3 ... see REF below.
REF = {"tst.bag_size": 2, "tst.ratio": 0.2}
LEVERS = {
    "output-s3-anneal": {"tst.mode": "output", "tst.bag_size": 3, "tst.slot_weights": [1.0, 0.5, 0.25],
                         "tst.anneal_to_ntp": True},
    "output": {"tst.mode": "output"},
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
}
FIRST_LEVERS = 6  # run before the larger budgets; the rest after them
LRS = [1.5e-3, 6e-3]  # LR sweep: baseline and reference TST arm, both at each LR


def base_overrides(args, preset: str, steps: int, batch: int) -> list[str]:
    return [f"--model.preset={preset}", f"--data.dir={args.data}", "--data.corpus=", f"--data.seq_len={args.seq_len}",
            f"--train.steps={steps}", f"--train.batch_size={batch}", f"--train.eval_every={steps}",
            f"--train.eval_tokens={args.eval_tokens}", f"--train.log_every={max(10, steps // 30)}",
            "--train.checkpoint_every=0", "--train.keep_checkpoints=1", "--train.progress=false",
            f"--optim.warmup_steps={min(50, steps // 10)}"]


def fmt(key: str, value) -> str:
    return f"--{key}={json.dumps(value) if isinstance(value, (list, bool)) else value}"


def point_dir(args, preset, steps, batch) -> Path:
    return Path(args.root) / f"{preset}-n{steps}-b{batch}"


def run(args, out: Path, overrides: list[str]) -> None:
    cfg = load_config(None, overrides + [f"--train.out_dir={out}"])
    if not args.table:
        run_arm(cfg, str(out))


def final(out: Path):
    if not is_finished(out):
        return None
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "eval":
            last = rec
    return last


def n_params(out: Path):
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for key in ("params", "parameters", "n_params"):
            if key in rec:
                return rec[key]
    return None


def run_point(args, i: int) -> None:
    preset, steps, batch = POINTS[i]
    root = point_dir(args, preset, steps, batch)
    base = base_overrides(args, preset, steps, batch)
    run(args, root / "baseline", base + ["--tst.ratio=0"])
    for s, r in ARMS if i == 0 else ARMS[:1]:
        run(args, root / f"s{s}-r{r:g}", base + [f"--tst.bag_size={s}", f"--tst.ratio={r}"])


def map_points(args):
    rows = []
    for preset, steps, batch in POINTS:
        root = point_dir(args, preset, steps, batch)
        b = final(root / "baseline")
        arms = {f"s{s}-r{r:g}": final(root / f"s{s}-r{r:g}") for s, r in ARMS}
        arms = {k: v for k, v in arms.items() if v}
        if not b or not arms:
            continue
        best = min(arms, key=lambda k: arms[k]["val_loss"])
        rows.append({"preset": preset, "steps": steps, "batch": batch, "tokens": b["tokens_seen"],
                     "params": n_params(root / "baseline"), "baseline": round(b["val_loss"], 4),
                     **{k: round(v["val_loss"] - b["val_loss"], 4) for k, v in arms.items()},
                     "best": best, "best_gap": round(arms[best]["val_loss"] - b["val_loss"], 4)})
    return rows


def levers(args, rows, names, lr_sweep: bool):
    cheap = [r for r in rows if (r["steps"], r["batch"]) == (POINTS[0][1], POINTS[0][2])]
    if not cheap:
        return []
    hardest = max(cheap, key=lambda r: r["best_gap"])
    preset, steps, batch = hardest["preset"], hardest["steps"], hardest["batch"]
    root = point_dir(args, preset, steps, batch)
    base = base_overrides(args, preset, steps, batch)
    ref = [fmt(k, v) for k, v in REF.items()]
    out = []
    b = final(root / "baseline")
    for name in names:
        extra = LEVERS[name]
        d = root / "levers" / name
        run(args, d, base + ref + [fmt(k, v) for k, v in extra.items()])
        f = final(d)
        if f and b:
            out.append({"point": root.name, "lever": name, "overrides": " ".join(fmt(k, v) for k, v in extra.items()),
                        "val_loss": round(f["val_loss"], 4), "gap_vs_baseline": round(f["val_loss"] - b["val_loss"], 4)})
    for lr in LRS if lr_sweep else []:
        d = root / "levers" / f"lr{lr:g}"
        run(args, d / "baseline", base + ["--tst.ratio=0", f"--optim.lr={lr}"])
        run(args, d / "tst", base + ref + [f"--optim.lr={lr}"])
        fb, ft = final(d / "baseline"), final(d / "tst")
        if fb and ft:
            out.append({"point": root.name, "lever": f"lr={lr:g} (both arms)", "overrides": f"--optim.lr={lr:g}",
                        "val_loss": round(ft["val_loss"], 4), "gap_vs_baseline": round(ft["val_loss"] - fb["val_loss"], 4),
                        "baseline_at_lr": round(fb["val_loss"], 4)})
    return out


def write(rows, lever_rows, root: Path):
    root.mkdir(parents=True, exist_ok=True)
    for name, data in (("map.csv", rows), ("levers.csv", lever_rows)):
        if data:
            keys = sorted({k for r in data for k in r}, key=lambda k: list(data[0]).index(k) if k in data[0] else 99)
            with open(root / name, "w", newline="") as h:
                w = csv.DictWriter(h, fieldnames=keys)
                w.writeheader()
                w.writerows(data)
    if rows:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        for xkey, xlabel, fname in (("tpp", "training tokens per parameter", "map_tokens_per_param.png"),
                                    ("steps", "optimizer steps", "map_steps.png")):
            fig, ax = plt.subplots(figsize=(6, 4))
            for r in rows:
                x = r["tokens"] / r["params"] if xkey == "tpp" and r["params"] else r["steps"]
                ax.scatter(x, r["best_gap"], marker="o" if r["preset"] == "tiny" else "s",
                           c="C0" if r["batch"] == 16 else "C1")
                ax.annotate(f"{r['preset']} B={r['batch']} {r['best']}", (x, r["best_gap"]), fontsize=7)
            ax.axhline(0, color="k", lw=0.8)
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("best TST - baseline val loss (nats)")
            ax.set_title("TST vs baseline at equal FLOPs (< 0: TST wins)")
            fig.tight_layout()
            fig.savefig(root / fname, dpi=120)
            plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a directory written by `superpose prepare`")
    p.add_argument("--root", default="runs/regime")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--table", action="store_true", help="do not train; tabulate finished runs only")
    p.add_argument("--map-only", action="store_true", help="skip the levers")
    args = p.parse_args()
    names = list(LEVERS)
    run_point(args, 0)
    if not args.map_only:
        levers(args, map_points(args), names[:FIRST_LEVERS], lr_sweep=False)
    for i in (1, 2):
        run_point(args, i)
    if not args.map_only:
        levers(args, map_points(args), names, lr_sweep=False)
    for i in range(3, len(POINTS)):
        run_point(args, i)
    rows = map_points(args)
    lever_rows = [] if args.map_only else levers(args, rows, names, lr_sweep=True)
    write(rows, lever_rows, Path(args.root))
    for r in rows:
        print(r)
    for r in lever_rows:
        print(r)


if __name__ == "__main__":
    main()
