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


def write_private_file(
    path: Path,
    data: bytes,
    mode: int = 0o600,
    uid: int | None = None,
    gid: int | None = None,
) -> None:
    """
    Replace ``path`` with ``data`` atomically, with ``mode`` and owner.

    A temp file with a random name (so nobody can pre-create it) is given
    its owner and mode, written, synced and renamed over ``path``, and
    the directory synced: a crash leaves the old file or the new one,
    never a mix, and the path never shows the wrong owner or mode. Every
    step goes through one descriptor of the directory, so a path
    component swapped meanwhile cannot split the temp file from the
    rename. A symlink at ``path`` is replaced, never followed. Raises
    `OSError`; no temp file is left behind.
    """
    directory = os.open(
        path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    )
    try:
        _refuse_special_file(path.name, directory)
        _replace_in(directory, path.name, data, mode, uid, gid)
        # The rename is durable only once the directory entry is.
        os.fsync(directory)
    finally:
        os.close(directory)


def describe_os_error(exc: Exception) -> str:
    """
    An error's cause for a log field: ``strerror`` for an `OSError`
    (the event carries the path already), else the message.
    """
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror

    return str(exc)


def _refuse_special_file(name: str, directory: int) -> None:
    try:
        existing = os.lstat(name, dir_fd=directory)
    except FileNotFoundError:
        return
    # A symlink is replaced (never followed); a device, FIFO, socket or
    # directory at the path is a mistake (say /dev/null as a path) that a
    # rename must not paper over.
    if not (stat.S_ISREG(existing.st_mode) or stat.S_ISLNK(existing.st_mode)):
        raise IsADirectoryError(
            errno.EEXIST, "not a regular file; refusing to replace it", name
        )


def _replace_in(
    directory: int,
    name: str,
    data: bytes,
    mode: int,
    uid: int | None,
    gid: int | None,
) -> None:
    # O_EXCL and O_NOFOLLOW refuse whatever another user might have put
    # at the temp name (a shared, sticky /tmp) rather than write through.
    temporary = f".{name}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    descriptor = os.open(temporary, flags, 0o600, dir_fd=directory)
    try:
        with os.fdopen(descriptor, "wb") as file:
            if uid is not None or gid is not None:
                os.fchown(
                    file.fileno(),
                    -1 if uid is None else uid,
                    -1 if gid is None else gid,
                )
            os.fchmod(file.fileno(), mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=directory)
        raise
