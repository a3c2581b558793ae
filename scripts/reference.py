"""Write the generated part of docs/reference.md: every config key with its type, default, comment
and choices, from the config tree itself: its dataclasses, their types and their trailing comments.

    python scripts/reference.py          # rewrite everything below the marker; the prose above stays
    python scripts/reference.py --check  # exit 1 if docs/reference.md is not current (tests/test_docs.py)

The meaning of a key is its trailing comment in superpose/config.py: edit it there, then rerun.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import sys
import tokenize
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from superpose.config import COMMAND_OPTIONS, Config, StageConfig, choices, type_name  # noqa: E402

PAGE = ROOT / "docs" / "reference.md"
MARKER = "<!-- Generated below by scripts/reference.py from the field comments of superpose/config.py: edit those. -->"


def field_comments(cls: type) -> dict[str, str]:
    """Each field's trailing ``# comment`` in the source of dataclass ``cls``: the config's own
    documentation, read by ``reference_markdown`` so that the reference cannot drift from the code."""
    fields, comments = {f.name for f in dataclasses.fields(cls)}, {}
    name, first = None, True  # the field that the current logical line defines; at its first token
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        if tok.type == tokenize.NEWLINE:
            name, first = None, True
        elif tok.type in (tokenize.INDENT, tokenize.DEDENT, tokenize.NL) or (first and tok.type == tokenize.COMMENT):
            continue  # a comment on a line of its own belongs to no field
        elif first:
            name, first = tok.string if tok.type == tokenize.NAME and tok.string in fields else None, False
        elif tok.type == tokenize.COMMENT and name is not None:
            comments[name] = " ".join(filter(None, [comments.get(name), tok.string.lstrip("#").strip()]))
    return comments


def reference_markdown() -> str:
    """The config reference (docs/reference.md, below its marker): every section and key of
    ``Config``, the keys of a [[tst.stages]] table and the flags of the commands that take no run
    config, each with its type, default, comment and allowed choices."""
    tables = [(f"[{section}]", section + ".", cls) for section, cls in typing.get_type_hints(Config).items()]
    tables.append(("[[tst.stages]], one table per stage", "tst.stages[].", StageConfig))
    tables += [(f"`superpose {command}` flags", "--", cls) for command, cls in COMMAND_OPTIONS.items()]
    lines = []
    for title, prefix, cls in tables:
        hints, comments = typing.get_type_hints(cls), field_comments(cls)
        lines += [f"## {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            meaning = comments.get(f.name, "").replace("|", "\\|")  # a bare | would end the table cell
            if choices(cls, f.name):
                meaning += "; one of " + ", ".join(f"`{c}`" for c in choices(cls, f.name))
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            default = json.dumps(value)  # a TOML literal for every type used here
            key = prefix + (f.name.replace("_", "-") if prefix == "--" else f.name)
            kind = type_name(hints[f.name])
            lines.append(f"| `{key}` | {kind} | `{default}` | {meaning} |")
        lines.append("")
    return "\n".join(lines)


def page(text: str) -> str:
    """``text`` (the page as it is) with everything after the marker regenerated."""
    head, found, _ = text.partition(MARKER)
    if not found:
        raise SystemExit(f"{PAGE} lacks the line {MARKER!r}; put it where the generated tables start")
    return f"{head}{MARKER}\n\n{reference_markdown()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the page is current")
    args = parser.parse_args()
    text = PAGE.read_text()
    new = page(text)
    if args.check:
        if new != text:
            raise SystemExit(f"{PAGE} is not current: run python scripts/reference.py")
        return
    PAGE.write_text(new)
    print(f"wrote {PAGE}" if new != text else f"{PAGE} was current")


if __name__ == "__main__":
    main()
