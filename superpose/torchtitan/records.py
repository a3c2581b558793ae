"""superpose's records of a torchtitan run, so that ``superpose report`` reads it like its own.

``DUMP/config.toml`` is the superpose config that describes the run and ``DUMP/metrics.jsonl``
holds superpose's ``start``, ``stage``, ``train``, ``eval`` and ``end`` records (the schema of
``superpose.runs``), beside torchtitan's TensorBoard/W&B logs. Parameters and FLOPs per step are
counted by superpose's own formula on the Hugging Face twin of the model (``export.hf_config``),
so a torchtitan run and a superpose run of one preset count alike; a model without a twin is
counted by torchtitan (the start record says which).
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch
from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC
from transformers import AutoModelForCausalLM

from ..config import Config, config_from_dict
from ..data import bits_per_byte
from ..errors import ConfigError
from ..launch import is_main_process
from ..model import count_parameters, flops_per_step
from ..provenance import provenance
from ..runs import METRICS, MetricsLog, write_run_config
from ..schedule import Stage

DTYPES = {"bfloat16": "bf16", "float32": "fp32"}


def superpose_config(config, tst: dict, global_batch: int, world: int) -> Config:
    """The superpose config of a ``TSTTrainer.Config``: the preset (the spec's flavor), the data,
    the ``[tst]`` table, AdamW and its WSD schedule, batch, steps and the logging cadence. What
    superpose has no key for (torchtitan's initialisation, its weight decay on every parameter,
    the parallelism beyond data parallel) is not in it; the start record names the framework."""
    adamw = config.optimizer.param_groups[0].optimizer_kwargs
    schedule, training, validator = config.lr_scheduler, config.training, config.validator
    replicate = config.parallelism.data_parallel_replicate_degree
    ac = config.activation_checkpoint
    return config_from_dict({
        "model": {"preset": config.model_spec.flavor},
        "data": {"dir": config.dataloader.dir, "corpus": "", "seq_len": training.seq_len},
        "tst": tst,
        "optim": {"lr": adamw["lr"], "beta1": adamw["betas"][0], "beta2": adamw["betas"][1], "eps": adamw["eps"],
                  "weight_decay": adamw["weight_decay"], "warmup_steps": schedule.warmup_steps,
                  "decay_fraction": schedule.decay_ratio or 0.0, "min_lr_ratio": schedule.min_lr_factor,
                  "grad_clip": training.max_norm},
        "train": {"out_dir": config.dump_folder, "steps": training.steps, "batch_size": global_batch,
                  "micro_batch_size": training.local_batch_size, "seed": config.dataloader.seed,
                  "device": "cuda" if torch.cuda.is_available() else "cpu",
                  "precision": DTYPES[training.mixed_precision_param], "compile": config.compile.enable,
                  "activation_checkpointing": ("full" if isinstance(ac, FullAC.Config) else
                                               "selective" if isinstance(ac, SelectiveAC.Config) else "none"),
                  "eval_every": validator.freq, "eval_tokens": validator.dataloader.tokens,
                  "log_every": config.metrics.log_freq, "checkpoint_every": config.checkpoint.interval,
                  "tensorboard": config.metrics.enable_tensorboard, "wandb": config.metrics.enable_wandb},
        "distributed": {"strategy": "hsdp" if replicate > 1 and world > replicate else "ddp" if replicate > 1 else "fsdp",
                        "param_dtype": DTYPES[training.mixed_precision_param],
                        "reduce_dtype": DTYPES[training.mixed_precision_reduce]},
    })


class RunRecords:
    """Rank 0's superpose records of one torchtitan run, and the training seconds they report.

    ``elapsed`` (given by ``TSTTrainer``) is superpose's: the sum of step times, without validation
    and checkpoints. A step is timed on the host, so on a GPU it is exact at the steps torchtitan
    logs (it reads the loss back, which waits for the GPU) and approximate between them; train
    records are written only there.
    """

    def __init__(self, config, global_batch: int, world: int, resume_step: int, elapsed: float,
                 titan_counts: tuple[int, float]):
        """``titan_counts``: torchtitan's parameter count and FLOPs per token of the model, used only when
        the model has no Hugging Face twin (``export.hf_config`` refuses it)."""
        from .export import hf_config

        self.config, self.global_batch, self.world = config, global_batch, world
        self.main = is_main_process()
        self.positions = global_batch * config.training.seq_len
        try:
            with torch.device("meta"):
                lm = AutoModelForCausalLM.from_config(hf_config(config.model_spec.model))  # no memory
            counts = count_parameters(lm)
            self.counts = {"parameters": counts["total"], "active_matmul_parameters": counts["active_matmul"],
                           "flops_per_step": flops_per_step(lm, config.training.seq_len, self.positions),
                           "counted_by": "superpose"}
        except ConfigError:  # a model superpose cannot mirror: torchtitan's own count and FLOPs formula
            self.counts = {"parameters": titan_counts[0], "active_matmul_parameters": None,
                           "flops_per_step": titan_counts[1] * self.positions, "counted_by": "torchtitan"}
        self.flops_per_step = self.counts["flops_per_step"]
        dump = Path(config.dump_folder)
        if self.main:
            dump.mkdir(parents=True, exist_ok=True)
        self.log = MetricsLog(dump / METRICS, self.main, resume_step=resume_step or None)
        self.logged = (resume_step, elapsed)  # (step, elapsed) of the last train record

    def start(self, stages: list[Stage], tst: dict, data_id: dict) -> None:
        """``config.toml`` and the ``start`` record of a run that starts at step 0."""
        if not self.main:
            return
        config, world = self.config, self.world
        write_run_config(config.dump_folder, superpose_config(config, tst, self.global_batch, world))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.log.write({"kind": "start", "step": 0, **self.counts, "positions_per_step": self.positions, "world_size": world,
                        "stages": [vars(s) for s in stages], "data": data_id, "framework": "torchtitan",
                        "provenance": {**provenance(device, world), "torchtitan": importlib.metadata.version("torchtitan")}})

    def stage(self, step: int, stage: Stage) -> None:
        self.log.write({"kind": "stage", "step": step, "stage": stage.name, "bag_size": stage.bag_size, "mode": stage.mode})

    def train(self, step: int, stage: Stage, loss: float, grad_norm: float, lr: float | None, tokens_seen: int,
              elapsed: float) -> None:
        """A ``train`` record at a step torchtitan logs; its step time is the mean since the last one."""
        last_step, last_elapsed = self.logged
        seconds = (elapsed - last_elapsed) / max(1, step - last_step)
        self.logged = (step, elapsed)
        step_tokens = self.global_batch * stage.window_length(self.config.training.seq_len)
        self.log.write({"kind": "train", "step": step, "stage": stage.name, "phase": stage.phase,
                        "bag_size": stage.bag_size, "loss": loss, "lr": lr, "grad_norm": grad_norm, "applied": True,
                        "tokens_seen": tokens_seen, "tokens_per_s": step_tokens / seconds if seconds else None,
                        "step_seconds": seconds, "elapsed": elapsed})

    def eval(self, step: int, loss: float, bytes_per_token: float, tokens_seen: int, elapsed: float) -> dict:
        record = {"kind": "eval", "step": step, "val_loss": loss, "val_bpb": bits_per_byte(loss, bytes_per_token),
                  "tokens_seen": tokens_seen, "elapsed": elapsed, "flops": step * self.flops_per_step}
        self.log.write(record)
        return record

    def end(self, step: int, last_eval: dict | None, stages: list[Stage], elapsed: float) -> None:
        self.log.write({"kind": "end", "step": step, "steps": step, "elapsed": elapsed,
                        "stages": [vars(s) for s in stages],
                        **({k: last_eval[k] for k in ("val_loss", "val_bpb", "tokens_seen")} if last_eval else {})})

    def close(self) -> None:
        self.log.close()
