"""Held-out validation of a torchtitan run on superpose's fixed windows of the prepared val split.

torchtitan's own ``Validator`` runs it (its forward, loss, PP/CP handling and logging); the plugin
gives it the windows. They are ``superpose.data.validation_windows``: the ones superpose's own
trainer scores, so the next-token validation loss of a torchtitan run and of a superpose run on
the same data measure the same thing and ``superpose report`` can put them side by side.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.components.validate import Validator

from ..data import TokenData, validation_windows


class HeldOutWindowLoader(BaseDataLoader):
    """This rank's share of the held-out windows, ``local_batch_size`` at a time, served once.

    Every rank serves the same number of batches (an FSDP forward needs all ranks): the last
    shares are padded with windows whose labels are ignored, so the loss is the mean over the
    real windows' tokens.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(BaseDataLoader.Config):
        dir: str = ""
        """A ``superpose prepare`` directory (its val split); empty: the training data loader's."""

        tokens: int = 65536
        """Held-out target tokens per validation (superpose's train.eval_tokens; 0 = the whole split)."""

        infinite: bool = False
        """Set by torchtitan's Validator; the windows are served once either way."""

    def __init__(self, config: Config, *, dp_world_size: int, dp_rank: int, seq_len: int, local_batch_size: int,
                 **_: Any):  # tokenizer: the windows are already tokens
        windows = held_out_windows(config.dir, seq_len, config.tokens)  # [n, L+1]
        per_batch = local_batch_size * dp_world_size
        batches = -(-windows.shape[0] // per_batch)
        pad = batches * per_batch - windows.shape[0]
        padding = windows[torch.arange(pad) % windows.shape[0]]  # [pad, L+1]
        inputs = torch.cat([windows[:, :-1], padding[:, :-1]])  # [batches * per_batch, L]
        labels = torch.cat([windows[:, 1:], torch.full_like(padding[:, 1:], IGNORE_INDEX)])
        mine = slice(dp_rank, None, dp_world_size)  # rank r serves rows r, r + world, ...
        self.inputs, self.labels = inputs[mine].split(local_batch_size), labels[mine].split(local_batch_size)
        self.positions = torch.arange(seq_len).expand(local_batch_size, -1)  # [b, L]: one document per window

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        for x, y in zip(self.inputs, self.labels):
            yield {"input": x, "positions": self.positions}, y

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


@functools.lru_cache(maxsize=4)
def held_out_windows(directory: str, seq_len: int, tokens: int) -> torch.Tensor:
    """The fixed windows ``[n, L+1]`` of the val split (``superpose.data.validation_windows``), read
    once per process: torchtitan's Validator builds its data loader again at every validation."""
    data = TokenData(directory)
    return validation_windows(data.splits["val"], seq_len, tokens, data.vocab_size)


class HeldOutValidator(Validator):
    """torchtitan's ``Validator`` over ``HeldOutWindowLoader``: the next-token loss of the held-out
    windows every ``freq`` steps (``TSTTrainer`` adds the last step), all of them each time."""

    @dataclass(kw_only=True, slots=True)
    class Config(Validator.Config):
        enable: bool = True
        freq: int = 100
        dataloader: HeldOutWindowLoader.Config = field(default_factory=HeldOutWindowLoader.Config)

    def __init__(self, config: Config, *, seq_len: int, local_batch_size: int, dp_world_size: int, **kwargs):
        # the batch count every rank serves, so that torchtitan's Validator stops on all ranks together
        # (its steps=-1 would read until the loader ends, which it warns may hang: it does not here)
        windows = held_out_windows(config.dataloader.dir, seq_len, config.dataloader.tokens).shape[0]
        steps = -(-windows // (local_batch_size * dp_world_size))
        super().__init__(dataclasses.replace(config, steps=steps), seq_len=seq_len, local_batch_size=local_batch_size,
                         dp_world_size=dp_world_size, **kwargs)

    def should_validate(self, step: int) -> bool:
        return step % self.config.freq == 0
