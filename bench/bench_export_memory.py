"""Peak resident memory of `superpose export` against the size of the weights it writes (run by hand).

    python bench/bench_export_memory.py                         # llama-600m, Llama-3 vocabulary, both formats
    python bench/bench_export_memory.py --preset small --vocab 8192 --formats sharded

A real checkpoint (model + AdamW moments, so three times the weights on disk) is written by one
process per format, then `superpose export CHECKPOINT_DIR OUT_DIR` runs in a fresh process and
its peak RSS (``ru_maxrss`` of the child) is compared with the fp32 weights. The export reads no
optimizer state and holds the weights once, plus one safetensors file while it is written. The
imports alone (torch, transformers, superpose) are measured in a process of their own.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9


def make_checkpoint(preset_dir: str, data_dir: str, fmt: str, run_dir: str) -> None:
    """One process: a fresh model, one AdamW step (its moments exist), a checkpoint at step 1."""
    import torch

    from superpose.checkpoint import Checkpoints
    from superpose.config import Config
    from superpose.data import TokenData
    from superpose.distributed import Runtime
    from superpose.model import TSTModel, build_model
    from superpose.optim import make_optimizer

    cfg = Config()
    cfg.model.preset, cfg.data.dir, cfg.data.corpus = preset_dir, data_dir, ""
    runtime = Runtime(0, 1, torch.device("cpu"))
    model = TSTModel(build_model(preset_dir, TokenData(Path(data_dir)).vocab_size, cfg.data.seq_len))
    optimizer = make_optimizer(model, cfg, runtime.device)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    trainer = {"step": 1, "elapsed": 0.0, "loader": {"tokens_seen": 0}, "rng": torch.get_rng_state(),
               "config": cfg.to_dict(), "last_eval": None}
    Checkpoints(Path(run_dir), fmt, 1, False, runtime).save(1, model, optimizer, trainer)


def peak_rss(command: list[str]) -> int:
    """Run ``command``; its peak resident set size in bytes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command} failed")
    return usage.ru_maxrss * 1024  # Linux reports KiB


def size(path: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


def main() -> None:
    if sys.argv[1:2] == ["--make"]:
        return make_checkpoint(*sys.argv[2:6])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-600m")
    parser.add_argument("--vocab", type=int, default=128_256, help="the Llama-3 vocabulary, as in the paper")
    parser.add_argument("--formats", default="sharded,gathered")
    parser.add_argument("--work", default="/tmp/superpose-bench-export", help="scratch directory (emptied first)")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from superpose.data import prepare, shakespeare_files
    from superpose.model import model_config

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    prepare(work / "data", inputs=[str(p) for p in shakespeare_files()[:2]], vocab_size=1024, progress=False)
    model_config(args.preset, args.vocab).save_pretrained(work / "preset")  # the preset at the full vocabulary

    imports = peak_rss([sys.executable, "-c", "import superpose.checkpoint, superpose.cli"])
    print(f"imports alone: peak RSS {imports / GB:.2f} GB")
    for fmt in args.formats.split(","):
        run = work / fmt
        subprocess.run([sys.executable, __file__, "--make", str(work / "preset"), str(work / "data"), fmt, str(run)],
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, check=True)
        checkpoint = run / "checkpoints" / "step-00000001"
        peak = peak_rss([sys.executable, "-m", "superpose", "export", str(checkpoint), str(work / f"export-{fmt}"), "--quiet"])
        weights = size(work / f"export-{fmt}", "*.safetensors")
        print(f"{args.preset} (vocab {args.vocab}) {fmt:8s}: checkpoint {size(checkpoint, '*') / GB:.2f} GB, "
              f"weights {weights / GB:.2f} GB, export peak RSS {peak / GB:.2f} GB = {peak / weights:.2f}x the weights "
              f"({(peak - imports) / weights:.2f}x above the imports)")
        shutil.rmtree(run)


if __name__ == "__main__":
    main()
