"""What superpose shows the person watching: the pace of a run, and no third-party bars where they would only be noise."""
from __future__ import annotations

import contextlib

from transformers.utils import logging as hf_logging


class Pace:
    """The expected duration of the rest of the run, from the first steps this process timed.

    The first step is left out (allocator warm-up, compilation); five after it give the pace."""

    WARMUP, MEASURED = 1, 5

    def __init__(self, start_step: int, steps: int):
        self.start, self.steps, self.seconds = start_step, steps, []

    def update(self, done: int, seconds: float) -> str | None:
        """One line, once, after the measured steps; else None."""
        if done - self.start <= self.WARMUP or len(self.seconds) >= self.MEASURED:
            return None
        self.seconds.append(seconds)
        if len(self.seconds) < self.MEASURED or done >= self.steps:
            return None
        pace = sum(self.seconds) / len(self.seconds)
        left = pace * (self.steps - done)
        return (f"{pace:.3f} s/step over steps {done - self.MEASURED + 1}-{done}: about "
                f"{left / 60:.1f} min for the remaining {self.steps - done} steps (validation not included)")


@contextlib.contextmanager
def hf_progress_bars(show: bool):
    """Turn transformers' own progress bars ("Loading weights", "Writing model shards") off inside
    the block unless ``show`` (then the user's setting stands); the setting is restored after."""
    if show or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
