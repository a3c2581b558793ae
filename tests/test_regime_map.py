"""scripts/regime_map.py's paper-shape plan and its tables, and scripts/paper_data.py: the pipeline a
GPU session runs (docs/when-tst-pays.md), rehearsed on CPU with tiny runs."""
from __future__ import annotations

import argparse
import csv
import importlib.util
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pytest

from superpose.data import TokenData
from superpose.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def plan():
    return script("regime_map")


@pytest.fixture(scope="module")
def packed(small_data, tmp_path_factory):
    """The small corpus packed as a device call carries it, and unpacked as the device does."""
    paper_data, tmp = script("paper_data"), tmp_path_factory.mktemp("paper")
    paper_data.pack(Path(small_data), tmp / "packed")
    paper_data.unpack(tmp / "packed", tmp / "data")
    return paper_data, tmp / "packed", tmp / "data"


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_packed_shards_unpack_to_the_same_data_and_a_damaged_one_is_refused(small_data, packed, tmp_path):
    paper_data, folder, data = packed
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "meta.json", "tokenizer.json",
                                                        "train-00000.bin.xz", "val-00000.bin.xz"]
    for name in ("train-00000.bin", "val-00000.bin", "meta.json", "tokenizer.json"):
        assert (data / name).read_bytes() == (Path(small_data) / name).read_bytes(), name
    assert TokenData(data).tokens("train") == TokenData(small_data).tokens("train")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for p in folder.iterdir():
        (damaged / p.name).write_bytes(p.read_bytes())
    plain = bytearray(lzma.decompress((folder / "val-00000.bin.xz").read_bytes()))
    plain[0] ^= 1  # one token changed: the shard no longer hashes to what was packed
    (damaged / "val-00000.bin.xz").write_bytes(lzma.compress(bytes(plain)))
    with pytest.raises(DataError, match="does not unpack to the shard that was packed"):
        paper_data.unpack(damaged, tmp_path / "out")
    assert not (tmp_path / "out" / "val-00000.bin").exists() and not (tmp_path / "out" / "meta.json").exists()


def test_the_paper_plan_continues_the_map_and_repeats_seeds_only_near_zero(plan, small_data, capsys):
    """Runs in the committed rows are skipped; an arm whose seed-0 gap lies within 2 seed s.d. of zero
    gets seeds 1-2 first (with their baselines), one far from zero does not; then the new points."""
    args = argparse.Namespace(device="cuda", data=str(small_data))
    (first, *later) = plan.PAPER
    name = plan.point_name(first[0], first[1], first[2], "cuda", first[3])
    gaps = {"s6-r0.3": 0.30, "s4-r0.3": 0.01, "output-s2-r0.2": -0.05}  # noise 0.03: only s4 and output-only are near
    runs = [{"point": name, "seed": 0, "arm": "baseline", "val_loss": 4.0}]
    runs += [{"point": name, "seed": 0, "arm": arm, "val_loss": 4.0 + gap} for arm, gap in gaps.items()]
    runs += [{"point": name, "seed": 1, "arm": "baseline", "val_loss": 4.1},
             {"point": name, "seed": 1, "arm": "s4-r0.3", "val_loss": 4.1}]
    seeds = [{"point": "medium-n1000-b16-cuda", "arm": "a", "gap_sd": 0.03},
             {"point": "medium-n1000-b16", "arm": "a", "gap_sd": 0.5}]
    todo = plan.paper_todo(args, runs, seeds)
    assert todo[:3] == [(first, 1, ["output-s2-r0.2"], False), (first, 2, ["s4-r0.3", "output-s2-r0.2"], True),
                        (later[0], 0, plan.PAPER_ARMS, True)]
    assert [key for key, *_ in todo[2:]] == later
    # the small corpus is far smaller than a paper-shape baseline reads: each point says so
    assert "the baseline reads" in capsys.readouterr().err
    assert plan.paper_todo(args, [], [])[0] == (first, 0, plan.PAPER_ARMS, True)


