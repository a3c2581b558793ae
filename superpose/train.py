"""The training loop: one step function for every stage, validation, checkpoints, export.

Per step: look up the stage, draw the windows that stage needs, split them into
(inputs, targets), run forward/backward on each micro-batch with the loss divided by the
*global* target weight of the step, clip, and apply AdamW at the scheduled LR. Phase 1 and
phase 2 differ only in the ``Stage`` the lookup returns.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .activation_checkpointing import apply_activation_checkpointing
from .checkpoint import (Checkpoints, export_info, export_model, load_checkpoint, resolve_format, select_checkpoint,
                         set_aside_newer)
from .compilation import compile_blocks, compile_seconds
from .config import SHORTHAND, Config, ConfigError, config_from_dict, stage_tables
from .device_defaults import AUTO_KEYS, resolve_auto
from .data import TokenData, WindowLoader, bits_per_byte, prepare, to_device, unigram_log_probs, validation_windows
from .distributed import (Runtime, all_reduce_sum, any_rank, barrier, check_world, gradient_sync, init_runtime, parallelize,
                          on_main, shards_parameters)
from .errors import CheckpointError, DataError, Interrupted, TrainingError
from .files import LOCK_FILE, DirectoryLock, writable_dir
from .method import split_window, window_length
from .model import TSTModel, build_model, count_parameters, flops_per_step
from .preemption import StopRequest
from .runs import RESUME_SAFE_KEYS, MetricsLog, checkpoint_dirs, write_run_config
from .schedule import Stage, build_stages, has_superposition, lr_at, stage_at
from .tracking import open_trackers

@dataclass
class StepResult:
    loss: float  # MCE (phase 1, without log s) or next-token CE, mean over the global batch
    grad_norm: float
    applied: bool  # False when the loss or gradients were not finite and the update was skipped


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; matrices get weight decay, norms and biases (1-D parameters) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.optim.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        fused=device.type == "cuda" or None,
    )


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    window: torch.Tensor,
    stage: Stage,
    step: int,
    lr: float,
    cfg: Config,
    runtime: Runtime,
) -> StepResult:
    """One optimizer step on this rank's windows ``[B_local, W]`` for any stage."""
    inputs, targets = split_window(to_device(window, runtime.device), stage.bag_size, stage.mode)
    weights = stage.weights(step, targets.shape[-1], device=runtime.device)  # [m], sums to 1
    # Every slot of our windows is a real token, so the global weight (= the number of
    # positions of the global batch) is known before the forward.
    global_weight = targets.shape[0] * targets.shape[1] * runtime.world
    micro = cfg.train.micro_batch_size or inputs.shape[0]
    chunks = list(zip(inputs.split(micro), targets.split(micro)))
    loss_total = torch.zeros((), device=runtime.device)
    for i, (x, y) in enumerate(chunks):
        with gradient_sync(model, i == len(chunks) - 1, cfg.distributed.strategy), autocast(cfg, runtime):
            loss_sum, _ = model(x, y, weights)
        # DDP/FSDP average gradients over ranks; the factor `world` turns that into a sum.
        (loss_sum * (runtime.world / global_weight)).backward()
        loss_total += loss_sum.detach()
    loss_mean = all_reduce_sum(loss_total) / global_weight
    max_norm = cfg.optim.grad_clip or math.inf
    # The step's one wait for the device; the loss is computed by then.
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    loss = loss_mean.item()
    applied = math.isfinite(loss) and math.isfinite(grad_norm)
    if applied:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, applied)


