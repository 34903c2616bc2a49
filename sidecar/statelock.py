"""
One sidecar per state file.

The token cache, the quota ledger and the token sink are each rewritten
whole by the process that owns them. Two sidecars sharing one (two
services' sidecars run by one user with the default paths, say) would
undo each other's writes: the ledger loses requests, and each start
discards the other's cache and spends a request. Each file therefore has
a lock beside it, ``<file>.lock``, held with ``flock`` for the life of
the process; the kernel drops it when the process ends, however it ends.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Sequence
from pathlib import Path

import structlog

from sidecar.errors import SidecarError

log = structlog.get_logger("sidecar.statelock")

#: Enough of a lock file to read the pid written there.
_PID_BYTES = 32


class StateInUseError(SidecarError):
    """
    Another process holds the lock on one of this sidecar's state files.
    """


class StateLock:
    """
    Exclusive locks on a sidecar's state files, taken all or none.

    ``files`` pairs each file with the config key that names it, for the
    error message.
    """

    def __init__(self, files: Sequence[tuple[str, Path]]) -> None:
        self._files = files
        self._held: list[int] = []

    def acquire(self) -> None:
        """
        Lock every file, or none: raises `StateInUseError` naming the
        file, the holder's pid and the key to change.

        A lock file that cannot be opened (a read-only or full state
        directory, a planted symlink) is logged and skipped: the state
        file beside it cannot be written either, and such trouble costs
        the sidecar its warm restart, never its service.
        """
        try:
            for key, path in self._files:
                fd = _lock(key, path)
                if fd is not None:
                    self._held.append(fd)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """
        Drop every lock held. The lock files stay: removing one would
        let a third process lock a new file while the second holds the
        old one.
        """
        while self._held:
            os.close(self._held.pop())


def _lock(key: str, path: Path) -> int | None:
    lock_path = path.with_name(path.name + ".lock")
    try:
        lock_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # O_NOFOLLOW: in a shared directory a planted symlink must not
        # make this process create or truncate another file.
        fd = os.open(
            lock_path,
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
    except OSError as exc:
        log.warning(
            "state.unlocked",
            key=key,
            path=str(lock_path),
            error=exc.strerror,
            hint="make the directory writable by this user alone",
        )
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder_of(fd)
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        raise StateInUseError(
            f"another sidecar ({holder}) keeps its state in {path}; give "
            f"each sidecar its own {key} (or its own runtime directory), "
            "or stop the other one"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())

    return fd


def _holder_of(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, _PID_BYTES, 0).decode("ascii").strip())
        return f"pid {pid}"

    return "pid unknown"
