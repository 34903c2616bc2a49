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
import stat
from collections.abc import Sequence
from pathlib import Path

import structlog

from sidecar.errors import StateInUseError, StateLockError

log = structlog.get_logger("sidecar.statelock")

#: Enough of a lock file to read the pid written there.
_PID_BYTES = 32


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
        file, the holder's pid and the key to change, or `StateLockError`
        when something else is in a lock file's place (a symlink, a
        directory, another user's file) in a directory this user may
        write.

        In a state directory that cannot be written the lock is logged
        and skipped: the state cannot be written (nor shared) either, and
        such trouble costs the sidecar its warm restart, never its
        service.
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
        # make this process create or truncate another file; O_NONBLOCK:
        # nor may a planted FIFO hold it up.
        fd = os.open(
            lock_path,
            os.O_RDWR
            | os.O_CREAT
            | os.O_NOFOLLOW
            | os.O_NONBLOCK
            | os.O_CLOEXEC,
            0o600,
        )
    except OSError as exc:
        _unlocked(key, lock_path, exc)
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder_of(fd)
        os.close(fd)
        raise StateInUseError(
            f"another sidecar ({holder}) keeps its state in {path}; give "
            f"each sidecar its own {key} (or its own runtime directory), "
            "or stop the other one"
        ) from None
    except OSError as exc:
        os.close(fd)
        _unlocked(key, lock_path, exc)
        return None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as exc:
        # Locked all the same; only the pid for another's message is
        # missing (a full file system).
        log.warning(
            "state.lock_pid_unwritten", path=str(lock_path), error=exc.strerror
        )

    return fd


def _unlocked(key: str, lock_path: Path, exc: OSError) -> None:
    # Where the state file beside the lock can be written, running
    # unlocked could let a second sidecar share it: refuse. Where it
    # cannot (a read-only directory), nothing is shared; serve on.
    directory = lock_path.parent
    if directory.is_dir() and os.access(directory, os.W_OK | os.X_OK):
        raise StateLockError(
            f"cannot lock {lock_path} ({exc.strerror}); remove what is in "
            f"its place (a lock file is a plain file this user may "
            f"write), or give this sidecar its own {key}"
        )
    log.warning(
        "state.unlocked",
        key=key,
        path=str(lock_path),
        error=exc.strerror,
        hint="the state directory cannot be written: no warm restart, "
        "and no count kept across restarts",
    )


def _holder_of(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, _PID_BYTES, 0).decode("ascii").strip())
        return f"pid {pid}"

    return "pid unknown"
