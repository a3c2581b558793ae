"""Corpora read and tokenised with Hugging Face ``datasets``: Parquet, Arrow, JSONL and text files.

``load_dataset("parquet" | "arrow" | "json" | "text", data_files=...)`` reads the files (JSONL
may be gzipped; a text file is one document), one text column is kept, and ``Dataset.map``
tokenises in ``num_proc`` processes with its progress bar. The datasets cache lives in a hidden
directory of the output directory and is removed afterwards. ``superpose.data.prepare`` uses
this for Parquet/Arrow inputs and whenever ``num_proc > 1``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
from tokenizers import Tokenizer

from .corpus import JSONL_SUFFIXES, TEXT_SUFFIXES, holdout
from .errors import DataError

BUILDERS = ({".parquet": "parquet", ".arrow": "arrow"} | dict.fromkeys(JSONL_SUFFIXES, "json")
            | dict.fromkeys(TEXT_SUFFIXES, "text"))


def builder_of(path: Path) -> str:
    return next(builder for suffix, builder in BUILDERS.items() if path.name.endswith(suffix))


class DatasetCorpus:
    """Train and validation ``datasets.Dataset``s with a single ``text`` column."""

    def __init__(self, files: list[Path], valid_files: list[Path], text_field: str, val_fraction: float, seed: int,
                 num_proc: int, out: Path, progress: bool):
        import datasets

        # Bytes that are not UTF-8 are replaced with U+FFFD, as the plain reader does, but not counted (None)
        self.num_proc, self.progress, self.replaced = num_proc, progress, None
        self.cache = tempfile.mkdtemp(prefix=".datasets-cache-", dir=out)
        self._bars_were_off = datasets.are_progress_bars_disabled()
        (datasets.enable_progress_bars if progress else datasets.disable_progress_bars)()
        try:
            documents = self._load(files, text_field)
            if valid_files:
                self.splits = {"train": documents, "val": self._load(valid_files, text_field)}
            else:
                train_idx, val_idx = holdout(len(documents), val_fraction, seed)
                self.splits = {"train": documents.select(train_idx), "val": documents.select(val_idx)}
        except BaseException:
            self.close()
            raise

    def _load(self, files: list[Path], text_field: str):
        """One dataset of the non-blank texts of ``files`` (grouped by format)."""
        import datasets

        parts = []
        for builder in sorted({builder_of(f) for f in files}):
            group = [str(f) for f in files if builder_of(f) == builder]
            options = {"sample_by": "document"} if builder == "text" else {}
            # bad UTF-8 replaced; json re-encodes (and so replaces) only for another encoding name
            if builder in ("text", "json"):
                options.update(encoding_errors="replace", **({"encoding": "utf-8-sig"} if builder == "json" else {}))
            try:
                part = datasets.load_dataset(builder, data_files=group, split="train", cache_dir=self.cache,
                                             num_proc=min(self.num_proc, len(group)) if self.num_proc > 1 else None, **options)
            except StopIteration:  # the json builder's schema inference on files without a line
                raise DataError(f"{', '.join(group)}: hold no text; remove them from the inputs or fix them") from None
            except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as err:
                raise DataError(f"{', '.join(group)}: cannot be read as {builder} ({err.__cause__ or err})") from None
            column = "text" if builder == "text" else text_field
            if column not in part.column_names:
                raise DataError(f"{', '.join(group)}: no column {column!r} (columns: {', '.join(part.column_names)}); "
                                "set --text-field")
            if getattr(part.features[column], "dtype", None) not in ("string", "large_string"):
                raise DataError(f"{', '.join(group)}: column {column!r} holds {part.features[column]}, not text")
            parts.append(part.select_columns([column]).rename_column(column, "text") if column != "text"
                         else part.select_columns(["text"]))
        texts = datasets.concatenate_datasets(parts)
        texts = texts.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True,
                             num_proc=self._procs(texts), desc="dropping empty documents")
        if not len(texts):
            raise DataError(f"{', '.join(map(str, files))}: hold no text; remove them from the inputs or fix them")
        return texts

    def _procs(self, dataset) -> int | None:
        return min(self.num_proc, len(dataset)) if self.num_proc > 1 else None

    def texts(self, split: str) -> Iterator[str]:
        for batch in self.splits[split].iter(batch_size=1000):
            yield from batch["text"]

    def encode(self, split: str, tok: Tokenizer, eos: int, progress: bool) -> Iterator[tuple[np.ndarray, int]]:
        """(token ids with a closing EOS, UTF-8 bytes) of each document, in order, tokenised by ``map``."""
        import datasets

        def tokenize(batch):
            texts = batch["text"]
            return {"ids": [e.ids + [eos] for e in tok.encode_batch(texts)], "bytes": [len(t.encode("utf-8")) for t in texts]}

        dataset = self.splits[split]
        if self.num_proc > 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core instead of threads
        features = datasets.Features({"ids": datasets.Sequence(datasets.Value("int32")), "bytes": datasets.Value("int64")})
        encoded = dataset.map(tokenize, batched=True, remove_columns=["text"], features=features,
                              num_proc=self._procs(dataset), desc=f"tokenising {split}")
        sizes = encoded.data.column("bytes").to_numpy()
        index = 0
        for chunk in encoded.data.column("ids").chunks:  # Arrow list arrays: one flat buffer + offsets
            offsets = chunk.offsets.to_numpy()
            values = chunk.flatten().to_numpy()
            offsets = offsets - offsets[0]
            for start, end in zip(offsets[:-1], offsets[1:]):
                yield values[start:end].astype(np.int64), int(sizes[index])
                index += 1

    def close(self) -> None:
        import datasets

        (datasets.disable_progress_bars if self._bars_were_off else datasets.enable_progress_bars)()
        shutil.rmtree(self.cache, ignore_errors=True)
