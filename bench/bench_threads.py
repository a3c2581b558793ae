"""CPU threads per process: the step time of the quick start's shape at 1, 2, ... threads.

    python bench/bench_threads.py                    # tiny preset, L=128, B=16 (configs/quickstart.toml)
    python bench/bench_threads.py --preset small --threads 1,2 --rounds 5

``train.threads = 0`` picks the thread count from this measurement (``superpose.threads.default_threads``).
Each thread count runs in its own fresh process (torch fixes its pool at start-up); the processes
take turns, one at a time, for ``--rounds`` rounds of ``--steps`` timed phase-2 steps after two
warm-up steps, so a load swing of a shared machine hits every count alike. Prints, per count, the
median wall-clock and CPU seconds per step, and the machine's load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(preset: str, threads: int, steps: int, seq_len: int, batch: int) -> None:
    """Time ``steps`` training steps; print one JSON line (wall and CPU seconds per step)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from superpose.config import Config
    from superpose.distributed import Runtime
    from superpose.model import TSTModel, build_model
    from superpose.optim import make_optimizer
    from superpose.schedule import Stage
    from superpose.train import train_step

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = TSTModel(build_model(preset, 8192, seq_len))
    cfg, runtime = Config(), Runtime(0, 1, torch.device("cpu"))
    optimizer = make_optimizer(model, cfg, runtime.device)
    stage = Stage("next-token", 1, "full", "uniform", 10**9)
    window = torch.randint(0, 8192, (batch, seq_len + 1))  # [B, L+1]
    for step in range(2):
        train_step(model, optimizer, window, stage, step, 1e-3, cfg, runtime)
    wall, cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        train_step(model, optimizer, window, stage, step, 1e-3, cfg, runtime)
    print(json.dumps({"wall": (time.perf_counter() - wall) / steps, "cpu": (time.process_time() - cpu) / steps}))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], *map(int, sys.argv[3:]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--threads", default=",".join(str(n) for n in range(1, min(4, os.cpu_count() or 1) + 1)))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    counts = [int(n) for n in args.threads.split(",")]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    load_before = os.getloadavg()[0]
    times: dict[int, list[dict]] = {n: [] for n in counts}
    for _ in range(args.rounds):
        for n in counts:
            out = subprocess.run([sys.executable, __file__, "--child", args.preset, str(n), str(args.steps),
                                  str(args.seq_len), str(args.batch)], env=env, capture_output=True, text=True, check=True)
            times[n].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{args.preset}, L={args.seq_len}, B={args.batch}: median of {args.rounds} rounds x {args.steps} steps; "
          f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, {os.cpu_count()} CPUs")
    print("threads  wall s/step  CPU s/step")
    for n in counts:
        wall, cpu = (statistics.median(t[key] for t in times[n]) for key in ("wall", "cpu"))
        print(f"{n:>7}  {wall:>11.3f}  {cpu:>10.3f}")


if __name__ == "__main__":
    main()
