"""
Token requests to the IdP with the OAuth2 client-credentials grant.

A `TokenSource` makes exactly one HTTP request per `fetch` and turns
every outcome into a `Token` or an `IdPError` subclass; deciding when to
ask, and how often to retry, is the refresher's job.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
from collections.abc import Callable
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp

from sidecar import __version__
from sidecar.clock import Clock
from sidecar.config import IdPSettings
from sidecar.credential import ClientAuthenticator
from sidecar.errors import (
    IdPError,
    IdPRejectedError,
    IdPResponseError,
    IdPUnavailableError,
)
from sidecar.idpquota import QuotaBucket, quota_buckets
from sidecar.response import (
    ParsedResponse,
    parse_oauth_error,
    parse_token_response,
)

#: A token response is a few KiB; more is an error page or an attack.
MAX_RESPONSE_BYTES = 1024 * 1024

_HINTS = {
    "invalid_client": (
        "check the client secret (idp.client_secret_file or "
        "SIDECAR_IDP__CLIENT_SECRET), the private key and idp.auth_method"
    ),
    "unauthorized_client": (
        "allow the client_credentials grant for this client at the IdP"
    ),
    "invalid_scope": "check idp.scope against the client's grants",
    "invalid_target": "check idp.audience against the IdP's APIs",
    "access_denied": "check idp.audience and the client's grants",
    "unsupported_grant_type": (
        "the endpoint does not do client_credentials; check idp.token_url"
    ),
}


class TokenSource(Protocol):
    """
    Something that can be asked for a fresh token.
    """

    async def fetch(self) -> ParsedResponse:
        """
        Request one new token; raise an `IdPError` subclass on failure.
        """

    def credentials_changed(self) -> bool:
        """
        Whether the credentials on disk differ from the last request's.
        """


class ClientCredentialsSource:
    """
    Asks the IdP's token endpoint for a client-credentials token.
    """

    def __init__(
        self,
        idp: IdPSettings,
        session: aiohttp.ClientSession,
        clock: Clock,
        on_quota: Callable[[list[QuotaBucket]], None] | None = None,
    ) -> None:
        self._idp = idp
        self._url = idp.resolved_token_url
        self._session = session
        self._clock = clock
        self._authenticator = ClientAuthenticator(idp)
        self._on_quota = on_quota

    def credentials_changed(self) -> bool:
        return self._authenticator.credentials_changed()

    def key_material(self) -> bytes:
        """
        The credential the token cache's key derives from; see
        `ClientAuthenticator.key_material`.
        """
        return self._authenticator.key_material()

    @property
    def endpoint(self) -> str:
        """
        The token endpoint's scheme, host and path, for logs.
        """
        parts = urlsplit(self._url)

        return f"{parts.scheme}://{parts.netloc}{parts.path}"

    async def fetch(self) -> ParsedResponse:
        requested_at = self._clock.now()
        form = {"grant_type": "client_credentials"}
        if self._idp.audience:
            form["audience"] = self._idp.audience
        if self._idp.scope:
            form["scope"] = self._idp.scope
        headers = {
            "Accept": "application/json",
            "User-Agent": f"token-sidecar/{__version__}",
        }
        self._authenticator.authenticate(form, headers, requested_at)

        status, content_type, retry_after, body = await self._post(
            form, headers
        )

        if 200 <= status < 300:
            return parse_token_response(body, content_type, requested_at)
        raise self._error_for(status, retry_after, body)

    async def _post(
        self, form: dict[str, str], headers: dict[str, str]
    ) -> tuple[int, str, str | None, bytes]:
        try:
            async with asyncio.timeout(self._idp.timeout_seconds):
                async with self._session.post(
                    self._url,
                    data=form,
                    headers=headers,
                    # A redirect would resend the credentials to wherever
                    # the IdP (or something posing as it) points.
                    allow_redirects=False,
                ) as response:
                    body = await _read_limited(response)
                    buckets = quota_buckets(response.headers)
                    if buckets and self._on_quota is not None:
                        self._on_quota(buckets)
                    return (
                        response.status,
                        response.content_type,
                        response.headers.get("Retry-After"),
                        body,
                    )
        except TimeoutError:
            raise IdPUnavailableError(
                f"IdP did not answer within {self._idp.timeout_seconds:g} "
                f"seconds ({self.endpoint})"
            ) from None
        except aiohttp.ClientError as exc:
            raise IdPUnavailableError(
                f"cannot reach the IdP at {self.endpoint} "
                f"({exc.__class__.__name__}: {exc})"
            ) from None

    def _error_for(
        self, status: int, retry_after: str | None, body: bytes
    ) -> IdPError:
        error, description = parse_oauth_error(body)
        said = f"HTTP {status}" + (f", {error}" if error else "")
        if description:
            said += f": {description}"

        if status == 429 or status == 408 or status >= 500:
            return IdPUnavailableError(
                f"IdP is unavailable ({said})",
                status=status,
                oauth_error=error,
                retry_after_seconds=parse_retry_after(
                    retry_after, self._clock.now()
                ),
            )
        if 300 <= status < 400:
            return IdPRejectedError(
                f"IdP token endpoint {self.endpoint} redirects ({said}); "
                "set idp.token_url to the final token endpoint",
                status=status,
            )

        hint = _HINTS.get(error or "")
        if hint is None and status in (404, 405):
            hint = "no token endpoint there; check idp.token_url"
        hint = hint or "check idp.token_url and the client at the IdP"
        return IdPRejectedError(
            f"IdP rejected client {self._idp.client_id!r} ({said}); {hint}",
            status=status,
            oauth_error=error,
        )


def parse_retry_after(value: str | None, now: float) -> float | None:
    """
    Seconds to wait from a ``Retry-After`` value (seconds or HTTP date).

    ``None`` when absent or unreadable; never negative.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    seconds = when.timestamp() - now
    if math.isnan(seconds):
        return None

    return max(0.0, seconds)


async def _read_limited(response: aiohttp.ClientResponse) -> bytes:
    chunks = []
    size = 0
    while chunk := await response.content.read(64 * 1024):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise IdPResponseError(
                f"IdP response is larger than {MAX_RESPONSE_BYTES} bytes",
                status=response.status,
            )
        chunks.append(chunk)

    return b"".join(chunks)
