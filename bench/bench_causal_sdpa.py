"""The training step with transformers' masked "sdpa" vs the maskless causal SDPA the presets train
with (superpose.model.CAUSAL_SDPA, issue #24), side by side in one process on CPU.

    python bench/bench_causal_sdpa.py [--rounds 20]

Both models hold the same weights; the variants run interleaved round by round (bench_step), and
each ratio is the median of per-round ratios, which a busy shared machine disturbs least.
"""
import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from bench_step import StepCase, time_interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = {}
    for name in ("masked sdpa", "causal sdpa"):
        case = StepCase("tiny", 8192, 8, 128, "cpu", "fp32")
        if name == "masked sdpa":
            case.lm.set_attn_implementation("sdpa")
        cases[name] = case
    variants = {f"{name} s={s}": case.ours(s) for name, case in cases.items() for s in (1, 4)}
    times = time_interleaved(variants, args.rounds, "cpu", warmup=2)
    for name, t in times.items():
        print(f"{name:<18} min {min(t) * 1e3:7.1f} ms  median {statistics.median(t) * 1e3:7.1f} ms")
    for s in (1, 4):
        r = [a / b for a, b in zip(times[f"causal sdpa s={s}"], times[f"masked sdpa s={s}"])]
        print(f"s={s}: causal / masked, median of per-round ratios: {statistics.median(r):.3f}")


if __name__ == "__main__":
    main()
