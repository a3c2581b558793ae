"""superpose: Token Superposition Training for Hugging Face causal LMs.

The method as pure functions (``embed_bags``, ``multi_hot_cross_entropy``, ``split_window``),
the stage schedule, and a trainer with its command-line tool ``superpose``.

The names below are imported on first use (PEP 562), so ``import superpose`` and the CLI's
``--help``, ``--version`` and config errors do not pay for importing torch and transformers.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "config": ("Config", "ConfigError", "load_config"),
    "loss": ("multi_hot_cross_entropy", "multi_hot_cross_entropy_sum", "slot_weight_vector"),
    "method": ("embed_bags", "split_window", "window_length"),
    "model": ("PRESETS", "TSTModel", "build_model"),
    "schedule": ("Stage", "build_stages", "lr_at", "stage_at"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'superpose' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
