"""``--config NAME`` functions for ``-m torchtitan.train --module superpose.torchtitan``.

Each returns a ``TSTTrainer.Config``; every field stays a torchtitan CLI flag (``--tst.bag_size 4``,
``--dataloader.dir data/x``, ``--training.steps``...). The paper recipes mirror configs/paper/*.toml
(docs/paper-recipes.md): B x L = 1024 x 2048 positions per step ("2M"; 4096 x 2048 for the MoE),
AdamW (0.9, 0.95), WSD with 2,000 warmup steps and linear decay over the last 10%, s = 6, r = 0.3
(MoE: s = 16, r = 0.25). Set ``--training.local_batch_size`` so that local x ranks x accumulation
gives the global batch; the global batch is fixed by ``--training.global_batch_size``.
"""
from __future__ import annotations

import dataclasses

from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
from torchtitan.config import ParallelismConfig, TrainingConfig
from torchtitan.config.configs import DebugConfig
from torchtitan.distributed.activation_checkpoint import SelectiveAC
from torchtitan.protocols.model_spec import ModelSpec
from torchtitan.trainer import Trainer

from .data import TokenWindowDataLoader
from .embedding import with_stock_embedding
from .loss import MultiHotLoss
from .models import llama3_spec, qwen3_moe_spec
from .trainer import TSTOptions, TSTTrainer
from .validation import HeldOutValidator, HeldOutWindowLoader


def tst_config(model_spec: ModelSpec, *, lr: float, steps: int, warmup: int, global_batch: int, local_batch: int,
               seq_len: int, tst: TSTOptions, data_dir: str, chunks: int = 8, log_freq: int = 10, eval_every: int = 1000,
               eval_tokens: int = 4194304) -> TSTTrainer.Config:
    """A TSTTrainer config: the model, our loss inside torchtitan's chunked head+loss, the windows
    of a prepared directory, one WSD schedule over the run, bf16 FSDP with fp32 reductions, the
    held-out windows of the prepared val split scored every ``eval_every`` steps and at the end."""
    return TSTTrainer.Config(
        model_spec=model_spec,
        tst=tst,
        loss=ChunkedLossWrapper.Config(num_chunks=chunks,
                                       loss_fn=MultiHotLoss.Config(global_vocab_size=model_spec.model.vocab_size)),
        dataloader=TokenWindowDataLoader.Config(dir=data_dir),
        hf_assets_path=data_dir,
        optimizer=default_adamw(lr=lr),
        lr_scheduler=LRSchedulersContainer.Config(warmup_steps=warmup, decay_ratio=0.1, decay_type="linear", min_lr_factor=0.0),
        training=TrainingConfig(local_batch_size=local_batch, global_batch_size=global_batch, seq_len=seq_len, steps=steps,
                                max_norm=1.0, mixed_precision_param="bfloat16", mixed_precision_reduce="float32",
                                disable_cuda_graphs=True),  # a graph needs fixed shapes; inputs change shape at the switch
        metrics=MetricsProcessor.Config(log_freq=log_freq, enable_tensorboard=True),
        validator=HeldOutValidator.Config(freq=eval_every, dataloader=HeldOutWindowLoader.Config(tokens=eval_tokens)),
        parallelism=ParallelismConfig(),
        checkpoint=CheckpointManager.Config(enable=True, interval=1000, last_save_model_only=False),
        activation_checkpoint=SelectiveAC.Config(),
        debug=DebugConfig(seed=0),  # the initial weights, like superpose's train.seed (the windows: --dataloader.seed)
    )


