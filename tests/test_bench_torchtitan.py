"""bench/bench_torchtitan.py and superpose.torchtitan.train, the prepared GPU check of issue #27, kept from
rotting between GPU loans: the import check and, slow, the five arms of ``--smoke`` on CPU."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchtitan", reason="torchtitan is not installed (pip install 'superpose[torchtitan]')")

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_check_says_torchtitan_imports_with_the_shims_this_torch_needs():
    # what this torch has, asked of a fresh interpreter (one where no shim was applied)
    probe = ("import torch.distributed as d, torch.distributed.fsdp as f; "
             "print(hasattr(d, 'set_timeout'), hasattr(f, 'DataParallelMeshDims'))")
    has = subprocess.run([sys.executable, "-c", probe], env=ENV, capture_output=True, text=True, timeout=120).stdout.split()
    done = subprocess.run([sys.executable, "-m", "superpose.torchtitan.train", "--check"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    line = done.stdout.strip()
    assert line.startswith("torchtitan 0.3.0 imports on torch "), line
    shims = re.search(r"\(shims: (.*)\)", line).group(1).split(", ")
    assert ("dist.set_timeout" in shims) == (has[0] == "False") and ("fsdp.DataParallelMeshDims" in shims) == (has[1] == "False")


@pytest.mark.slow
def test_smoke_times_every_arm_on_one_model(small_data, tmp_path):
    done = subprocess.run([sys.executable, "bench/bench_torchtitan.py", "--data", str(small_data), "--out", str(tmp_path),
                           "--smoke"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "bench_torchtitan.json").read_text())["results"]
    assert list(results) == ["titan-tst", "titan-stock", "superpose-tst", "titan-ntp", "superpose-ntp"]
    assert all(r["step_seconds"] > 0 and r["positions_per_s"] > 0 for r in results.values()), results
    # superpose's arms train torchtitan's model size (its vocabulary, not the data's): the same parameter count
    titan_log = (tmp_path / "titan-tst.log").read_text()
    titan_size = int(re.search(r"size: ([\d,]+) total parameters", titan_log).group(1).replace(",", ""))
    start = json.loads((tmp_path / "superpose-tst" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["kind"] == "start" and start["parameters"] == titan_size
    assert "validate step" not in titan_log  # no held-out validation in the timed runs
