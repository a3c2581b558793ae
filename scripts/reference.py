"""Write the generated part of docs/reference.md: every config key with its type, default, comment
and choices, from the config tree itself (``superpose.config.reference_markdown``).

    python scripts/reference.py          # rewrite everything below the marker; the prose above stays
    python scripts/reference.py --check  # exit 1 if docs/reference.md is not current (tests/test_docs.py)

The meaning of a key is its trailing comment in superpose/config.py: edit it there, then rerun.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from superpose.config import reference_markdown  # noqa: E402

PAGE = ROOT / "docs" / "reference.md"
MARKER = "<!-- Generated below by scripts/reference.py from the field comments of superpose/config.py: edit those. -->"


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
