"""Peak resident memory per rank while building and sharding a model under FSDP2 (run by hand).

    python bench/bench_init_memory.py --preset llama-600m                 # both paths, 2 CPU ranks (gloo)
    python bench/bench_init_memory.py --preset llama-3b --paths meta      # the meta path alone
    python bench/bench_init_memory.py --preset llama-3b --paths full --ranks 1   # one full build, unsharded

Two ways to reach the same sharded model (the training path of ``superpose train`` with
``distributed.strategy = fsdp``, Llama-3 vocabulary, fp32):
- ``full``: every rank builds the whole model on CPU, then ``fully_shard`` keeps its shard (before meta init);
- ``meta``: every rank builds on the meta device, shards, allocates its shards and initialises
  them as one process would (``superpose.meta_init``).
Each variant runs in fresh processes under torchrun; a rank reports its peak resident set size
(``ru_maxrss``) after the imports and after building + sharding, and the bytes of its shards.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def rank_main(preset: str, path: str, vocab: int, seq_len: int, out: Path) -> None:
    """One rank: build and shard as train._train does, then write this rank's measurements."""
    import torch
    from torch.distributed.tensor import DTensor

    from superpose.distributed import init_runtime, parallelize, shutdown
    from superpose.model import TSTModel, build_model

    runtime = init_runtime("cpu")
    after_imports = peak_rss_bytes()
    start = time.perf_counter()
    torch.manual_seed(0)
    lm = build_model(preset, vocab, seq_len, meta=path == "meta")
    model = parallelize(TSTModel(lm), runtime, "fsdp", "fp32", "fp32")
    seconds = time.perf_counter() - start
    shard_bytes = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in model.parameters())
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    record = {"rank": runtime.rank, "peak_rss_after_imports": after_imports, "peak_rss": peak_rss_bytes(),
              "shard_bytes": shard_bytes, "model_bytes": total_bytes, "seconds": seconds}
    (out / f"rank{runtime.rank}.json").write_text(json.dumps(record))
    shutdown()


def measure(preset: str, path: str, ranks: int, vocab: int, seq_len: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", __file__,
                   "--rank-of", preset, path, str(vocab), str(seq_len), tmp]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        subprocess.run(command, cwd=ROOT, env=env, check=True)
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-of":
        preset, path, vocab, seq_len, out = sys.argv[2:7]
        return rank_main(preset, path, int(vocab), int(seq_len), Path(out))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-600m")
    parser.add_argument("--paths", default="full,meta", help="comma-separated: full, meta")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=128_256, help="the Llama-3 vocabulary, as in the paper")
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()

    peaks = {}
    for path in args.paths.split(","):
        records = measure(args.preset, path, args.ranks, args.vocab, args.seq_len)
        peaks[path] = max(r["peak_rss"] for r in records)
        for r in records:
            print(f"{args.preset} {path:4s} rank {r['rank']}/{args.ranks}: peak RSS {r['peak_rss'] / GB:6.2f} GB "
                  f"(after imports {r['peak_rss_after_imports'] / GB:.2f} GB), shard {r['shard_bytes'] / GB:.2f} GB "
                  f"of a {r['model_bytes'] / GB:.2f} GB model, {r['seconds']:.1f} s to build + shard")
    if {"full", "meta"} <= set(peaks):
        print(f"peak RSS per rank, full / meta: {peaks['full'] / peaks['meta']:.2f}x")


if __name__ == "__main__":
    main()
