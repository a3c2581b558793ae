"""What a run tells the person watching it: the expected duration of the rest of the run."""
from __future__ import annotations


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
