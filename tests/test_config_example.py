"""
config.example.toml documents every settings key, and nothing else.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from pydantic import BaseModel

from sidecar.config import Settings

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def _model_keys() -> set[str]:
    keys = set()
    for table, field in Settings.model_fields.items():
        section = field.annotation
        assert isinstance(section, type)
        assert issubclass(section, BaseModel)
        keys |= {f"{table}.{key}" for key in section.model_fields}
    return keys


def _documented_keys() -> set[str]:
    # Keys appear either set or commented out ("# key = value").
    keys = set()
    table = ""
    for line in EXAMPLE.read_text().splitlines():
        if match := re.fullmatch(r"\[(\w+)\]", line.strip()):
            table = match[1]
        elif match := re.fullmatch(r"#? ?(\w+) = .*", line.strip()):
            keys.add(f"{table}.{match[1]}")
    return keys


def test_every_settings_key_is_in_the_example() -> None:
    """
    A key added to the settings model without documentation fails here.
    """
    assert _model_keys() - _documented_keys() == set()


def test_the_example_names_no_unknown_key() -> None:
    """
    The example documents no key the model does not have.
    """
    assert _documented_keys() - _model_keys() == set()


def test_the_example_parses() -> None:
    """
    The example is valid TOML with the model's tables.
    """
    data = tomllib.loads(EXAMPLE.read_text())

    assert set(data) == set(Settings.model_fields)
