"""Training phases as data: a list of stages, each with its bag size, mode and end step.

The trainer asks ``stage_at(stages, step)`` once per step; there is no second training loop.
The learning rate is one warmup-stable-decay schedule over the whole run, across stages.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import OptimConfig, TSTConfig


@dataclass(frozen=True)
class Stage:
    name: str
    bag_size: int  # s (1 = next-token prediction)
    mode: str  # full | input | output (irrelevant when bag_size == 1)
    weighting: str  # slot weighting of the multi-hot loss
    end_step: int  # first step that no longer belongs to this stage


def build_stages(tst: TSTConfig, steps: int) -> list[Stage]:
    """Phase 1 (superposition) for steps ``[0, round(r*T))``, then phase 2 (recovery, NTP)."""
    switch = round(tst.ratio * steps) if tst.bag_size > 1 else 0
    stages = []
    if switch > 0:
        stages.append(Stage("superposition", tst.bag_size, tst.mode, tst.weighting, switch))
    if switch < steps:
        stages.append(Stage("next-token", 1, "full", "uniform", steps))
    return stages


def stage_at(stages: list[Stage], step: int) -> Stage:
    for stage in stages:
        if step < stage.end_step:
            return stage
    raise IndexError(f"step {step} is past the last stage (ends at {stages[-1].end_step})")


def lr_at(step: int, optim: OptimConfig, steps: int) -> float:
    """Warmup-stable-decay: linear warmup, constant, linear decay over the last decay fraction."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    decay_steps = round(optim.decay_fraction * steps)
    decay_start = steps - decay_steps
    if step < decay_start or decay_steps == 0:
        return optim.lr
    progress = (step - decay_start + 1) / decay_steps  # reaches 1 at the last step
    return optim.lr * (1.0 - progress * (1.0 - optim.min_lr_ratio))
