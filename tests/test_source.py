"""
Token requests as the fake IdP sees them, and how each kind of answer
becomes a token or an error.
"""

from __future__ import annotations

import base64
import email.utils
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sidecar.clock import SystemClock
from sidecar.config import Settings
from sidecar.errors import (
    CredentialError,
    IdPRejectedError,
    IdPResponseError,
    IdPUnavailableError,
)
from sidecar.source import (
    MAX_RESPONSE_BYTES,
    ClientCredentialsSource,
    parse_retry_after,
)
from tests.conftest import CLIENT_SECRET
from tests.fakes import FakeIdP, Reply, oauth_error


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def make_source(
    make_settings: Callable[..., Settings], session: aiohttp.ClientSession
) -> Callable[..., ClientCredentialsSource]:
    def make(**idp: Any) -> ClientCredentialsSource:
        settings = make_settings(idp=idp)
        return ClientCredentialsSource(settings.idp, session, SystemClock())

    return make


async def test_client_secret_post_sends_the_standard_form(
    fake_idp: FakeIdP, make_source: Callable[..., ClientCredentialsSource]
) -> None:
    """
    client_secret_post puts id, secret, audience and scope in the form.
    """
    source = make_source(audience="https://api.qlam.example", scope="a b")

    parsed = await source.fetch()

    request = fake_idp.requests[0]
    assert request.form == {
        "grant_type": "client_credentials",
        "client_id": "billing",
        "client_secret": CLIENT_SECRET,
        "audience": "https://api.qlam.example",
        "scope": "a b",
    }
    assert "Authorization" not in request.headers
    assert parsed.token.access_token == fake_idp.issued[0]


async def test_client_secret_basic_encodes_credentials(
    fake_idp: FakeIdP, make_source: Callable[..., ClientCredentialsSource]
) -> None:
    """
    client_secret_basic form-encodes id and secret into the header and
    keeps the secret out of the body.
    """
    source = make_source(
        auth_method="client_secret_basic",
        client_id="bill:ing",
        client_secret="p@ss word/+",
    )

    await source.fetch()

    request = fake_idp.requests[0]
    scheme, _, encoded = request.headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded).decode() == (
        "bill%3Aing:p%40ss%20word%2F%2B"
    )
    assert "client_secret" not in request.form
    assert "client_id" not in request.form


