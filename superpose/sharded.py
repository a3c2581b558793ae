"""The sharded checkpoint format: every rank writes its own shards with torch.distributed.checkpoint.

    step-N/.metadata, __R_I.distcp   DCP: model and optimizer state keyed by parameter name, each
                                     rank's own shards (``get_state_dict`` without ``full_state_dict``)
    step-N/trainer.pt                rank 0: step, elapsed, loader position, RNG, last eval, config
    step-N/manifest.json             every file's size and SHA-256 (``superpose.integrity``)

Nothing is gathered, so a synchronous save costs no rank more memory than training does (an
asynchronous one first copies the rank's shards to CPU memory). DCP's metadata records each
tensor's global shape and which slice each file holds, so a checkpoint resumes on any world size
and under any strategy: the reader asks for the slices of its own world and DCP reshards. \
This module writes and reads the files of one directory; where the
directory goes (temporary name, rename, retention) is ``superpose.checkpoint``'s business.

Every rank hashes the shard files it wrote for the manifest, so the read-back that checksums cost
is split over the ranks, each reading its own ~1/N of the checkpoint in parallel, from its page
cache, instead of rank 0 reading all of it.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .integrity import file_entry
from .runs import TRAINER_FILE

_MODEL = "model."  # DCP flattens {"model": {name: tensor}} to "model.<name>"
# DCP warns on every save and load in one process that it assumes one process: it does, on purpose.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def is_sharded(path: Path) -> bool:
    """Is ``path`` a checkpoint directory of this format?"""
    return (Path(path) / TRAINER_FILE).is_file()


class ShardedWriter:
    """Starts the DCP write of one checkpoint; with ``asynchronous``, in the background.

    The asynchronous write runs its collectives on a gloo group of its own, so they never
    interleave with the training loop's on the default group."""

    def __init__(self, asynchronous: bool):
        self.asynchronous = asynchronous
        self.group = dist.new_group(backend="gloo") if asynchronous and dist.is_initialized() else None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint") if asynchronous else None

    def start(self, directory: Path, model: nn.Module, optimizer) -> Future:
        """Collective. A future of this rank's share of the manifest, ``{file: entry}``, once every
        rank's shards and DCP's ``.metadata`` are on disk. A failed write raises from ``result()``
        (DCP's ``CheckpointException`` names the ranks and their errors)."""
        model_state, optimizer_state = get_state_dict(model, optimizer)  # this rank's shards, no copy
        state = {"model": model_state, "optimizer": optimizer_state}
        writer = dcp.FileSystemWriter(directory)  # fsyncs every file
        if not self.asynchronous:
            done = Future()
            try:
                dcp.save(state, storage_writer=writer, no_dist=not dist.is_initialized())
                done.set_result(_hash_share(directory))
            except (Exception, dcp.CheckpointException) as err:  # DCP's is a BaseException
                done.set_exception(err)
            return done
        # async_save copies the state to CPU memory before it returns: training may go on at once
        upload = dcp.async_save(state, storage_writer=writer, process_group=self.group, no_dist=not dist.is_initialized())

        def written() -> dict[str, dict]:
            upload.result()
            return _hash_share(directory)

        return self.executor.submit(written)

    def close(self) -> None:
        """Stop the background writer (after its last write) and free its process group."""
        if self.executor is not None:
            self.executor.shutdown()
            self.executor = None
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None


def _hash_share(directory: Path) -> dict[str, dict]:
    """This rank's share of the checkpoint's files, hashed: the shard files it wrote itself (still
    in its page cache, on its own node), and on rank 0 DCP's ``.metadata``. ``trainer.pt`` was
    hashed as rank 0 wrote it."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = [p for p in Path(directory).iterdir() if p.is_file() and p.name.startswith(f"__{rank}_")]
    if rank == 0:
        mine.append(Path(directory) / ".metadata")
    return {p.name: file_entry(p) for p in mine}


def load_sharded(path: Path, model: nn.Module, optimizer) -> None:
    """Collective: restore model and optimizer in place from the shards of any world size and
    strategy (DCP reads the slices that this world's shards cover)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=Path(path), no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def read_sharded_model(path: Path, skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The full model weights of a sharded checkpoint, in this process alone: DCP's metadata
    gives the keys and global shapes, and only the model's tensors are read (no optimizer state),
    except the keys in ``skip`` (DCP stores a tied weight under each of its names: read it once)."""
    metadata = dcp.FileSystemReader(Path(path)).read_metadata()
    skip = {_MODEL + key for key in skip}
    weights = {key.removeprefix(_MODEL): torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in metadata.state_dict_metadata.items()
               if key.startswith(_MODEL) and key not in skip and isinstance(meta, TensorStorageMetadata)}
    dcp.load({"model": weights}, checkpoint_id=Path(path), no_dist=True)
    return weights