def test_seeds_pair_with_their_baselines_across_sessions(plan):
    """The seeds table comes from the per-run rows: seeds tabulated in different sessions pair with
    the baseline of the same seed; a seed without its baseline does not count."""
    runs = [{"point": "p", "seed": 0, "arm": "baseline", "val_loss": 5.0},
            {"point": "p", "seed": 0, "arm": "a", "val_loss": 5.02},
            {"point": "p", "seed": 1, "arm": "baseline", "val_loss": 5.1},
            {"point": "p", "seed": 1, "arm": "a", "val_loss": 5.106},
            {"point": "p", "seed": 2, "arm": "a", "val_loss": 4.0}]
    (row,) = plan.seed_rows(runs)
    assert (row["point"], row["arm"], row["seeds"], row["gaps"]) == ("p", "a", 2, "+0.020 +0.006")
    assert row["gap_mean"] == pytest.approx(0.013) and row["gap_sd"] == pytest.approx(0.0099, abs=1e-4)


def test_the_paper_plan_rehearsed_on_cpu(plan, packed, tmp_path, monkeypatch):
    """The device plan's pipeline end to end with tiny runs, in this process: the unpacked data, the
    first point's 4 runs (1,024-token windows cut to 32 by --set), and the merged tables, written to
    --tables-out only (--set runs are not measurements: the committed tables stay as they are)."""
    _, _, data = packed
    committed = {p: p.read_bytes() for p in (ROOT / "superpose" / "regime_data").glob("*.csv")}
    out = tmp_path / "tables"
    first = plan.point_name(*plan.PAPER[0][:3], "cpu", plan.PAPER[0][3])
    monkeypatch.setattr(sys, "argv", [
        "regime_map.py", "--plan", "paper", "--device", "cpu", "--data", str(data), "--root", str(tmp_path / "runs"),
        "--only", f"{first}/", "--eval-tokens", "256", "--tables-out", str(out), "--set", "model.preset=tiny",
        "--set", "train.steps=4", "--set", "optim.warmup_steps=1", "--set", "train.batch_size=2", "--set", "data.seq_len=32"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    plan.main()
    ran = [r for r in rows(out / "runs.csv") if r["point"] == first]
    assert sorted(r["arm"] for r in ran) == sorted(["baseline", *plan.PAPER_ARMS])
    tokens = TokenData(data).tokens("train")
    by_arm = {r["arm"]: r for r in ran}
    assert int(by_arm["baseline"]["tokens_seen"]) == 4 * 2 * 33
    # phase 1 of s=6, r=0.3 is round(0.3 * 4) = 1 step of windows 6 times as long: that arm reads the most
    assert int(by_arm["s6-r0.3"]["tokens_seen"]) == 2 * 6 * 33 + 3 * 2 * 33
    assert float(by_arm["s6-r0.3"]["epochs"]) == pytest.approx((2 * 6 * 33 + 3 * 2 * 33) / tokens, rel=1e-3)
    # the row has the shape the runs had (--set made them 4 steps of 2 x 32 tokens), beside the committed rows
    (row,) = [r for r in rows(out / "map.csv")
              if (r["preset"], r["steps"], r["batch"], r["seq_len"]) == (plan.PAPER[0][0], "4", "2", "32")]
    assert float(row["max_epochs"]) == float(by_arm["s6-r0.3"]["epochs"]) > float(row["epochs"])
    for arm in plan.PAPER_ARMS:
        assert float(row[arm]) == pytest.approx(float(by_arm[arm]["val_loss"]) - float(by_arm["baseline"]["val_loss"]), abs=1e-4)
    assert {p: p.read_bytes() for p in (ROOT / "superpose" / "regime_data").glob("*.csv")} == committed


@pytest.mark.slow
def test_the_paper_plan_rehearsed_with_shards_stops_at_the_budget_with_one_line(packed, tmp_path):
    """As on the GPU: shards side by side, the parent stopping the runs still going at the budget;
    each stopped run prints one line (no traceback) and the tables are still written."""
    _, _, data = packed
    out = tmp_path / "tables"
    run = subprocess.run([
        sys.executable, str(ROOT / "scripts" / "regime_map.py"), "--plan", "paper", "--device", "cpu", "--data", str(data),
        "--root", str(tmp_path / "runs"), "--parallel", "2", "--budget-s", "90", "--eval-tokens", "256", "--tables-out", str(out),
        "--set", "model.preset=tiny", "--set", "train.steps=5000", "--set", "optim.warmup_steps=1", "--set", "train.batch_size=2",
        "--set", "data.seq_len=32"], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    stopped = [line for line in run.stderr.splitlines() if "stopped at step" in line]
    # a shard still importing at the budget ends without a run to stop (on a loaded machine): at least one
    assert stopped and all("the plan resumes it when started again" in line for line in stopped)
    assert (out / "tables.md").is_file() and (out / "map.csv").is_file()