def _write_key(path: Path, kind: str) -> Any:
    if kind == "rsa":
        key: Any = rsa.generate_private_key(65537, 2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key.public_key()


@pytest.mark.parametrize(("kind", "alg"), [("rsa", "RS256"), ("ec", "ES256")])
async def test_private_key_jwt_signs_a_fresh_assertion_each_time(
    kind: str,
    alg: str,
    tmp_path: Path,
    fake_idp: FakeIdP,
    token_url: str,
    make_source: Callable[..., ClientCredentialsSource],
) -> None:
    """
    private_key_jwt sends an RFC 7523 assertion with a new jti per
    request, signed with the configured key.
    """
    public_key = _write_key(tmp_path / "key.pem", kind)
    source = make_source(
        auth_method="private_key_jwt",
        client_secret=None,
        private_key_file=str(tmp_path / "key.pem"),
        private_key_id="k1",
    )

    await source.fetch()
    await source.fetch()

    claims = []
    for request in fake_idp.requests:
        form = request.form
        assert form["client_assertion_type"] == (
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        )
        assertion = form["client_assertion"]
        assert jwt.get_unverified_header(assertion)["kid"] == "k1"
        claims.append(
            jwt.decode(
                assertion, public_key, algorithms=[alg], audience=token_url
            )
        )
        assert "client_secret" not in form
    assert claims[0]["iss"] == claims[0]["sub"] == "billing"
    assert claims[0]["jti"] != claims[1]["jti"]
    assert 0 < claims[0]["exp"] - claims[0]["iat"] <= 60


async def test_secret_file_is_read_at_each_request(
    tmp_path: Path,
    fake_idp: FakeIdP,
    make_source: Callable[..., ClientCredentialsSource],
) -> None:
    """
    A rotated secret file is used from the next request on.
    """
    secret_file = tmp_path / "secret"
    secret_file.write_text("first-secret-value\n")
    source = make_source(
        client_secret=None, client_secret_file=str(secret_file)
    )

    await source.fetch()
    secret_file.write_text("second-secret-value\n")
    await source.fetch()

    sent = [r.form["client_secret"] for r in fake_idp.requests]
    assert sent == ["first-secret-value", "second-secret-value"]


async def test_unreadable_secret_file_is_a_credential_error(
    tmp_path: Path,
    make_source: Callable[..., ClientCredentialsSource],
) -> None:
    """
    A secret file that vanished is the sidecar's own problem, named as
    such, and nothing is sent to the IdP.
    """
    secret_file = tmp_path / "secret"
    secret_file.write_text("first-secret-value\n")
    source = make_source(
        client_secret=None, client_secret_file=str(secret_file)
    )
    secret_file.unlink()

    with pytest.raises(CredentialError, match="client_secret_file"):
        await source.fetch()


@pytest.mark.parametrize(
    ("reply", "error_type", "text"),
    [
        (
            oauth_error(401, "invalid_client"),
            IdPRejectedError,
            "check the client secret",
        ),
        (
            oauth_error(400, "invalid_client"),
            IdPRejectedError,
            "invalid_client",
        ),
        (
            oauth_error(400, "unauthorized_client"),
            IdPRejectedError,
            "allow the client_credentials grant",
        ),
        (oauth_error(400, "invalid_scope"), IdPRejectedError, "idp.scope"),
        (oauth_error(400, "invalid_target"), IdPRejectedError, "idp.audience"),
        (oauth_error(403, "access_denied"), IdPRejectedError, "idp.audience"),
        (
            Reply(status=404, body=b"not here", content_type="text/plain"),
            IdPRejectedError,
            "no token endpoint",
        ),
        (
            Reply(status=302, body=b"", headers={"Location": "/elsewhere"}),
            IdPRejectedError,
            "redirects",
        ),
        (
            oauth_error(429, "too_many_requests"),
            IdPUnavailableError,
            "HTTP 429",
        ),
        (
            Reply(
                status=500, body=b"<html>oops</html>", content_type="text/html"
            ),
            IdPUnavailableError,
            "HTTP 500",
        ),
        (
            Reply(
                status=200,
                body=b"<html>login</html>",
                content_type="text/html",
            ),
            IdPResponseError,
            "not JSON",
        ),
        (Reply(status=200, body=b""), IdPResponseError, "empty body"),
        (
            Reply(status=200, body={"error": "server_error"}),
            IdPResponseError,
            "server_error",
        ),
        (
            Reply(status=200, body=b"x" * (MAX_RESPONSE_BYTES + 1)),
            IdPResponseError,
            "larger than",
        ),
    ],
    ids=[
        "401-invalid-client",
        "400-invalid-client",
        "unauthorized-client",
        "invalid-scope",
        "invalid-target",
        "access-denied",
        "404",
        "redirect",
        "429",
        "500-html",
        "200-html",
        "200-empty",
        "200-oauth-error",
        "200-huge",
    ],
)
async def test_answers_map_to_errors(
    reply: Reply,
    error_type: type[Exception],
    text: str,
    fake_idp: FakeIdP,
    make_source: Callable[..., ClientCredentialsSource],
) -> None:
    """
    Each kind of bad answer becomes the error class the refresher acts
    on, with a message that says what to check, and no secret.
    """
    fake_idp.then(reply)
    source = make_source()

    with pytest.raises(error_type) as caught:
        await source.fetch()

    assert text in str(caught.value)
    assert CLIENT_SECRET not in str(caught.value)
    assert fake_idp.count == 1


async def test_slow_idp_hits_the_deadline(
    fake_idp: FakeIdP, make_source: Callable[..., ClientCredentialsSource]
) -> None:
    """
    An IdP slower than timeout_seconds makes the request fail as
    unavailable.
    """
    fake_idp.then(Reply(body={"access_token": "x"}, delay_seconds=5))
    source = make_source(timeout_seconds=0.1)

    with pytest.raises(IdPUnavailableError, match="did not answer"):
        await source.fetch()


async def test_unreachable_idp_is_unavailable(
    make_settings: Callable[..., Settings],
    session: aiohttp.ClientSession,
    unused_tcp_port: int,
) -> None:
    """
    A refused connection is an outage, not a rejection.
    """
    settings = make_settings(
        idp={"token_url": f"http://127.0.0.1:{unused_tcp_port}/token"}
    )
    source = ClientCredentialsSource(settings.idp, session, SystemClock())

    with pytest.raises(IdPUnavailableError, match="cannot reach"):
        await source.fetch()


async def test_429_carries_retry_after(
    fake_idp: FakeIdP, make_source: Callable[..., ClientCredentialsSource]
) -> None:
    """
    The IdP's Retry-After travels on the error to the back-off.
    """
    fake_idp.then(oauth_error(429, "slow_down", **{"Retry-After": "42"}))
    source = make_source()

    with pytest.raises(IdPUnavailableError) as caught:
        await source.fetch()

    assert caught.value.retry_after_seconds == 42


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("17", 17.0),
        (" 0 ", 0.0),
        (email.utils.formatdate(1_000_030, usegmt=True), 30.0),
        (email.utils.formatdate(999_000, usegmt=True), 0.0),
        ("soon", None),
        ("-5", None),
        ("1e3", None),
    ],
    ids=[
        "absent",
        "seconds",
        "zero",
        "date",
        "past-date",
        "garbage",
        "negative",
        "exponent",
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    """
    Retry-After is read as seconds or an HTTP date, never negative.
    """
    assert parse_retry_after(value, now=1_000_000) == expected
