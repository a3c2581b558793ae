"""Eval files: multiple-choice sets as JSONL, checked line by line before any model runs.

One JSON object per line: ``{"query": str, "choices": [str, str, ...], "gold": int}`` where
``gold`` indexes ``choices`` (the format of /work/shared/data/eval/*.jsonl). A file that breaks
the schema is refused with a ``DataError`` naming the file, the line and the field, so a
mistake is caught before an evaluation spends any compute.
"""
from __future__ import annotations

import json
from pathlib import Path

from .data import DataError


def load_multiple_choice(path: str | Path) -> list[dict]:
    """Every example of a multiple-choice JSONL file, as ``{"query", "choices", "gold"}`` dicts."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"eval file {path} does not exist")
    examples = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"eval file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    for number, line in enumerate(lines, 1):
        if line.strip():
            examples.append(_example(line, f"{path}:{number}"))
    if not examples:
        raise DataError(f"eval file {path} holds no examples")
    return examples


def _example(line: str, where: str) -> dict:
    schema = 'expected {"query": str, "choices": [str, ...], "gold": int}'
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise DataError(f"{where}: line is not valid JSON; {schema}") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: line is a JSON {type(record).__name__}, not an object; {schema}")
    missing = [key for key in ("query", "choices", "gold") if key not in record]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}; {schema}")
    query, choices, gold = record["query"], record["choices"], record["gold"]
    if not isinstance(query, str):
        raise DataError(f"{where}: 'query' must be a string, got {type(query).__name__}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of at least 2 strings")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise DataError(f"{where}: 'gold' must be an integer index into the {len(choices)} choices, got {gold!r}")
    return {"query": query, "choices": choices, "gold": gold}
