"""
Sealing a token: AES-256-GCM under a key derived from the client's own
key material and bound to the credential it was fetched with.

The warm-restart cache file and the fleet's shared entry in Redis both
hold a sealed token, each under its own `Purpose`, so that one can never
be used in place of the other. A sealed token is a fixed binary
envelope, all integers big-endian::

    offset  size  field
    0       4     magic (the purpose's)
    4       1     envelope version (1)
    5       12    nonce, random and fresh at every seal
    17      4     length of what follows
    21      n     ciphertext and its 16-byte GCM tag

The plaintext is JSON: a format version, the access token, and its
``issued_at`` and ``expires_at`` in epoch seconds. The key is HKDF-SHA256
over the key material (the client secret, or the private key PEM for
``private_key_jwt``), with the purpose's salt and an info that carries
the `Binding` fingerprint: another token URL, client, audience, scope,
auth method or secret gives another key. The fingerprint and the
21-byte header are the associated data too, so neither can be swapped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sidecar.config import IdPSettings
from sidecar.log import redact_value
from sidecar.token import Token

# Limitation: anyone who can read the client secret (or the private key)
# can derive the key; a sealed token is only as secret as that material.

# Limitation: the scope is bound verbatim, so reordering the scopes in
# the config changes the binding and costs one IdP request.

ENVELOPE_VERSION = 1
PLAINTEXT_VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16
_HEADER = struct.Struct(f">4sB{NONCE_BYTES}sI")

BINDING_DOMAIN = b"token-sidecar token cache binding v1\x00"


@dataclass(frozen=True, slots=True)
class Purpose:
    """
    What a sealed token is for: its magic and its key derivation inputs,
    each naming the purpose, so no two purposes share a key.
    """

    magic: bytes
    hkdf_salt: bytes
    hkdf_info: bytes


class UnsealError(Exception):
    """
    A sealed token cannot be used, for ``reason`` (with ``fields`` that
    say more, never the token).
    """

    def __init__(self, reason: str, fields: dict[str, Any]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fields = fields


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


def derive_key(purpose: Purpose, binding: Binding, material: bytes) -> bytes:
    """
    The 32-byte AES key of ``purpose`` for ``binding`` and ``material``.

    Raises `ValueError` for empty material, which would give a key
    anyone can derive.
    """
    if not material:
        raise ValueError("the key material is empty")
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=purpose.hkdf_salt,
        info=purpose.hkdf_info + binding.fingerprint(),
    )

    return hkdf.derive(material)


def seal(
    token: Token, purpose: Purpose, binding: Binding, key: bytes
) -> bytes:
    """
    ``token`` sealed under ``key`` (from `derive_key`), as an envelope.
    """
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
    header = _HEADER.pack(purpose.magic, ENVELOPE_VERSION, nonce, length)
    ciphertext = AESGCM(key).encrypt(
        nonce, plaintext, header + binding.fingerprint()
    )

    return header + ciphertext


def unseal(
    contents: bytes, purpose: Purpose, binding: Binding, key: bytes
) -> Token:
    """
    The token sealed in ``contents``, registered for redaction.

    Raises `UnsealError` with reason ``corrupt``, ``unsupported_version``,
    ``stale_binding_or_key`` (sealed for another credential or secret) or
    ``malformed``. Whether the token is still valid is the caller's
    question.
    """
    nonce, ciphertext, header = _open_envelope(contents, purpose)
    try:
        plaintext = AESGCM(key).decrypt(
            nonce, ciphertext, header + binding.fingerprint()
        )
    except InvalidTag:
        _fail("stale_binding_or_key")

    return _parse_plaintext(plaintext)


def _fail(reason: str, **fields: Any) -> NoReturn:
    raise UnsealError(reason, fields)


def _encode_field(value: str | None) -> bytes:
    if value is None:
        return b"\x00"
    # surrogatepass: a lone surrogate from the environment still
    # encodes, and to bytes no other text gives.
    encoded = value.encode("utf-8", "surrogatepass")

    return b"\x01" + struct.pack(">I", len(encoded)) + encoded


def _open_envelope(
    contents: bytes, purpose: Purpose
) -> tuple[bytes, bytes, bytes]:
    """
    The nonce, ciphertext and header of a cache file's contents.
    """
    if len(contents) < _HEADER.size:
        _fail("corrupt", detail="shorter than the header")
    header = contents[: _HEADER.size]
    magic, version, nonce, length = _HEADER.unpack(header)
    if magic != purpose.magic:
        _fail("corrupt", detail="not sealed for this purpose")
    if version != ENVELOPE_VERSION:
        _fail("unsupported_version", version=version)
    ciphertext = contents[_HEADER.size :]
    if length < TAG_BYTES or len(ciphertext) != length:
        _fail("corrupt", detail="truncated or padded")

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
        _fail("malformed")
    if not isinstance(data, dict):
        _fail("malformed")
    access_token = data.get("access_token")
    if isinstance(access_token, str):
        # Before any other check, so the value is scrubbed from then on.
        redact_value(access_token)
    if data.get("version") != PLAINTEXT_VERSION:
        _fail("malformed", detail="unknown plaintext version")
    if not isinstance(access_token, str) or not access_token:
        _fail("malformed", detail="no access_token")
    issued_at = _finite_number(data.get("issued_at"))
    expires_at = _finite_number(data.get("expires_at"))
    if issued_at is None or expires_at is None:
        _fail("malformed", detail="no valid issued_at or expires_at")

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
