"""Held-out losses of a run: the next-token loss on fixed windows, and in a superposition stage
that stage's own objective beside the unigram level. ``Validator`` also decides when it runs."""
from __future__ import annotations

import torch
from torch import nn

from .config import Config
from .data import TokenData, bits_per_byte, unigram_log_probs, validation_windows
from .distributed import Runtime, all_reduce_sum
from .schedule import NEXT_TOKEN, Stage, stage_at


@torch.no_grad()
def validation_loss(model: nn.Module, windows: torch.Tensor, cfg: Config, runtime: Runtime, stage: Stage | None = None,
                    step: int = 0) -> float:
    """Loss (nats) on fixed held-out windows, split across ranks: the next-token loss on windows
    ``[n, L+1]`` or, given a superposition ``stage``, that stage's own objective (MCE without
    log s, at the slot weights of ``step``) on windows ``[n, stage.window_length(L)]``.

    Every rank runs the same number of forwards (FSDP needs that): the last rank's share is
    padded with windows whose targets are ignored."""
    stage = stage or NEXT_TOKEN
    model.eval()
    per_rank = -(-windows.shape[0] // runtime.world)
    mine = windows[runtime.rank * per_rank : (runtime.rank + 1) * per_rank]
    inputs, targets, weights = stage.split(mine, step)  # [b, L, k], [b, L, m], [m]
    pad = per_rank - inputs.shape[0]
    if pad:
        pad_inputs, pad_targets, _ = stage.split(windows[:pad], step)
        inputs = torch.cat([inputs, pad_inputs])
        targets = torch.cat([targets, torch.full_like(pad_targets, -100)])
    weights = weights.to(runtime.device)
    total = torch.zeros(2, device=runtime.device)
    micro = cfg.train.micro_batch_size or max(1, cfg.train.batch_size // runtime.world)
    for x, y in zip(inputs.split(micro), targets.split(micro)):
        with runtime.autocast(cfg.train.precision):  # the training step's precision
            loss_sum, weight = model(x.to(runtime.device), y.to(runtime.device), weights)
        total += torch.stack([loss_sum.float(), weight.float()])
    total = all_reduce_sum(total)
    model.train()
    return (total[0] / total[1]).item()



class Validator:
    """The validation of one run: its fixed windows, when it runs, and the record it writes."""

    def __init__(self, data: TokenData, cfg: Config, runtime: Runtime, stages: list[Stage]):
        self.data, self.cfg, self.runtime, self.stages = data, cfg, runtime, stages
        self.windows = validation_windows(data.splits["val"], cfg.data.seq_len, cfg.train.eval_tokens, data.vocab_size)
        self.bytes_per_token = data.bytes_per_token("val")
        self.bag_windows = {}  # (bag size, mode) -> held-out windows of that stage (None: the split is too short)
        self.unigram = None  # log-probabilities [V] of the train split's token frequencies, computed on first use

    def due(self, done: int) -> bool:
        """Every ``train.eval_every`` steps, and after the last one."""
        return done % self.cfg.train.eval_every == 0 or done == self.cfg.train.steps

    def record(self, model: nn.Module, step: int) -> dict:
        """The ``eval`` record of ``step`` (steps done): the next-token loss and, while a superposition
        stage trains, the diagnostic of phase 1: its own objective on held-out bags beside the
        unigram level (the MCE of predicting the train split's token frequencies at every position):
        a bag loss near it means phase 1 learned little beyond token frequencies."""
        loss = validation_loss(model, self.windows, self.cfg, self.runtime)
        record = {"kind": "eval", "step": step, "val_loss": loss, "val_bpb": bits_per_byte(loss, self.bytes_per_token)}
        trained = max(step - 1, 0)  # the step just trained (at step 0: the first step's stage)
        stage = stage_at(self.stages, trained)
        windows = self._bag_windows(stage) if stage.bag_size > 1 else None
        if windows is not None:
            if self.unigram is None:
                self.unigram = unigram_log_probs(self.data.splits["train"], self.data.vocab_size)
            _, targets, weights = stage.split(windows, trained)  # [n, L, m], [m] summing to 1
            record["val_bag_loss"] = validation_loss(model, windows, self.cfg, self.runtime, stage, trained)
            record["val_bag_unigram_loss"] = -(self.unigram[targets] * weights).sum(-1).mean().item()
        return record

    def _bag_windows(self, stage: Stage) -> torch.Tensor | None:
        """As many held-out windows of ``stage`` as the next-token validation has."""
        key, width = (stage.bag_size, stage.mode), stage.window_length(self.cfg.data.seq_len)
        if key not in self.bag_windows:
            fits = self.data.longest("val") >= width
            self.bag_windows[key] = validation_windows(self.data.splits["val"], width - 1, self.windows.shape[0] * (width - 1),
                                                       self.data.vocab_size) if fits else None
        return self.bag_windows[key]
