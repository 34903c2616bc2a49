"""
Token files: the current token written where tools look for one.

Some tools read a bearer token from a file rather than asking an HTTP
endpoint: scripts, and WLCG bearer-token discovery, which looks in
``$XDG_RUNTIME_DIR/bt_u<uid>`` or ``/tmp/bt_u<uid>``. A `FileSink`
replaces such a file atomically at every refresh, so a reader sees the
old token or the new one, never a part. Files are left in place when the
sidecar stops: tools may read them between restarts.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from sidecar.config import Settings, resolve_id
from sidecar.token import Token

log = structlog.get_logger("sidecar.sink")

#: Where WLCG bearer-token discovery looks when ``XDG_RUNTIME_DIR`` is
#: unset.
WLCG_FALLBACK_DIRECTORY = Path("/tmp")  # noqa: S108 -- the WLCG location

#: The WLCG token file is readable by its owner only.
WLCG_MODE = 0o600


class TokenSink(Protocol):
    """
    Somewhere the current token is put for readers outside the sidecar.

    Neither call raises: a failure is logged and the sidecar goes on
    serving.
    """

    def write(self, token: Token) -> None:
        """
        Put ``token`` in place of the previous one.
        """

    def remove(self) -> None:
        """
        Take the token away.
        """


@dataclass(frozen=True, slots=True)
class FileSink:
    """
    A file holding the bare token and a newline, replaced atomically.

    ``mode`` is applied exactly (the umask plays no part); ``uid`` and
    ``gid`` own the file, ``None`` leaving the sidecar's. The blocking
    calls touch the file system (two fsyncs per write); from the event
    loop, run them in a thread.
    """

    path: Path
    mode: int
    uid: int | None
    gid: int | None

    def write(self, token: Token) -> None:
        """
        Replace the file with ``token``; never raises.

        A temp file in the same directory is created (exclusively, never
        through a symlink), given its owner and mode, written, synced and
        renamed over the file, so the final path never holds a partial
        token or the wrong owner or mode. A symlink at the path is
        replaced, not followed. A failure is one ``sink.write_failed``
        warning and leaves the earlier file, and no temp file, behind.
        """
        try:
            self._replace((token.access_token + "\n").encode())
        except (OSError, ValueError) as exc:
            log.warning(
                "sink.write_failed",
                path=str(self.path),
                error_type=type(exc).__name__,
                error=_describe(exc),
            )
            return

        log.debug(
            "sink.written",
            path=str(self.path),
            token_fingerprint=token.fingerprint,
        )

    def remove(self) -> None:
        """
        Delete the file (a symlink there, not its target); never raises.

        A failure is one ``sink.remove_failed`` warning.
        """
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning(
                "sink.remove_failed",
                path=str(self.path),
                error_type=type(exc).__name__,
                error=_describe(exc),
            )

    def _replace(self, data: bytes) -> None:
        # Every step goes through one descriptor of the directory, so a
        # path component swapped meanwhile cannot split the temp file
        # from the rename.
        directory = os.open(
            self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        )
        try:
            self._replace_in(directory, data)
            # The rename is durable only once the directory entry is.
            os.fsync(directory)
        finally:
            os.close(directory)

    def _replace_in(self, directory: int, data: bytes) -> None:
        name = self.path.name
        # A random name nobody can guess in advance; O_EXCL and O_NOFOLLOW
        # refuse whatever another user might have put there (a shared,
        # sticky /tmp), rather than write through it.
        temporary = f".{name}.{secrets.token_hex(8)}.tmp"
        flags = (
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        )
        descriptor = os.open(temporary, flags, 0o600, dir_fd=directory)
        try:
            with os.fdopen(descriptor, "wb") as file:
                # Owner and mode before the rename: the final path never
                # shows the wrong ones, not even for a moment.
                if self.uid is not None or self.gid is not None:
                    os.fchown(
                        file.fileno(),
                        -1 if self.uid is None else self.uid,
                        -1 if self.gid is None else self.gid,
                    )
                os.fchmod(file.fileno(), self.mode)
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            # rename replaces a symlink at the destination; it never
            # follows one.
            os.replace(
                temporary, name, src_dir_fd=directory, dst_dir_fd=directory
            )
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=directory)
            raise


def wlcg_token_path(uid: int) -> Path:
    """
    Where WLCG bearer-token discovery looks for ``uid``'s token.

    ``$XDG_RUNTIME_DIR/bt_u<uid>`` when the sidecar's ``XDG_RUNTIME_DIR``
    is set, else ``/tmp/bt_u<uid>``.
    """
    # Limitation: in a shared, sticky /tmp another user can pre-create
    # /tmp/bt_u<uid> as a directory (no one can rename over it), or, when
    # the sidecar is not root, as a file of their own (the sticky bit
    # forbids replacing it). Every write then fails with a
    # sink.write_failed warning, and tools read what that user left. An
    # XDG_RUNTIME_DIR private to the user lifts it.
    directory = os.environ.get("XDG_RUNTIME_DIR") or WLCG_FALLBACK_DIRECTORY

    return Path(directory) / f"bt_u{uid}"


def build_sinks(settings: Settings) -> list[FileSink]:
    """
    The token files the settings ask for: ``sink.path`` and the WLCG file
    of ``sink.wlcg_uid``, each when set.

    Raises `KeyError` when a name no longer resolves (config validation
    checked it).
    """
    sink = settings.sink
    sinks = []
    if sink.path:
        gid = resolve_id(sink.group, "group") if sink.group != "" else None
        sinks.append(FileSink(Path(sink.path), sink.mode_bits, None, gid))
    if sink.wlcg_uid != "":
        uid = resolve_id(sink.wlcg_uid, "user")
        sinks.append(FileSink(wlcg_token_path(uid), WLCG_MODE, uid, None))

    return sinks


def _describe(exc: OSError | ValueError) -> str:
    # strerror names the cause without repeating the path, which the
    # event already carries.
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror

    return str(exc)
