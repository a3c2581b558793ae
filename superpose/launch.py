"""What the launcher (torchrun) tells this process: its rank, the world size and this machine's
share of it. Torch-free, so the CLI can ask "am I rank 0?" before torch is imported; every other
place asks here too (``distributed.init_runtime`` builds its ``Runtime`` from these)."""
from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """torchrun's processes on this machine (they share its cores)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0: the one process that writes files and prints (every rank trains)."""
    return rank() == 0
