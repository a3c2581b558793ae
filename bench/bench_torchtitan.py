"""torchtitan TST step vs torchtitan's baseline step vs superpose's own trainer: tokens/s and MFU.

    python bench/bench_torchtitan.py --data DIR --out OUT              # one CUDA GPU: llama-270m, bf16, L=2048
    python bench/bench_torchtitan.py --data DIR --out OUT --smoke      # CPU, the tiny model (torchtitan CPU shims)

DIR is a ``superpose prepare`` directory (the same windows feed every arm). First it checks that
torchtitan.train imports on this torch (superpose.torchtitan.train, with its shims for released
torch) and stops with that one line if not. Then five runs of --steps steps each, one after
another on the same device, each its own process, in this order (a --budget that runs out drops the
last ones):

  titan-tst       torchrun -m superpose.torchtitan.train --module superpose.torchtitan --config llama3_270m_tst,
                  every step phase 1 (s=6)
  titan-stock     llama3_270m_baseline: torchtitan's unmodified Trainer, embedding and loss
  superpose-tst   superpose train configs/paper/llama-270m.toml, every step phase 1
  titan-ntp       llama3_270m_tst with --tst.ratio 0: every step next-token (torchtitan's own step path)
  superpose-ntp   superpose-tst with --tst.ratio 0

Every arm runs B x L = batch x seq_len positions per step (equal FLOPs) with torchtitan's vocabulary
(the superpose arms get a model directory of the same preset at the torchtitan config's vocab size,
whatever the data's); no held-out validation runs in the titan arms. The table gives median seconds
per step after --warmup steps, positions/s and MFU (6*N*positions + attention, each framework's own
FLOPs count over the bf16 peak torchtitan assumes for the card). Needs ``superpose[torchtitan]``; on
CUDA it uses FlexAttention and torchtitan's defaults (bf16 FSDP, selective activation checkpointing;
add --compile to compile the model in both frameworks). Results go to OUT/bench_torchtitan.json,
rewritten after every arm, and each arm's output to OUT/ARM.log.

On this project's GPU machine (docs/torchtitan.md, "On the GPU machine"): prepare once here

    bash bench/torchtitan_device_wheels.sh          # .whl/: what torchtitan and superpose need beyond the image
    python -m superpose prepare --input ../shared/data/gutenberg/train-00000.jsonl.gz \\
        --valid ../shared/data/gutenberg/valid-00000.jsonl.gz --out /tmp/bench-data
    python scripts/paper_data.py pack /tmp/bench-data .bench-data

then one call, run(carry=[".whl", ".bench-data"], timeout_s=400, command=...), the lines joined by spaces:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 || exit; python3 -m superpose.torchtitan.train --check || exit;
    python3 scripts/paper_data.py unpack .bench-data /tmp/bench-data || exit;
    python3 bench/bench_torchtitan.py --data /tmp/bench-data --out /tmp/bt --arm-timeout 200 --budget 330; rc=$?;
    cp /tmp/bt/bench_torchtitan.json /tmp/bt/*.log $OUT/; exit $rc
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


def titan_command(config: str, dump: Path, args, *flags: str) -> list[str]:
    script = [str(ROOT / "tests" / "torchtitan_on_cpu.py")] if args.smoke else ["-m", "superpose.torchtitan.train"]
    sizes = ["--training.local_batch_size", str(args.batch), "--training.global_batch_size", str(args.batch),
             "--training.seq_len", str(args.seq_len)]
    compile_flags = ["--compile.enable"] if args.compile else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", *script,
            "--module", "superpose.torchtitan", "--config", config, "--dataloader.dir", str(args.data),
            "--hf_assets_path", str(args.data), "--dump_folder", str(dump), "--training.steps", str(args.steps),
            "--checkpoint.no-enable", "--validator.no-enable", "--metrics.log_freq", "1", "--lr_scheduler.warmup_steps", "1",
            *sizes, *compile_flags, *flags]


def superpose_command(config: str, model: Path, out: Path, args, ratio: float) -> list[str]:
    return [sys.executable, "-m", "superpose", "train", config, f"--model.preset={json.dumps(str(model))}",
            f"--data.dir={json.dumps(str(args.data))}",
            f"--train.out_dir={json.dumps(str(out))}", f"--train.steps={args.steps}", f"--train.batch_size={args.batch}",
            f"--train.micro_batch_size={args.batch}", f"--data.seq_len={args.seq_len}", f"--tst.ratio={ratio}",
            f"--train.eval_every={args.steps}", "--train.eval_tokens=4096", "--train.log_every=1",
            "--train.checkpoint_every=0", "--train.progress=false", "--optim.warmup_steps=1",
            f"--train.compile={'true' if args.compile else 'false'}", "--distributed.strategy=ddp",
            f"--train.precision={'fp32' if args.smoke else 'bf16'}", f"--train.device={'cpu' if args.smoke else 'cuda'}"]


def superpose_model(titan: str, paper: Path, out: Path) -> Path:
    """A model directory (config.json) of the superpose preset at the vocabulary of the torchtitan
    config: superpose's own trainer otherwise sizes the embedding and head by the data's tokenizer."""
    from superpose.config import load_config
    from superpose.model import model_config
    from superpose.torchtitan import config_registry

    vocab = getattr(config_registry, f"{titan}_tst")().model_spec.model.vocab_size
    model_config(load_config(paper).model.preset, vocab).save_pretrained(out)
    return out


def titan_times(dump: Path, warmup: int) -> dict:
    """Median seconds per step, positions/s and MFU from torchtitan's TensorBoard scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in (dump / "tb").rglob("events.*")}
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    def pick(tag):
        return [e.value for e in acc.Scalars(tag) if e.step > warmup] if tag in acc.Tags()["scalars"] else []

    mfu = pick("mfu(%)")
    return {"step_seconds": statistics.median(pick("time_metrics/end_to_end(s)")),
            "positions_per_s": statistics.median(pick("throughput(tps)")), "mfu_percent": statistics.median(mfu) if mfu else None}


