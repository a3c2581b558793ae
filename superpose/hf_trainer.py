"""TST inside the Hugging Face ``Trainer``: swap ``Trainer`` for ``TSTTrainer`` and feed wider windows.

A pre-training script that groups its tokenised text into blocks of ``L + 1`` tokens groups them
into blocks of ``window_tokens(L, tst)`` instead (``s*L + s`` for full TST) and constructs
``TSTTrainer(..., tst=TSTConfig(bag_size=4, ratio=0.3), seq_len=L)``. Everything else of
``Trainer`` (optimizer, LR schedule, gradient accumulation, DDP, logging, saving, resuming) is
left as it is.

Why this shape: ``Trainer`` pulls a fixed number of batches per optimizer step, so the data
cannot change width with the stage. Every batch therefore holds phase-1 windows; the loss looks
up the stage from ``state.global_step`` (the optimizer step, the same for every micro-batch of a
gradient-accumulation step, and restored on resume) and

- phase 1 splits each window into L bags (``split_window``) and scores the multi-hot loss;
- phase 2 reads one ``L + 1``-token row of each window, the row rotating with the step so that
  over many steps every part of the blocks is read, and scores next-token prediction.

Both phases run the model on L positions per sample, so FLOPs per step are equal, as in the paper.
"""
from __future__ import annotations

import gc
import logging
import sys
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from .config import Config, DataConfig, TrainConfig, TSTConfig
from .method import window_length
from .model import embed_bags_in_forward, tst_inputs, tst_loss_sum
from .schedule import NEXT_TOKEN, Stage, build_stages, stage_at

logger = logging.getLogger(__name__)



def window_tokens(seq_len: int, tst: TSTConfig) -> int:
    """Tokens per dataset sample: the widest window any stage of the run reads."""
    widths = [window_length(seq_len, t.bag_size, t.mode) for t in tst.stages if t.bag_size > 1]
    return max(widths + [seq_len + 1])


class TSTTrainer(Trainer):
    """``transformers.Trainer`` whose loss is the loss of the TST stage of the current optimizer step.

    ``train_dataset`` items must hold ``input_ids`` of at least ``window_tokens(seq_len, tst)``
    tokens; evaluation datasets need ``seq_len + 1``. The model is any HF causal LM that
    accepts ``inputs_embeds``. Logs gain ``tst_bag_size`` (bag size of the last trained step).
    Stage levers that only change the loss or the data (curriculum, slot weights, annealing,
    blend) work as in ``superpose train``; the LR/optimizer levers belong to Trainer's arguments.
    """

    def __init__(self, *args, tst: TSTConfig, seq_len: int, **kwargs):
        super().__init__(*args, **kwargs)
        # The same checks as `superpose train`; a stage list of absolute steps must fit max_steps, if given.
        steps = self.args.max_steps if self.args.max_steps > 0 else sys.maxsize
        Config(tst=tst, data=DataConfig(seq_len=seq_len), train=TrainConfig(steps=steps))  # checked when built
        if tst.reset_optimizer or any(t.lr_scale != 1.0 or t.rewarmup_steps for t in tst.stages):
            raise ValueError("lr_scale, rewarmup_steps and tst.reset_optimizer act on the optimizer and LR, "
                             "which Trainer owns: set them through TrainingArguments / a custom scheduler instead")
        deepspeed = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if deepspeed is not None and deepspeed.zero_stage == 3:
            raise ValueError("TSTTrainer does not run under DeepSpeed ZeRO-3 (it gathers each module's weights in that "
                             "module's own call, and the bag mean reads the embedding's); use Trainer's FSDP or DDP")
        self.tst, self.seq_len = tst, seq_len
        self.width = window_tokens(seq_len, tst)
        # Our loss is a mean over the micro-batch; Trainer then divides by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        # Datasets hold token windows, not labels: evaluation asks compute_loss for the loss.
        self.label_names, self.can_return_loss = [], True
        self._stages: list[Stage] = []
        self.last_stage: Stage | None = None

    @property
    def stages(self) -> list[Stage]:
        """Phase 1 for the first round(r * max_steps) optimizer steps, then next-token prediction."""
        if not self._stages or self._stages[-1].end_step != self.state.max_steps:
            self._stages = build_stages(self.tst, self.state.max_steps)
        return self._stages

    def stage_window(self, input_ids: torch.Tensor, stage: Stage, step: int) -> torch.Tensor:
        """The part of each sample ``[b, W]`` that ``stage`` reads at ``step``: ``[b, W_stage]``."""
        need = stage.window_length(self.seq_len)
        if input_ids.shape[1] < need:
            raise ValueError(
                f"samples of {input_ids.shape[1]} tokens are too short for the {stage.name} stage "
                f"(needs {need}); group the dataset into blocks of window_tokens(seq_len, tst) = {self.width}"
            )
        start = (step % (input_ids.shape[1] // need)) * need if stage.phase == "next-token" else 0
        return input_ids[:, start : start + need]

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch=None):
        step = self.state.global_step
        stage = stage_at(self.stages, step) if model.training else NEXT_TOKEN
        if model.training and stage != self.last_stage:
            logger.info("step %d: TST stage -> %s (bag size %d)", step, stage.name, stage.bag_size)
            self.last_stage = stage
        window = self.stage_window(inputs["input_ids"], stage, step)  # [b, W_stage]
        x, y, weights = stage.split(window, step)  # [b, L, k], [b, L, m], [m] summing to 1
        lm = self.accelerator.unwrap_model(model)
        # the bag mean runs inside the (sharded) forward; installed at the first step, once, on the
        # model Trainer trains (also one it built itself, with model_init)
        embed_bags_in_forward(lm)
        # The whole causal LM, through the (possibly DDP-wrapped) model, so that gradient
        # synchronisation sees the forward; the loss is the one `superpose train` scores.
        outputs = model(**tst_inputs(lm, x))
        loss_sum, weight = tst_loss_sum(lm, outputs, y, weights, model.training)
        loss = loss_sum / weight.clamp(min=torch.finfo(torch.float32).tiny)
        return (loss, outputs) if return_outputs else loss

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The model runs on L positions per sample in every stage (not on W tokens)."""
        return super().floating_point_ops({"input_ids": inputs["input_ids"][:, : self.seq_len]})

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.last_stage is not None:
            logs["tst_bag_size"] = self.last_stage.bag_size
        super().log(logs, start_time)


def end_training(trainer: Trainer) -> None:
    """End a torchrun script: free the trainer's DDP wrapper, then destroy the process group.

    Trainer does neither, and both matter on gloo. A group left to the interpreter's exit aborts
    the rank ("terminate called without an active exception"). And the group must outlive the
    DDP wrapper: its C++ reducer frees its share of the group holding the GIL, so were it the last
    owner, the group's destructor would join a worker thread that waits for the GIL (a hang, seen
    in CI and in 5 of 13 2-rank runs of tests/trainer_run.py here). Freed first, the wrapper leaves
    the group to ``destroy_process_group``, which frees it with the GIL released. Call it last:
    the trainer keeps its unwrapped model (and ``save_model``), not its DDP wrapper."""
    trainer.model_wrapped = trainer.model
    trainer.accelerator.free_memory()  # accelerate's own references to the prepared model
    gc.collect()  # a wrapper left in a reference cycle would otherwise be freed after the group
    trainer.accelerator.end_training()
