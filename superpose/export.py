"""The export of a trained model to an ordinary Hugging Face model directory.

An export is written whole beside its final place and swapped in (``superpose.files.StagedDir``):
``OUT_DIR`` is always either the previous export or the new one, a kill between the two renames
leaves the old one as ``.old-OUT_DIR`` (put back by the next export, never deleted first), and a
full disk leaves no temporary directory. ``OUT_DIR`` must be new, empty or an export (``--force``
replaces one); a run directory, a checkout or a user's files are refused. The model is paired
with the tokenizer of the data it was trained on: an export whose run's data directory now holds
other data is refused (``allow_data_change`` overrides, and ``superpose.json`` records it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from transformers import AutoModelForCausalLM

from .checkpoint import _GATHER, _read, verified, write_failed
from .config import Config, config_from_dict
from .data import TokenData, check_same_data
from .distributed import Runtime, barrier
from .errors import CheckpointError
from .files import StagedDir
from .integrity import write_manifest
from .model import model_config
from .progress import hf_progress_bars
from .runs import CHECKPOINTS, STATE_FILE, TRAINER_FILE
from .schedule import build_stages
from .sharded import is_sharded, read_sharded_model

_SHARD_SIZE = "1GB"  # safetensors files of an export: one is in memory twice while it is written
INFO_FILE = "superpose.json"


def export_model(model: nn.Module, lm: nn.Module, tokenizer, eos_id: int, out_dir: Path, info: dict, runtime: Runtime) -> None:
    """Write ``out_dir`` (the run's own ``model/``, replaced) from the model in training.
    Collective: the weights are gathered from every rank; rank 0 writes."""
    full = get_model_state_dict(model, options=_GATHER)
    if runtime.is_main:
        write_model_dir(full, lm, tokenizer, eos_id, out_dir, info, force=True,
                        advice="free disk space and resume with --resume auto (a finished run exports again)")
    barrier()


def export_checkpoint(path: Path, out_dir: Path, force: bool = False, allow_data_change: bool = False) -> dict:
    """``superpose export``: the model of one checkpoint (either format, any world size) as an HF
    model directory, in this process alone. No optimizer state is loaded (verifying the checkpoint
    reads every file once) and the weights are in memory once, on CPU: the model is built on the
    meta device and the checkpoint's tensors are read into place (DCP: the model's keys only, a
    tied weight once; gathered: memory-mapped). The tokenizer comes from the run's prepared data
    directory, which must still hold the data the checkpoint was trained on. Returns ``superpose.json``."""
    path, out_dir = Path(path), Path(out_dir)
    verified(path, "CHECKPOINT_DIR", Path("RUN") / CHECKPOINTS / "step-00000100")
    state = None if is_sharded(path) else _read(path / STATE_FILE)  # its "optimizer" stays on disk, unread
    trainer = _read(path / TRAINER_FILE) if state is None else state["trainer"]
    cfg = config_from_dict(trainer["config"])
    if not (Path(cfg.data.dir) / "meta.json").is_file():
        raise CheckpointError(f"the export takes its tokenizer from the run's prepared data, {cfg.data.dir}, which is not "
                              "there; run superpose export from where the run was trained (data.dir is relative to it)")
    data = TokenData(Path(cfg.data.dir))
    change = check_same_data(trainer.get("data"), data, f"checkpoint {path}", "--allow-data-change", allow_data_change)
    with torch.device("meta"):  # the architecture only: no memory, no random draws
        lm = AutoModelForCausalLM.from_config(model_config(cfg.model.preset, data.vocab_size), dtype=torch.float32)
    StagedDir(out_dir, "model", "OUT_DIR", force).check()  # before the weights are read
    if state is None:  # a tied weight is read once, under its first name; write_model_dir ties it again
        weights = read_sharded_model(path, skip=["lm." + alias for alias in tied_names(lm)])
    else:
        weights = state["model"]
    info = {**export_info(trainer, cfg), "checkpoint": str(path), **({"data_changed": change} if change else {})}
    write_model_dir(weights, lm, data.tokenizer(), data.eos_id, out_dir, info, force)
    return info


def export_info(trainer: dict, cfg: Config) -> dict:
    """``superpose.json`` of an exported model, from the trainer state of its step (also the run's
    ``end`` record): steps, the last validation, data tokens, training seconds, stages, and the
    identity of the data it was trained on."""
    last_eval = trainer.get("last_eval") or {}
    return {"steps": trainer["step"], "val_loss": last_eval.get("val_loss"), "val_bpb": last_eval.get("val_bpb"),
            "tokens_seen": trainer["loader"]["tokens_seen"], "elapsed": trainer["elapsed"],
            "stages": [vars(s) for s in build_stages(cfg.tst, cfg.train.steps)],
            **({"data": trainer["data"]} if trainer.get("data") else {})}


def write_model_dir(state: dict[str, torch.Tensor], lm: nn.Module, tokenizer, eos_id: int, out_dir: Path, info: dict,
                    force: bool = False, advice: str = "free disk space and export again") -> None:
    """Write ``out_dir`` as an HF model directory: safetensors weights, config, tokenizer, ``superpose.json``
    and a manifest, from ``state`` (the trainer's parameter names, ``lm.`` first), which it consumes.

    ``save_pretrained`` drops each safetensors file's tensors once the file is written, so the
    weights plus one file (``_SHARD_SIZE``) are the most that is in memory. ``advice`` says what
    to do after a full disk. Its files are made
    readable as the user's umask says (safetensors writes through a private temporary file)."""
    from transformers import PreTrainedTokenizerFast

    weights = {name.removeprefix("lm."): state.pop(name) for name in list(state)}
    for alias, name in tied_names(lm).items():  # gathered copies of one tied weight: share it again,
        weights[alias] = weights[name]  # so save_pretrained stores it once, as a single process does
    lm.config.eos_token_id = lm.config.bos_token_id = eos_id
    if lm.generation_config is not None:
        lm.generation_config.eos_token_id = lm.generation_config.bos_token_id = eos_id
        lm.generation_config.pad_token_id = eos_id
    out_dir = Path(out_dir)
    staged = StagedDir(out_dir, "model", "OUT_DIR", force)
    with staged as tmp, hf_progress_bars(False):
        try:
            lm.save_pretrained(tmp, state_dict=weights, safe_serialization=True, max_shard_size=_SHARD_SIZE)
            eos = tokenizer.id_to_token(eos_id)  # the data's end-of-document token (<|endoftext|>, Llama 3's <|end_of_text|>)
            fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, bos_token=eos, pad_token=eos)
            fast.save_pretrained(tmp)
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
            _umask_modes(tmp)
            write_manifest(tmp)  # last: `superpose verify` checks the export like a checkpoint
        except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error
            raise write_failed(tmp, f"the model export {out_dir}", err,
                               "the checkpoints are intact, and so is any previous export", advice) from None
        staged.publish()


def _umask_modes(directory: Path) -> None:
    """Give every file the mode a plain ``open`` would (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for file in directory.iterdir():
        if file.is_file():
            file.chmod(0o666 & ~umask)


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
