"""
The warm-restart cache: the current token, sealed in one small file.

A sidecar restarted within its token's life loads the token from here
and spends no IdP request. The file holds the token sealed as
`sidecar.seal` describes (AES-256-GCM, magic ``b"TSKC"``, keyed by the
client secret or private key and bound to the credential), so another
token URL, client, audience, scope, auth method or secret finds a file
it cannot open.

Saves are atomic (a 0600 temporary file beside the target, fsynced,
renamed over it, then the directory fsynced) and never raise: a failure
is one ``cache.save_failed`` warning. Loads never raise either: a file
that is missing, not a regular file, a symlink, someone else's, open to
group or others, too large, damaged, from another binding or key, or
holding an expired token gives ``None`` and one ``cache.ignored`` line
whose ``reason`` says why. The token value is never logged.

The calls block on the file system (a few small reads and writes, and
two fsyncs on save); from the event loop, run them in a thread.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import structlog

from sidecar.clock import Clock, SystemClock
from sidecar.errors import CredentialError
from sidecar.files import (
    describe_os_error,
    remove_stale_temporaries,
    write_private_file,
)
from sidecar.seal import (
    Binding,
    Purpose,
    UnsealError,
    derive_key,
    seal,
    unseal,
)
from sidecar.token import Token

# Limitation: root, and anyone who can read the client secret (or the
# private key), can decrypt the file. The encryption keeps the token out
# of backups, images and copies of the state directory that lack it.

__all__ = ["Binding", "TokenStore"]

log = structlog.get_logger("sidecar.store")

#: A cached token is a few KiB at most; anything larger is not ours.
MAX_CACHE_FILE_BYTES = 64 * 1024

#: Fixed inputs of the key derivation; each names this purpose, so no
#: other use of the secret shares a key.
MAGIC = b"TSKC"
HKDF_SALT = b"token-sidecar token cache salt v1"
HKDF_INFO = b"token-sidecar token cache key v1\x00"
CACHE_PURPOSE = Purpose(MAGIC, HKDF_SALT, HKDF_INFO)

#: Reasons to ignore the file that normal operation brings (a long stop,
#: a rotated secret, a changed config): logged at info, the rest at
#: warning.
_QUIET_REASONS = frozenset({"expired", "stale_binding_or_key"})


class TokenStore:
    """
    One token, encrypted in the file at ``path``, for a warm restart.

    ``key_material`` returns the client secret, or the private key PEM,
    as bytes; it is called at every save and load, since the secret may
    rotate, and may raise `CredentialError`, which makes the cache
    unusable for that call. ``clock`` decides what has expired.
    """

    def __init__(
        self,
        path: Path,
        binding: Binding,
        key_material: Callable[[], bytes],
        *,
        clock: Clock | None = None,
    ) -> None:
        self.path = path
        self.binding = binding
        self._key_material = key_material
        self._clock = clock or SystemClock()

    def load(self) -> Token | None:
        """
        The cached token if it is usable and unexpired, else ``None``.

        Never raises. Each ``None`` but a missing file is logged once, as
        ``cache.ignored`` with a ``reason``. Whether the token has enough
        life left to serve is the caller's decision.
        """
        remove_stale_temporaries(self.path)
        try:
            token = self._load()
        except _IgnoredError as ignored:
            quiet = ignored.reason in _QUIET_REASONS
            report = log.info if quiet else log.warning
            report(
                "cache.ignored",
                reason=ignored.reason,
                path=str(self.path),
                **ignored.fields,
            )
            return None
        if token is None:
            log.debug("cache.missing", path=str(self.path))
            return None

        log.info(
            "cache.loaded",
            path=str(self.path),
            token_fingerprint=token.fingerprint,
            expires_in_seconds=round(
                token.remaining_seconds(self._clock.now()), 3
            ),
        )

        return token

    def save(self, token: Token) -> None:
        """
        Write ``token`` to the file, atomically; never raises.

        A failure is logged as ``cache.save_failed`` and leaves any
        earlier file, and no temporary file, behind.
        """
        try:
            contents = self._seal(token, self._key_material())
            self._write(contents)
        except (CredentialError, OSError, ValueError) as exc:
            log.warning(
                "cache.save_failed",
                path=str(self.path),
                error_type=type(exc).__name__,
                error=describe_os_error(exc),
            )
            return

        log.debug(
            "cache.saved",
            path=str(self.path),
            token_fingerprint=token.fingerprint,
        )

    def clear(self) -> None:
        """
        Remove the file, if there is one; never raises.
        """
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning(
                "cache.clear_failed",
                path=str(self.path),
                error_type=type(exc).__name__,
                error=describe_os_error(exc),
            )

    def _load(self) -> Token | None:
        contents = self._read()
        if contents is None:
            return None
        try:
            key_material = self._key_material()
        except CredentialError as exc:
            _ignore(
                "key_unavailable",
                error_type=type(exc).__name__,
                error=str(exc),
            )
        if not key_material:
            _ignore("key_unavailable", error_type="EmptyKeyMaterial")
        key = derive_key(CACHE_PURPOSE, self.binding, key_material)
        try:
            token = unseal(contents, CACHE_PURPOSE, self.binding, key)
        except UnsealError as exc:
            _ignore(exc.reason, **exc.fields)
        if token.expires_at <= self._clock.now():
            _ignore("expired")

        return token

    def _read(self) -> bytes | None:
        # O_NOFOLLOW refuses a symlink; O_NONBLOCK keeps a FIFO from
        # blocking the open. Every check below is on the open descriptor,
        # so the file cannot be swapped between check and read.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            descriptor = os.open(self.path, flags)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                _ignore("symlink")
            _ignore(
                "unreadable",
                error_type=type(exc).__name__,
                error=describe_os_error(exc),
            )
        # Not os.fdopen: it refuses a directory before our own check, and
        # then leaves the descriptor open.
        try:
            _check_status(os.fstat(descriptor))
            contents = _read_at_most(descriptor, MAX_CACHE_FILE_BYTES + 1)
        except OSError as exc:
            _ignore(
                "unreadable",
                error_type=type(exc).__name__,
                error=describe_os_error(exc),
            )
        finally:
            os.close(descriptor)
        # Checked on what was read, not on st_size, which a file still
        # being appended to would outgrow.
        if len(contents) > MAX_CACHE_FILE_BYTES:
            _ignore("too_large")

        return contents

    def _seal(self, token: Token, key_material: bytes) -> bytes:
        key = derive_key(CACHE_PURPOSE, self.binding, key_material)

        return seal(token, CACHE_PURPOSE, self.binding, key)

    def _write(self, contents: bytes) -> None:
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)

        write_private_file(self.path, contents)


class _IgnoredError(Exception):
    """
    The cache file cannot be used, for ``reason``; never leaves `load`.
    """

    def __init__(self, reason: str, fields: dict[str, Any]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fields = fields


def _ignore(reason: str, **fields: Any) -> NoReturn:
    raise _IgnoredError(reason, fields)


def _check_status(status: os.stat_result) -> None:
    """
    Refuse a file that is not a private regular file of ours.
    """
    if not stat.S_ISREG(status.st_mode):
        _ignore("not_regular_file")
    if status.st_uid != os.geteuid():
        _ignore("foreign_owner", owner_uid=status.st_uid)
    if status.st_mode & 0o077:
        _ignore("too_open", mode=oct(stat.S_IMODE(status.st_mode)))


def _read_at_most(descriptor: int, limit: int) -> bytes:
    """
    Up to ``limit`` bytes from ``descriptor``, to its end if sooner.
    """
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = os.read(descriptor, remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)

    return b"".join(chunks)
