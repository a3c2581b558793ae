"""Ctrl-C and cluster preemption: finish the step, write a checkpoint, exit with the signal's status.

SLURM and Kubernetes stop a job with SIGTERM and wait a grace period before SIGKILL; a terminal
sends SIGINT. Either asks the training loop to stop after the step in flight (``requested``);
the loop then checkpoints and raises ``Interrupted``, and the CLI exits with 128 + the signal
number (130 for SIGINT, 143 for SIGTERM), as shells expect. A second SIGINT aborts at once
(``KeyboardInterrupt``: the newest complete checkpoint stays the resume point). Under torchrun,
the ranks agree on the step to stop at (``distributed.any_rank``), whichever rank got the signal.
"""
from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Context manager: while inside, SIGINT/SIGTERM set ``signum`` instead of killing the process."""

    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: abort now
            return
        self.signum = signum
        if self.announce:
            print(f"\nsuperpose: {signal.Signals(signum).name} received; stopping after the current step "
                  "and writing a checkpoint (Ctrl-C again aborts at once)", file=sys.stderr)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
