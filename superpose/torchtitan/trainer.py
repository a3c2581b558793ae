"""torchtitan's ``Trainer`` running the stages of a superpose ``[tst]`` table."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from torchtitan.components.loss import ChunkedLossWrapper
from torchtitan.trainer import Trainer

from ..config import TSTConfig, config_from_dict, load_config
from ..data import TokenData
from ..errors import ConfigError
from ..schedule import Stage, build_stages, stage_at
from .data import TokenWindowDataLoader
from .embedding import BagEmbedding
from .loss import MultiHotLoss
from .records import RunRecords
from .validation import HeldOutValidator


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

    def section(self) -> TSTConfig:
        """The ``[tst]`` section these options stand for, checked by superpose's config."""
        if self.config:
            return load_config(self.config).tst
        return config_from_dict({"tst": {"bag_size": self.bag_size, "ratio": self.ratio, "weighting": self.weighting,
                                         "mode": self.mode}}).tst

    def stages(self, steps: int) -> list[Stage]:
        """The run's stages (``superpose.schedule.build_stages``); what torchtitan cannot run is refused."""
        tst = self.section()
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
    so the optimizer state and the schedule carry across the switch. ``HeldOutValidator`` scores
    superpose's held-out windows, and rank 0 writes superpose's records (``records.RunRecords``)
    so that ``superpose report`` reads the run.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        tst: TSTOptions = field(default_factory=TSTOptions)

    def __init__(self, config: Config):
        self.stages = config.tst.stages(config.training.steps)  # before any work: a bad table fails here
        check_parts(config, self.stages)
        self.held_out = held_out = isinstance(config.validator, HeldOutValidator.Config) and config.validator.enable
        if held_out and not config.validator.dataloader.dir:
            config.validator.dataloader.dir = config.dataloader.dir
        self.elapsed = 0.0  # training seconds of the steps done (checkpointed: ``state_dict``)
        self.step_start: float | None = None  # perf_counter() when the step in progress began
        super().__init__(config)
        self.multi_hot = self.loss_fn.loss_fn if isinstance(self.loss_fn, ChunkedLossWrapper) else self.loss_fn
        self.dataloader.plan(self.stages, self.gradient_accumulation_steps)
        self.stage: Stage | None = None
        self.records: RunRecords | None = None  # opened at the first step, when a resume's step is known
        self.last_eval: dict | None = None
        log, log_validation = self.metrics_processor.log, self.metrics_processor.log_validation
        bytes_per_token = TokenData(config.validator.dataloader.dir).bytes_per_token("val") if held_out else None

        def log_with_record(step, loss, max_loss, grad_norm, extra_metrics=None):
            log(step, loss, max_loss, grad_norm, extra_metrics=extra_metrics)
            lr = next((v for k, v in (extra_metrics or {}).items() if k.startswith("lr")), None)
            self.records.train(step, stage_at(self.stages, step - 1), loss, grad_norm, lr,
                               self.dataloader.tokens_seen(step), self.seconds())

        def log_validation_with_record(loss, step, extra_metrics=None):
            log_validation(loss, step, extra_metrics=extra_metrics)
            if held_out:
                self.last_eval = self.records.eval(step, loss, bytes_per_token, self.dataloader.tokens_seen(step),
                                                   self.elapsed)

        self.metrics_processor.log = log_with_record
        self.metrics_processor.log_validation = log_validation_with_record

    def open_records(self, done: int) -> RunRecords:
        """The run's records, opened at the first step this process trains (``done`` steps done before
        it: 0, or the checkpoint's step); the config and the ``start`` record when that is 0."""
        if self.records is None:
            config = self.config
            parameters = sum(p.numel() for part in self.model_parts for p in part.parameters())  # DTensors: global
            self.records = RunRecords(config, self.dataloader.global_batch, self.parallel_dims.world_size,
                                      resume_step=done, elapsed=self.elapsed,
                                      titan_counts=(parameters, self.metrics_processor.num_flops_per_token))
            if done == 0:
                self.records.start(self.stages, config.tst.section().to_dict(), self.dataloader.data.identity())
        return self.records

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
        records = self.open_records(step)
        if self.stage is None or stage.name != self.stage.name:
            records.stage(step, stage)
        self.stage = stage
        self.step_start = time.perf_counter()
        super().train_step(data_iterator)  # logs (at log steps) before it returns
        self.elapsed, self.step_start = self.seconds(), None

    def seconds(self) -> float:
        """Training seconds so far, the step in progress included."""
        return self.elapsed + (time.perf_counter() - self.step_start if self.step_start is not None else 0.0)

    def train(self):
        """torchtitan's loop, then (at the last step) a held-out validation if the loop's last one was
        earlier, and the ``end`` record."""
        super().train()
        if self.step < self.config.training.steps:  # ran out of data
            return
        records = self.open_records(self.step)  # already open, unless resumed from the last checkpoint
        if self.held_out and (self.last_eval is None or self.last_eval["step"] != self.step):
            self.validator.validate(self.model_parts, self.step)
        records.end(self.step, self.last_eval, self.stages, self.elapsed)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "elapsed": self.elapsed}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.elapsed = float(state_dict.get("elapsed", 0.0))

    def close(self) -> None:
        super().close()
        if getattr(self, "records", None):
            self.records.close()


def check_parts(config: TSTTrainer.Config, stages: list[Stage]) -> None:
    """The three parts the stages need, parallelisms the bag stages run under and a vocabulary that
    holds the data's ids, checked before torchtitan builds anything."""
    loss = config.loss.loss_fn if isinstance(config.loss, ChunkedLossWrapper.Config) else config.loss
    problems = [
        (isinstance(loss, MultiHotLoss.Config), "loss (or the loss_fn of ChunkedLossWrapper) must be MultiHotLoss"),
        (isinstance(config.dataloader, TokenWindowDataLoader.Config), "dataloader must be TokenWindowDataLoader"),
        (isinstance(getattr(config.model_spec.model, "tok_embeddings", None), BagEmbedding.Config),
         "model tok_embeddings must be BagEmbedding (superpose.torchtitan.embedding.with_bag_embedding)"),
    ]
    bags = [s.name for s in stages if s.bag_size > 1]
    parallelism = config.parallelism
    for degree, name in ((parallelism.tensor_parallel_degree, "tensor"), (parallelism.context_parallel_degree, "context")):
        problems.append((degree == 1 or not bags, f"stages {', '.join(bags)} bag tokens, which {name} parallelism does not "
                                                   f"support here (parallelism.{name}_parallel_degree = {degree}): the "
                                                   "vocab-parallel embedding and loss-parallel logits (TP) and the sequence "
                                                   "split (CP) expect one token per position"))
    for ok, message in problems:
        if not ok:
            raise ConfigError(f"TSTTrainer: {message}")
    data, model = TokenData(config.dataloader.dir), config.model_spec.model
    if data.vocab_size > model.vocab_size:
        raise ConfigError(f"{config.dataloader.dir} has {data.vocab_size} token ids but the model's vocabulary is "
                          f"{model.vocab_size}; use a model config with vocab_size >= {data.vocab_size}")

