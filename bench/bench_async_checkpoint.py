"""How long a sharded checkpoint stops the training loop, with and without ``train.async_checkpoint`` (run by hand).

    python bench/bench_async_checkpoint.py                      # llama-270m, 24 steps, a checkpoint every 8
    python bench/bench_async_checkpoint.py --preset small --steps 12 --every 4

One process on CPU runs the trainer's own step (``superpose.train.train_step``, AdamW, next-token
loss on random tokens) and saves with ``superpose.checkpoint.Checkpoints`` as ``superpose train``
does, once synchronously and once asynchronously, each in a fresh process. Per mode it reports
the median step, the time the loop is held by each save call (the hiccup), the steps right after
a save (an asynchronous write competes with them for the CPU) and the wait at the end of the run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_mode(preset: str, asynchronous: bool, steps: int, every: int, batch: int, seq_len: int, out: Path) -> dict:
    """One process: the timed loop of one mode."""
    import torch

    from superpose.checkpoint import Checkpoints
    from superpose.config import Config
    from superpose.distributed import Runtime
    from superpose.model import TSTModel, build_model
    from superpose.optim import make_optimizer
    from superpose.schedule import Stage
    from superpose.train import train_step

    vocab = 1024
    cfg, runtime = Config(), Runtime(0, 1, torch.device("cpu"))
    torch.manual_seed(0)
    model = TSTModel(build_model(preset, vocab, seq_len))
    optimizer = make_optimizer(model, cfg, runtime.device)
    stage = Stage("next-token", 1, "full", "uniform", 0)
    checkpoints = Checkpoints(out, "sharded", 1, asynchronous, runtime)
    windows = torch.randint(0, vocab, (steps, batch, seq_len + 1))  # [steps, B, L+1]
    step_seconds, save_seconds = [], []
    for step in range(steps):
        start = time.perf_counter()
        train_step(model, optimizer, windows[step], stage, step, 1e-4, cfg, runtime)
        step_seconds.append(time.perf_counter() - start)
        if (step + 1) % every == 0:
            start = time.perf_counter()
            checkpoints.save(step + 1, model, optimizer, {"step": step + 1, "config": cfg.to_dict()})
            save_seconds.append(time.perf_counter() - start)
    start = time.perf_counter()
    checkpoints.close()
    final_wait = time.perf_counter() - start
    shard_bytes = sum(p.stat().st_size for p in out.rglob("*.distcp"))
    return {"step_seconds": step_seconds, "save_seconds": save_seconds, "final_wait": final_wait, "checkpoint_bytes": shard_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-270m")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--mode", choices=["sync", "async"], help=argparse.SUPPRESS)  # one mode, in a child process
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        sys.path.insert(0, str(ROOT))
        result = run_mode(args.preset, args.mode == "async", args.steps, args.every, args.batch, args.seq_len, Path(args.out))
        print(json.dumps(result))
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for mode in ("sync", "async"):
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, __file__, "--preset", args.preset, "--steps", str(args.steps), "--every", str(args.every),
                       "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--mode", mode,
                       "--out", str(Path(tmp) / "run")]
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
            shutil.rmtree(Path(tmp) / "run", ignore_errors=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        steps = result["step_seconds"]
        after = [steps[i] for i in range(args.every, len(steps), args.every)]  # the first step after each save
        plain = [s for i, s in enumerate(steps) if i % args.every and i > 0]  # neither the first step nor one after a save
        print(f"{args.preset} {mode:5s}: checkpoint {result['checkpoint_bytes'] / 1e9:.2f} GB; "
              f"step median {statistics.median(plain):.3f} s; "
              f"save call {', '.join(f'{s:.3f}' for s in result['save_seconds'])} s; "
              f"step after a save {', '.join(f'{s:.3f}' for s in after) or '-'} s; wait at the end {result['final_wait']:.3f} s")


if __name__ == "__main__":
    main()
