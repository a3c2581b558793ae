"""One device check of the CUDA path (issue #13): correct, and how fast, side by side in one process.

    python bench/gpu_check.py --out DIR            # one CUDA GPU: sized for ~5 minutes on an H200
    python bench/gpu_check.py --quick --out DIR    # a second try: at most 4 minutes
    python bench/gpu_check.py --smoke --out DIR    # every section on CPU at toy sizes (CI runs it)

It runs on a bare CUDA image's Python (torch, transformers, tokenizers, safetensors, matplotlib,
tensorboard, tqdm): the one missing dependency, tomli-w (pure Python), travels as a wheel in
bench/wheels and is imported from the zip. Every number goes to DIR/gpu_check.json; the goals of
issue #24 are printed last as PASS/FAIL lines. Sections run in this order and each starts only
inside ``--budget-s`` (a skipped one is recorded as skipped):

  peak     the card's bf16 matmul rate, measured: the MFU denominator
  correct  MCE and the chunked head+loss vs a float64 loop of F.cross_entropy (values, gradients,
           duplicates, ignore_index, power weights, bf16 logits, several row blocks); 30 TST steps
           (s=4, then s=1 from step 15): fp32 vs bf16 autocast vs train.compile vs fused AdamW
  compiled llama-270m, V=128256, L=2048 with a CUDA run's defaults (bf16, train.compile = each
           decoder block compiled, the loss chunked with compiled kernels): phase 1 (s=6), phase 2
           and the plain transformers step, each at its fastest micro-batch; compile time
  step     the same eager: tokens/s, MFU; data time per step; host syncs in one micro-batch's
           forward+backward (CUDA sync debug mode)
  mce      MCE (s=1, 6, 16) vs one F.cross_entropy on the same bf16 logits, fwd+bwd: the default loss
           (loss.LOSS_KERNELS: compiled kernels on CUDA), its eager row blocks, torch.compile of the loss
  chunk    chunked head+loss vs unfused, bf16 autocast: time and peak memory per chunk size
  moe      qwen3-moe-10b-a1b with 2 layers: tokens/s and MFU of phase 1 (s=16) and phase 2, host syncs

MFU: flops_per_step / step time / the measured peak, flops_per_step = 6 * N_active * B * L +
6 * n_layers * L * d_attn * B * L (attention counted; the JSON states it under "mfu").

Timing: CUDA events around each call (bench_step.seconds) after warm-up, variants interleaved
round by round; tables show medians, ratios are medians of per-round ratios (bench_step.ratio).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path += [str(wheel) for wheel in sorted((HERE / "wheels").glob("*.whl"))]  # an installed copy wins

import numpy as np
import torch
import torch._dynamo
import torch.nn.functional as F
import transformers
from bench_step import PEAK_BF16, StepCase, chunk_variants, ratio, seconds, summary, time_interleaved
from torch import nn

from superpose import loss as loss_mod
from superpose.compilation import compile_blocks
from superpose.config import Config
from superpose.data import WindowLoader, to_device
from superpose.device_defaults import device_defaults
from superpose.distributed import Runtime
from superpose.loss import chunked_head_mce_sum, multi_hot_cross_entropy_sum, slot_weight_vector
from superpose.method import split_window, window_length
from superpose.model import PRESETS, TSTModel, build_model, flops_per_step
from superpose.optim import make_optimizer
from superpose.schedule import build_stages, lr_at, stage_at
from superpose.train import train_step

IGNORE = -100
# The 10B-A1B MoE with 2 of its 24 layers: its expert and head shapes on one card.
PRESETS["qwen3-moe-10b-a1b-2l"] = {**PRESETS["qwen3-moe-10b-a1b"], "num_hidden_layers": 2}
PRESETS["qwen3-moe-tiny-2l"] = {**PRESETS["qwen3-moe-tiny"], "num_hidden_layers": 2}

FULL = dict(
    matmul=8192, ref_positions=1024, ref_vocab=128256, ref_width=576,
    run_preset="tiny", run_vocab=8192, run_seq=256, run_batch=8,
    step_preset="llama-270m", vocab=128256, seq_len=2048, batches=[4, 8, 16, 32, 64], rounds=5, batch_rounds=2,
    data_tokens=1 << 25, mce_positions=8192, mce_bags=[1, 6, 16], mce_rounds=10,
    chunk_positions=16384, chunk_width=576, chunks=[1024, 4096, 8192],
    moe_preset="qwen3-moe-10b-a1b-2l", moe_batch=4, compile_backend="inductor",
)
# Every section at toy sizes on CPU; the compiles trace with dynamo and run eagerly.
SMOKE = dict(
    matmul=256, ref_positions=48, ref_vocab=500, ref_width=32,
    run_preset="tiny", run_vocab=512, run_seq=16, run_batch=8,
    step_preset="tiny", vocab=1024, seq_len=32, batches=[1, 2], rounds=2, batch_rounds=1,
    data_tokens=1 << 16, mce_positions=256, mce_bags=[1, 6, 16], mce_rounds=2,
    chunk_positions=256, chunk_width=32, chunks=[32, 128],
    moe_preset="qwen3-moe-tiny-2l", moe_batch=2, compile_backend="eager",
)
# --quick: a second try inside 4 minutes on an H200: fewer micro-batches and rounds.
QUICK = {**FULL, "batches": [8, 16, 32], "rounds": 3, "mce_rounds": 5, "chunks": [4096]}
QUICK_BUDGET_S = 200  # sections start only inside it; the last ones take ~30 s
RUN_STEPS, RUN_SWITCH = 30, 15
# Per-step |loss difference| (nats) allowed in the 30-step runs, against the reference named.
RUN_TOLERANCE = {
    "bf16": ("fp32", 0.05),  # bf16 matmuls: ~3 significant digits per product, 30 steps of drift
    "bf16+compile": ("bf16", 0.02),  # same arithmetic, reductions fused and reordered by inductor
    "fp32+fused_adamw": ("fp32", 1e-4),  # the same update, one kernel
}
# Largest error relative to the reference's largest magnitude, per input precision.
KERNEL_TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for gpu_check.json")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on CPU, every section")
    parser.add_argument("--quick", action="store_true", help=f"a second try: fewer micro-batches and rounds, "
                                                             f"sections start inside {QUICK_BUDGET_S} s (4 minutes in all)")
    parser.add_argument("--budget-s", type=float, default=None, help="start no section after this many seconds (330)")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    args = parser.parse_args()
    size = SMOKE if args.smoke else QUICK if args.quick else FULL
    args.budget_s = args.budget_s or (QUICK_BUDGET_S if args.quick else 330)
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke on CPU")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the references and the fp32 run
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(device), "size": dict(size), "sections": {}, "skipped": [],
               "mfu": "flops_per_step / step_s / peak: flops_per_step = " + MFU_FORMULA + "; peak = the card's measured "
                      "bf16 matmul rate (section peak); each variant at its own micro-batch"}
    start = time.time()
    state: dict = {"deadline": start + args.budget_s}
    for name in args.sections.split(","):
        if time.time() - start > args.budget_s:
            results["skipped"].append(name)
            print(f"[{name}] skipped: past the {args.budget_s:.0f} s budget", flush=True)
            continue
        began = time.time()
        try:
            results["sections"][name] = SECTIONS[name](size, device, state)
        except Exception as err:  # one loan, one run: record it and go on to the next section
            traceback.print_exc()
            results["sections"][name] = {"error": f"{type(err).__name__}: {err}"}
            free(device)
        results["sections"][name]["seconds"] = time.time() - began
        print(f"[{name}] done in {time.time() - began:.1f} s", flush=True)
    results["goals"] = goals({k: v for k, v in results["sections"].items() if "error" not in v})
    results["seconds"] = time.time() - start
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    print_table(results)
    print(f"\nwrote {out / 'gpu_check.json'} ({results['seconds']:.0f} s)")


MFU_FORMULA = ("6 * N_active * B * L + 6 * n_layers * L * d_attn * B * L (N_active: the matmul weights a position "
               "passes through, head included, embedding lookup excluded, MoE experts scaled by top-k / E; "
               "the second term: attention QK^T and AV, forward and backward, causal masking not discounted; "
               "superpose.model.flops_per_step)")


def machine(device: torch.device) -> dict:
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    return {"device": str(device), "gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "vendor_peak_bf16": next((v for k, v in PEAK_BF16.items() if gpu and k in gpu), None),
            "block_elements": dict(loss_mod.BLOCK_ELEMENTS), "loss_kernels": dict(loss_mod.LOSS_KERNELS)}


# ---------------------------------------------------------------------------------------------
# Helpers.

def times_table(times: dict) -> dict:
    """{variant: summary}, as bench_step writes it (median_s, min_s, all_s)."""
    return {name: summary(t) for name, t in times.items()}


def peak_extra_mib(fn, device: torch.device) -> float | None:
    """Peak memory (MiB) one call allocates above what was live before it (CUDA only)."""
    if device.type != "cuda":
        return None
    fn()  # warm: optimizer state, workspaces
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def free(device: torch.device) -> None:
    gc.collect()  # closures over a dropped case hold its model in reference cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()


def blocks(elements: int | None, fn, device: torch.device):
    """``fn`` with the loss's row blocks set to ``elements`` (None: the whole tensor in one block)."""
    key = "cpu" if device.type == "cpu" else "cuda"

    def call():
        saved = loss_mod.BLOCK_ELEMENTS[key]
        loss_mod.BLOCK_ELEMENTS[key] = elements or 1 << 62
        try:
            return fn()
        finally:
            loss_mod.BLOCK_ELEMENTS[key] = saved
    return call


