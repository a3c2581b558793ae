"""The errors a user can act on: the CLI prints them as one line and exits with status 2.

They live in this dependency-free module so that the CLI can tell a user error from a bug
without importing torch or transformers (a config error answers in well under a second).
"""
from __future__ import annotations


class UserError(Exception):
    """Base of every error whose message tells the user what to fix."""


class ConfigError(UserError, ValueError):
    """A config that cannot run; the message says which key and how to fix it."""


class OutputError(ConfigError):
    """An output directory that cannot be used: not writable, holding files of another kind, in the way.
    A ConfigError too: the path is a setting (``train.out_dir``, ``--out``) the user chose."""


class RunInUse(OutputError):
    """A run directory that another process is writing (it holds the directory's lock)."""


class DataError(UserError, ValueError):
    """Input data that cannot be used; the message names the file and the problem."""


class ModelError(UserError, ValueError):
    """A model that cannot be built or does not fit the data; the message says why."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be written, read or verified; the previous good one is left untouched."""


class TrainingError(UserError, RuntimeError):
    """The run stopped for a reason the user must act on; the message says which."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run after a checkpoint; the CLI exits with 128 + ``signum``.
    ``how`` says how to continue (another command for `compare` and `sweep`)."""

    def __init__(self, step: int, checkpoint, signum: int, how: str = "--resume auto"):
        super().__init__(f"interrupted at step {step}; checkpoint written to {checkpoint}; continue with {how}")
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
