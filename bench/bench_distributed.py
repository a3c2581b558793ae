"""Throughput of 1 process vs 2 ranks (torchrun, DDP and FSDP2), side by side (run by hand).

    python bench/bench_distributed.py --data DIR                 # CPU: 2 ranks x 1 thread vs 1 process
    python bench/bench_distributed.py --data DIR --device cuda --ranks 8 --batch 64 --seq-len 1024

Every variant trains the same run (same global batch, TST phase 1 then phase 2) through the real
CLI, once per round; rounds interleave the variants so that a busy machine slows them alike.
A variant's step time per stage is its minimum over steps (the first step of each stage left
out) and rounds, the least noisy statistic on a shared machine; tokens/s counts data tokens of the
global batch (a phase-1 step reads s times more of them than a phase-2 step at equal FLOPs).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from superpose.runs import read_records  # noqa: E402  (torch-free)


def variants(ranks: int, threads: int) -> dict[str, tuple[list[str], dict]]:
    """name -> (launcher + overrides, environment)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    per_rank = {"OMP_NUM_THREADS": str(max(1, threads // ranks))}
    return {
        f"1 process, {threads} threads": ([sys.executable], {"OMP_NUM_THREADS": str(threads)}),
        "1 process, 1 thread": ([sys.executable], {"OMP_NUM_THREADS": "1"}),
        f"{ranks} ranks DDP": (torchrun + ["-m", "superpose", "train", "--distributed.strategy=ddp"], per_rank),
        f"{ranks} ranks FSDP2": (torchrun + ["-m", "superpose", "train", "--distributed.strategy=fsdp"], per_rank),
    }


def run(launcher: list[str], env: dict, args, out_dir: Path) -> dict[str, float]:
    """One training run; the best tokens/s (minimum step time) of each stage, its first step left out."""
    train = [] if "train" in launcher else ["-m", "superpose", "train"]
    command = [*launcher, *train, f"--data.dir={args.data}", f"--train.out_dir={out_dir}", f"--model.preset={args.preset}",
               f"--data.seq_len={args.seq_len}", f"--train.batch_size={args.batch}", f"--train.steps={args.steps}",
               f"--tst.bag_size={args.bag_size}", "--tst.ratio=0.5", f"--train.device={args.device}", "--train.log_every=1",
               "--train.eval_every=100000", "--train.eval_tokens=1024", "--train.checkpoint_every=0", "--train.progress=false"]
    subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, check=True, capture_output=True)
    train_records = [r for r in read_records(out_dir) if r["kind"] == "train"]
    best: dict[str, float] = {}
    for previous, record in zip(train_records, train_records[1:]):
        if record["stage"] == previous["stage"]:
            best[record["stage"]] = max(best.get(record["stage"], 0.0), record["tokens_per_s"])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a prepared data directory (`superpose prepare`)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="global batch (windows)")
    parser.add_argument("--bag-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16, help="per run; half in each stage")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads in all (split over ranks)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for index, (name, (launcher, env)) in enumerate(variants(args.ranks, args.threads).items()):
                best = run(launcher, env, args, Path(tmp) / f"run-{round_}-{index}")
                for stage, value in best.items():
                    results.setdefault(name, {})[stage] = max(results.get(name, {}).get(stage, 0.0), value)
                print(f"round {round_ + 1}/{args.rounds}: {name} done", file=sys.stderr)

    base = next(iter(results.values()))
    stages = list(base)
    print(f"{args.preset}, L={args.seq_len}, global batch {args.batch}, s={args.bag_size}, device {args.device}, "
          f"{args.threads} threads in all; data tokens/s (best step), ratio to the first row")
    print(f"{'variant':<24}" + "".join(f"{stage:>28}" for stage in stages))
    for name, best in results.items():
        print(f"{name:<24}" + "".join(f"{best[s]:>18,.0f} ({best[s] / base[s]:4.2f}x)" for s in stages))


if __name__ == "__main__":
    main()
