"""superpose: Token Superposition Training for Hugging Face causal LMs.

The method as pure functions (``bag_embeddings``, ``multi_hot_cross_entropy``, ``split_window``),
the stage schedule, and a trainer with its command-line tool ``superpose``.
"""
from .config import Config, ConfigError, load_config
from .method import (
    bag_embeddings,
    embed_bags,
    multi_hot_cross_entropy,
    multi_hot_cross_entropy_sum,
    slot_weights,
    split_window,
    window_length,
)
from .model import PRESETS, TSTModel, build_model
from .schedule import Stage, build_stages, lr_at, stage_at

__all__ = [
    "Config", "ConfigError", "load_config", "bag_embeddings", "embed_bags", "multi_hot_cross_entropy",
    "multi_hot_cross_entropy_sum", "slot_weights", "split_window", "window_length", "PRESETS", "TSTModel",
    "build_model", "Stage", "build_stages", "lr_at", "stage_at",
]
__version__ = "0.1.0"