def baseline(config: TSTTrainer.Config) -> Trainer.Config:
    """The same run on torchtitan's stock ``Trainer``: its ``Embedding``, its cross-entropy, every step
    next-token, the same windows (by seed and step). A TST checkpoint loads into it (same keys).
    ``--tst.ratio 0`` on a TST config trains the same steps; this is the unmodified reference. It
    writes torchtitan's logs only, and validates nothing (the held-out windows follow the TST
    trainer's data directory); the baseline arm that ``superpose report`` reads is ``--tst.ratio 0``."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(Trainer.Config)}
    fields["validator"] = dataclasses.replace(config.validator, enable=False)
    spec = dataclasses.replace(config.model_spec, model=with_stock_embedding(config.model_spec.model))
    loss = ChunkedLossWrapper.Config(num_chunks=config.loss.num_chunks,
                                     loss_fn=CrossEntropyLoss.Config(global_vocab_size=spec.model.vocab_size))
    return Trainer.Config(**{**fields, "model_spec": spec, "loss": loss})


def cpu_check(model_spec: ModelSpec) -> TSTTrainer.Config:
    """A config for CPU checks: 20 steps of 4 x 32 positions, s=4, r=0.3, every step logged, validated
    every 4 (the model's vocabulary 8192: superpose prepare's default)."""
    return tst_config(model_spec, lr=3e-3, steps=20, warmup=2, global_batch=4, local_batch=4, seq_len=32,
                      tst=TSTOptions(bag_size=4, ratio=0.3), data_dir="data/shakespeare", chunks=2, log_freq=1,
                      eval_every=4, eval_tokens=2048)


def llama3_tiny_tst() -> TSTTrainer.Config:
    """superpose's tiny preset (4 layers, d=128): CPU checks."""
    return cpu_check(llama3_spec("tiny", vocab_size=8192))


def llama3_tiny_baseline() -> Trainer.Config:
    """``llama3_tiny_tst`` on torchtitan's stock Trainer (``baseline``)."""
    return baseline(llama3_tiny_tst())


def qwen3_moe_tiny_tst() -> TSTTrainer.Config:
    """superpose's qwen3-moe-tiny preset (4 layers, d=128, 8 experts of 128, top-2): CPU checks."""
    return cpu_check(qwen3_moe_spec("qwen3-moe-tiny", vocab_size=8192))


def llama3_270m_tst() -> TSTTrainer.Config:
    """The paper's 270M run (configs/paper/llama-270m.toml): peak LR 2e-3, 20k steps."""
    return tst_config(llama3_spec("llama-270m"), lr=2e-3, steps=20000, warmup=2000, global_batch=1024, local_batch=16,
                      seq_len=2048, tst=TSTOptions(bag_size=6, ratio=0.3), data_dir="data/dclm-llama3")


def llama3_270m_baseline() -> Trainer.Config:
    """``llama3_270m_tst`` on torchtitan's stock Trainer (``baseline``): the bench's reference step."""
    return baseline(llama3_270m_tst())


def llama3_600m_tst() -> TSTTrainer.Config:
    """The paper's 600M run (configs/paper/llama-600m.toml): peak LR 1e-3, 20k steps."""
    return tst_config(llama3_spec("llama-600m"), lr=1e-3, steps=20000, warmup=2000, global_batch=1024, local_batch=8,
                      seq_len=2048, tst=TSTOptions(bag_size=6, ratio=0.3), data_dir="data/dclm-llama3")


def llama3_3b_tst() -> TSTTrainer.Config:
    """The paper's 3B run (configs/paper/llama-3b.toml): peak LR 2e-4, 20k steps."""
    return tst_config(llama3_spec("llama-3b"), lr=2e-4, steps=20000, warmup=2000, global_batch=1024, local_batch=4,
                      seq_len=2048, tst=TSTOptions(bag_size=6, ratio=0.3), data_dir="data/dclm-llama3")


def qwen3_moe_10b_a1b_tst() -> TSTTrainer.Config:
    """The paper's 10B-A1B MoE TST arm (configs/paper/qwen3-moe-10b-a1b.toml): s=16, r=0.25, LR 3e-4, 50k steps."""
    return tst_config(qwen3_moe_spec("qwen3-moe-10b-a1b"), lr=3e-4, steps=50000, warmup=2000, global_batch=4096, local_batch=4,
                      seq_len=2048, tst=TSTOptions(bag_size=16, ratio=0.25), data_dir="data/dclm-fineweb-edu-llama3")
