"""A golden loss curve: a tiny TST run's per-step losses, checked in (tests/assets/golden_losses.json).

Any change that moves the numbers (data order, initialisation, the loss, the schedule, the phase
switch) fails here first, even when every behavioural test still passes. One thread (conftest)
and float32; the tolerance absorbs the last bits that differ between CPU kernels (AVX2/AVX-512),
not a change of method. After an intended change, regenerate: ``python tests/test_golden.py``.
"""
import json
import sys
from pathlib import Path

from conftest import tiny_overrides

from superpose.config import load_config
from superpose.train import train

ASSET = Path(__file__).parent / "assets" / "golden_losses.json"
SETTINGS = {"tst.ratio": 0.5, "train.eval_every": 10}  # 20 superposition steps (s = 4), then 20 next-token steps
TOLERANCE = 1e-3  # nats, per step


def losses(data_dir, run_dir) -> dict:
    train(load_config(None, tiny_overrides(data_dir, run_dir, **SETTINGS)))
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {"train": [[r["step"], r["bag_size"], r["loss"]] for r in records if r["kind"] == "train"],
            "val": [[r["step"], r["val_loss"]] for r in records if r["kind"] == "eval"]}


def test_the_golden_loss_curve_is_reproduced(small_data, tmp_path):
    golden, got = json.loads(ASSET.read_text()), losses(small_data, tmp_path / "run")
    for kind in ("train", "val"):
        assert [row[:-1] for row in got[kind]] == [row[:-1] for row in golden[kind]]  # same steps, same stages
        worst = max(abs(a[-1] - b[-1]) for a, b in zip(got[kind], golden[kind]))
        assert worst < TOLERANCE, f"{kind} losses moved by up to {worst:.2e} nats from {ASSET.name}"
    assert golden["train"][19][1] == 4 and golden["train"][20][1] == 1  # both phases are covered


if __name__ == "__main__":  # regenerate the asset (one thread, as the tests run)
    import os
    import tempfile

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from superpose.corpus import shakespeare_files
    from superpose.data import prepare

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "shk"  # the small_data fixture of conftest
        prepare(data, inputs=[str(p) for p in shakespeare_files()[:4]], vocab_size=1024, val_fraction=0.25, progress=False)
        ASSET.write_text(json.dumps(losses(data, Path(tmp) / "run")) + "\n")
    print(f"wrote {ASSET}", file=sys.stderr)
