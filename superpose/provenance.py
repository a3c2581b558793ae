"""What produced a run's numbers: the code, the libraries and the machine, recorded in every run's
``start`` record and in a report's ``summary.json``.

Two runs of one config agree to the last digit only on the same code, library versions, device,
CPU instruction set and thread count: the CPU kernels torch picks (AVX2, AVX-512, ...) and the
way a sum is split over threads change the rounding, which a few hundred steps amplify. So a
result that does not reproduce can be traced to the difference.
"""
from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

from . import __version__

LIBRARIES = ("torch", "transformers", "tokenizers")


def git_state(directory: Path = Path(__file__).resolve().parent) -> dict | None:
    """The commit of the git checkout the package runs from and whether its tree had changes; None
    when it runs from an installed copy (or git is not there)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    try:
        root = Path(git("rev-parse", "--show-toplevel"))
        if not (root / "pyproject.toml").is_file() or directory.parent != root:
            return None  # a git repository around an installed copy is not superpose's
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device=None, world_size: int = 1) -> dict:
    """Versions, the git state, the device, the CPU's instruction set used by torch's kernels, the
    thread count and the world size of this process."""
    import torch

    libraries = {}
    for name in LIBRARIES:
        try:
            libraries[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            libraries[name] = None
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = cpu_name()
    return {
        "superpose": __version__,
        "git": git_state(),
        "python": platform.python_version(),
        **libraries,
        "device": device.type,
        "device_name": device_name,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "world_size": world_size,
    }
