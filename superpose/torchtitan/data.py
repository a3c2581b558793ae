"""torchtitan's data loader over a ``superpose prepare`` directory: each step's windows for its stage."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torchtitan.components.dataloader import BaseDataLoader

from ..data import TokenData, WindowLoader
from ..schedule import Stage, stage_at


class TokenWindowDataLoader(BaseDataLoader):
    """Serves step t's windows from the train split of a prepared directory, for t's stage.

    The windows are superpose's own (``superpose.data.WindowLoader``: drawn from ``(seed, t)``),
    so a torchtitan run and a superpose run of the same data, seed and batch read the same text,
    and the state is one number: the steps served. A window of stage (s, mode) is
    ``window_length(L, s, mode)`` tokens (full TST: ``s*L + s``), split by
    ``superpose.method.split_window``; a side of one token per position is squeezed, so a
    next-token step yields torchtitan's own ``input [b, L]`` and labels ``[b, L]``, and a bag
    step ``input [b, L, s]`` and labels ``[b, L, s]``. ``positions`` (0..L-1, one document per
    window: plain causal attention, as in superpose's trainer) go with every batch.

    Without ``plan`` (a stock torchtitan ``Trainer``) every step is next-token prediction.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(BaseDataLoader.Config):
        dir: str = ""
        """A directory written by ``superpose prepare`` (its train split is read)."""

        seed: int = 0
        """The windows of step t are drawn from (seed, t), as in superpose's own trainer."""

    def __init__(self, config: Config, *, dp_world_size: int, dp_rank: int, seq_len: int, local_batch_size: int,
                 **_: Any):  # tokenizer, snapshot_every_n_steps: the windows are already tokens
        self.data = TokenData(config.dir)
        self.seed, self.seq_len, self.local_batch = config.seed, seq_len, local_batch_size
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.stages = [Stage("next-token", 1, "full", "uniform", end_step=2**62)]
        self.accumulation = 1
        self.steps_served = 0

    def plan(self, stages: list[Stage], accumulation: int) -> None:
        """Serve ``stages`` (``superpose.schedule.build_stages``), ``accumulation`` micro-batches per step."""
        self.stages, self.accumulation = stages, accumulation

    @property
    def global_batch(self) -> int:
        """Windows per optimizer step over all data-parallel ranks and micro-batches."""
        return self.local_batch * self.dp_world_size * self.accumulation

    def tokens_seen(self, steps: int) -> int:
        """Data tokens the first ``steps`` steps read over all ranks (superpose's ``tokens_seen``:
        the whole windows, ``s*L + s`` per sample in a full-TST step)."""
        return sum(max(0, min(s.end_step, steps) - s.start_step) * self.global_batch * s.window_length(self.seq_len)
                   for s in self.stages)

    def step_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's whole batch of 0-based ``step``: inputs ``[b*g, L(, k)]``, labels ``[b*g, L(, m)]``."""
        stage = stage_at(self.stages, step)
        loader = WindowLoader(self.data.splits["train"], self.global_batch,
                              self.seed, self.dp_rank, self.dp_world_size, self.data.vocab_size)
        window = loader.batch(step, stage.window_length(self.seq_len))  # [b*g, W]
        inputs, labels, _ = stage.split(window, step)  # [b*g, L, k], [b*g, L, m]; the weights: TSTTrainer's
        def squeeze(t):
            return t.squeeze(-1) if t.shape[-1] == 1 else t

        return squeeze(inputs), squeeze(labels)

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        while True:
            step = self.steps_served
            inputs, labels = self.step_batch(step)
            self.steps_served = step + 1  # counted before the yields: a checkpoint after step t says t
            positions = torch.arange(self.seq_len).expand(self.local_batch, -1)  # [b, L]
            for x, y in zip(inputs.split(self.local_batch), labels.split(self.local_batch)):
                yield {"input": x, "positions": positions}, y

    def state_dict(self) -> dict[str, Any]:
        return {"steps_served": self.steps_served, "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self.steps_served = int(state_dict["steps_served"])
