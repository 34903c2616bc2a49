"""
The small-file helpers: safe reads, atomic private writes, cleanup.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sidecar.files import (
    read_secret_file,
    remove_stale_temporaries,
    write_private_file,
)


def test_write_is_private_and_replaces(tmp_path: Path) -> None:
    """
    A write leaves only the new contents, mode 0600, and no temp file.
    """
    path = tmp_path / "state.json"
    path.write_text("old")

    write_private_file(path, b"new")

    assert path.read_bytes() == b"new"
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_write_never_replaces_a_fifo(tmp_path: Path) -> None:
    """
    Something that is not a regular file or a symlink at the path is an
    error, not something to rename over.
    """
    path = tmp_path / "state.json"
    os.mkfifo(path)

    with pytest.raises(OSError, match="not a regular file"):
        write_private_file(path, b"new")


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    """
    Temp files a killed write left behind are removed; other files stay.
    """
    path = tmp_path / "token.cache"
    (tmp_path / ".token.cache.0123abcd.tmp").write_text("half")
    (tmp_path / ".token.cache.4567ef01.tmp").write_text("half")
    (tmp_path / "unrelated.tmp").write_text("keep")

    removed = remove_stale_temporaries(path)

    assert removed == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unrelated.tmp"]


def test_secret_read_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    """
    A FIFO at a secret's path is refused at once, not waited on.
    """
    path = tmp_path / "secret"
    os.mkfifo(path)

    with pytest.raises(ValueError, match="not a regular file"):
        read_secret_file(path)