def autocast(cfg: Config, runtime: Runtime):
    if cfg.train.precision == "bf16":
        return torch.autocast(runtime.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def validation_loss(model: nn.Module, windows: torch.Tensor, cfg: Config, runtime: Runtime, stage: Stage | None = None,
                    step: int = 0) -> float:
    """Loss (nats) on fixed held-out windows, split across ranks: the next-token loss on windows
    ``[n, L+1]`` or, given a superposition ``stage``, that stage's own objective (MCE without
    log s, at the slot weights of ``step``) on windows ``[n, window_length(L, s, mode)]``.

    Every rank runs the same number of forwards (FSDP needs that): the last rank's share is
    padded with windows whose targets are ignored."""
    bag_size, mode = (stage.bag_size, stage.mode) if stage else (1, "full")
    model.eval()
    per_rank = -(-windows.shape[0] // runtime.world)
    mine = windows[runtime.rank * per_rank : (runtime.rank + 1) * per_rank]
    inputs, targets = split_window(mine, bag_size, mode)  # [b, L, k], [b, L, m]
    pad = per_rank - inputs.shape[0]
    if pad:
        pad_inputs, pad_targets = split_window(windows[:pad], bag_size, mode)
        inputs = torch.cat([inputs, pad_inputs])
        targets = torch.cat([targets, torch.full_like(pad_targets, -100)])
    weights = stage.weights(step, targets.shape[-1], runtime.device) if stage else torch.ones(1, device=runtime.device)
    total = torch.zeros(2, device=runtime.device)
    micro = cfg.train.micro_batch_size or max(1, cfg.train.batch_size // runtime.world)
    for x, y in zip(inputs.split(micro), targets.split(micro)):
        with autocast(cfg, runtime):
            loss_sum, weight = model(x.to(runtime.device), y.to(runtime.device), weights)
        total += torch.stack([loss_sum.float(), weight.float()])
    total = all_reduce_sum(total)
    model.train()
    return (total[0] / total[1]).item()


def ensure_data(cfg: Config, runtime: Runtime) -> TokenData:
    """Open ``data.dir``, preparing the embedded corpus there on first use (rank 0 only)."""
    directory = Path(cfg.data.dir)
    if not (directory / "meta.json").is_file() and cfg.data.corpus:  # the embedded corpus (validate allows no other)
        if runtime.is_main:
            print(f"preparing the embedded Shakespeare corpus in {directory} ...", file=sys.stderr)
            prepare(directory, vocab_size=cfg.data.vocab_size, progress=cfg.train.progress)
        barrier()
    return TokenData(directory)


def config_changes(saved: dict, cfg: Config) -> list[str]:
    """Keys (outside ``RESUME_SAFE_KEYS``) where ``cfg`` differs from a run's saved config. A key the
    saved config lacks (a run saved before the key existed) counts as its default value; between
    two plain next-token runs (no superposition stage) the [tst] keys make no difference; the
    stage list counts, not how it was written (a stage list or the shorthand it expands to). A key of
    ``AUTO_KEYS`` still "auto" in ``cfg`` matches the value it resolved to (train checks again
    once it has resolved them for its device)."""
    before = config_from_dict(saved)
    plain = not has_superposition(before.tst, before.train.steps) and not has_superposition(cfg.tst, cfg.train.steps)
    same_stages = stage_tables(before.tst) == stage_tables(cfg.tst)
    stage_keys = {f"tst.{name}" for name in (*SHORTHAND, "stages")}
    old, new = before.to_dict(), cfg.to_dict()
    changes = [
        (f"{section}.{key}", f"{section}.{key}: {old[section][key]!r} -> {value!r}")
        for section, values in new.items()
        for key, value in values.items()
        if f"{section}.{key}" not in RESUME_SAFE_KEYS and old[section][key] != value and not (plain and section == "tst")
        and not (same_stages and f"{section}.{key}" in stage_keys) and not (value == "auto" and f"{section}.{key}" in AUTO_KEYS)
    ]
    # Other stages written in the shorthand: name the shorthand keys, not the whole list.
    shorthand = any(key in stage_keys - {"tst.stages"} for key, _ in changes)
    return [text for key, text in changes if not (shorthand and key == "tst.stages")]


def check_resume_config(saved: dict, cfg: Config) -> None:
    """Refuse to resume with a config that would change the run (``--allow-config-change`` skips)."""
    try:
        changed = config_changes(saved, cfg)
    except ConfigError as err:  # e.g. a key this version does not know
        raise ConfigError(f"the checkpoint's config cannot be checked ({err}); pass --allow-config-change to resume anyway") from None
    if changed:
        raise ConfigError(
            "resuming with a config that changes the run (" + "; ".join(changed) + "); "
            "restore the saved config or pass --allow-config-change"
        )


def train(cfg: Config, resume: str = "never", allow_config_change: bool = False, label: str = "train") -> dict | None:
    """Run (or resume) one training run in ``cfg.train.out_dir``; returns the final metrics
    (on rank 0; None on the other ranks, which write nothing). ``label`` names the run on the
    progress bar (e.g. the arm of a comparison).

    Rank 0 holds the run directory's lock for the whole run. A run that fails before it wrote
    anything removes the directory it created, so a typo leaves no empty run behind."""
    runtime = init_runtime(cfg.train.device)
    run_dir = Path(cfg.train.out_dir)
    created = not run_dir.exists()
    with contextlib.ExitStack() as stack:
        stack.callback(torch.set_num_threads, torch.get_num_threads())  # set_threads changes them for the run only
        try:
            writable_dir(run_dir, "train.out_dir")
            on_main(runtime, lambda: stack.enter_context(DirectoryLock(run_dir, "train.out_dir")), ConfigError)
            return _train(cfg, runtime, run_dir, resume, allow_config_change, label, stack)
        except BaseException:
            if created and runtime.is_main:
                _remove_if_unused(run_dir)
            raise


def _remove_if_unused(run_dir: Path) -> None:
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {LOCK_FILE}:
        (run_dir / LOCK_FILE).unlink(missing_ok=True)
        run_dir.rmdir()


def _train(cfg: Config, runtime: Runtime, run_dir: Path, resume: str, allow_config_change: bool, label: str,
           stack: contextlib.ExitStack) -> dict | None:
    if resume == "never" and (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"{run_dir} already holds a run; resume it with --resume auto or choose another train.out_dir")
    check_world(runtime, cfg.train.batch_size, cfg.distributed.strategy, cfg.distributed.shard_size)
    set_threads(cfg, runtime, lambda text: print(f"{label}: {text}", file=sys.stderr) if runtime.is_main else None)
    data = ensure_data(cfg, runtime)
    cfg = resolve_auto(cfg, runtime.device, data.vocab_size, lambda text: print(f"{label}: {text}", file=sys.stderr) if runtime.is_main else None)
    resume_from, rejected = select_checkpoint(run_dir, resume, runtime)
    checkpoint_format = resolve_format(cfg.train.checkpoint_format, runtime, cfg.distributed.strategy)
    # Entered into the run's stack: an error anywhere waits for a background write before the process groups go.
    checkpoints = stack.enter_context(Checkpoints(run_dir, checkpoint_format, cfg.train.keep_checkpoints,
                                                  cfg.train.async_checkpoint, runtime))
    barrier()  # every rank has checked the run directory before rank 0 writes into it

    torch.manual_seed(cfg.train.seed)  # the initial weights; under FSDP built on meta, drawn in parallelize alike
    lm = build_model(cfg.model.preset, data.vocab_size, cfg.data.seq_len, cfg.model.attn_implementation,
                     meta=shards_parameters(runtime, cfg.distributed.strategy))
    model = TSTModel(lm, cfg.model.loss_chunk_size)
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)  # before FSDP2 shards the wrapped blocks
    if cfg.train.compile:
        compile_blocks(model)  # regional, in place: parameter names and checkpoints stay those of the plain model
    model = parallelize(model, runtime, cfg.distributed.strategy, cfg.distributed.param_dtype, cfg.distributed.reduce_dtype,
                        cfg.distributed.shard_size)
    optimizer = make_optimizer(model, cfg, runtime.device)
    stages = build_stages(cfg.tst, cfg.train.steps)
    for stage in stages:
        width = window_length(cfg.data.seq_len, stage.bag_size, stage.mode)
        if max(s.size for s in data.splits["train"]) < width:
            raise DataError(f"a {stage.name} window of {width} tokens is longer than the training data")
    loader = WindowLoader(data.splits["train"], cfg.train.batch_size, cfg.train.seed, runtime.rank, runtime.world,
                                   vocab_size=data.vocab_size)
    val_windows = validation_windows(data.splits["val"], cfg.data.seq_len, cfg.train.eval_tokens, data.vocab_size)
    val_bpt = data.bytes_per_token("val")

    start_step, elapsed, last_eval, set_aside = 0, 0.0, None, []
    if resume_from is not None:
        state = load_checkpoint(Path(resume_from), model, optimizer)
        if not allow_config_change:
            check_resume_config(state["config"], cfg)
        start_step, elapsed, last_eval = state["step"], state["elapsed"], state.get("last_eval")
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and runtime.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], runtime.device)
        if runtime.is_main:
            print(f"{label}: resuming from step {start_step} ({resume_from})", file=sys.stderr)
        set_aside = on_main(runtime, lambda: set_aside_newer(run_dir, start_step), CheckpointError) or []
    elif resume == "auto" and (run_dir / "metrics.jsonl").exists() and runtime.is_main:
        print(f"{label}: {run_dir} has no checkpoint to resume from; starting again from step 0", file=sys.stderr)

    if runtime.is_main:
        write_run_config(run_dir, cfg)
    resume_step = start_step if resume_from else None
    log = MetricsLog(run_dir / "metrics.jsonl", runtime.is_main, resume_step, open_trackers(cfg, run_dir, runtime.is_main, resume_step))
    if rejected or set_aside:
        log.write({"kind": "resume", "step": start_step, "checkpoint": str(resume_from), "rejected": rejected,
                   "set_aside": set_aside})
    params = count_parameters(lm)
    positions = cfg.train.batch_size * cfg.data.seq_len
    step_flops = flops_per_step(lm, cfg.data.seq_len, positions)
    if start_step == 0:
        log.write({"kind": "start", "step": 0, "parameters": params["total"], "active_matmul_parameters": params["active_matmul"],
                   "flops_per_step": step_flops, "positions_per_step": positions, "world_size": runtime.world,
                   "stages": [vars(s) for s in stages]})
    bar = tqdm(total=cfg.train.steps, initial=start_step, disable=not (cfg.train.progress and runtime.is_main),
               desc=label, unit="step", file=sys.stderr, dynamic_ncols=True)

    def trainer_state(step: int) -> dict:
        return {"step": step, "elapsed": elapsed, "loader": loader.state_dict(), "rng": torch.get_rng_state(),
                **({"cuda_rng": torch.cuda.get_rng_state(runtime.device)} if runtime.device.type == "cuda" else {}),
                "config": cfg.to_dict(), "last_eval": last_eval}

    def newest_checkpoint(phrase: str) -> str:
        """``phrase`` with {} as the newest checkpoint, or what to say when there is none."""
        checkpoints.wait()  # one written in the background counts once it is complete
        kept = checkpoint_dirs(run_dir)
        return phrase.format(kept[-1]) if kept else "no checkpoint was written yet"

    def fail(step: int, message: str) -> TrainingError:
        """Record why the run stopped; the caller raises the returned error (no export happens)."""
        log.write({"kind": "failed", "step": step, "error": message})
        log.close()
        bar.close()
        return TrainingError(message)

    bag_windows = {}  # (bag size, mode) -> held-out windows of that superposition stage (None: val too short)
    unigram = []  # log-probabilities [V] of the train split's token frequencies, computed on first use

    def run_validation(step: int) -> dict:
        loss = validation_loss(model, val_windows, cfg, runtime)
        record = {"kind": "eval", "step": step, "val_loss": loss, "val_bpb": bits_per_byte(loss, val_bpt),
                  "tokens_seen": loader.tokens_seen, "elapsed": elapsed, "flops": step * step_flops}
        trained = max(step - 1, 0)  # the step just trained (at step 0: the first step's stage)
        stage = stage_at(stages, trained)
        key, width = (stage.bag_size, stage.mode), window_length(cfg.data.seq_len, stage.bag_size, stage.mode)
        if stage.bag_size > 1 and key not in bag_windows:  # as many windows as the next-token eval
            fits = max(s.size for s in data.splits["val"]) >= width
            bag_windows[key] = validation_windows(data.splits["val"], width - 1, val_windows.shape[0] * (width - 1),
                                                           data.vocab_size) if fits else None
        if stage.bag_size > 1 and bag_windows[key] is not None:
            # Diagnostic of phase 1: its own objective on held-out bags beside the unigram level, the
            # MCE of predicting the train split's token frequencies at every position: a bag loss near
            # it means phase 1 learned little beyond token frequencies.
            if not unigram:
                unigram.append(unigram_log_probs(data.splits["train"], data.vocab_size))
            targets = split_window(bag_windows[key], stage.bag_size, stage.mode)[1]  # [n, L, m]
            weights = stage.weights(trained, targets.shape[-1])  # [m], sums to 1
            record["val_bag_loss"] = validation_loss(model, bag_windows[key], cfg, runtime, stage, trained)
            record["val_bag_unigram_loss"] = -(unigram[0][targets] * weights).sum(-1).mean().item()
        log.write(record)
        if not math.isfinite(loss):
            raise fail(step, f"the validation loss at step {step} is {loss}: the model diverged and is not exported; "
                             f"{newest_checkpoint('the newest checkpoint is {}')}; lower optim.lr (or check the data) "
                             "and resume from a checkpoint before the divergence with --resume DIR --allow-config-change")
        return record

    bad_steps = 0
    model.train()
    pace = Pace(start_step, cfg.train.steps)
    with StopRequest(announce=runtime.is_main) as stop:
        if start_step == 0:
            last_eval = run_validation(0)
        for step in range(start_step, cfg.train.steps):
            stage = stage_at(stages, step)
            if step == 0 or stage != stage_at(stages, step - 1):
                log.write({"kind": "stage", "step": step, "stage": stage.name, "bag_size": stage.bag_size, "mode": stage.mode})
                if runtime.is_main and step > 0:
                    bar.write(f"step {step}: stage -> {stage.name} (bag size {stage.bag_size})")
            width = window_length(cfg.data.seq_len, stage.bag_size, stage.mode)
            start = time.perf_counter()
            window = loader.batch(step, width)
            lr = lr_at(step, cfg.optim, cfg.train.steps, stage)
            if cfg.tst.reset_optimizer and len(stages) > 1 and step == stages[-1].start_step:
                optimizer.state.clear()  # lever: forget phase-1 moments at the switch
            result = train_step(model, optimizer, window, stage, step, lr, cfg, runtime)
            seconds = time.perf_counter() - start
            elapsed += seconds
            bad_steps = 0 if result.applied else bad_steps + 1
            done = step + 1
            if done % cfg.train.log_every == 0 or done == cfg.train.steps or not result.applied:
                log.write({"kind": "train", "step": done, "stage": stage.name, "phase": stage.phase, "bag_size": stage.bag_size,
                           "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm, "applied": result.applied,
                           "tokens_seen": loader.tokens_seen, "tokens_per_s": cfg.train.batch_size * width / seconds,
                           "step_seconds": seconds, "elapsed": elapsed, "compile_seconds": compile_seconds()})
            if bad_steps >= cfg.train.max_bad_steps:
                raise fail(done, f"steps {done - bad_steps + 1}-{done} had a non-finite loss or gradient and were skipped "
                                 f"(train.max_bad_steps = {cfg.train.max_bad_steps}); "
                                 f"{newest_checkpoint('the newest checkpoint, {}, predates them')}; "
                                 "lower optim.lr or check the data, then resume with --resume auto --allow-config-change")
            if (estimate := pace.update(done, seconds)) and runtime.is_main:
                bar.write(f"{label}: {estimate}", file=sys.stderr)
            if done % cfg.train.eval_every == 0 or done == cfg.train.steps:
                last_eval = run_validation(done)
            bar.set_postfix(stage=stage.name, s=stage.bag_size, loss=f"{result.loss:.3f}",
                            val=f"{last_eval['val_loss']:.3f}" if last_eval else "-", refresh=False)
            bar.update(1)
            stopping = any_rank(stop.requested, runtime.device)
            # No periodic checkpoint inside a run of skipped steps: the last K stay ones from good steps.
            periodic = cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0 and not bad_steps
            if done == cfg.train.steps or periodic or stopping:
                checkpoints.save(done, model, optimizer, trainer_state(done))
            if stopping and done < cfg.train.steps:
                checkpoints.close()
                log.close()
                bar.close()
                # a rank that got no signal stops because another did: it exits as if it got SIGTERM
                raise Interrupted(done, run_dir / "checkpoints" / f"step-{done:08d}", stop.signum or signal.SIGTERM)
    bar.close()
    checkpoints.close()
    if last_eval is None or last_eval["step"] != cfg.train.steps:  # resumed from the final checkpoint
        last_eval = run_validation(cfg.train.steps)

    info = export_info(trainer_state(cfg.train.steps), cfg)
    export_model(model, lm, data.tokenizer(), data.eos_id, run_dir / "model", info, runtime, cfg.train.progress)
    log.write({"kind": "end", "step": cfg.train.steps, **info})
    log.close()
    return info if runtime.is_main else None


