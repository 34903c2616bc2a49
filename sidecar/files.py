"""
Reading the small files that hold secrets, safely and only when changed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

#: Secrets, keys and client tokens are a few KiB at most.
MAX_SECRET_FILE_BYTES = 64 * 1024


def read_secret_file(path: Path) -> bytes:
    """
    The contents of a small regular file, read without blocking.

    Raises `OSError` when it cannot be read, and `ValueError` when it is
    not a regular file (a FIFO or a device would block or never end) or
    is larger than `MAX_SECRET_FILE_BYTES`.
    """
    # O_NONBLOCK: opening a FIFO must not wait for a writer.
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ValueError(f"{str(path)!r} is not a regular file")
        chunks = []
        size = 0
        while chunk := os.read(descriptor, MAX_SECRET_FILE_BYTES + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_SECRET_FILE_BYTES:
                break
        contents = b"".join(chunks)
    finally:
        os.close(descriptor)
    if len(contents) > MAX_SECRET_FILE_BYTES:
        raise ValueError(
            f"{str(path)!r} is larger than {MAX_SECRET_FILE_BYTES} bytes"
        )

    return contents


def is_world_readable(path: Path) -> bool:
    """
    Whether anyone on the host may read ``path`` (following symlinks).
    """
    return bool(os.stat(path).st_mode & stat.S_IROTH)


class WatchedFile:
    """
    A small file whose contents are re-read only when it changes on disk.

    A change is a new inode, size or modification time of the target;
    Kubernetes swaps a symlink to update a mounted secret, and ``stat``
    follows it, so the swap is seen.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._identity: tuple[int, int, int, int] | None = None
        self._contents = b""

    def read(self) -> bytes:
        """
        The current contents; raises like `read_secret_file`.
        """
        status = os.stat(self.path)
        identity = (
            status.st_dev,
            status.st_ino,
            status.st_size,
            status.st_mtime_ns,
        )
        if identity != self._identity:
            self._contents = read_secret_file(self.path)
            self._identity = identity

        return self._contents


def remove_stale_temporaries(path: Path) -> int:
    """
    Delete temp files that `write_private_file` left for ``path`` when the
    process was killed mid-write; return how many. Only our own regular
    files are touched.
    """
    removed = 0
    with contextlib.suppress(OSError):
        for candidate in path.parent.glob(f".{path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                status = os.lstat(candidate)
                if (
                    stat.S_ISREG(status.st_mode)
                    and status.st_uid == os.geteuid()
                ):
                    candidate.unlink()
                    removed += 1

    return removed


def write_private_file(path: Path, data: bytes) -> None:
    """
    Replace ``path`` with ``data`` atomically, readable by the owner only.

    A temp file with a random name (so nobody can pre-create it) is
    written, synced and renamed over ``path``, and the directory synced,
    so a crash leaves the old file or the new one, never a mix. Raises
    `OSError`; no temp file is left behind.
    """
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        # A symlink is replaced (never followed); a device, FIFO, socket
        # or directory at the path is a mistake (say /dev/null as a path)
        # that a rename must not paper over.
        if not (
            stat.S_ISREG(existing.st_mode) or stat.S_ISLNK(existing.st_mode)
        ):
            raise IsADirectoryError(
                errno.EEXIST,
                "not a regular file; refusing to replace it",
                str(path),
            )
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    descriptor = os.open(temporary, flags, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise

    # The rename is durable only once the directory entry is.
    directory = os.open(
        path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    )
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
