"""bench/gpu_check.py, the one-call device check of issue #13, kept from rotting between GPU loans:
``--smoke`` runs every section on CPU at toy sizes, and its float64 references must agree."""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["peak", "correct", "compiled", "step", "mce", "chunk", "moe"]  # the compiled defaults first after correct


def test_smoke_runs_every_section_and_its_references_agree(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(results["sections"]) == SECTIONS and not results["skipped"]
    errors = {name: s["error"] for name, s in results["sections"].items() if "error" in s}
    assert not errors, errors
    correct = results["sections"]["correct"]
    assert len(correct["kernels"]) == 14 and all(k["ok"] for k in correct["kernels"]), correct["kernels"]
    assert [r["name"] for r in correct["runs"]["comparisons"]] == ["bf16 vs fp32", "bf16+compile vs bf16",
                                                                   "fp32+fused_adamw vs fp32"]
    assert all(r["ok"] for r in correct["runs"]["comparisons"]), correct["runs"]["comparisons"]
    losses = correct["runs"]["losses"]["fp32"]
    assert len(losses) == 30 and losses[-1] < losses[0] - 0.3  # the runs train, through the switch at step 15
    compiled, step = results["sections"]["compiled"], results["sections"]["step"]
    assert set(compiled["variants"]) == {"s=6 compiled", "s=1 compiled", "plain"}
    assert {r["kind"] for r in compiled["ratios"]} == {"phase", "plain"}
    assert set(compiled["compile_s"]) == {"s=1", "s=6"} and compiled["graphs"] == 1  # the switch compiled nothing new
    assert set(step["variants"]) == {"s=6", "s=1", "plain"} and {r["kind"] for r in step["ratios"]} == {"phase", "plain"}
    for section in (compiled, step):  # each variant at the fastest micro-batch of its scan
        for name, v in section["variants"].items():
            rates = section["scan"][name]
            assert set(rates) == {"1", "2"} and v["batch"] == int(max(rates, key=rates.get))
            assert v["tokens_per_s"] > 0 and v["mfu"] > 0
    assert step["data"]["host_s_per_step"] > 0
    assert step["host_syncs"] == {"s=6": None, "s=1": None}  # ran unwatched: sync debug mode is CUDA's
    rows = results["sections"]["mce"]["rows"]
    assert [row["bags"] for row in rows] == [1, 6, 16]
    assert all({"one_ce", "default", "eager"} <= set(row["variants"]) for row in rows) and "compiled" in rows[1]["variants"]
    assert "6 * n_layers * L * d_attn" in results["mfu"]  # the MFU formula, attention counted, in the JSON
    goals = {g["goal"].split(":")[0] for g in results["goals"]}
    assert {"correct", "step", "compiled", "moe", "mce s=1", "mce s=6", "mce s=16", "chunk"} <= goals
    lines = done.stdout.splitlines()
    assert any(line.startswith(("PASS", "FAIL")) and "our phase-2 step with the defaults" in line for line in lines)
    assert done.stdout.rstrip().splitlines()[-1].startswith("wrote ")  # the table is the last thing printed


def test_travelling_wheels_import_from_the_zip():
    """The device image lacks tomli-w: the script imports it from bench/wheels (a pure-Python zip)."""
    wheels = sorted((ROOT / "bench" / "wheels").glob("*.whl"))
    assert [w.name.split("-")[0] for w in wheels] == ["tomli_w"]
    assert all(zipfile.is_zipfile(w) for w in wheels)
    code = "import sys; sys.path.insert(0, sys.argv[1]); import tomli_w; print(tomli_w.__file__); print(tomli_w.dumps({'a': 1}))"
    done = subprocess.run([sys.executable, "-c", code, str(wheels[0])], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith(str(wheels[0])) and "a = 1" in done.stdout
