"""Checkpoints that survive a crash, and the export to an ordinary Hugging Face model directory.

A checkpoint is one file, ``checkpoints/step-NNNNNNNN/state.pt``, holding the full (gathered)
model and optimizer state keyed by parameter name, the trainer state (step, data position, RNG)
and the resolved config, plus ``manifest.json`` (its size and SHA-256, ``superpose.integrity``).
Because it is gathered, a checkpoint written under any strategy and world size resumes under any
other. It is written into a hidden temporary directory, fsynced and renamed into place, so a
directory named ``step-*`` was complete when written; it is verified against its manifest before
it is loaded, so one damaged since is never trained on. Every rank reads it from the run
directory (a filesystem shared by the nodes).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .distributed import Runtime, barrier, broadcast_object, raise_together
from .errors import CheckpointError
from .integrity import MANIFEST, NO_MANIFEST, HashingWriter, problem, write_manifest
from .model import hf_progress_bars
from .runs import STATE_FILE, checkpoint_dirs

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


def select_checkpoint(run_dir: Path, resume: str, runtime: Runtime) -> tuple[Path | None, list[dict]]:
    """The checkpoint to resume from, and the newer ones rejected because they failed verification.

    ``never``: none. ``auto``: the newest that verifies (older ones are tried in turn; an error if
    there are checkpoints but none verifies). A directory: that one, which must verify; one
    without a manifest (written before checksums existed) is loaded with a warning. Collective:
    rank 0 reads and hashes, the others receive its choice."""
    choice, error = None, None
    if runtime.is_main:
        try:
            choice = _select(Path(run_dir), resume)
        except CheckpointError as err:
            error = err
    raise_together(error)
    return broadcast_object(choice)


def _select(run_dir: Path, resume: str) -> tuple[Path | None, list[dict]]:
    if resume == "never":
        return None, []
    if resume != "auto":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise CheckpointError(
                f"--resume {resume}: expected never, auto, or a checkpoint directory "
                f"(one holding {STATE_FILE}, e.g. {run_dir / 'checkpoints' / 'step-00000100'})"
            )
        found = problem(path)
        if found == NO_MANIFEST:
            print(f"superpose: warning: {path} has no {MANIFEST} (written before checkpoints had checksums); "
                  "loading it unverified", file=sys.stderr)
        elif found is not None:
            raise CheckpointError(f"checkpoint {path} failed verification: {found}; pass an older checkpoint directory")
        return path, []
    rejected = []
    for path in reversed(checkpoint_dirs(run_dir)):
        found = problem(path)
        if found is None:
            return path, rejected
        print(f"superpose: warning: checkpoint {path} failed verification ({found}); trying the one before", file=sys.stderr)
        rejected.append({"checkpoint": str(path), "problem": found})
    if rejected:
        raise CheckpointError(
            f"no checkpoint of {run_dir} verifies (newest: {rejected[0]['checkpoint']}: {rejected[0]['problem']}); "
            "move the checkpoints directory away to start over, or restore it from a copy"
        )
    return None, []


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer, trainer_state: dict, keep: int, runtime: Runtime) -> None:
    """Collective: every rank calls it; rank 0 writes."""
    state = {
        "model": get_model_state_dict(model, options=_GATHER),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=_GATHER),
        "trainer": trainer_state,
    }
    if runtime.is_main:
        root = Path(run_dir) / "checkpoints"
        final = root / f"step-{step:08d}"
        tmp = root / f".tmp-step-{step:08d}"
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-step-*"):  # left by a process killed while writing
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
            with open(tmp / STATE_FILE, "wb") as handle:
                writer = HashingWriter(handle)  # the checksum costs no second read of the file
                _save(state, writer)
                handle.flush()
                os.fsync(handle.fileno())
            write_manifest(tmp, {STATE_FILE: writer.entry()})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(root)
        except OSError as err:
            raise _write_failed(tmp, f"checkpoint {final}", err, "earlier checkpoints are intact") from None
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def _write_failed(tmp: Path, what: str, err: Exception, intact: str) -> CheckpointError:
    """Remove the partial ``tmp`` and say what to do; a full disk is the usual cause."""
    shutil.rmtree(tmp, ignore_errors=True)
    return CheckpointError(
        f"could not write {what} ({getattr(err, 'strerror', None) or err}); {intact}: free disk space "
        "(or lower train.keep_checkpoints) and resume with --resume auto"
    )


def _save(state: dict, writer: HashingWriter) -> None:
    try:
        torch.save(state, writer)
    except RuntimeError:  # torch.save's writer hides the errno of a full disk
        if writer.error is None:
            raise
        raise writer.error from None


def load_checkpoint(path: Path, model: nn.Module, optimizer) -> dict:
    """Restore model and optimizer in place (any strategy) and return the trainer state.
    ``path`` comes from ``select_checkpoint``, which verified it."""
    try:
        # mmap: the ranks of one node share the file's pages instead of each holding a copy
        state = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a damaged file can fail in many ways inside the unpickler
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({err}); delete it to resume from the one before, "
            "or pass --resume with an older checkpoint directory"
        ) from None
    try:
        set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    except (KeyError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} does not fit this model ({first}); it was written for another model config") from None
    return state["trainer"]


def export_model(model: nn.Module, lm: nn.Module, tokenizer, eos_id: int, out_dir: Path, info: dict, runtime: Runtime,
                 progress: bool = True) -> None:
    """Write ``out_dir`` as an HF model directory: safetensors weights, config, tokenizer.

    Collective (the weights are gathered from every rank); rank 0 writes into a temporary
    directory and renames it, so ``out_dir`` is either the old export or the new one.
    """
    from transformers import PreTrainedTokenizerFast

    full = get_model_state_dict(model, options=_GATHER)
    if runtime.is_main:
        weights = {name.removeprefix("lm."): tensor for name, tensor in full.items()}
        for alias, name in tied_names(lm).items():  # gathered copies of one tied weight: share it again,
            weights[alias] = weights[name]  # so save_pretrained stores it once, as a single process does
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(f".tmp-{out_dir.name}")
        old = out_dir.with_name(f".old-{out_dir.name}")
        for leftover in (tmp, old):  # from an export that was killed
            shutil.rmtree(leftover, ignore_errors=True)
        lm.config.eos_token_id = lm.config.bos_token_id = eos_id
        if lm.generation_config is not None:
            lm.generation_config.eos_token_id = lm.generation_config.bos_token_id = eos_id
            lm.generation_config.pad_token_id = eos_id
        try:
            with hf_progress_bars(progress):
                lm.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
            eos = tokenizer.id_to_token(eos_id)  # the data's end-of-document token (<|endoftext|>, Llama 3's <|end_of_text|>)
            fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, bos_token=eos, pad_token=eos)
            fast.save_pretrained(tmp)
            (tmp / "superpose.json").write_text(json.dumps(info, indent=2))
            write_manifest(tmp)  # last: `superpose verify` checks the export like a checkpoint
        except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error
            raise _write_failed(tmp, f"the model export {out_dir}", err, "the checkpoints are intact") from None
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def tied_names(module: nn.Module) -> dict[str, str]:
    """``{alias: first name}`` for every parameter registered under more than one name (tied weights)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
