"""The training loop: one step function for every stage; ``Trainer`` sets a run up and runs it.

Per step: look up the stage, draw the windows that stage needs, split them into
(inputs, targets), run forward/backward on each micro-batch with the loss divided by the
*global* target weight of the step, clip, and apply AdamW at the scheduled LR. Phase 1 and
phase 2 differ only in the ``Stage`` the lookup returns.
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .activation_checkpointing import apply_activation_checkpointing
from .checkpoint import Checkpoints, load_checkpoint, resolve_format, select_checkpoint, set_aside_newer
from .compilation import compile_blocks, compile_seconds
from .config import Config, ConfigError
from .data import WindowLoader, check_same_data, ensure_data, to_device
from .device_defaults import resolve_auto
from .distributed import (
    Runtime,
    all_reduce_sum,
    any_rank,
    barrier,
    check_world,
    gradient_sync,
    init_runtime,
    on_main,
    parallelize,
    shards_parameters,
)
from .errors import CheckpointError, DataError, Interrupted, TrainingError
from .export import export_info, export_model
from .files import LOCK_FILE, MARKER, claim_dir, writable_dir
from .model import TSTModel, build_model, count_parameters, flops_per_step
from .optim import make_optimizer
from .preemption import StopRequest
from .progress import Pace
from .provenance import provenance
from .runs import MetricsLog, check_resume_config, checkpoint_dirs, write_run_config
from .schedule import Stage, build_stages, lr_at, stage_at
from .threads import set_threads
from .tracking import open_trackers
from .validation import Validator


@dataclass
class StepResult:
    loss: float  # MCE (phase 1, without log s) or next-token CE, mean over the global batch
    grad_norm: float
    applied: bool  # False when the loss or gradients were not finite and the update was skipped


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
    inputs, targets, weights = stage.split(to_device(window, runtime.device), step)  # [b, L, k], [b, L, m], [m] summing to 1
    # Every slot of our windows is a real token, so the global weight (= the number of
    # positions of the global batch) is known before the forward.
    global_weight = targets.shape[0] * targets.shape[1] * runtime.world
    micro = cfg.train.micro_batch_size or inputs.shape[0]
    chunks = list(zip(inputs.split(micro), targets.split(micro)))
    loss_total = torch.zeros((), device=runtime.device)
    for i, (x, y) in enumerate(chunks):
        with gradient_sync(model, i == len(chunks) - 1, cfg.distributed.strategy), runtime.autocast(cfg.train.precision):
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


def train(cfg: Config, resume: str = "never", allow_config_change: bool = False, label: str = "train",
          allow_data_change: bool = False) -> dict | None:
    """Run (or resume) one training run in ``cfg.train.out_dir``; returns the final metrics
    (on rank 0; None on the other ranks, which write nothing). ``label`` names the run on the
    progress bar (e.g. the arm of a comparison). ``allow_data_change`` resumes on other data
    than the checkpoint was trained on (recorded in the run's log).

    Rank 0 holds the run directory's lock for the whole run. A run that fails before it wrote
    anything removes the directory it created, so a typo leaves no empty run behind."""
    runtime = init_runtime(cfg.train.device)
    run_dir = Path(cfg.train.out_dir)
    created = not run_dir.exists()
    with contextlib.ExitStack() as stack:
        stack.callback(torch.set_num_threads, torch.get_num_threads())  # set_threads changes them for the run only
        try:
            on_main(runtime, lambda: claim_dir(run_dir, "run", "train.out_dir", stack), ConfigError)  # the rule, the lock
            writable_dir(run_dir, "train.out_dir")
            if resume == "never" and (run_dir / "metrics.jsonl").exists():
                raise ConfigError(f"{run_dir} already holds a run; resume it with --resume auto or choose another train.out_dir")
            trainer = Trainer(cfg, runtime, run_dir, label, stack, resuming=resume != "never" and bool(checkpoint_dirs(run_dir)))
            trainer.resume(resume, allow_config_change, allow_data_change)
            return trainer.fit()
        except BaseException:
            if created and runtime.is_main:
                _remove_if_unused(run_dir)
            raise


def _remove_if_unused(run_dir: Path) -> None:
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {LOCK_FILE, MARKER}:
        for name in (LOCK_FILE, MARKER):
            (run_dir / name).unlink(missing_ok=True)
        run_dir.rmdir()


class TrainState:
    """What a checkpoint restores besides the model and the optimizer (torchtitan's ``Stateful``
    shape): the steps done, the training time, the last validation, the data position and the RNG."""

    def __init__(self, loader: WindowLoader, device: torch.device):
        self.loader, self.device = loader, device
        self.step, self.elapsed, self.last_eval = 0, 0.0, None

    def state_dict(self) -> dict:
        cuda = {"cuda_rng": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {}
        return {"step": self.step, "elapsed": self.elapsed, "loader": self.loader.state_dict(), "rng": torch.get_rng_state(),
                **cuda, "last_eval": self.last_eval}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.elapsed, self.last_eval = state["step"], state["elapsed"], state.get("last_eval")
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)


class Trainer:
    """One run: the setup (``__init__``: data, model, optimizer, stages, checkpoints, validation),
    ``resume`` from a checkpoint, and ``fit``, the loop. Rank 0 writes; every rank trains."""

    def __init__(self, cfg: Config, runtime: Runtime, run_dir: Path, label: str, stack: contextlib.ExitStack,
                 resuming: bool = False):
        self.cfg, self.runtime, self.run_dir, self.label = cfg, runtime, run_dir, label
        self.log, self.bar = None, None  # opened by resume and fit; until then say() prints
        check_world(runtime, cfg.train.batch_size, cfg.distributed.strategy, cfg.distributed.shard_size)
        set_threads(cfg, runtime, lambda text: self.say(f"{label}: {text}"))
        self.data = ensure_data(cfg, runtime, resuming)
        # "auto" precision, compile and loss chunking for this device: config.toml records the resolved values
        self.cfg = cfg = resolve_auto(cfg, runtime.device, self.data.vocab_size, lambda text: self.say(f"{label}: {text}"))
        self.data_id = self.data.identity()  # in every checkpoint and the start record: a resume or export checks it
        self.resume_from = None  # the checkpoint resume() restores, if any
        checkpoint_format = resolve_format(cfg.train.checkpoint_format, runtime, cfg.distributed.strategy)
        # Entered into the run's stack: an error anywhere waits for a background write before the process groups go.
        self.checkpoints = stack.enter_context(Checkpoints(run_dir, checkpoint_format, cfg.train.keep_checkpoints,
                                                           cfg.train.async_checkpoint, runtime, cfg.train.checkpoint_every))
        torch.manual_seed(cfg.train.seed)  # the initial weights; under FSDP built on meta, drawn in parallelize alike
        self.lm = build_model(cfg.model.preset, self.data.vocab_size, cfg.data.seq_len, cfg.model.attn_implementation,
                              meta=shards_parameters(runtime, cfg.distributed.strategy))
        model = TSTModel(self.lm, cfg.model.loss_chunk_size)
        apply_activation_checkpointing(model, cfg.train.activation_checkpointing)  # before FSDP2 shards the wrapped blocks
        if cfg.train.compile:
            compile_blocks(model)  # regional, in place: parameter names and checkpoints stay those of the plain model
        self.model = parallelize(model, runtime, cfg.distributed.strategy, cfg.distributed.param_dtype,
                                 cfg.distributed.reduce_dtype, cfg.distributed.shard_size)
        self.optimizer = make_optimizer(self.model, cfg, runtime.device)
        self.stages = build_stages(cfg.tst, cfg.train.steps)
        for stage in self.stages:
            width = stage.window_length(cfg.data.seq_len)
            if self.data.longest("train") < width:
                raise DataError(f"a {stage.name} window of {width} tokens is longer than the training data")
        self.loader = WindowLoader(self.data.splits["train"], cfg.train.batch_size, cfg.train.seed, runtime.rank, runtime.world,
                                   vocab_size=self.data.vocab_size)
        self.validator = Validator(self.data, cfg, runtime, self.stages)
        self.state = TrainState(self.loader, runtime.device)
        self.step_flops = flops_per_step(self.lm, cfg.data.seq_len, cfg.train.batch_size * cfg.data.seq_len)

    def say(self, text: str) -> None:
        if self.runtime.is_main:
            (self.bar.write if self.bar else print)(text, file=sys.stderr)

    def resume(self, resume: str, allow_config_change: bool, allow_data_change: bool) -> None:
        """Restore the newest intact checkpoint (``resume`` = auto) or the one named, then open the run's log."""
        run_dir, runtime, cfg = self.run_dir, self.runtime, self.cfg
        self.resume_from, rejected = select_checkpoint(run_dir, resume, runtime)
        barrier()  # every rank has checked the run directory before rank 0 writes into it
        set_aside, data_change = [], None
        if self.resume_from is not None:
            state = load_checkpoint(Path(self.resume_from), self.model, self.optimizer)
            if not allow_config_change:
                check_resume_config(state["config"], cfg)
            data_change = check_same_data(state.get("data"), self.data, f"the run in {run_dir}", "--allow-data-change",
                                          allow_data_change)
            self.state.load_state_dict(state)
            self.say(f"{self.label}: resuming from step {self.state.step} ({self.resume_from})")
            set_aside = on_main(runtime, lambda: set_aside_newer(run_dir, self.state.step), CheckpointError) or []
        elif resume == "auto" and (run_dir / "metrics.jsonl").exists():
            self.say(f"{self.label}: {run_dir} has no checkpoint to resume from; starting again from step 0")
        if runtime.is_main:
            write_run_config(run_dir, cfg)
        resume_step = self.state.step if self.resume_from else None
        self.log = MetricsLog(run_dir / "metrics.jsonl", runtime.is_main, resume_step,
                              open_trackers(cfg, run_dir, runtime.is_main, resume_step))
        if rejected or set_aside or data_change:
            self.log.write({"kind": "resume", "step": self.state.step, "checkpoint": str(self.resume_from),
                            "rejected": rejected, "set_aside": set_aside,
                            **({"data_changed": data_change} if data_change else {})})
        if self.state.step == 0:
            params = count_parameters(self.lm)
            self.log.write({"kind": "start", "step": 0, "parameters": params["total"],
                            "active_matmul_parameters": params["active_matmul"], "flops_per_step": self.step_flops,
                            "positions_per_step": cfg.train.batch_size * cfg.data.seq_len, "world_size": runtime.world,
                            "stages": [vars(s) for s in self.stages], "data": self.data_id,
                            "provenance": provenance(runtime.device, runtime.world)})

    def fit(self) -> dict | None:
        """The loop, from the restored step to the last; then the final validation and the export."""
        cfg, state, steps = self.cfg, self.state, self.cfg.train.steps
        self.bar = tqdm(total=steps, initial=state.step, disable=not (cfg.train.progress and self.runtime.is_main),
                        desc=self.label, unit="step", file=sys.stderr, dynamic_ncols=True)
        bad_steps, pace = 0, Pace(state.step, steps)
        self.model.train()
        with StopRequest(announce=self.runtime.is_main) as stop:
            if state.step == 0:
                self.validate()
            while state.step < steps:
                step = state.step
                stage = stage_at(self.stages, step)
                if step == 0 or stage != stage_at(self.stages, step - 1):
                    self.log.write({"kind": "stage", "step": step, "stage": stage.name, "bag_size": stage.bag_size,
                                    "mode": stage.mode})
                    if step > 0 and self.runtime.is_main:  # on stdout, beside the bar
                        self.bar.write(f"step {step}: stage -> {stage.name} (bag size {stage.bag_size})")
                start = time.perf_counter()
                width = stage.window_length(cfg.data.seq_len)
                window = self.loader.batch(step, width)
                lr = lr_at(step, cfg.optim, steps, stage)
                if cfg.tst.reset_optimizer and len(self.stages) > 1 and step == self.stages[-1].start_step:
                    self.optimizer.state.clear()  # lever: forget phase-1 moments at the switch
                result = train_step(self.model, self.optimizer, window, stage, step, lr, cfg, self.runtime)
                seconds = time.perf_counter() - start
                state.step, state.elapsed = step + 1, state.elapsed + seconds
                bad_steps = 0 if result.applied else bad_steps + 1
                if state.step % cfg.train.log_every == 0 or state.step == steps or not result.applied:
                    self.log.write({"kind": "train", "step": state.step, "stage": stage.name, "phase": stage.phase,
                                    "bag_size": stage.bag_size, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                                    "applied": result.applied, "tokens_seen": self.loader.tokens_seen,
                                    "tokens_per_s": cfg.train.batch_size * width / seconds, "step_seconds": seconds,
                                    "elapsed": state.elapsed, "compile_seconds": compile_seconds()})
                if bad_steps >= cfg.train.max_bad_steps:
                    raise self.fail(f"steps {state.step - bad_steps + 1}-{state.step} had a non-finite loss or gradient and "
                                    f"were skipped (train.max_bad_steps = {cfg.train.max_bad_steps}); "
                                    f"{self.newest_checkpoint('the newest checkpoint, {}, predates them')}; "
                                    "lower optim.lr or check the data, then resume with --resume auto --allow-config-change")
                if estimate := pace.update(state.step, seconds):
                    self.say(f"{self.label}: {estimate}")
                if self.validator.due(state.step):
                    self.validate()
                self.bar.set_postfix(stage=stage.name, s=stage.bag_size, loss=f"{result.loss:.3f}",
                                     val=f"{state.last_eval['val_loss']:.3f}" if state.last_eval else "-", refresh=False)
                self.bar.update(1)
                stopping = any_rank(stop.requested, self.runtime.device)
                if self.checkpoints.due(state.step, steps, stopping, healthy=not bad_steps):
                    self.checkpoints.save(state.step, self.model, self.optimizer, self.trainer_state())
                if stopping and state.step < steps:
                    self.close()
                    # a rank that got no signal stops because another did: it exits as if it got SIGTERM
                    raise Interrupted(state.step, self.run_dir / "checkpoints" / f"step-{state.step:08d}",
                                      stop.signum or signal.SIGTERM)
        self.bar.close()
        self.checkpoints.close()
        if state.last_eval is None or state.last_eval["step"] != steps:  # resumed from the final checkpoint
            self.validate()
        info = export_info(self.trainer_state(), cfg)
        export_model(self.model, self.lm, self.data.tokenizer(), self.data.eos_id, self.run_dir / "model", info, self.runtime)
        self.log.write({"kind": "end", "step": steps, **info})
        self.log.close()
        return info if self.runtime.is_main else None

    def trainer_state(self) -> dict:
        """What a checkpoint holds besides model and optimizer: the state and the config that made it."""
        return {**self.state.state_dict(), "config": self.cfg.to_dict(), "data": self.data_id}

    def validate(self) -> None:
        """Validate at the current step and log it; a non-finite loss stops the run (nothing is exported)."""
        state = self.state
        record = {**self.validator.record(self.model, state.step), "tokens_seen": self.loader.tokens_seen,
                  "elapsed": state.elapsed, "flops": state.step * self.step_flops}
        self.log.write(record)
        if not math.isfinite(record["val_loss"]):
            raise self.fail(f"the validation loss at step {state.step} is {record['val_loss']}: the model diverged and is "
                            f"not exported; {self.newest_checkpoint('the newest checkpoint is {}')}; lower optim.lr (or check "
                            "the data) and resume from a checkpoint before the divergence with --resume DIR "
                            "--allow-config-change")
        state.last_eval = record

    def newest_checkpoint(self, phrase: str) -> str:
        """``phrase`` with {} as the newest checkpoint, or what to say when there is none."""
        self.checkpoints.wait()  # one written in the background counts once it is complete
        kept = checkpoint_dirs(self.run_dir)
        return phrase.format(kept[-1]) if kept else "no checkpoint was written yet"

    def fail(self, message: str) -> TrainingError:
        """Record why the run stopped; the caller raises the returned error (no export happens)."""
        self.log.write({"kind": "failed", "step": self.state.step, "error": message})
        self.close()
        return TrainingError(message)

    def close(self) -> None:
        self.checkpoints.close()
        self.log.close()
        self.bar.close()
