"""The paired re-evaluation of two runs: both exported final models on the same held-out windows,
so that a final difference can be read against the noise of the validation set."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .runs import Run


def window_losses(model_dir: Path, windows, batch: int = 16) -> np.ndarray:
    """Mean next-token loss of each held-out window ``[n, L+1]`` under an exported HF model."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from .progress import hf_progress_bars

    with hf_progress_bars(False):  # no "Loading weights" bar in the middle of a report
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    out = []
    with torch.no_grad():
        for rows in windows.split(batch):
            logits = model(input_ids=rows[:, :-1]).logits  # [b, L, V]
            loss = F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten(), reduction="none")
            out.append(loss.view(rows.shape[0], -1).mean(dim=1))  # [b]
    return torch.cat(out).numpy()

def paired_final_eval(reference: Run, candidate: Run) -> dict | None:
    """Both exported final models on the same validation windows: the mean per-window loss
    difference and its standard error, which says whether a final difference is above the
    noise of the validation set. None when a model or the data directory is missing."""
    from .data import TokenData, validation_windows

    dirs = [reference.path / "model", candidate.path / "model"]
    if not all((d / "config.json").is_file() for d in dirs) or not (Path(reference.config.data.dir) / "meta.json").is_file():
        return None
    data = TokenData(reference.config.data.dir)
    windows = validation_windows(data.splits["val"], reference.config.data.seq_len, reference.config.train.eval_tokens)
    ref, cand = (window_losses(d, windows) for d in dirs)
    diff = cand - ref
    return {
        "windows": int(diff.size),
        "reference_val_loss": float(ref.mean()),
        "candidate_val_loss": float(cand.mean()),
        "difference": float(diff.mean()),
        "stderr": float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else math.nan,
        "candidate_better_fraction": float((diff < 0).mean()),
    }
