"""Data: corpus -> tokenizer -> token shards on disk -> windows of the length each stage needs.

``prepare`` writes a directory with ``tokenizer.json``, ``meta.json`` and uint16/uint32 shards
(``train-00000.bin``, ``val-00000.bin``, ...), an end-of-document token after every document.
``WindowLoader`` draws a batch of windows for step t from a generator seeded by (seed, t), so the
data order is a pure function of the seed: identical across arms of a comparison, across ranks,
and across a resume. Windows are sampled uniformly with replacement, as nanoGPT does.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .config import Config, PrepareOptions, check_prepare_options
from .corpus import TABLE_SUFFIXES, DocumentCorpus, expand_inputs, shakespeare_files
from .distributed import Runtime, barrier
from .errors import DataError
from .files import StagedDir, no_space
from .integrity import ALGORITHM, HashingWriter, file_entry, write_manifest

EOS = "<|endoftext|>"
# End-of-document tokens of other tokenizers, tried after EOS: Llama 3's (the paper's tokenizer).
OTHER_EOS = ("<|end_of_text|>",)
SHARD_TOKENS = 1 << 28  # tokens per shard file (512 MiB at uint16)


# ---------------------------------------------------------------------------- tokenizers


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2 style) with ``<|endoftext|>`` as its only special token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A ``tokenizer.json`` file, a directory holding one, or a vocab.json + merges.txt directory."""
    path = Path(path)
    try:
        if path.is_file():
            return Tokenizer.from_file(str(path))
        if (path / "tokenizer.json").is_file():
            return Tokenizer.from_file(str(path / "tokenizer.json"))
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            tokenizer = Tokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
            tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tokenizer.decoder = decoders.ByteLevel()
            return tokenizer
    except Exception as err:  # tokenizers raises plain Exception on malformed files
        raise DataError(f"tokenizer {path} cannot be loaded: {err}") from None
    raise DataError(f"tokenizer {path} not found: give a tokenizer.json or a directory with vocab.json + merges.txt")


def find_eos(tokenizer: Tokenizer) -> int | None:
    """The id of the token that closes every document: ``EOS``, else the first of ``OTHER_EOS`` it has."""
    return next((tokenizer.token_to_id(t) for t in (EOS, *OTHER_EOS) if tokenizer.token_to_id(t) is not None), None)


def eos_id(tokenizer: Tokenizer) -> int:
    token_id = find_eos(tokenizer)
    if token_id is None:
        raise DataError(f"tokenizer has none of {', '.join((EOS, *OTHER_EOS))} to separate documents")
    return token_id


# ---------------------------------------------------------------------------- prepare


