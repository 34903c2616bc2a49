"""
The warm-restart cache: the current token, encrypted in one small file.

A sidecar restarted within its token's life loads the token from here
and spends no IdP request. What is stored is the access token with its
``issued_at`` and ``expires_at`` (wall-clock epoch seconds), as JSON
with a format version, encrypted with AES-256-GCM.

The file is a fixed binary envelope, all integers big-endian::

    offset  size  field
    0       4     magic b"TSKC"
    4       1     envelope version (1)
    5       12    nonce, random and fresh at every save
    17      4     length of what follows
    21      n     ciphertext and its 16-byte GCM tag

The key is HKDF-SHA256 over the key material (the client secret, or the
private key PEM for ``private_key_jwt``), with a fixed salt and an info
that names this purpose and carries the `Binding` fingerprint: another
token URL, client, audience, scope, auth method or secret gives another
key, and the file no longer decrypts. The fingerprint and the 21-byte
header are the associated data too, so neither can be swapped.

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
import hashlib
import json
import math
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sidecar.clock import Clock, SystemClock
from sidecar.config import IdPSettings
from sidecar.errors import CredentialError
from sidecar.files import (
    describe_os_error,
    remove_stale_temporaries,
    write_private_file,
)
from sidecar.log import redact_value
from sidecar.token import Token

# Limitation: root, and anyone who can read the client secret (or the
# private key), can decrypt the file; the key is only as secret as the
# key material. The encryption keeps the token out of backups, images
# and copies of the state directory that lack the secret.

# Limitation: the scope is bound verbatim, so reordering the scopes in
# the config discards the cached token and costs one IdP request.

log = structlog.get_logger("sidecar.store")

MAGIC = b"TSKC"
ENVELOPE_VERSION = 1
PLAINTEXT_VERSION = 1

#: A cached token is a few KiB at most; anything larger is not ours.
MAX_CACHE_FILE_BYTES = 64 * 1024

NONCE_BYTES = 12
TAG_BYTES = 16
_HEADER = struct.Struct(f">4sB{NONCE_BYTES}sI")

#: Fixed inputs of the key derivation and the binding fingerprint; each
#: names this purpose, so no other use of the secret shares a key.
HKDF_SALT = b"token-sidecar token cache salt v1"
HKDF_INFO = b"token-sidecar token cache key v1\x00"
BINDING_DOMAIN = b"token-sidecar token cache binding v1\x00"

#: Reasons to ignore the file that normal operation brings (a long stop,
#: a rotated secret, a changed config): logged at info, the rest at
#: warning.
_QUIET_REASONS = frozenset({"expired", "stale_binding_or_key"})


@dataclass(frozen=True, slots=True)
class Binding:
    """
    What a cached token is bound to; any change makes it unusable.
    """

    token_url: str
    client_id: str
    audience: str | None
    scope: str | None
    auth_method: str

    @classmethod
    def of(cls, idp: IdPSettings) -> Binding:
        """
        The binding of the token that ``idp`` settings would fetch.
        """
        return cls(
            token_url=idp.resolved_token_url,
            client_id=idp.client_id,
            audience=idp.audience,
            scope=idp.scope,
            auth_method=idp.auth_method,
        )

    def fingerprint(self) -> bytes:
        """
        SHA-256 of a canonical encoding of the fields.

        Each field is a presence byte, then (when present) its UTF-8
        length and bytes, so no two bindings encode alike: ``None`` is
        not ``""``, and no text can shift into the next field.
        """
        digest = hashlib.sha256(BINDING_DOMAIN)
        for value in (
            self.token_url,
            self.client_id,
            self.audience,
            self.scope,
            self.auth_method,
        ):
            digest.update(_encode_field(value))

        return digest.digest()


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
        nonce, ciphertext, header = _open_envelope(contents)
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
        aead = AESGCM(self._key(key_material))
        try:
            plaintext = aead.decrypt(
                nonce, ciphertext, header + self.binding.fingerprint()
            )
        except InvalidTag:
            _ignore("stale_binding_or_key")
        token = _parse_plaintext(plaintext)
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
        if not key_material:
            # An empty secret would give a key anyone can derive.
            raise ValueError("the key material is empty")
        plaintext = json.dumps(
            {
                "version": PLAINTEXT_VERSION,
                "access_token": token.access_token,
                "issued_at": token.issued_at,
                "expires_at": token.expires_at,
            },
            allow_nan=False,
        ).encode("ascii")
        nonce = os.urandom(NONCE_BYTES)
        length = len(plaintext) + TAG_BYTES
        header = _HEADER.pack(MAGIC, ENVELOPE_VERSION, nonce, length)
        aead = AESGCM(self._key(key_material))
        ciphertext = aead.encrypt(
            nonce, plaintext, header + self.binding.fingerprint()
        )

        return header + ciphertext

    def _write(self, contents: bytes) -> None:
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)

        write_private_file(self.path, contents)

    def _key(self, key_material: bytes) -> bytes:
        hkdf = HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=HKDF_SALT,
            info=HKDF_INFO + self.binding.fingerprint(),
        )

        return hkdf.derive(key_material)


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


def _encode_field(value: str | None) -> bytes:
    if value is None:
        return b"\x00"
    # surrogatepass: a lone surrogate from the environment still
    # encodes, and to bytes no other text gives.
    encoded = value.encode("utf-8", "surrogatepass")

    return b"\x01" + struct.pack(">I", len(encoded)) + encoded


def _open_envelope(contents: bytes) -> tuple[bytes, bytes, bytes]:
    """
    The nonce, ciphertext and header of a cache file's contents.
    """
    if len(contents) < _HEADER.size:
        _ignore("corrupt", detail="shorter than the header")
    header = contents[: _HEADER.size]
    magic, version, nonce, length = _HEADER.unpack(header)
    if magic != MAGIC:
        _ignore("corrupt", detail="not a token cache file")
    if version != ENVELOPE_VERSION:
        _ignore("unsupported_version", version=version)
    ciphertext = contents[_HEADER.size :]
    if length < TAG_BYTES or len(ciphertext) != length:
        _ignore("corrupt", detail="truncated or padded")

    return nonce, ciphertext, header


def _parse_plaintext(plaintext: bytes) -> Token:
    """
    The token in a decrypted cache file, registered for redaction.
    """
    try:
        data = json.loads(plaintext)
    except (ValueError, RecursionError):
        # No detail: the error text could quote the token. RecursionError:
        # 64 KiB of "[" nests deeper than the parser goes.
        _ignore("malformed")
    if not isinstance(data, dict):
        _ignore("malformed")
    access_token = data.get("access_token")
    if isinstance(access_token, str):
        # Before any other check, so the value is scrubbed from then on.
        redact_value(access_token)
    if data.get("version") != PLAINTEXT_VERSION:
        _ignore("malformed", detail="unknown plaintext version")
    if not isinstance(access_token, str) or not access_token:
        _ignore("malformed", detail="no access_token")
    issued_at = _finite_number(data.get("issued_at"))
    expires_at = _finite_number(data.get("expires_at"))
    if issued_at is None or expires_at is None:
        _ignore("malformed", detail="no valid issued_at or expires_at")

    return Token(
        access_token=access_token,
        issued_at=issued_at,
        expires_at=expires_at,
    )


def _finite_number(value: object) -> float | None:
    # bool is an int to Python, but never a time.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None

    return number if math.isfinite(number) else None
