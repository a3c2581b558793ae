"""Peak memory and step time of train.activation_checkpointing = none | full | selective (run by hand).

    python bench/bench_activation_checkpointing.py                   # small preset, L = 1024, batch 4, CPU (~3 min, 1 thread)
    python bench/bench_activation_checkpointing.py --batch 8 --rounds 5

One training step is ``superpose.train.train_step`` (next-token stage, fp32, AdamW, clipping) on
random tokens, the model built as ``superpose train`` builds it (``apply_activation_checkpointing``
on the decoder blocks).
- Step time: the three modes in this process, interleaved (one warm-up step each, then rounds of
  one step each); the table shows each mode's minimum over rounds of the wall time and of the
  process's CPU time. With one thread the CPU time is what a step costs even on a shared machine
  whose other jobs stretch the wall time, so the ratio to ``none`` is taken of CPU times.
- Peak memory: each mode in a fresh process with large allocations forced to mmap (so that the
  resident set follows live memory); after a warm-up step (the optimizer state exists then) it
  resets the resident set's high-water mark and reports the peak (``VmHWM``) over a second step
  and how far that rises above the resident set before it (activations kept for backward,
  gradients, temporaries).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench this checkout's superpose

import torch

from superpose.activation_checkpointing import apply_activation_checkpointing
from superpose.config import Config
from superpose.distributed import Runtime
from superpose.model import TSTModel, build_model
from superpose.optim import make_optimizer
from superpose.schedule import Stage
from superpose.train import train_step

MODES = ("none", "full", "selective")
CPU = Runtime(0, 1, torch.device("cpu"))
NEXT_TOKEN = Stage("next-token", 1, "full", "uniform", end_step=1 << 30)
MIB = 2**20


def step_fn(mode: str, args):
    """One training step of a fresh model (seed 0) under ``mode``, as a closure."""
    cfg = Config()
    cfg.model.preset, cfg.data.seq_len, cfg.train.batch_size = args.preset, args.seq_len, args.batch
    torch.manual_seed(0)
    model = TSTModel(build_model(args.preset, args.vocab, args.seq_len))
    apply_activation_checkpointing(model, mode)
    model.train()
    optimizer = make_optimizer(model, cfg, CPU.device)
    window = torch.randint(args.vocab, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(1))  # [B, L+1]
    return lambda: train_step(model, optimizer, window, NEXT_TOKEN, 0, cfg.optim.lr, cfg, CPU)


def time_interleaved(steps: dict, rounds: int) -> dict[str, dict[str, float]]:
    """{mode: {"wall_s": min, "cpu_s": min}} over ``rounds`` rounds of one step per mode, after one warm-up step each."""
    for step in steps.values():
        step()
    times = {mode: {"wall_s": [], "cpu_s": []} for mode in steps}
    for _ in range(rounds):
        for mode, step in steps.items():
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            times[mode]["wall_s"].append(time.perf_counter() - wall)
            times[mode]["cpu_s"].append(time.process_time() - cpu)
    return {mode: {kind: min(values) for kind, values in t.items()} for mode, t in times.items()}


def status_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its high-water mark) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(mode: str, args) -> dict:
    step = step_fn(mode, args)
    step()  # warm-up: AdamW's moments are allocated in the first step
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from the resident set now
    before = status_bytes("VmRSS")
    step()
    peak = status_bytes("VmHWM")
    return {"peak_rss": peak, "step_peak_above_resident": peak - before}


def measure_memory(mode: str, argv: list[str]) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 16), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run([sys.executable, __file__, "--memory-of", mode, *argv], env=env, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-of", choices=MODES, help=argparse.SUPPRESS)  # the child process of one mode
    args, argv = parser.parse_args(), sys.argv[1:]
    torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps(memory_child(args.memory_of, args)))
        return
    memory = {mode: measure_memory(mode, argv) for mode in MODES}
    times = time_interleaved({mode: step_fn(mode, args) for mode in MODES}, args.rounds)
    print(f"{args.preset}, V = {args.vocab}, L = {args.seq_len}, batch {args.batch}, fp32, CPU, {args.threads} thread(s), "
          f"{args.rounds} rounds")
    print(f"{'mode':<10} {'peak RSS MiB':>13} {'step peak above resident MiB':>29} {'step wall s':>12} {'step CPU s':>11} "
          f"{'CPU / none':>11}")
    for mode in MODES:
        mem, t = memory[mode], times[mode]
        print(f"{mode:<10} {mem['peak_rss'] / MIB:>13.0f} {mem['step_peak_above_resident'] / MIB:>29.0f} "
              f"{t['wall_s']:>12.2f} {t['cpu_s']:>11.2f} {t['cpu_s'] / times['none']['cpu_s']:>10.2f}x")


if __name__ == "__main__":
    main()
