import json
import os
from pathlib import Path

# One CPU thread in this process and every process a test starts, set before torch is imported:
# tiny models gain nothing from a second thread, and on a busy 2-core machine it makes a test many
# times slower. An explicit OMP_NUM_THREADS also keeps train.threads = 0 from choosing per machine
# load (tests of that choice set it themselves).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from superpose.corpus import shakespeare_files  # noqa: E402
from superpose.data import prepare  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (DEVELOPERS.md), else the workplace's copy.
SHARED_DATA = next((p / "shared" / "data" for p in ROOT.parents if (p / "shared" / "data").is_dir()), Path("/work/shared/data"))


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """Four Shakespeare plays tokenised with a 1k BPE: a real corpus, prepared in about a second."""
    out = tmp_path_factory.mktemp("data") / "shk"
    files = [str(p) for p in shakespeare_files()[:4]]
    prepare(out, inputs=files, vocab_size=1024, val_fraction=0.25, progress=False)
    return out


def tiny_overrides(data_dir, out_dir, **extra):
    """Overrides for a fast tiny run: L=32, B=8, a phase switch inside a few dozen steps."""
    values = {
        "data.dir": str(data_dir), "data.seq_len": 32, "train.out_dir": str(out_dir), "train.batch_size": 8,
        "train.steps": 40, "train.eval_every": 20, "train.eval_tokens": 4096, "train.log_every": 1,
        "train.progress": False, "train.checkpoint_every": 0, "optim.warmup_steps": 5, "optim.lr": 3e-3,
        "tst.bag_size": 4, "tst.ratio": 0.3,
    }
    values.update(extra)
    return [f"--{k}={json.dumps(v)}" for k, v in values.items()]  # JSON scalars and lists are TOML literals


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny models: on a busy 2-core machine a second thread mostly waits
    for a descheduled peer and makes a 1-second test take 30."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
