"""The "auto" values of a run config, resolved for the device the run trains on.

One function decides them, so a run's ``config.toml`` records what actually ran (the resolved
values, never "auto") and a resumed run on the same kind of device resolves alike:

- ``train.precision``: bf16 autocast on CUDA (parameters and optimizer state stay fp32), fp32
  elsewhere (CPU autocast to bf16 is slower than fp32 on most CPUs).
- ``train.compile``: on for CUDA, off elsewhere (inductor's C++ compile costs minutes on a CPU
  and the step of a small CPU model gains little).
- ``model.loss_chunk_size``: ``CHUNK`` positions at a time when the vocabulary is at least
  ``LARGE_VOCAB``, so the default head+loss never holds the full ``[B*L, V]`` logits there; the
  full logits below (they are small, and one matmul is faster). The H200 of 2026-12-04 measured
  chunks of 4096 at 0.249x the memory of the full logits for 1.108x the time (V = 128,256);
  chunks of 1024 cost 1.197x.
"""
from __future__ import annotations

import dataclasses

import torch

from .config import AUTO_KEYS, Config

LARGE_VOCAB = 32768
CHUNK = 4096
PLAIN = {"train.precision": "fp32", "train.compile": False, "model.loss_chunk_size": 0}  # what "auto" meant before


def device_defaults(device: torch.device, vocab_size: int) -> dict:
    """What each "auto" key of ``AUTO_KEYS`` becomes on ``device`` for a vocabulary of ``vocab_size``."""
    cuda = device.type == "cuda"
    return {"train.precision": "bf16" if cuda else "fp32", "train.compile": cuda,
            "model.loss_chunk_size": CHUNK if vocab_size >= LARGE_VOCAB else 0}


def resolve_auto(cfg: Config, device: torch.device, vocab_size: int, say=None) -> Config:
    """A copy of ``cfg`` with every "auto" of ``AUTO_KEYS`` replaced by ``device_defaults``;
    explicit values stand. ``say`` (e.g. print on rank 0) gets one line naming what was resolved
    when "auto" turned anything on (bf16, compile, chunking); plain fp32 eager full logits (a small
    CPU run) go unsaid, as before these defaults existed. config.toml records the values either way."""
    resolved = device_defaults(device, vocab_size)
    out = dataclasses.replace(cfg, **{f.name: dataclasses.replace(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)})
    chosen = []  # the keys that were "auto"
    for key in AUTO_KEYS:
        section, name = key.split(".")
        if getattr(getattr(out, section), name) == "auto":
            setattr(getattr(out, section), name, resolved[key])
            chosen.append(key)
    if say is not None and any(resolved[key] != PLAIN[key] for key in chosen):
        values = ", ".join(f"{key} = {resolved[key]!r}" for key in chosen)
        say(f"on {device.type}: {values} (\"auto\"; set them to override)")
    return out