def superpose_times(out: Path, warmup: int, peak: float | None) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["kind"] == "start")
    seconds = statistics.median(r["step_seconds"] for r in records if r["kind"] == "train" and r["step"] > warmup)
    return {"step_seconds": seconds, "positions_per_s": start["positions_per_step"] / seconds,
            "mfu_percent": 100 * start["flops_per_step"] / seconds / peak if peak else None}


def run_arm(name: str, command: list[str], kind: str, env: dict, args, peak: float | None, limit: float | None) -> dict:
    """One arm in its own process, stopped after ``limit`` seconds: its timings, or its error (the end of its output)."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=limit)
        failed = proc.returncode != 0
    except subprocess.TimeoutExpired:
        import psutil  # torchrun starts its workers in sessions of their own: the whole tree is stopped

        for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        output, failed = proc.communicate()[0] + f"\nstopped after {limit:.0f} s (--arm-timeout, --budget)", True
    (args.out / f"{name}.log").write_text(output)
    if failed:
        return {"error": output[-2000:]}
    return (titan_times(args.out / name, args.warmup) if kind == "titan"
            else superpose_times(args.out / name, args.warmup, peak))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, CPU shims")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="windows per step (one micro-batch)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--arm-timeout", type=float, default=None, help="seconds before an arm is stopped (its row: failed)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all arms: each gets what is left (at most --arm-timeout), none starts after")
    args = parser.parse_args()
    smoke = dict(steps=4, warmup=1, batch=4, seq_len=32) if args.smoke else dict(steps=30, warmup=10, batch=8, seq_len=2048)
    for key, value in smoke.items():
        setattr(args, key, getattr(args, key) if getattr(args, key) is not None else value)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")]  # the carried wheels' site stays on the path
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    check = subprocess.run([sys.executable, "-m", "superpose.torchtitan.train", "--check"], env=env, capture_output=True,
                           text=True)
    print(check.stdout.strip() or check.stderr.strip()[-2000:], flush=True)
    if check.returncode:
        return 2  # nothing to time: the line above says why
    sys.path.insert(0, str(ROOT))
    from superpose.torchtitan.train import torch_shims

    torch_shims()  # this process reads torchtitan's configs and its peak-FLOPs table
    titan, paper = (("llama3_tiny", ROOT / "configs" / "tiny.toml") if args.smoke
                    else ("llama3_270m", ROOT / "configs" / "paper" / "llama-270m.toml"))
    model = superpose_model(titan, paper, args.out / "superpose-model")
    peak = None
    if not args.smoke:
        import torch
        from torchtitan.tools.utils import get_peak_flops  # the denominator torchtitan's own MFU uses

        peak = get_peak_flops(torch.cuda.get_device_name())
    arms = {
        "titan-tst": (titan_command(f"{titan}_tst", args.out / "titan-tst", args, "--tst.ratio", "1"), "titan"),
        "titan-stock": (titan_command(f"{titan}_baseline", args.out / "titan-stock", args), "titan"),
        "superpose-tst": (superpose_command(str(paper), model, args.out / "superpose-tst", args, 1.0), "superpose"),
        "titan-ntp": (titan_command(f"{titan}_tst", args.out / "titan-ntp", args, "--tst.ratio", "0"), "titan"),
        "superpose-ntp": (superpose_command(str(paper), model, args.out / "superpose-ntp", args, 0.0), "superpose"),
    }
    results, deadline = {}, time.monotonic() + args.budget if args.budget else None
    for name, (command, kind) in arms.items():
        left = deadline - time.monotonic() if deadline else None
        if left is not None and left < 1:
            results[name] = {"error": f"not run: --budget {args.budget:g} s spent"}
        else:
            print(f"{name} ...", flush=True)
            limit = min((t for t in (args.arm_timeout, left) if t is not None), default=None)
            results[name] = run_arm(name, command, kind, env, args, peak, limit)
        (args.out / "bench_torchtitan.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                                    "check": check.stdout.strip(), "peak_flops": peak,
                                                                    "results": results}, indent=2))
    print(f"{'arm':<15} {'s/step':>9} {'positions/s':>12} {'MFU %':>7}")
    for name, r in results.items():
        if "error" in r:
            why = r["error"] if r["error"].startswith("not run") else f"failed (see {args.out / (name + '.log')})"
            print(f"{name:<15} {why}")
        else:
            mfu = f"{r['mfu_percent']:.1f}" if r["mfu_percent"] is not None else "-"
            print(f"{name:<15} {r['step_seconds']:>9.4f} {r['positions_per_s']:>12.0f} {mfu:>7}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