def prepare(
    out_dir: str | Path,
    inputs: list[str] | None = None,
    valid_inputs: list[str] | None = None,
    tokenizer: str | None = None,
    vocab_size: int = PrepareOptions.vocab_size,
    text_field: str = PrepareOptions.text_field,
    val_fraction: float = PrepareOptions.val_fraction,
    seed: int = PrepareOptions.seed,
    progress: bool = True,
    num_proc: int = PrepareOptions.num_proc,
    force: bool = False,
) -> dict:
    """Tokenise a corpus into ``out_dir``; returns the metadata written to ``meta.json``.

    ``inputs=None`` uses the embedded Shakespeare corpus. Without ``valid_inputs`` a seeded
    ``val_fraction`` of the documents (at least one) is held out, whole documents only.
    Parquet/Arrow inputs, or ``num_proc > 1``, read and tokenise through Hugging Face
    ``datasets`` (``num_proc`` processes); otherwise documents are read here and tokenised
    by the tokenizer's own threads.

    ``out_dir`` must be new, empty or prepared data (``force`` replaces it). It is written whole
    beside its place, locked against a second ``prepare``, and swapped in complete
    (``superpose.files.StagedDir``), with ``manifest.json`` (every file's SHA-256) for ``verify``.
    """
    check_prepare_options(val_fraction, vocab_size, num_proc, tokenizer)
    out = Path(out_dir)
    files = shakespeare_files() if inputs is None else expand_inputs(inputs)
    valid_files = expand_inputs(valid_inputs) if valid_inputs else []
    if not files:
        raise DataError("no input files")
    staged = StagedDir(out, "data", "output directory", force)
    with staged as tmp:
        if num_proc > 1 or any(p.name.endswith(TABLE_SUFFIXES) for p in files + valid_files):
            from .hf_datasets import DatasetCorpus

            corpus = DatasetCorpus(files, valid_files, text_field, val_fraction, seed, num_proc, tmp, progress)
        else:
            corpus = DocumentCorpus(files, valid_files, text_field, val_fraction, seed)
        try:
            tok = load_tokenizer(tokenizer) if tokenizer else train_tokenizer(corpus.texts("train"), vocab_size)
            eos = eos_id(tok)
            vocab = tok.get_vocab_size()
            dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
            tok.save(str(tmp / "tokenizer.json"))
            splits = {split: write_shards(tmp, split, corpus.encode(split, tok, eos, progress), dtype)
                      for split in ("train", "val")}
            meta = {
                "format": 1,
                "vocab_size": vocab,
                "eos_id": eos,
                "dtype": np.dtype(dtype).name,
                "tokenizer": "tokenizer.json",
                "sources": [str(f) for f in files + valid_files],
                "splits": splits,
                "non_utf8_documents_replaced": corpus.replaced,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            write_manifest(tmp, {s["file"]: {"size": s["tokens"] * np.dtype(dtype).itemsize, ALGORITHM: s[ALGORITHM]}
                                 for split in splits.values() for s in split["shards"]})
        except OSError as err:
            if not no_space(err):
                raise
            raise DataError(f"could not write the prepared data {out} ({err.strerror}: no space left, or a quota or "
                            f"file-size limit); nothing was left behind; free disk space and prepare again") from None
        finally:
            corpus.close()
        staged.publish()
    return meta


def write_shards(out: Path, split: str, documents: Iterator[tuple[np.ndarray, int]], dtype) -> dict:
    """Concatenate tokenised documents into ``{split}-NNNNN.bin`` shards of at most SHARD_TOKENS, each
    listed with its token count and SHA-256."""
    shards, buffer, buffered = [], [], 0
    total_tokens, total_bytes, count = 0, 0, 0

    def flush():
        nonlocal buffer, buffered
        name = f"{split}-{len(shards):05d}.bin"
        array = np.ascontiguousarray(np.concatenate(buffer).astype(dtype))
        with open(out / name, "wb") as handle:
            writer = HashingWriter(handle)  # the checksum costs no second read; a full disk keeps its errno
            writer.write(memoryview(array).cast("B"))  # fsynced when the directory is published
        shards.append({"file": name, "tokens": int(array.size), ALGORITHM: writer.entry()[ALGORITHM]})
        buffer, buffered = [], 0

    for ids, n_bytes in documents:
        buffer.append(ids)
        buffered += ids.size
        total_tokens += ids.size
        total_bytes += n_bytes
        count += 1
        if buffered >= SHARD_TOKENS:
            flush()
    if buffer:
        flush()
    if not count:
        raise DataError(f"the {split} split holds no text")
    return {
        "shards": shards,
        "tokens": total_tokens,
        "bytes": total_bytes,
        "documents": count,
        "bytes_per_token": total_bytes / total_tokens,
    }


# ---------------------------------------------------------------------------- loading


class TokenData:
    """A prepared directory: its metadata, tokenizer and memory-mapped shards."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self._identity: dict | None = None  # identity(), computed on first use
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{self.dir} is not a prepared data directory (no meta.json); run `superpose prepare`")
        try:
            self.meta = json.loads(meta_path.read_text())
            self.vocab_size = int(self.meta["vocab_size"])
            self.eos_id = int(self.meta["eos_id"])
            dtype = np.dtype(self.meta["dtype"])
            self.splits = {
                split: [self._open(shard, dtype) for shard in self.meta["splits"][split]["shards"]]
                for split in ("train", "val")
            }
        except DataError:
            raise
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
            raise DataError(f"{meta_path} is malformed ({err!r}); prepare the directory again") from None
        for split, shards in self.splits.items():
            if not shards:
                raise DataError(f"{meta_path} lists no {split} shards; prepare the directory again")
        tok = self.tokenizer()
        if (tok.get_vocab_size(), find_eos(tok)) != (self.vocab_size, self.eos_id):
            raise DataError(
                f"{self.dir / self.meta['tokenizer']} has {tok.get_vocab_size()} tokens (end of document = {find_eos(tok)}) but "
                f"the shards were written with {self.vocab_size} (end of document = {self.eos_id}): the tokenizer does not "
                "belong to this data; prepare the directory again"
            )

    def _open(self, shard: dict, dtype) -> np.ndarray:
        path = self.dir / shard["file"]
        expected = int(shard["tokens"]) * dtype.itemsize
        found = path.stat().st_size if path.is_file() else None
        if found != expected:
            state = "missing" if found is None else f"{found} bytes, expected {expected}"
            raise DataError(f"shard {path} is missing, truncated or too long ({state}); prepare the directory again")
        if expected == 0:
            raise DataError(f"shard {path} is empty; prepare the directory again")
        return np.memmap(path, dtype=dtype, mode="r")

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.dir / self.meta["tokenizer"])

    def longest(self, split: str) -> int:
        """Tokens of the split's longest shard: no window can be longer (windows never cross shards)."""
        return max(shard.size for shard in self.splits[split])

    def identity(self) -> dict:
        """What binds a run to this data (``check_same_data``): the SHA-256 of the tokenizer file and
        of the list of shards with their checksums (data prepared before checksums: their names
        and token counts). Hashed once per ``TokenData``: the run and the resume check both ask."""
        if self._identity is None:
            shards = [[s["file"], s.get(ALGORITHM, s["tokens"])]
                      for split in ("train", "val") for s in self.meta["splits"][split]["shards"]]
            self._identity = {"tokenizer_sha256": file_entry(self.dir / self.meta["tokenizer"])[ALGORITHM],
                              "shards_sha256": hashlib.sha256(json.dumps(shards).encode()).hexdigest()}
        return self._identity

    def tokens(self, split: str) -> int:
        return sum(s.size for s in self.splits[split])

    def bytes_per_token(self, split: str) -> float:
        return float(self.meta["splits"][split]["bytes_per_token"])


class WindowLoader:
    """Serves each step's windows, ``[local batch, W]`` int64, from one split.

    The global batch of step t is drawn from ``numpy.random.default_rng([seed, t])``; rank r of
    n takes rows ``[r*B/n, (r+1)*B/n)``. A window never crosses a shard boundary. The state is
    the number of data tokens served so far (the batch itself needs only the step).
    """

    def __init__(self, shards: list[np.ndarray], global_batch: int, seed: int, rank: int = 0, world: int = 1,
                 vocab_size: int | None = None):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world}")
        self.shards, self.global_batch, self.seed, self.vocab_size = shards, global_batch, seed, vocab_size
        self.rank, self.world = rank, world
        self.tokens_seen = 0

    def batch(self, step: int, width: int) -> torch.Tensor:
        starts_per_shard = np.array([max(0, s.size - width + 1) for s in self.shards])
        total = int(starts_per_shard.sum())
        if total == 0:
            raise DataError(
                f"a window of {width} tokens is longer than every shard (largest: "
                f"{max(s.size for s in self.shards)} tokens); use more data or a smaller seq_len/bag_size"
            )
        rng = np.random.default_rng([self.seed, step])
        flat = rng.integers(0, total, size=self.global_batch)  # [B] global window starts
        per_rank = self.global_batch // self.world
        flat = flat[self.rank * per_rank : (self.rank + 1) * per_rank]
        bounds = np.cumsum(starts_per_shard)
        shard_ids = np.searchsorted(bounds, flat, side="right")
        offsets = flat - (bounds[shard_ids] - starts_per_shard[shard_ids])
        rows = np.stack([np.asarray(self.shards[i][o : o + width], dtype=np.int64) for i, o in zip(shard_ids, offsets)])
        check_token_ids(rows, [(self.shards[i], o) for i, o in zip(shard_ids, offsets)], self.vocab_size)
        self.tokens_seen += self.global_batch * width
        return torch.from_numpy(rows)

    def state_dict(self) -> dict:
        return {"tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict) -> None:
        self.tokens_seen = int(state["tokens_seen"])


def ensure_data(cfg: Config, runtime: Runtime, resuming: bool = False) -> TokenData:
    """Open ``data.dir``, preparing the embedded corpus there on first use (rank 0 only): never for
    a run that has checkpoints (``resuming``), which continues only on the data it was trained on."""
    directory = Path(cfg.data.dir)
    if resuming and not (directory / "meta.json").is_file():
        raise DataError(f"data.dir {directory}, the data this run was trained on, is not there (no meta.json); restore it, "
                        "or prepare the same data there again (the resume checks that it is the same)")
    if not (directory / "meta.json").is_file() and cfg.data.corpus:  # the embedded corpus (validate allows no other)
        if runtime.is_main:
            print(f"preparing the embedded Shakespeare corpus in {directory} ...", file=sys.stderr)
            prepare(directory, vocab_size=cfg.data.vocab_size, progress=cfg.train.progress)
        barrier()
    return TokenData(directory)


def check_same_data(saved: dict | None, data: TokenData, what: str, flag: str, allow: bool) -> dict | None:
    """Refuse to continue or export ``what`` (trained on the data ``saved`` identifies) with other
    data: the tokenizer would not be the one its weights learned, or the token stream would change
    under the run. ``allow`` (the user's ``flag``) lets it through; the change is returned to be
    recorded. A checkpoint written before data identities existed (``saved`` None) is not checked."""
    current = data.identity()
    if saved is None or saved == current:
        return None
    parts = [name for key, name in (("tokenizer_sha256", "tokenizer"), ("shards_sha256", "shards"))
             if saved.get(key) != current[key]]
    if not allow:
        raise DataError(f"{what} was trained on other data than {data.dir} holds now (its {' and '.join(parts)} differ); "
                        f"point data.dir at the data it was trained on, or pass {flag} to use this data anyway")
    return {"trained_on": saved, "now": current}


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on ``device`` without stalling the host. On CUDA it goes through pinned memory
    with a non-blocking copy (a copy from pageable memory may wait for the GPU to drain first);
    elsewhere it is a plain copy (pinning needs an accelerator)."""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


def validation_windows(shards: list[np.ndarray], seq_len: int, max_tokens: int, vocab_size: int | None = None) -> torch.Tensor:
    """Fixed held-out windows ``[n, L+1]`` with stride L (each target token scored once), spread
    evenly over the split; at most ``max_tokens`` target tokens (0 = all)."""
    windows = []
    for shard in shards:
        count = (shard.size - 1) // seq_len
        windows += [(shard, i * seq_len) for i in range(count)]
    if not windows:
        raise DataError(f"the validation split is shorter than one window of {seq_len + 1} tokens")
    keep = len(windows) if max_tokens == 0 else max(1, min(len(windows), max_tokens // seq_len))
    picks = np.linspace(0, len(windows) - 1, keep).round().astype(int)
    rows = np.stack([np.asarray(windows[i][0][windows[i][1] : windows[i][1] + seq_len + 1], dtype=np.int64) for i in picks])
    check_token_ids(rows, [windows[i] for i in picks], vocab_size)
    return torch.from_numpy(rows)


def unigram_log_probs(shards: list[np.ndarray], vocab_size: int) -> torch.Tensor:
    """Log-probabilities ``[V]`` of the shards' token frequencies (add-one smoothed): the model
    that learned token frequencies and nothing else, a floor for any loss over these tokens."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for shard in shards:
        counts += np.bincount(np.asarray(shard, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    return torch.from_numpy(np.log(counts / counts.sum())).float()


def check_token_ids(rows: np.ndarray, origins: list[tuple[np.ndarray, int]], vocab_size: int | None) -> None:
    """Refuse windows ``[n, W]`` holding an id at or above the vocabulary size (a corrupt shard,
    or shards from another tokenizer) before an embedding lookup indexes out of range.
    ``origins[i]`` is the (shard, offset) row i was read from. Costs one max over the batch."""
    if vocab_size is None or rows.size == 0 or int(rows.max()) < vocab_size:
        return
    row = int(np.argmax((rows >= vocab_size).any(axis=1)))
    col = int(np.argmax(rows[row] >= vocab_size))
    shard, offset = origins[row]
    raise DataError(
        f"{getattr(shard, 'filename', None) or 'a shard'}: token id {int(rows[row, col])} at position {offset + col} is not "
        f"below the vocabulary size {vocab_size}; the shard is corrupt or was written with another tokenizer: "
        "prepare the data again"
    )


def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
    return loss_nats / math.log(2) / bytes_per_token
