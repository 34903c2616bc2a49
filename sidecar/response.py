"""
Turn the body of an IdP token response into a `Token`, or say why not.

Everything the IdP sends is untrusted: the parser accepts only what it
can serve safely and names the first thing wrong, without quoting the
body (it may hold a token).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import jwt

from sidecar.errors import IdPResponseError
from sidecar.token import Token

#: Longer than any M2M token lifetime seen in practice; anything beyond is
#: a unit mix-up (milliseconds) or garbage.
MAX_LIFETIME_SECONDS = 366 * 24 * 3600

#: Shorter tokens cannot be kept fresh: the refresher would ask for one
#: several times a second.
MIN_LIFETIME_SECONDS = 1.0

#: Used when the IdP gives no lifetime at all and the token is not a JWT.
DEFAULT_LIFETIME_SECONDS = 300

#: Tokens end up in HTTP headers; larger ones are not tokens.
MAX_TOKEN_LENGTH = 16 * 1024


#: A plain decimal number: float() alone would also take "1_000", "inf"
#: and non-ASCII digits.
_DECIMAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", re.ASCII)


@dataclass(frozen=True, slots=True)
class ParsedResponse:
    """
    A usable token and the warnings its response earned.
    """

    token: Token
    warnings: tuple[str, ...] = ()


def parse_oauth_error(body: bytes) -> tuple[str | None, str | None]:
    """
    Return ``(error, error_description)`` from an OAuth error body.

    Both are ``None`` when the body is not OAuth error JSON; the texts
    are cut short and stripped of control characters for logging.
    """
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(data, dict):
        return None, None

    return _clean(data.get("error")), _clean(data.get("error_description"))


def parse_token_response(
    body: bytes, content_type: str, requested_at: float
) -> ParsedResponse:
    """
    Validate a 2xx token response and build a `Token` from it.

    ``requested_at`` is when the request was sent; the lifetime counts
    from there. Raises `IdPResponseError` naming the problem.
    """
    data = _load_object(body, content_type)
    if "error" in data:
        error, description = parse_oauth_error(body)
        raise IdPResponseError(
            f"IdP answered success but with OAuth error {error!r}"
            + (f" ({description})" if description else ""),
            oauth_error=error,
        )

    access_token = _access_token(data.get("access_token"))
    warnings = _check_token_type(data)
    lifetime, lifetime_warning = _lifetime(
        data.get("expires_in"), access_token, requested_at
    )
    if lifetime_warning:
        warnings.append(lifetime_warning)
    token = Token(
        access_token=access_token,
        issued_at=requested_at,
        expires_at=requested_at + lifetime,
    )

    return ParsedResponse(token=token, warnings=tuple(warnings))


def _load_object(body: bytes, content_type: str) -> dict[str, Any]:
    if not body.strip():
        raise IdPResponseError("IdP answered with an empty body")
    try:
        data = json.loads(body)
    # RecursionError: deeply nested arrays, a cheap way to crash parsers.
    except (ValueError, RecursionError):
        kind = content_type or "no content type"
        raise IdPResponseError(
            f"IdP answered with a body that is not JSON ({kind}, "
            f"{len(body)} bytes); check that token_url is the token "
            "endpoint and not a login page or a proxy"
        ) from None
    if not isinstance(data, dict):
        raise IdPResponseError(
            f"IdP answered with JSON {type(data).__name__}, not an object"
        )

    return data


def _access_token(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise IdPResponseError(
            "IdP response has no access_token (or it is not a string)"
        )
    if len(value) > MAX_TOKEN_LENGTH:
        raise IdPResponseError(
            f"IdP access_token is {len(value)} characters long; "
            f"at most {MAX_TOKEN_LENGTH} are accepted"
        )
    # Visible ASCII only: a space, newline or non-ASCII byte in a token
    # would break (or inject into) the consumers' Authorization headers.
    if not all("!" <= ch <= "~" for ch in value):
        raise IdPResponseError(
            "IdP access_token contains characters that cannot go into an "
            "HTTP header (spaces, control or non-ASCII characters)"
        )

    return value


def _check_token_type(data: dict[str, Any]) -> list[str]:
    token_type = data.get("token_type")
    if token_type is None:
        return ["IdP response has no token_type; treating it as Bearer"]
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        shown = _clean(token_type) if isinstance(token_type, str) else "?"
        raise IdPResponseError(
            f"IdP issued token_type {shown!r}; only Bearer tokens can be "
            "served (DPoP and others need a proof per request)"
        )

    return []


def _lifetime(
    value: object, access_token: str, requested_at: float
) -> tuple[float, str | None]:
    if value is None:
        return _lifetime_without_expires_in(access_token, requested_at)

    seconds = _number(value)
    if seconds is None:
        raise IdPResponseError(
            "IdP expires_in is not a number (got "
            f"{type(value).__name__}); expected seconds"
        )
    _check_lifetime(seconds, "expires_in")

    # A JWT's exp is whole seconds on the IdP's clock and can fall up to
    # a second before requested_at + expires_in; the earlier one wins, so
    # a short token is never served past its own exp. An exp already
    # past means the clocks disagree, and expires_in is the better guide.
    exp = _jwt_exp(access_token)
    if exp is not None and requested_at < exp < requested_at + seconds:
        _check_lifetime(exp - requested_at, "the JWT's exp")
        return exp - requested_at, None
    if exp is not None and exp <= requested_at:
        return seconds, (
            "the token's exp lies before this host's current time; "
            "check the clocks of this host and the IdP (using expires_in)"
        )

    return seconds, None


def _lifetime_without_expires_in(
    access_token: str, requested_at: float
) -> tuple[float, str | None]:
    exp = _jwt_exp(access_token)
    if exp is None:
        return DEFAULT_LIFETIME_SECONDS, (
            "IdP response has no expires_in and the token is not a JWT "
            f"with exp; assuming {DEFAULT_LIFETIME_SECONDS} seconds"
        )
    seconds = exp - requested_at
    _check_lifetime(seconds, "the JWT's exp")

    return seconds, None


def _number(value: object) -> float | None:
    # bool is an int subclass in Python; true/false is no lifetime.
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            return float(value.strip())
    except OverflowError:
        # An integer beyond the float range: as good as infinite.
        return math.inf
    except ValueError:
        return None

    return None


def _check_lifetime(seconds: float, what: str) -> None:
    if math.isnan(seconds) or math.isinf(seconds):
        raise IdPResponseError(f"IdP lifetime from {what} is not finite")
    if 0 < seconds < MIN_LIFETIME_SECONDS:
        raise IdPResponseError(
            f"IdP lifetime from {what} is {seconds:g} seconds; tokens "
            f"living under {MIN_LIFETIME_SECONDS:g} s cannot be kept fresh"
        )
    if seconds <= 0:
        raise IdPResponseError(
            f"IdP lifetime from {what} is {seconds:g} seconds: the token is "
            "already expired (check this host's clock if it is a JWT exp)"
        )
    if seconds > MAX_LIFETIME_SECONDS:
        raise IdPResponseError(
            f"IdP lifetime from {what} is {seconds:g} seconds, more than a "
            "year; refusing it as a likely unit error"
        )


def _jwt_exp(access_token: str) -> float | None:
    try:
        claims = jwt.decode(
            access_token,
            options={"verify_signature": False, "verify_exp": False},
        )
    except jwt.PyJWTError:
        return None
    exp = claims.get("exp")

    return _number(exp)


def _clean(value: object, limit: int = 200) -> str | None:
    if not isinstance(value, str):
        return None
    printable = "".join(ch if ch.isprintable() else "?" for ch in value)

    return printable[:limit]
