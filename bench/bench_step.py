"""Cost of TST's fast paths, side by side in one process (run by hand, never in CI).

    python bench/bench_step.py                       # the full grid (CPU, 2 cores: ~30-40 min)
    python bench/bench_step.py --quick               # a smoke run of every section (~3 min)
    python bench/bench_step.py --threads 1           # steadier ratios on a CPU shared with others
    python bench/bench_step.py --device cuda         # on a GPU (bf16 autocast, CUDA memory stats)

Sections (printed as tables, written as JSON to --json):
  1. our phase-1 step (s = 4, 8) vs our phase-2 step at equal FLOPs (same model, same positions):
     step-time and peak-memory ratios; tokens/s of each phase and MFU where the peak is known;
  2. our phase-2 step vs the step a user would otherwise write with the same `transformers`
     model: ``model(input_ids, labels=input_ids)`` + ``torch.optim.AdamW`` (both clip at 1.0);
  3. our multi-hot cross-entropy vs the paper's loop of s ``F.cross_entropy`` on fp32 logits vs a
     naive ``log_softmax`` + gather, and one ``F.cross_entropy`` on the same logits: forward +
     backward time and peak memory;
  4. our bagged embedding (``embed_bags``) vs a loop of s lookups: forward + backward time;
  5. chunked head+loss vs the full logits (V = 128k, 4096 positions): peak memory and time.

Timing: the variants of one group run interleaved (one warm-up call each, then rounds of one
call each). Tables show each variant's minimum time; every ratio is the median over rounds of
the ratio within a round (paired), which survives the load swings of a shared machine far
better than a ratio of minima or medians (all times are in the JSON). Peak memory: each case runs alone in a fresh
spawned process; after a warm-up call the process returns freed heap to the OS (malloc_trim),
resets its RSS high-water mark (/proc/self/clear_refs) and reports VmHWM - VmRSS around one
measured call (large allocations are forced to mmap so that RSS follows live memory). On CUDA,
``torch.cuda.max_memory_allocated`` minus the allocation before the call.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench this checkout's superpose

import torch
import torch.nn.functional as F
from torch import nn

from superpose.config import Config
from superpose.distributed import Runtime
from superpose.loss import chunked_head_mce_sum, multi_hot_cross_entropy_sum, slot_weight_vector
from superpose.method import embed_bags, window_length
from superpose.model import TSTModel, build_model, flops_per_step
from superpose.optim import make_optimizer
from superpose.schedule import Stage
from superpose.train import train_step

# Dense bf16 peak FLOP/s of known devices (vendor figures, no sparsity); CPUs have none here.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12, "L4": 121e12}
PRESET_SHAPES = {"tiny": dict(batch=8, seq_len=128, rounds=5), "llama-270m": dict(batch=1, seq_len=256, rounds=5)}


# ---------------------------------------------------------------------------------------------
# Cases: each builds its tensors from a picklable spec and returns {variant: zero-arg callable}.

class StepCase:
    """One model, our ``train_step`` for each bag size, and the plain transformers step."""

    def __init__(self, preset: str, vocab: int, batch: int, seq_len: int, device: str, precision: str, chunk: int = 0):
        torch.manual_seed(0)
        self.device, self.batch, self.seq_len, self.vocab = torch.device(device), batch, seq_len, vocab
        self.cfg = Config()
        self.cfg.train.precision = precision
        self.runtime = Runtime(0, 1, self.device)
        self.lm = build_model(preset, vocab, seq_len).to(self.device)
        self.model = TSTModel(self.lm, loss_chunk_size=chunk)  # chunk: model.loss_chunk_size
        self.optimizer = make_optimizer(self.model, self.cfg, self.device)
        self.plain_optimizer = None

    def window(self, width: int) -> torch.Tensor:
        return torch.randint(self.vocab, (self.batch, width), generator=torch.Generator().manual_seed(width))

    @staticmethod
    def stage(bag_size: int) -> Stage:
        return Stage("superposition" if bag_size > 1 else "next-token", bag_size, "full", "uniform", 1)

    def ours(self, bag_size: int, model: nn.Module | None = None):
        """Our step; ``model`` may be another ``TSTModel`` over the same LM (a compiled one)."""
        stage = self.stage(bag_size)
        window = self.window(window_length(self.seq_len, bag_size, "full"))
        model = model or self.model
        return lambda: train_step(model, self.optimizer, window, stage, 0, 1e-4, self.cfg, self.runtime)

    def plain(self):
        """What a user writes without superpose: HF loss, AdamW with the same hyper-parameters."""
        ids = self.window(self.seq_len).to(self.device)  # [B, L]; labels = ids (HF shifts inside)
        o = self.cfg.optim

        def step():
            if self.plain_optimizer is None:
                self.plain_optimizer = torch.optim.AdamW(
                    self.lm.parameters(), lr=1e-4, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                    fused=self.device.type == "cuda" or None)
            with self.runtime.autocast(self.cfg.train.precision):
                loss = self.lm(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.lm.parameters(), o.grad_clip)
            self.plain_optimizer.step()
            self.plain_optimizer.zero_grad(set_to_none=True)
        return step

    def variants(self, bags: list[int]) -> dict:
        return {**{f"s={s}": self.ours(s) for s in bags}, "plain": self.plain()}

    def flops(self) -> float:
        return flops_per_step(self.lm, self.seq_len, self.batch * self.seq_len)


def mce_variants(vocab: int, bags: int, positions: int, device: str, dtype: torch.dtype) -> dict:
    """Scoring ``[N, V]`` logits against ``[N, s]`` targets, forward + backward, four ways."""
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(positions, vocab, generator=g) * 2).to(device=device, dtype=dtype).requires_grad_()
    y = torch.randint(vocab, (positions, bags), generator=g).to(device)
    count = positions * bags

    def run(loss_fn):
        def call():
            loss_fn().backward()
            z.grad = None
        return call

    def ours():
        total, weight = multi_hot_cross_entropy_sum(z, y)
        return total / weight

    def paper():  # the paper's code: one fp32 cross-entropy per slot
        return sum(F.cross_entropy(z.float(), y[:, j], reduction="sum") for j in range(bags)) / count

    def naive():
        return -F.log_softmax(z.float(), dim=-1).gather(1, y).sum() / count

    def one_ce():  # the cost of ordinary next-token loss on the same logits
        return F.cross_entropy(z.float(), y[:, 0])

    return {"ours": run(ours), "paper_loop": run(paper), "naive": run(naive), "one_ce": run(one_ce)}


def embed_variants(vocab: int, bags: int, positions: int, width: int, device: str) -> dict:
    torch.manual_seed(0)
    emb = nn.Embedding(vocab, width).to(device)
    ids = torch.randint(vocab, (1, positions, bags), device=device)
    upstream = torch.randn(1, positions, width, device=device)

    def run(fn):
        def call():
            fn().backward(upstream)
            emb.weight.grad = None
        return call

    def loop():  # the paper's s lookups
        return sum(emb(ids[..., j]) for j in range(bags)) / bags

    return {"ours": run(lambda: embed_bags(emb, ids)), "loop": run(loop)}


def chunk_variants(vocab: int, bags: int, positions: int, width: int, chunk: int, device: str) -> dict:
    torch.manual_seed(0)
    head = nn.Linear(width, vocab, bias=False).to(device)
    hidden = torch.randn(positions, width, device=device, requires_grad=True)
    y = torch.randint(vocab, (positions, bags), device=device)
    weights = slot_weight_vector("uniform", bags, device)

    def run(fn):
        def call():
            total, weight = fn()
            (total / weight).backward()
            hidden.grad = head.weight.grad = None
        return call

    return {"unfused": run(lambda: multi_hot_cross_entropy_sum(head(hidden), y, weights)),
            "chunked": run(lambda: chunked_head_mce_sum(hidden, head, y, weights, chunk))}


def build_variants(spec: dict) -> dict:
    kind, args = spec["kind"], spec["args"]
    if kind == "step":
        case = StepCase(**args)
        return {"ours": case.ours, "plain": lambda _: case.plain()}[spec["which"]](spec.get("bag_size"))
    return {"mce": mce_variants, "embed": embed_variants, "chunk": chunk_variants}[kind](**args)[spec["which"]]


# ---------------------------------------------------------------------------------------------
# Measurement.

def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(variants: dict, rounds: int, device: str, warmup: int = 1) -> dict:
    """{name: [seconds per round]}, after ``warmup`` calls of each variant."""
    times = {name: [] for name in variants}
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(seconds(fn, device))
    return times


def seconds(fn, device: str) -> float:
    """One call's time: CUDA events on a GPU (device time, no host timer jitter), else the wall clock."""
    if not device.startswith("cuda"):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(spec: dict, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    fn = build_variants(spec)
    device = spec["device"]
    fn()  # warm-up: optimizer state, library workspaces
    sync(device)
    if device.startswith("cuda"):
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync(device)
        queue.put((torch.cuda.max_memory_allocated() - base) / 2**20)
        return
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status_kb("VmRSS")
    fn()
    queue.put((_status_kb("VmHWM") - base) / 2**10)


def peak_mib(spec: dict) -> float:
    """Peak extra memory (MiB) of one call of a variant, measured in a fresh process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 16)  # read by the child's glibc at start
    try:
        proc = ctx.Process(target=_child, args=(spec, torch.get_num_threads(), queue))
        proc.start()
        proc.join()
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    if proc.exitcode != 0:
        raise RuntimeError(f"memory child for {spec} failed with exit code {proc.exitcode}")
    return queue.get()


def summary(times: list[float]) -> dict:
    return {"min_s": min(times), "median_s": statistics.median(times), "all_s": times}


def ratio(variants: dict, a: str, b: str) -> float:
    """Time of ``a`` over time of ``b``: the median over rounds of the per-round ratio. Both ran
    back to back in each round, so a load swing on a shared machine hits both alike."""
    return statistics.median(x / y for x, y in zip(variants[a]["all_s"], variants[b]["all_s"]))


# ---------------------------------------------------------------------------------------------
# Sections.

def bench_steps(args, results: dict) -> None:
    for preset in args.presets:
        shape = PRESET_SHAPES[preset]
        for vocab in args.vocabs:
            case_args = dict(preset=preset, vocab=vocab, batch=shape["batch"], seq_len=shape["seq_len"],
                             device=args.device, precision=args.precision)
            case = StepCase(**case_args)
            bags = sorted(set([1] + args.bags))
            rounds = args.rounds or shape["rounds"]
            times = time_interleaved(case.variants(bags), rounds, args.device)
            flops = case.flops()
            peak = _peak_flops(args)
            del case
            gc.collect()
            memory = {}
            if not args.no_memory:
                for s in bags:
                    memory[f"s={s}"] = peak_mib({"kind": "step", "args": case_args, "which": "ours", "bag_size": s,
                                                 "device": args.device})
            row = {"preset": preset, "vocab": vocab, **{k: shape[k] for k in ("batch", "seq_len")},
                   "flops_per_step": flops, "variants": {}}
            for name, t in times.items():
                best = min(t)
                tokens = _tokens(name, shape)
                row["variants"][name] = {**summary(t), "tokens_per_step": tokens, "tokens_per_s": tokens / best,
                                         "mfu": flops / best / peak if peak else None,
                                         "peak_mib": memory.get(name)}
            results["steps"].append(row)
            _print_step_row(row)


def _tokens(name: str, shape: dict) -> int:
    if name == "plain":
        return shape["batch"] * shape["seq_len"]
    return shape["batch"] * window_length(shape["seq_len"], int(name[2:]), "full")


def _peak_flops(args) -> float | None:
    if not args.device.startswith("cuda") or args.precision != "bf16":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def _print_step_row(row: dict) -> None:
    v = row["variants"]
    base = v["s=1"]
    print(f"\n[step] {row['preset']} V={row['vocab']} B={row['batch']} L={row['seq_len']} "
          f"({row['flops_per_step'] / 1e9:.1f} GFLOP/step, equal in every phase)")
    print(f"  {'variant':<14}{'time s':>9}{'/phase2':>9}{'tokens/s':>11}{'MFU':>7}{'peak MiB':>10}{'mem/phase2':>11}")
    for name, x in v.items():
        label = {"s=1": "phase2 (s=1)", "plain": "plain HF"}.get(name, f"phase1 ({name})")
        mem = f"{x['peak_mib']:.0f}" if x["peak_mib"] is not None else "-"
        mem_ratio = f"{x['peak_mib'] / base['peak_mib']:.3f}" if x["peak_mib"] and base["peak_mib"] else "-"
        mfu = f"{100 * x['mfu']:.1f}%" if x["mfu"] else "n/a"
        print(f"  {label:<14}{x['min_s']:>9.3f}{ratio(v, name, 's=1'):>9.3f}{x['tokens_per_s']:>11.0f}"
              f"{mfu:>7}{mem:>10}{mem_ratio:>11}")
    print(f"  phase2 / plain HF step time: {ratio(v, 's=1', 'plain'):.3f}")


def bench_kernels(args, results: dict, kind: str, grid: list[dict], rounds: int, memory: bool) -> None:
    builder = {"mce": mce_variants, "embed": embed_variants, "chunk": chunk_variants}[kind]
    for case_args in grid:
        variants = builder(**case_args)
        times = time_interleaved(variants, rounds, args.device)
        del variants
        row = {**{k: v for k, v in case_args.items() if k not in ("device", "dtype")}, "variants": {}}
        for name, t in times.items():
            row["variants"][name] = summary(t)
            if memory and not args.no_memory:
                spec = {"kind": kind, "args": case_args, "which": name, "device": args.device}
                row["variants"][name]["peak_mib"] = peak_mib(spec)
        results[kind].append(row)
        _print_kernel_row(kind, row)


def _print_kernel_row(kind: str, row: dict) -> None:
    v = row["variants"]
    ref = {"mce": "one_ce", "embed": "loop", "chunk": "unfused"}[kind]
    shape = " ".join(f"{k}={row[k]}" for k in ("vocab", "bags", "positions", "width", "chunk") if k in row)
    print(f"\n[{kind}] {shape}")
    print(f"  {'variant':<12}{'time ms':>10}{'/' + ref:>12}{'ours faster x':>15}{'peak MiB':>10}{'mem/' + ref:>12}")
    ours = "ours" if "ours" in v else "chunked"
    for name, x in v.items():
        peak = x.get("peak_mib")
        ref_peak = v[ref].get("peak_mib")
        print(f"  {name:<12}{1e3 * x['min_s']:>10.2f}{ratio(v, name, ref):>12.3f}"
              f"{ratio(v, name, ours):>15.2f}{(f'{peak:.0f}' if peak is not None else '-'):>10}"
              f"{(f'{peak / ref_peak:.3f}' if peak is not None and ref_peak else '-'):>12}")


# ---------------------------------------------------------------------------------------------
# Targets of issue #4, read off the results.

def targets(results: dict) -> list[dict]:
    out = []

    def add(name, value, limit, ok):
        out.append({"target": name, "value": value, "limit": limit, "met": bool(ok)})

    for row in results["steps"]:
        v = row["variants"]
        tag = f"{row['preset']} V={row['vocab']}"
        for name in v:
            if name.startswith("s=") and name != "s=1":
                add(f"phase1({name})/phase2 step time, {tag}", ratio(v, name, "s=1"), "<= 1.03",
                    ratio(v, name, "s=1") <= 1.03)
        add(f"phase2/plain HF step time, {tag}", ratio(v, "s=1", "plain"), "<= 1.0", ratio(v, "s=1", "plain") <= 1.0)
    for row in results["mce"]:
        v = row["variants"]
        tag = f"V={row['vocab']} s={row['bags']}"
        mce = ratio(v, "ours", "one_ce")
        add(f"MCE time / one CE, {tag}", mce, "<= 1.1", mce <= 1.1)
        if row["bags"] == 8:
            speedup = ratio(v, "paper_loop", "ours")
            add(f"paper loop / MCE time, {tag}", speedup, ">= 2", speedup >= 2)
        if "peak_mib" in v["ours"]:
            mem = v["ours"]["peak_mib"] / v["one_ce"]["peak_mib"]
            add(f"MCE peak memory / one CE, {tag}", mem, "<= 1.0", mem <= 1.0)
    for row in results["chunk"]:
        v = row["variants"]
        if "peak_mib" in v["chunked"]:
            mem = v["chunked"]["peak_mib"] / v["unfused"]["peak_mib"]
            add(f"chunked/unfused peak memory, V={row['vocab']} N={row['positions']}", mem, "<= 0.25", mem <= 0.25)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run of every section")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--precision", default=None, help="fp32 | bf16 (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--presets", default="tiny,llama-270m")
    parser.add_argument("--vocabs", default="8192,50304,128256")
    parser.add_argument("--bags", default="1,4,8")
    parser.add_argument("--rounds", type=int, default=0, help="timed rounds per step group (0 = per preset)")
    parser.add_argument("--mce-positions", type=int, default=512)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-process memory cases")
    parser.add_argument("--sections", default="steps,mce,embed,chunk", help="which sections to run")
    parser.add_argument("--json", default="bench/results/bench_step.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.presets = args.presets.split(",")
    args.vocabs = [int(v) for v in args.vocabs.split(",")]
    args.bags = [int(s) for s in args.bags.split(",")]
    chunk_shape = dict(vocab=128256, bags=4, positions=4096, width=576, chunk=512)
    if args.quick:
        args.presets, args.vocabs, args.bags, args.rounds, args.mce_positions = ["tiny"], [8192], [1, 4], 2, 128
        chunk_shape = dict(vocab=8192, bags=4, positions=1024, width=128, chunk=128)

    logits_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    results = {"machine": {"device": args.device, "precision": args.precision, "threads": torch.get_num_threads(),
                           "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
               "steps": [], "mce": [], "embed": [], "chunk": []}
    start = time.time()
    sections = args.sections.split(",")
    if "steps" in sections:
        bench_steps(args, results)
    if "mce" in sections:
        bench_kernels(args, results, "mce", [
            dict(vocab=v, bags=s, positions=args.mce_positions, device=args.device, dtype=logits_dtype)
            for v in args.vocabs for s in args.bags], rounds=5, memory=True)
    if "embed" in sections:
        bench_kernels(args, results, "embed", [
            dict(vocab=v, bags=s, positions=2048, width=576, device=args.device)
            for v in args.vocabs for s in args.bags if s > 1], rounds=5, memory=False)
    if "chunk" in sections:
        bench_kernels(args, results, "chunk", [dict(**chunk_shape, device=args.device)], rounds=2, memory=True)
    results["targets"] = targets(results)
    results["seconds"] = time.time() - start
    print("\n[targets]")
    for t in results["targets"]:
        print(f"  {'MET    ' if t['met'] else 'NOT MET'} {t['target']}: {t['value']:.3f} (target {t['limit']})")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwrote {path} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
