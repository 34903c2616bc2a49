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

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from sidecar.config import Settings, resolve_id
from sidecar.files import describe_os_error, write_private_file
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
            write_private_file(
                self.path,
                (token.access_token + "\n").encode(),
                self.mode,
                self.uid,
                self.gid,
            )
        except (OSError, ValueError) as exc:
            log.warning(
                "sink.write_failed",
                path=str(self.path),
                error_type=type(exc).__name__,
                error=describe_os_error(exc),
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
                error=describe_os_error(exc),
            )


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
