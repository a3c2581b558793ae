"""The docs cannot drift from the code: the config reference is generated and current, every field
documents itself, links resolve, and the README names every module, command and public function."""
from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import superpose
from scripts.reference import field_comments, reference_markdown
from superpose.cli import build_parser
from superpose.config import COMMAND_OPTIONS, Config, StageConfig, choices, type_name
from superpose.model import PRESETS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SECTIONS = typing.get_type_hints(Config)  # section name -> its dataclass


def test_reference_is_current():
    """docs/reference.md below its marker is what the config tree generates now."""
    out = subprocess.run([sys.executable, ROOT / "scripts" / "reference.py", "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_every_config_field_has_a_comment():
    tables = {**SECTIONS, "tst.stages[]": StageConfig, **COMMAND_OPTIONS}
    missing = [f"{name}.{f.name}" for name, cls in tables.items() for f in dataclasses.fields(cls)
               if not field_comments(cls).get(f.name)]
    assert not missing, f"config fields without a trailing comment (their meaning in docs/reference.md): {missing}"


@dataclass
class _Sample:
    plain: int = 1  # one line
    # a comment on a line of its own belongs to no field
    wrapped: list = field(  # first part,
        default_factory=list)  # second part
    bare: str = "x"
    hashed: str = "a # b"  # the string's '#' is not a comment


def test_field_comments_reads_trailing_comments():
    assert field_comments(_Sample) == {"plain": "one line", "wrapped": "first part, second part",
                                       "hashed": "the string's '#' is not a comment"}


def test_reference_rows_carry_type_default_and_choices():
    text = reference_markdown()
    for name, cls in SECTIONS.items():
        assert f"## [{name}]" in text
        for f in dataclasses.fields(cls):
            row = next(line for line in text.splitlines() if line.startswith(f"| `{name}.{f.name}` |"))
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
            assert cells[1] == type_name(typing.get_type_hints(cls)[f.name])
            assert cells[3].startswith(field_comments(cls).get(f.name, "").replace("|", "\\|"))
            for choice in choices(cls, f.name):
                assert f"`{choice}`" in cells[3]
    assert '| `tst.bag_size` | int | `4` |' in text and '| `model.preset` | str | `"tiny"` |' in text
    assert '| `tst.curriculum` | list | `[]` |' in text and '| `train.compile` | bool or str | `"auto"` |' in text


def test_reference_names_every_preset():
    text = (ROOT / "docs" / "reference.md").read_text()
    assert [p for p in PRESETS if f"`{p}`" not in text] == []


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#", 1)[0]
            if path and not re.match(r"[a-z]+:", path) and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_readme_names_every_module_command_and_public_name():
    modules = [p.name for p in sorted((ROOT / "superpose").glob("*.py")) if f"`{p.name}`" not in README]
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    commands = [c for c in sub.choices if f"| `{c}" not in README]
    names = [n for n in superpose.__all__ if not re.search(rf"\b{n}\b", README)]
    assert (modules, commands, names) == ([], [], [])
