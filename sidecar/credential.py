"""
Client authentication for token requests: secrets and signed assertions.

The secret and the private key are read from their files at every token
request, so a rotated file is used from the next request on, with no
restart. Nothing here logs; nothing returned names a secret.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from sidecar.config import IdPSettings
from sidecar.errors import CredentialError
from sidecar.files import read_secret_file
from sidecar.log import redact_value

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

#: A client assertion only has to survive one request.
ASSERTION_LIFETIME_SECONDS = 60

#: RFC 7518 asks for 2048 bits at least for RS256.
MIN_RSA_KEY_BITS = 2048

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _redact_secret(secret: str) -> None:
    # The secret travels form-encoded too; scrub every form it takes.
    redact_value(secret, secret=True)
    redact_value(quote(secret, safe=""), secret=True)
    redact_value(quote_plus(secret), secret=True)


def load_private_key(path: Path, alg: str | None) -> tuple[PrivateKey, str]:
    """
    Load a PEM private key and pick (or check) its signing algorithm.

    Raises `ValueError` saying what is wrong with the key file, and
    `OSError` when it cannot be read.
    """
    return parse_private_key(read_secret_file(path), alg, path)


def parse_private_key(
    pem: bytes, alg: str | None, path: Path
) -> tuple[PrivateKey, str]:
    """
    Parse PEM bytes read from ``path``; see `load_private_key`.
    """
    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"{str(path)!r} is not an unencrypted PEM private key ({exc})"
        ) from None

    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_KEY_BITS:
            raise ValueError(
                f"the RSA key has {key.key_size} bits; use at least "
                f"{MIN_RSA_KEY_BITS}"
            )
        chosen = alg or "RS256"
        if not chosen.startswith(("RS", "PS")):
            raise ValueError(f"an RSA key cannot sign {chosen}; use RS256")
        return key, chosen
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("EC keys must use the P-256 curve (ES256)")
        chosen = alg or "ES256"
        if chosen != "ES256":
            raise ValueError(f"a P-256 key cannot sign {chosen}; use ES256")
        return key, chosen

    raise ValueError("only RSA and EC P-256 private keys are supported")


class ClientAuthenticator:
    """
    Adds the client's credentials to a token request.
    """

    def __init__(self, idp: IdPSettings) -> None:
        self._idp = idp
        self._assertion_audience = (
            idp.assertion_audience or idp.resolved_token_url
        )
        self._credential_file = (
            idp.private_key_file
            if idp.auth_method == "private_key_jwt"
            else idp.client_secret_file
        )
        # What the last request was built from, to notice a rotation.
        self._used_digest: bytes | None = None

    def key_material(self) -> bytes:
        """
        The secret, or the private key's PEM, as bytes: what the token
        cache's key is derived from, so a rotated credential voids it.

        Raises `CredentialError` when it cannot be read.
        """
        if self._idp.client_secret is not None:
            return self._idp.client_secret.get_secret_value().encode()
        path = self._credential_file
        assert path is not None
        try:
            contents = read_secret_file(path)
        except (OSError, ValueError) as exc:
            raise CredentialError(
                f"cannot read {str(path)!r}: {_reason(exc)}"
            ) from None

        return contents.strip()

    def credentials_changed(self) -> bool:
        """
        Whether the secret or key file differs from the last request's.

        Always ``False`` for a secret given inline, which cannot change.
        """
        if self._credential_file is None or self._used_digest is None:
            return False
        try:
            current = read_secret_file(self._credential_file)
        except (OSError, ValueError):
            return False

        return hashlib.sha256(current).digest() != self._used_digest

    def authenticate(
        self, form: dict[str, str], headers: dict[str, str], now: float
    ) -> None:
        """
        Put the credentials into ``form`` and ``headers`` for one request.

        Raises `CredentialError` when the secret or key cannot be read.
        """
        method = self._idp.auth_method
        client_id = self._idp.client_id
        if method == "private_key_jwt":
            form["client_id"] = client_id
            form["client_assertion_type"] = ASSERTION_TYPE
            form["client_assertion"] = self._assertion(now)
        elif method == "client_secret_basic":
            # RFC 6749 2.3.1: both parts are form-encoded before base64.
            secret = self._secret()
            pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
            encoded = base64.b64encode(pair.encode()).decode()
            # An IdP may echo the header back in an error description.
            redact_value(encoded, secret=True)
            headers["Authorization"] = f"Basic {encoded}"
        else:
            form["client_id"] = client_id
            form["client_secret"] = self._secret()

    def _secret(self) -> str:
        if self._idp.client_secret is not None:
            secret = self._idp.client_secret.get_secret_value()
            _redact_secret(secret)
            return secret
        path = self._idp.client_secret_file
        assert path is not None
        try:
            contents = read_secret_file(path)
            secret = contents.decode("utf-8").strip()
        except (OSError, ValueError) as exc:
            # ValueError covers UnicodeDecodeError too.
            raise CredentialError(
                f"cannot read idp.client_secret_file {str(path)!r} "
                f"({exc.__class__.__name__}: {_reason(exc)}); check the "
                "file and its mode"
            ) from None
        if not secret:
            # Likely caught half-way through a non-atomic rewrite.
            raise CredentialError(
                f"idp.client_secret_file {str(path)!r} is empty"
            )
        _redact_secret(secret)
        self._used_digest = hashlib.sha256(contents).digest()

        return secret

    def _assertion(self, now: float) -> str:
        path = self._idp.private_key_file
        assert path is not None
        try:
            pem = read_secret_file(path)
            key, alg = parse_private_key(pem, self._idp.private_key_alg, path)
        except (OSError, ValueError) as exc:
            raise CredentialError(
                f"cannot use idp.private_key_file: {_reason(exc)}"
            ) from None
        self._used_digest = hashlib.sha256(pem).digest()
        issued_at = int(now)
        claims: dict[str, Any] = {
            "iss": self._idp.client_id,
            "sub": self._idp.client_id,
            "aud": self._assertion_audience,
            "jti": uuid.uuid4().hex,
            "iat": issued_at,
            "exp": issued_at + ASSERTION_LIFETIME_SECONDS,
        }
        kid = self._idp.private_key_id
        assertion = jwt.encode(
            claims, key, algorithm=alg, headers={"kid": kid} if kid else None
        )
        redact_value(assertion)

        return assertion
