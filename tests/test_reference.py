"""
Tests for the configuration reference: generated from the settings model,
it must cover every key, and the README's copy must match it.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from sidecar.config import SECTIONS
from sidecar.reference import UndocumentedKeyError, render_reference
from tests.test_cli import run_cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
START, END = (
    "<!-- config-reference:start -->\n",
    "<!-- config-reference:end -->",
)


def test_readme_holds_the_current_reference() -> None:
    """
    The README's reference is exactly what the model renders today.
    """
    text = README.read_text()
    copy = text[text.index(START) + len(START) : text.index(END)]

    assert copy == render_reference(), (
        "README.md's configuration reference is stale: replace the text "
        "between its config-reference markers with the output of "
        "`token-sidecar config-reference`"
    )


def test_every_key_appears_once() -> None:
    """
    Each table gets a heading and each of its keys one row.
    """
    reference = render_reference()

    for table, model in SECTIONS.items():
        assert f"### `[{table}]`" in reference
        for key in model.model_fields:
            rows = re.findall(rf"^\| `{key}` \|", reference, re.MULTILINE)
            assert rows, f"{table}.{key}"


def test_a_key_without_description_fails() -> None:
    """
    A key added to the model with no description cannot be rendered.
    """

    class Undocumented(BaseModel):
        """
        A table with one undocumented key.
        """

        documented: int = Field(1, description="Has one.")
        forgotten: int = 2

    with pytest.raises(UndocumentedKeyError, match=r"extra\.forgotten"):
        render_reference({"extra": Undocumented})


def test_defaults_and_bounds_are_shown() -> None:
    """
    A row shows the key's type with its bounds, and its default.
    """
    reference = render_reference()

    assert (
        "| `refresh_at` | number (> 0, < 1) | `0.9` | "
        "Fraction of lifetime before renewal. |"
    ) in reference
    assert "| `client_id` | string | **required** |" in reference


def test_the_example_gives_each_key_a_comment() -> None:
    """
    In config.example.toml every key line follows a comment line.
    """
    lines = (ROOT / "config.example.toml").read_text().splitlines()
    tomllib.loads("\n".join(lines))

    for before, line in itertools.pairwise(lines):
        if re.fullmatch(r"#? ?\w+ = .*", line):
            assert before.startswith("#"), line


def test_cli_prints_the_reference(tmp_path: Path) -> None:
    """
    token-sidecar config-reference prints the rendered reference, exit 0.
    """
    result = run_cli("config-reference", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout == render_reference()
