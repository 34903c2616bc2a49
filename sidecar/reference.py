"""
The configuration reference, rendered as Markdown from the settings model
itself, so that the documentation cannot drift from what is accepted.

``token-sidecar config-reference`` prints it; the README holds a copy
that a test compares with this output.
"""

from __future__ import annotations

import inspect
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from sidecar.config import ENV_PREFIX, SECTIONS


class UndocumentedKeyError(Exception):
    """
    A settings key has no description, so it cannot be documented.
    """


def render_reference(
    sections: dict[str, type[BaseModel]] | None = None,
) -> str:
    """
    The Markdown reference of every table and key of ``sections`` (by
    default the real settings model).

    Raises `UndocumentedKeyError` naming a key that has no description.
    """
    parts = [
        "Every key can also be set from the environment as "
        f"`{ENV_PREFIX}<TABLE>__<KEY>`, e.g. `{ENV_PREFIX}IDP__CLIENT_ID`; "
        "the environment wins over the file. A list is written "
        "comma-separated or as a JSON array, e.g. "
        f"`{ENV_PREFIX}ACCESS__ALLOW_UIDS=1000,ci-runner`.\n"
    ]
    for table, model in (sections or SECTIONS).items():
        parts.append(_render_table(table, model))

    return "\n".join(parts)


def _render_table(table: str, model: type[BaseModel]) -> str:
    summary = inspect.cleandoc(model.__doc__ or "").split("\n\n")[0]
    rows = [
        f"### `[{table}]`",
        "",
        summary.replace("\n", " "),
        "",
        "| key | type | default | description |",
        "| --- | --- | --- | --- |",
    ]
    for key, field in model.model_fields.items():
        if not field.description:
            raise UndocumentedKeyError(
                f"{table}.{key} has no description; give its Field one "
                "(it becomes the reference's line)"
            )
        rows.append(
            f"| `{key}` | {_describe_type(field)} | "
            f"{_describe_default(field)} | {_escape(field.description)} |"
        )

    return "\n".join(rows) + "\n"


def _describe_type(field: FieldInfo) -> str:
    words = _type_words(field.annotation)
    bounds = _describe_bounds(field.metadata)

    return _escape(words + (f" ({bounds})" if bounds else ""))


def _type_words(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(
            f'"{value}"' for value in get_args(annotation)
        )
    if origin in (Union, types.UnionType):
        words = [
            _type_words(arg)
            for arg in get_args(annotation)
            if arg is not type(None)
        ]
        return " or ".join(words)
    if origin is list:
        (item,) = get_args(annotation)
        return f"list of {_type_words(item)}"

    return {
        str: "string",
        int: "integer",
        float: "number",
        bool: "boolean",
        Path: "path",
        SecretStr: "secret string",
    }[annotation]


def _describe_bounds(metadata: list[Any]) -> str:
    words = []
    for item in metadata:
        if isinstance(item, Gt):
            words.append(f"> {item.gt}")
        elif isinstance(item, Ge):
            words.append(f"≥ {item.ge}")
        elif isinstance(item, Lt):
            words.append(f"< {item.lt}")
        elif isinstance(item, Le):
            words.append(f"≤ {item.le}")
        elif getattr(item, "pattern", None):
            words.append(f"matches `{item.pattern}`")

    return ", ".join(words)


def _describe_default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined:
        return "**required**"
    if field.default is None:
        return "unset"
    value = field.default
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'

    return f"`{value}`"


def _escape(text: str) -> str:
    # A pipe would end the Markdown table cell.
    return text.replace("|", "\\|")