def eager_kernels(fn, device: torch.device):
    """``fn`` with the loss's eager kernels (row blocks of ``BLOCK_ELEMENTS``) instead of the device's."""
    def call():
        saved = loss_mod.LOSS_KERNELS.get(device.type)
        loss_mod.LOSS_KERNELS[device.type] = "eager"
        try:
            return fn()
        finally:
            loss_mod.LOSS_KERNELS[device.type] = saved
    return call


def bag_targets(positions: int, bags: int, vocab: int, device, seed: int = 0) -> torch.Tensor:
    """Targets ``[N, s]`` with a duplicate in every bag, ignored slots and one fully ignored row."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(vocab, (positions, bags), generator=g)
    if bags > 1:
        y[:, 1] = y[:, 0]
    y.view(-1)[::7] = IGNORE
    y[3] = IGNORE
    return y.to(device)


def reference_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The paper's loss in float64: one ``F.cross_entropy`` per slot, weighted, summed."""
    z = logits.double()
    return sum(weights[j].double() * F.cross_entropy(z, targets[:, j], ignore_index=IGNORE, reduction="sum")
               for j in range(targets.shape[1]))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|: one number per tensor, blind to where the magnitude sits."""
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


# ---------------------------------------------------------------------------------------------
# Sections. Each returns a JSON-able dict.

def section_peak(size, device, state) -> dict:
    """bf16 matmul FLOP/s of this card (or CPU), median of 10 after 3 warm-ups."""
    n = size["matmul"]
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    times = time_interleaved({"matmul": lambda: a @ b}, 10, str(device), warmup=3)["matmul"]
    rate = 2 * n**3 / float(np.median(times))
    state["peak"] = rate
    print(f"[peak] bf16 matmul {n}^3: {rate / 1e12:.1f} TFLOP/s", flush=True)
    return {"n": n, "flops_per_s": rate, **summary(times)}


def section_correct(size, device, state) -> dict:
    checks = mce_checks(size, device) + chunk_checks(size, device)
    runs = tst_runs(size, device)
    for c in checks:
        print(f"[correct] {'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['error']:.2e} (tol {c['tol']:.0e})", flush=True)
    return {"kernels": checks, "runs": runs}


def mce_checks(size, device) -> list[dict]:
    n, v = size["ref_positions"], size["ref_vocab"]
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(n, v, generator=g) * 3).to(device)
    out = []
    for bags, weighting in [(1, "uniform"), (6, "uniform"), (16, "power")]:
        y = bag_targets(n, bags, v, device, seed=bags)
        w = slot_weight_vector(weighting, bags, device)
        for dtype, precision in [(torch.float32, "fp32"), (torch.bfloat16, "bf16")]:
            z = base.to(dtype)
            ref_z = z.double().requires_grad_()
            ref = reference_sum(ref_z, y, w)
            (ref * 0.37).backward()
            for elements in (None, 7 * v):  # one block; 7-row blocks with a partial last one
                leaf = z.detach().clone().requires_grad_()
                total, _ = blocks(elements, lambda: multi_hot_cross_entropy_sum(leaf, y, w), device)()
                blocks(elements, lambda: (total * 0.37).backward(), device)()
                tol = KERNEL_TOLERANCE[precision]
                errors = {"value": rel_err(total, ref), "grad": rel_err(leaf.grad, ref_z.grad)}
                name = f"mce s={bags} {weighting} {precision} logits, {'7-row' if elements else 'one'} blocks"
                out.append({"name": name, "error": max(errors.values()), "errors": errors, "tol": tol,
                            "ok": max(errors.values()) <= tol})
    return out


def chunk_checks(size, device) -> list[dict]:
    """Chunked head+loss (fp32 and bf16 autocast) vs the float64 head and loop of cross-entropies."""
    n, v, d = size["ref_positions"], size["ref_vocab"], size["ref_width"]
    torch.manual_seed(0)
    head = nn.Linear(d, v, bias=True).to(device)
    hidden = torch.randn(n, d, device=device)
    y = bag_targets(n, 6, v, device)
    w = slot_weight_vector("uniform", 6, device)
    out = []
    for precision in ("fp32", "bf16"):
        cast = torch.bfloat16 if precision == "bf16" else torch.float32
        # The reference sees the inputs the matmul sees (bf16-rounded under autocast).
        ref_h = hidden.to(cast).double().requires_grad_()
        ref_w, ref_b = (p.detach().to(cast).double().requires_grad_() for p in (head.weight, head.bias))
        ref = reference_sum(F.linear(ref_h, ref_w, ref_b), y, w)
        (ref * 0.37).backward()
        head.zero_grad(set_to_none=True)
        h = hidden.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            total, _ = chunked_head_mce_sum(h, head, y, w, chunk=max(1, n // 3))
        (total * 0.37).backward()
        # bf16: logits are rounded to bf16 before the loss, so the loss sees ~3 digits per logit
        errors = {"value": rel_err(total, ref), "grad_hidden": rel_err(h.grad, ref_h.grad),
                  "grad_weight": rel_err(head.weight.grad, ref_w.grad), "grad_bias": rel_err(head.bias.grad, ref_b.grad)}
        tol = KERNEL_TOLERANCE[precision] * (10 if precision == "fp32" else 1)  # fp32: d-long dot products
        out.append({"name": f"chunked head+loss s=6 {precision}", "error": max(errors.values()), "errors": errors,
                    "tol": tol, "ok": max(errors.values()) <= tol})
    return out


def tst_runs(size, device) -> dict:
    """30 steps of TST (s=4, then s=1 from step 15) in four set-ups from the same seed and data."""
    vocab = size["run_vocab"]
    rng = np.random.default_rng(0)
    # A learnable stream: each token is the previous plus 1..3 (mod V), so the loss falls fast.
    tokens = (np.cumsum(rng.integers(1, 4, 1 << 18)) % vocab).astype(np.uint32)
    losses = {name: tst_run(size, device, tokens, **setup) for name, setup in {
        "fp32": dict(precision="fp32", compile=False, fused=False),
        "bf16": dict(precision="bf16", compile=False, fused=False),
        "bf16+compile": dict(precision="bf16", compile=True, fused=False),
        "fp32+fused_adamw": dict(precision="fp32", compile=False, fused=True),
    }.items()}
    out = {"losses": losses, "comparisons": []}
    for name, (ref, tol) in RUN_TOLERANCE.items():
        diff = max(abs(a - b) for a, b in zip(losses[name], losses[ref]))
        out["comparisons"].append({"name": f"{name} vs {ref}", "max_abs_diff": diff, "tol": tol, "ok": diff <= tol})
        print(f"[correct] {'ok  ' if diff <= tol else 'FAIL'} 30-step run {name} vs {ref}: max |dloss| {diff:.2e} "
              f"(tol {tol:.0e}); loss {losses[ref][0]:.3f} -> {losses[ref][-1]:.3f}", flush=True)
    return out


def tst_run(size, device, tokens, precision: str, compile: bool, fused: bool) -> list[float]:
    cfg = Config()
    cfg.train.precision = precision
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 5
    cfg.tst = cfg.tst.with_shorthand(bag_size=4, ratio=RUN_SWITCH / RUN_STEPS)
    runtime = Runtime(0, 1, device)
    torch.manual_seed(0)
    model = TSTModel(build_model(size["run_preset"], size["run_vocab"], size["run_seq"])).to(device)
    if compile:
        torch._dynamo.reset()  # a fresh compile, as in a new training process
        compile_blocks(model, backend=size["compile_backend"])  # what train.compile does
    # make_optimizer fuses AdamW on CUDA devices only: naming the device picks the kernel.
    optimizer = make_optimizer(model, cfg, torch.device("cuda" if fused else "cpu"))
    stages = build_stages(cfg.tst, RUN_STEPS)
    loader = WindowLoader([tokens], size["run_batch"], seed=0, vocab_size=size["run_vocab"])
    losses = []
    for step in range(RUN_STEPS):
        stage = stage_at(stages, step)
        window = loader.batch(step, window_length(size["run_seq"], stage.bag_size, stage.mode))
        lr = lr_at(step, cfg.optim, RUN_STEPS, stage)
        losses.append(train_step(model, optimizer, window, stage, step, lr, cfg, runtime).loss)
    return losses


def default_case(size, device, preset: str | None = None, batch: int = 1) -> StepCase:
    """A StepCase as a run on this device trains by default: bf16 autocast and the loss chunking of
    ``device_defaults`` (chunks of 4096 positions at V = 128,256)."""
    chunk = device_defaults(device, size["vocab"])["model.loss_chunk_size"]
    return StepCase(preset or size["step_preset"], size["vocab"], batch, size["seq_len"], str(device), "bf16", chunk=chunk)


def at_batch(case: StepCase, make):
    """A maker for ``fastest_batches``: ``make()`` (a step fn of ``case``) at a given micro-batch."""
    def build(batch: int):
        case.batch = batch
        return make()
    return build


def fastest_batches(makers: dict, cases: list, size, device) -> tuple[dict, dict, dict]:
    """Each variant at its own fastest micro-batch: ``makers`` {name: batch -> step fn} over the
    models of ``cases``. Every candidate of ``size["batches"]`` is timed (positions per second)
    until the variant runs out of memory. Returns ({name: fn at its best batch}, {name: batch}, the scan)."""
    scan, stopped, seq_len = {name: {} for name in makers}, set(), cases[0].seq_len
    for batch in size["batches"]:
        for name, make in makers.items():
            if name in stopped:
                continue
            try:
                t = time_interleaved({name: make(batch)}, size["batch_rounds"], str(device), warmup=1)[name]
                scan[name][batch] = batch * seq_len / float(np.median(t))
            except torch.OutOfMemoryError:
                stopped.add(name)
            finally:
                for case in cases:
                    case.lm.zero_grad(set_to_none=True)
                free(device)
    if any(not rates for rates in scan.values()):
        raise RuntimeError(f"not even a micro-batch of {size['batches'][0]} fits: {scan}")
    batches = {name: max(rates, key=rates.get) for name, rates in scan.items()}
    fns = {name: make(batches[name]) for name, make in makers.items()}
    print(f"[batch] fastest micro-batch per variant: {batches}", flush=True)
    return fns, batches, {name: {str(b): r for b, r in rates.items()} for name, rates in scan.items()}


def section_compiled(size, device, state) -> dict:
    """Both phases as a run on this device trains by default (bf16, ``train.compile``: each decoder
    block compiled, the loss chunked with its compiled kernels) vs the plain transformers step,
    each at its fastest micro-batch; run first after ``correct``, so the budget never skips it."""
    torch._dynamo.reset()  # no shapes remembered from the 30-step runs, as in a new process
    torch._dynamo.utils.counters.clear()
    case = default_case(size, device)
    compiled = TSTModel(case.lm, loss_chunk_size=case.model.loss_chunk_size)
    compile_blocks(compiled, backend=size["compile_backend"])  # what train.compile does
    compile_s = {}
    case.batch = size["batches"][0]
    for bag in (1, 6):  # the first call compiles; the switch to the other phase should not
        began = time.time()
        case.ours(bag, compiled)()
        sync(device)
        compile_s[f"s={bag}"] = time.time() - began
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    print(f"[compiled] first calls (compile included): {compile_s}; {graphs} graph(s)", flush=True)
    plain = default_case(size, device)  # what the user would otherwise run: eager transformers, its own copy
    makers = {"s=6 compiled": at_batch(case, lambda: case.ours(6, compiled)),
              "s=1 compiled": at_batch(case, lambda: case.ours(1, compiled)), "plain": at_batch(plain, plain.plain)}
    fns, batches, scan = fastest_batches(makers, [case, plain], size, device)
    times = time_interleaved(fns, size["rounds"], str(device), warmup=1)
    return {**step_rows(case, times, state.get("peak"), "compiled", batches), "scan": scan, "compile_s": compile_s,
            "graphs": graphs}


def section_step(size, device, state) -> dict:
    """Our eager phase-1 (s=6) and phase-2 steps and the plain transformers step at the paper's
    smallest shape, each at its fastest micro-batch; host syncs and data time."""
    case = default_case(size, device)  # eager: the compiled section compiled its model's blocks in place
    makers = {"s=6": at_batch(case, lambda: case.ours(6)), "s=1": at_batch(case, lambda: case.ours(1)),
              "plain": at_batch(case, case.plain)}
    fns, batches, scan = fastest_batches(makers, [case], size, device)
    print(f"[step] {size['step_preset']} L={size['seq_len']} V={size['vocab']} chunk={case.model.loss_chunk_size}", flush=True)
    times = time_interleaved(fns, size["rounds"], str(device), warmup=2)
    state["case"] = case
    out = step_rows(case, times, state.get("peak"), "step", batches)
    out["scan"] = scan
    case.batch = batches["s=6"]
    out["data"] = data_time(size, device, case)
    out["host_syncs"] = {f"s={bag}": host_syncs(case, bag) for bag in (6, 1)}
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_rows(case: StepCase, times: dict, peak: float | None, tag: str, batches: dict) -> dict:
    """Tokens/s and MFU (vs the measured peak) of each variant at its own micro-batch, and the
    per-round ratios of time per model position (equal to step-time ratios at equal batches)."""
    rows = {}
    for name, t in times.items():
        batch, median = batches[name], float(np.median(t))
        flops = flops_per_step(case.lm, case.seq_len, batch * case.seq_len)
        bag = 1 if name.startswith("plain") else int(name.split()[0][2:])
        tokens = batch * (case.seq_len if name.startswith("plain") else window_length(case.seq_len, bag, "full"))
        rows[name] = {**summary(t), "batch": batch, "flops_per_step": flops, "tokens_per_s": tokens / median,
                      "mfu": flops / median / peak if peak else None}
    per_position = {name: summary([x / batches[name] for x in t]) for name, t in times.items()}
    ratios = [{"a": a, "b": b, "kind": kind, "value": ratio(per_position, a, b)} for a, b, kind in pairs(list(rows))]
    for name, r in rows.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
        print(f"[{tag}] {name:<14} B={r['batch']:<3} {1e3 * r['median_s']:9.1f} ms {r['tokens_per_s']:12.0f} tok/s  "
              f"MFU {mfu}", flush=True)
    for r in ratios:
        print(f"[{tag}] {r['a']} / {r['b']} (time per position): {r['value']:.3f}", flush=True)
    return {"batches": batches, "seq_len": case.seq_len, "variants": rows, "ratios": ratios}


def pairs(names: list[str]) -> list[tuple[str, str, str]]:
    """The ratios the goals read: each phase 1 over its phase 2 ("phase"), phase 2 over the plain
    step ("plain"), compiled over eager ("compile"). Names: "s=6", "s=1 compiled", "plain"."""
    out = []
    for name in names:
        base, _, tag = name.partition(" ")
        suffix = f" {tag}" if tag else ""
        if base.startswith("s=") and base != "s=1" and f"s=1{suffix}" in names:
            out.append((name, f"s=1{suffix}", "phase"))
        if base == "s=1" and "plain" in names:
            out.append((name, "plain", "plain"))
        if tag and base in names:
            out.append((name, base, "compile"))
    return out


def host_syncs(case: StepCase, bag: int) -> dict | None:
    """The synchronising CUDA calls (torch.cuda's sync debug mode) in one micro-batch's forward and
    backward, the body of train_step's micro-batch loop; None on CPU, where the same code runs unwatched."""
    stage = case.stage(bag)
    inputs, targets = split_window(to_device(case.window(window_length(case.seq_len, bag, "full")), case.device), bag, "full")
    weights = stage.weights(0, targets.shape[-1], device=case.device)
    watch = case.device.type == "cuda"
    if watch:
        torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if watch:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with case.runtime.autocast(case.cfg.train.precision):
                loss_sum, _ = case.model(inputs, targets, weights)
            loss_sum.backward()
        finally:
            if watch:
                torch.cuda.set_sync_debug_mode("default")
    case.lm.zero_grad(set_to_none=True)
    calls = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    tag = "moe" if hasattr(case.lm.config, "num_experts") else "step"
    print(f"[{tag}] host syncs in one s={bag} micro-batch: {len(calls) if watch else 'n/a (CPU)'}", flush=True)
    return {"count": len(calls), "where": sorted(set(calls))} if watch else None


def data_time(size, device, case: StepCase) -> dict:
    """Host time per step to draw the phase-1 windows from a memory-mapped shard and hand them to
    the GPU (``WindowLoader.batch`` + ``to_device``), and the copy's own device time."""
    width = window_length(case.seq_len, 6, "full")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.bin"
        np.random.default_rng(0).integers(0, case.vocab, size["data_tokens"], dtype=np.uint32).tofile(path)
        loader = WindowLoader([np.memmap(path, dtype=np.uint32, mode="r")], case.batch, seed=0, vocab_size=case.vocab)
        draw, hand = [], []
        for step in range(20):
            start = time.perf_counter()
            window = loader.batch(step, width)
            middle = time.perf_counter()
            to_device(window, device)
            draw.append(middle - start)
            hand.append(time.perf_counter() - middle)
        copy = seconds(lambda: to_device(window, device), str(device))
    host = float(np.median(draw) + np.median(hand))
    print(f"[step] data: {1e3 * host:.2f} ms host per step (draw {1e3 * np.median(draw):.2f}, "
          f"to_device {1e3 * np.median(hand):.2f}), copy {1e3 * copy:.2f} ms", flush=True)
    return {"batch": case.batch, "width": width, "draw_s": draw, "to_device_s": hand, "host_s_per_step": host,
            "copy_device_s": copy}


def section_mce(size, device, state) -> dict:
    """MCE fwd+bwd on bf16 logits ``[N, V]`` per block candidate vs one cross-entropy; compiled loss at s=6."""
    n, v = size["mce_positions"], size["vocab"]
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(n, v, generator=g) * 2).to(device=device, dtype=torch.bfloat16).requires_grad_()
    rows = []
    for bags in size["mce_bags"]:
        y = torch.randint(v, (n, bags), generator=g).to(device)

        def step(loss_fn):
            def call():
                loss_fn().backward()
                z.grad = None
            return call

        ours = step(lambda: mean(*multi_hot_cross_entropy_sum(z, y)))
        variants = {"one_ce": step(lambda: F.cross_entropy(z.float(), y[:, 0])),  # what transformers computes
                    "default": ours,  # the loss as it ships on this device (loss.LOSS_KERNELS), no flag
                    "eager": eager_kernels(ours, device)}  # the eager row blocks, the fallback
        if bags == 6:
            compiled = torch.compile(lambda z, y: mean(*multi_hot_cross_entropy_sum(z, y)), backend=size["compile_backend"])
            variants["compiled"] = step(lambda: compiled(z, y))
        times = times_table(time_interleaved(variants, size["mce_rounds"], str(device), warmup=2))
        memory = {name: peak_extra_mib(fn, device) for name, fn in variants.items()}
        row = {"bags": bags, "positions": n, "vocab": v, "variants": times, "peak_mib": memory,
               "ratio_to_one_ce": {name: ratio(times, name, "one_ce") for name in variants}}
        rows.append(row)
        print(f"[mce] s={bags}: " + ", ".join(f"{k} {1e3 * times[k]['median_s']:.2f} ms ({row['ratio_to_one_ce'][k]:.2f}x)"
                                               for k in variants), flush=True)
        free(device)
    return {"rows": rows}


