"""torchtitan's ``Trainer`` running the stages of a superpose ``[tst]`` table."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from torchtitan.components.loss import ChunkedLossWrapper
from torchtitan.trainer import Trainer

from ..config import config_from_dict, load_config
from ..data import TokenData
from ..errors import ConfigError
from ..runs import METRICS, MetricsLog
from ..schedule import Stage, build_stages, stage_at
from .data import TokenWindowDataLoader
from .embedding import BagEmbedding
from .loss import MultiHotLoss


@dataclass(kw_only=True, slots=True)
class TSTOptions:
    """The ``[tst]`` table of a superpose config (docs/method.md): the shorthand, or ``config``."""

    bag_size: int = 6
    """s: tokens averaged into one input position in phase 1 (1 = the baseline)."""
    ratio: float = 0.3
    """r: the fraction of training.steps in phase 1 (0 = the baseline)."""
    weighting: str = "uniform"
    """Slot weights of the multi-hot loss: uniform | power | exp | first."""
    mode: str = "full"
    """full | input (bagged inputs only) | output (bag targets only)."""
    config: str = ""
    """A superpose TOML file whose [tst] table is used instead of the fields above (curricula, stages, blends)."""

    def stages(self, steps: int) -> list[Stage]:
        """The run's stages (``superpose.schedule.build_stages``), validated by superpose's config."""
        if self.config:
            tst = load_config(self.config).tst
        else:
            tst = config_from_dict({"tst": {"bag_size": self.bag_size, "ratio": self.ratio,
                                            "weighting": self.weighting, "mode": self.mode}}).tst
        stages = build_stages(tst, steps)
        unsupported = ([s.name for s in stages if s.lr_scale != 1.0 or s.rewarmup_steps]
                       + (["reset_optimizer"] if tst.reset_optimizer else []))
        if unsupported:
            raise ConfigError(f"tst: lr_scale, rewarmup_steps and reset_optimizer are not supported on torchtitan "
                              f"(stages {', '.join(unsupported)}); torchtitan's lr_scheduler runs one schedule over the run")
        return stages


class TSTTrainer(Trainer):
    """torchtitan's ``Trainer``; step t trains the superpose stage ``stage_at(stages, t - 1)``.

    The data loader serves each step the windows of its stage, ``MultiHotLoss`` scores them at
    the stage's slot weights, and ``BagEmbedding`` averages the bags. Everything else (the model,
    parallelisms, optimizer, one LR schedule over the whole run, checkpoints) is torchtitan's,
    so the optimizer state and the schedule carry across the switch. Rank 0 writes superpose's
    ``train``/``stage`` records to ``dump_folder/metrics.jsonl``.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        tst: TSTOptions = field(default_factory=TSTOptions)

    def __init__(self, config: Config):
        self.stages = config.tst.stages(config.training.steps)  # before any work: a bad table fails here
        check_parts(config)
        super().__init__(config)
        self.multi_hot = self.loss_fn.loss_fn if isinstance(self.loss_fn, ChunkedLossWrapper) else self.loss_fn
        self.dataloader.plan(self.stages, self.gradient_accumulation_steps)
        self.stage: Stage | None = None
        self.records: MetricsLog | None = None  # opened at the first step, when a resume's step is known
        log = self.metrics_processor.log

        def log_with_record(step, loss, max_loss, grad_norm, extra_metrics=None):
            log(step, loss, max_loss, grad_norm, extra_metrics=extra_metrics)
            if self.records:
                stage = stage_at(self.stages, step - 1)
                lr = next((v for k, v in (extra_metrics or {}).items() if k.startswith("lr")), None)
                self.records.write({"kind": "train", "step": step, "stage": stage.name, "phase": stage.phase,
                                    "bag_size": stage.bag_size, "loss": loss, "grad_norm": grad_norm, "lr": lr,
                                    "tokens_seen": (extra_metrics or {}).get("n_tokens_seen")})

        self.metrics_processor.log = log_with_record

    def batch_generator(self, data_iterable):
        """torchtitan's, but its tokens/s and MFU count model positions (the FLOPs) in a bag step:
        it counts ``labels.numel()``, which is s target tokens per position. ``n_tokens_seen``
        still counts the data tokens read (s per position in phase 1)."""
        for input_dict, labels in super().batch_generator(data_iterable):
            if labels.ndim == 3:  # [b, L, m]
                self.metrics_processor.ntokens_since_last_log -= labels.numel() - labels[..., 0].numel()
            yield input_dict, labels

    def train_step(self, data_iterator):
        step = self.step - 1  # torchtitan counts steps from 1, superpose's stages from 0
        stage = stage_at(self.stages, step)
        slots = 1 if stage.bag_size == 1 or stage.mode == "input" else stage.bag_size
        self.multi_hot.weights = stage.weights(step, slots, device=self.device)  # [m], sums to 1
        if self.records is None:
            path = Path(self.config.dump_folder) / METRICS
            if _rank() == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
            self.records = MetricsLog(path, _rank() == 0, resume_step=step or None)
        if self.stage is None or stage.name != self.stage.name:
            self.records.write({"kind": "stage", "step": step, "stage": stage.name, "bag_size": stage.bag_size,
                                "mode": stage.mode})
        self.stage = stage
        return super().train_step(data_iterator)

    def close(self) -> None:
        super().close()
        if getattr(self, "records", None):
            self.records.close()


def check_parts(config: TSTTrainer.Config) -> None:
    """The three parts the stages need and a vocabulary that holds the data's ids, checked before
    torchtitan builds anything."""
    loss = config.loss.loss_fn if isinstance(config.loss, ChunkedLossWrapper.Config) else config.loss
    problems = [
        (isinstance(loss, MultiHotLoss.Config), "loss (or the loss_fn of ChunkedLossWrapper) must be MultiHotLoss"),
        (isinstance(config.dataloader, TokenWindowDataLoader.Config), "dataloader must be TokenWindowDataLoader"),
        (isinstance(getattr(config.model_spec.model, "tok_embeddings", None), BagEmbedding.Config),
         "model tok_embeddings must be BagEmbedding (superpose.torchtitan.embedding.with_bag_embedding)"),
    ]
    for ok, message in problems:
        if not ok:
            raise ConfigError(f"TSTTrainer: {message}")
    data, model = TokenData(config.dataloader.dir), config.model_spec.model
    if data.vocab_size > model.vocab_size:
        raise ConfigError(f"{config.dataloader.dir} has {data.vocab_size} token ids but the model's vocabulary is "
                          f"{model.vocab_size}; use a model config with vocab_size >= {data.vocab_size}")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))