class Pace:
    """The expected duration of the rest of the run, from the first steps this process timed.

    The first step is left out (allocator warm-up, compilation); five after it give the pace."""

    WARMUP, MEASURED = 1, 5

    def __init__(self, start_step: int, steps: int):
        self.start, self.steps, self.seconds = start_step, steps, []

    def update(self, done: int, seconds: float) -> str | None:
        """One line, once, after the measured steps; else None."""
        if done - self.start <= self.WARMUP or len(self.seconds) >= self.MEASURED:
            return None
        self.seconds.append(seconds)
        if len(self.seconds) < self.MEASURED or done >= self.steps:
            return None
        pace = sum(self.seconds) / len(self.seconds)
        left = pace * (self.steps - done)
        return (f"{pace:.3f} s/step over steps {done - self.MEASURED + 1}-{done}: about "
                f"{left / 60:.1f} min for the remaining {self.steps - done} steps (validation not included)")


def set_threads(cfg: Config, runtime: Runtime, say) -> None:
    """CPU threads of this process: ``train.threads``, or (0) the cores no one else is using."""
    if runtime.device.type != "cpu" or (not cfg.train.threads and "OMP_NUM_THREADS" in os.environ):
        return  # an explicit OMP_NUM_THREADS stands unless train.threads is set
    threads = cfg.train.threads or default_threads()
    torch.set_num_threads(threads)
    if not cfg.train.threads:
        cores, load = machine_load()
        say(f"{threads} CPU thread(s) per process ({cores} cores, load average {load:.1f} when superpose started; "
            "train.threads sets it)")


@functools.cache
def machine_load() -> tuple[int, float]:
    """(cores this process may use, the 1-minute load average) when first asked: cached, so that every
    run of one command (the arms of a comparison) takes the same decision."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores, os.getloadavg()[0]


def default_threads() -> int:
    """All of this rank's share of the free cores, at least 1. bench/bench_threads.py on the
    project's 2-core machine: a quick-start step took 0.51 s with 1 thread and 0.31 s with 2 when
    the machine was otherwise idle, but 0.52 s and 3.40 s when one other process ran (OpenMP
    threads waiting for a busy core); the quick start with torch's default 2 threads on a shared
    machine took 44 CPU-minutes instead of 12.5. The load average says which case this is."""
    cores, load = machine_load()
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's processes on this machine share its cores
    return max(1, min(cores // ranks, round(max(0.0, cores - load) / ranks)))
