"""superpose.provenance: what produced a run's numbers, as recorded in its start record."""
from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

import pytest
import torch

import superpose
from superpose.provenance import git_state, provenance

ROOT = Path(__file__).resolve().parents[1]


def test_provenance_names_the_versions_the_kernels_and_the_threads():
    record = provenance("cpu", world_size=3)
    assert record["superpose"] == superpose.__version__
    for name in ("torch", "transformers", "tokenizers"):
        assert record[name] == importlib.metadata.version(name)
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert (record["device"], record["threads"], record["world_size"]) == ("cpu", torch.get_num_threads(), 3)
    assert record["device_name"]


def test_git_state_is_the_checkouts_commit_or_none_outside_one(tmp_path):
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("the tests do not run from a git checkout")
    state = git_state(ROOT / "superpose")
    assert state["commit"] == head.stdout.strip() and isinstance(state["dirty"], bool)
    assert git_state(tmp_path) is None
