"""Training phases as data: a list of stages, each with its bag size, mode, weights and steps.

The trainer asks ``stage_at(stages, step)`` once per step; there is no second training loop.
The learning rate is one warmup-stable-decay schedule over the whole run, across stages, times
the stage's ``lr_scale`` and its optional re-warmup.

The plain method is one superposition stage then next-token prediction. The research levers of
``TSTConfig`` are variations of the same list: a bag-size curriculum (several superposition
stages), slot weights annealed to next-token prediction within a stage, a smooth switch (a blend
stage whose steps turn from bag steps into next-token steps), a phase-1 LR scale, and an LR
re-warmup after the switch.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import OptimConfig, TSTConfig

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Stage:
    name: str
    bag_size: int  # s (1 = next-token prediction)
    mode: str  # full | input | output (irrelevant when bag_size == 1)
    weighting: str | tuple  # slot weighting of the multi-hot loss, a name or s floats
    end_step: int  # first step that no longer belongs to this stage
    start_step: int = 0
    lr_scale: float = 1.0  # multiplies the scheduled LR during this stage
    rewarmup_steps: int = 0  # the stage's LR ramps up linearly over its first steps
    anneal: bool = False  # slot weights move linearly to next-token-only over the stage
    blend: bool = False  # steps turn from this stage's bags into next-token steps (smooth switch)

    @property
    def phase(self) -> str:
        """What the step trains, whatever the stage is called: superposition (phase 1, any stage of a
        curriculum), blend (a smooth switch's bag steps) or next-token (phase 2)."""
        return "next-token" if self.bag_size == 1 else "blend" if self.blend else "superposition"

    @classmethod
    def from_record(cls, record: dict) -> Stage:
        """A stage as ``metrics.jsonl`` records it: its fields (JSON turns a weight tuple into a
        list); keys of another version that this one does not know are left out."""
        known = {k: v for k, v in record.items() if k in {f.name for f in dataclasses.fields(cls)}}
        weighting = known["weighting"]
        return cls(**{**known, "weighting": tuple(weighting) if isinstance(weighting, list) else weighting})

    def window_length(self, seq_len: int) -> int:
        """Data tokens one sample of this stage reads (``superpose.method.window_length``)."""
        from .method import window_length  # imports torch, as above

        return window_length(seq_len, self.bag_size, self.mode)

    def split(self, window: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Windows ``[B, W]`` -> inputs ``[B, L, k]``, targets ``[B, L, m]`` and the slot weights ``[m]``
        of ``step`` (on the windows' device): what one step of this stage trains on."""
        from .method import split_window

        inputs, targets = split_window(window, self.bag_size, self.mode)
        return inputs, targets, self.weights(step, targets.shape[-1], device=window.device)

    def weights(self, step: int, slots: int, device=None) -> torch.Tensor:
        """Slot weights ``[m]`` at ``step``, normalised to sum 1: every position counts once."""
        from .loss import slot_weight_vector  # imports torch: a run's stages are read without it (superpose.runs)

        weighting = self.weighting[:slots] if isinstance(self.weighting, tuple) else self.weighting
        base = slot_weight_vector(weighting if slots == self.bag_size else "first", slots, device)
        base = base / base.sum()
        if self.anneal and slots > 1:
            progress = (step - self.start_step) / max(1, self.end_step - self.start_step)
            base = (1 - progress) * base + progress * slot_weight_vector("first", slots, device)
        return base


NEXT_TOKEN = Stage("next-token", 1, "full", "uniform", end_step=0)  # plain next-token prediction (what validation scores)


def build_stages(tst: TSTConfig, steps: int) -> list[Stage]:
    """The stages of a run of ``steps`` steps, one per table of ``tst.stages`` in order: a
    fraction is ``round(fraction * steps)`` steps, every stage ends by the end of the run, the last
    one runs to it, and a stage of no steps is dropped. A table's ``blend_steps`` split its last
    steps off into a blend stage (those of a table that got no steps, the previous stage's: the
    blend ends phase 1). A re-warmup needs a stage before it. Superposition stages are named
    superposition, or superposition-i (the i-th table) in a list of several."""
    tables = tst.stages
    several = sum(table.bag_size > 1 for table in tables) > 1
    stages, start, index = [], 0, 0
    for number, table in enumerate(tables):
        last = number == len(tables) - 1
        end = steps if last else min(steps, start + (table.steps or round(table.fraction * steps)))
        weighting = tuple(table.weighting) if isinstance(table.weighting, list) else table.weighting
        if table.bag_size == 1:
            name = "next-token"
        else:
            index += 1
            name = f"superposition-{index}" if several else "superposition"
        if end > start:
            stages.append(Stage(name, table.bag_size, table.mode, weighting, end, start, table.lr_scale,
                                table.rewarmup_steps if stages else 0, table.anneal))
            start = end
        if table.blend_steps and stages and stages[-1].bag_size > 1 and not stages[-1].blend:
            stage = stages.pop()
            cut = max(stage.start_step, stage.end_step - table.blend_steps)
            if cut > stage.start_step:
                stages.append(dataclasses.replace(stage, end_step=cut))
            stages.append(dataclasses.replace(stage, name="blend", start_step=cut, blend=True))
    return stages


def has_superposition(tst: TSTConfig, steps: int) -> bool:
    """Does this [tst] section give a run of ``steps`` steps any superposition stage?"""
    return any(stage.bag_size > 1 for stage in build_stages(tst, steps))


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that trains ``step``. Inside a blend stage of K steps, the i-th step is a
    next-token step with probability-like weight (i+1)/(K+1), realised deterministically: the
    count of next-token steps so far tracks the running sum of those weights."""
    for stage in stages:
        if step < stage.end_step:
            if stage.blend:
                i, k = step - stage.start_step, stage.end_step - stage.start_step
                def cumulative(n):  # sum_{j<n} (j+1)/(K+1)
                    return math.floor(n * (n + 1) / (2 * (k + 1)))

                if cumulative(i + 1) > cumulative(i):
                    return dataclasses.replace(stage, bag_size=1, mode="full", weighting="uniform", anneal=False)
            return stage
    raise IndexError(f"step {step} is past the last stage (ends at {stages[-1].end_step})")


def lr_at(step: int, optim: OptimConfig, steps: int, stage: Stage | None = None) -> float:
    """Warmup-stable-decay: linear warmup, constant, linear decay over the last decay fraction;
    times the stage's LR scale and re-warmup ramp."""
    if step < optim.warmup_steps:
        lr = optim.lr * (step + 1) / optim.warmup_steps
    else:
        decay_steps = round(optim.decay_fraction * steps)
        decay_start = steps - decay_steps
        lr = optim.lr
        if step >= decay_start and decay_steps:
            progress = (step - decay_start + 1) / decay_steps  # reaches 1 at the last step
            lr = optim.lr * (1.0 - progress * (1.0 - optim.min_lr_ratio))
    if stage is not None:
        lr *= stage.lr_scale
        if stage.rewarmup_steps:
            lr *= min(1.0, (step - stage.start_step + 1) / stage.rewarmup_steps)
    return lr