def mean(total: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return total / weight


def section_chunk(size, device, state) -> dict:
    """Chunked head+loss vs the full logits (bf16 autocast, s=6): time and peak memory per chunk size."""
    shape = dict(vocab=size["vocab"], bags=6, positions=size["chunk_positions"], width=size["chunk_width"], device=str(device))
    variants = {"unfused": chunk_variants(**shape, chunk=size["chunks"][0])["unfused"]}
    variants.update({f"chunk={c}": chunk_variants(**shape, chunk=c)["chunked"] for c in size["chunks"]})
    variants = {name: autocast_bf16(fn, device) for name, fn in variants.items()}
    times = times_table(time_interleaved(variants, size["mce_rounds"], str(device), warmup=2))
    memory = {name: peak_extra_mib(fn, device) for name, fn in variants.items()}
    out = {**shape, "variants": times, "peak_mib": memory,
           "time_ratio": {name: ratio(times, name, "unfused") for name in variants},
           "memory_ratio": {name: memory[name] / memory["unfused"] if memory["unfused"] else None for name in variants}}
    for name in variants:
        mem = f"{out['memory_ratio'][name]:.3f}" if out["memory_ratio"][name] is not None else "n/a"
        print(f"[chunk] {name:<11} {1e3 * times[name]['median_s']:8.2f} ms  time {out['time_ratio'][name]:.3f}x  "
              f"memory {mem}x of unfused", flush=True)
    free(device)
    return out


def autocast_bf16(fn, device: torch.device):
    def call():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn()
    return call


def section_moe(size, device, state) -> dict:
    """The 10B-A1B MoE's layers (2 of 24) at L=2048, bf16: tokens/s of phase 1 (s=16) and phase 2."""
    state.pop("case", None)  # the dense model's memory back before the MoE's
    free(device)
    case = default_case(size, device, size["moe_preset"], size["moe_batch"])
    times = time_interleaved({"s=16": case.ours(16), "s=1": case.ours(1)}, size["rounds"], str(device), warmup=2)
    out = step_rows(case, times, state.get("peak"), "moe", {"s=16": case.batch, "s=1": case.batch})
    out["experts_implementation"] = getattr(case.lm.config, "_experts_implementation", None)
    out["host_syncs"] = {f"s={bag}": host_syncs(case, bag) for bag in (16, 1)}
    del case
    free(device)
    return out


SECTIONS = {"peak": section_peak, "correct": section_correct, "compiled": section_compiled, "step": section_step,
            "mce": section_mce, "chunk": section_chunk, "moe": section_moe}


# ---------------------------------------------------------------------------------------------
# Goals of issue #13, read off the sections.

def goals(sections: dict) -> list[dict]:
    out = []

    def add(name, value, limit, ok, note=""):
        out.append({"goal": name, "value": value, "limit": limit, "met": None if value is None else bool(ok), "note": note})

    if "correct" in sections:
        c = sections["correct"]
        bad = [k["name"] for k in c["kernels"] if not k["ok"]] + [r["name"] for r in c["runs"]["comparisons"] if not r["ok"]]
        worst = max(k["error"] / k["tol"] for k in c["kernels"])
        add("correct: kernels and runs within tolerance (worst error / tol)", worst, "<= 1", not bad, "; ".join(bad))
    for key in ("compiled", "step"):  # compiled: the defaults on CUDA; step: eager
        if key not in sections:
            continue
        for r in sections[key]["ratios"]:
            if r["kind"] == "phase":
                add(f"{key}: phase-1 ({r['a']}) / phase-2 ({r['b']}) time per position", r["value"], "<= 1.02",
                    r["value"] <= 1.02)
            elif r["kind"] == "plain" and key == "compiled":
                add(f"{key}: our phase-2 step with the defaults / the plain transformers step", r["value"], "<= 0.75",
                    r["value"] <= 0.75)
            else:
                add(f"{key}: {r['a']} / {r['b']} time per position", r["value"], "stated", True)
        for name, v in sections[key]["variants"].items():
            if key == "compiled" and name != "plain" and v["mfu"]:
                add(f"{key}: MFU {name} at B={v['batch']} (stretch 45%)", v["mfu"], ">= 40%", v["mfu"] >= 0.40)
            elif v["mfu"]:
                add(f"{key}: MFU {name} at B={v['batch']}", v["mfu"], "stated", True)
    if "moe" in sections and sections["moe"]["variants"]["s=1"]["mfu"]:
        v = sections["moe"]["variants"]
        for name in ("s=1", "s=16"):
            add(f"moe: MFU {name} (2 layers, eager)", v[name]["mfu"], ">= 25%", v[name]["mfu"] >= 0.25)
    for key in ("step", "moe"):
        for bag, syncs in sections.get(key, {}).get("host_syncs", {}).items():
            add(f"{key}: host syncs in one {bag} micro-batch (fwd+bwd)", syncs and syncs["count"], "0",
                syncs and not syncs["count"], "; ".join(syncs["where"])[:160] if syncs else "")
    if "step" in sections:
        d, step = sections["step"]["data"], sections["step"]["variants"]["s=6"]["median_s"]  # at the same batch
        add("step: data host time / phase-1 step time", d["host_s_per_step"] / step, "<= 0.02",
            d["host_s_per_step"] / step <= 0.02)
    if "mce" in sections:
        for row in sections["mce"]["rows"]:
            ratios = {k: x for k, x in row["ratio_to_one_ce"].items() if k != "one_ce"}
            best = min(ratios, key=ratios.get)
            add(f"mce s={row['bags']}: MCE / one CE fwd+bwd (best: {best})", ratios[best], "<= 1.10", ratios[best] <= 1.10)
            if "default" in ratios:
                add(f"mce s={row['bags']}: the default loss, no flag", ratios["default"], "<= 1.00", ratios["default"] <= 1.00)
    if "chunk" in sections:
        c = sections["chunk"]
        fits = {k: c["time_ratio"][k] for k, m in c["memory_ratio"].items() if k != "unfused" and m is not None and m <= 0.25}
        if fits:
            best = min(fits, key=fits.get)
            add(f"chunk: {best} time / unfused at <= 1/4 peak memory", fits[best], "<= 1.15", fits[best] <= 1.15)
        else:
            add("chunk: a chunk size with <= 1/4 of unfused peak memory", None, "<= 1.15", False,
                "no memory figures (CPU)" if all(m is None for m in c["memory_ratio"].values()) else "none fits")
    return out


def recommendations(sections: dict) -> list[str]:
    """What the measurements say the defaults should be (the issue's 'default becomes what measured best')."""
    out = []
    if "chunk" in sections:
        c = sections["chunk"]
        good = [k for k, m in c["memory_ratio"].items() if k != "unfused" and m is not None and m <= 0.25]
        if good:
            out.append(f"model.loss_chunk_size: fastest within 1/4 of unfused memory is {min(good, key=c['time_ratio'].get)}")
    return out


def print_table(results: dict) -> None:
    m = results["machine"]
    print(f"\n== gpu_check: {m['gpu'] or m['device']}, torch {m['torch']}, transformers {m['transformers']} ==")
    print(f"{'':8}{'goal':<72}{'value':>10}  limit")
    for g in results["goals"]:
        status = "n/a" if g["met"] is None else ("PASS" if g["met"] else "FAIL")
        value = g["value"]
        value = ("-" if value is None else str(value) if isinstance(value, int)
                 else f"{100 * value:.1f}%" if "MFU" in g["goal"] else f"{value:.3f}")
        print(f"{status:<8}{g['goal']:<72}{value:>10}  {g['limit']}" + (f"  ({g['note']})" if g["note"] else ""))
    for line in recommendations(results["sections"]):
        print(f"suggest {line}")
    for name, section in results["sections"].items():
        if "error" in section:
            print(f"ERROR   section {name}: {section['error']}")
    if results["skipped"]:
        print(f"skipped (budget): {', '.join(results['skipped'])}")


if __name__ == "__main__":
    main()
