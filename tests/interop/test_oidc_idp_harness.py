"""Check the oidc-provider test IdP itself, with hand-made token requests.

Later interop tests trust this IdP to behave like a real one, so these
tests pin down what they rely on: the three client authentication
methods, ``audience`` selecting the JWT resource server with the
configured lifetime, the request counters, and secret rotation.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.interop import oidc_idp
from tests.interop.oidc_idp import (
    BASIC_CLIENT,
    DEFAULT_AUDIENCE,
    JWT_CLIENT,
    POST_CLIENT,
    IdpError,
    OidcProviderProcess,
)

pytestmark = pytest.mark.interop

Keys = tuple[Path, Path, Path]  # (rsa_pem, ec_pem, jwks) paths

TTL = 321  # unusual on purpose: no library default equals it
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """RSA and EC client keys plus their public JWKS."""
    oidc_idp.ensure_installed()
    return oidc_idp.write_test_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def idp(keys: Keys) -> Iterator[OidcProviderProcess]:
    """One IdP shared by the read-only tests of this module."""
    proc = OidcProviderProcess()
    proc.start(TTL, keys[2])
    yield proc
    proc.stop()


@pytest.fixture
def own_idp(keys: Keys) -> Iterator[OidcProviderProcess]:
    """A private IdP for tests that change its state."""
    proc = OidcProviderProcess()
    proc.start(TTL, keys[2])
    yield proc
    proc.stop()


class Redacted(str):
    """A str whose repr hides it, so failing asserts never show tokens."""

    __slots__ = ()

    def __repr__(self) -> str:
        """Stand-in text instead of the value."""
        return "'<redacted>'"


def post_token(
    url: str, form: dict[str, str], basic: tuple[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """POST a token request; return (HTTP status, decoded JSON body)."""
    # url is the loopback token endpoint the IdP reported.
    req = urllib.request.Request(  # noqa: S310
        url, data=urllib.parse.urlencode(form).encode(), method="POST"
    )
    req.add_header("Content-Type", "application/x-www-form-urlencoded")
    if basic is not None:
        # RFC 6749 2.3.1: form-encode id and secret before base64.
        pair = ":".join(urllib.parse.quote_plus(p) for p in basic)
        encoded = base64.b64encode(pair.encode()).decode()
        req.add_header("Authorization", f"Basic {encoded}")
    try:
        with _OPENER.open(req, timeout=10) as resp:
            status, body = resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, json.load(exc)
    if "access_token" in body:
        body["access_token"] = Redacted(body["access_token"])
    return status, body


def secret_post(
    idp: OidcProviderProcess, secret: str, **extra: str
) -> tuple[int, dict[str, Any]]:
    """Request a token as sidecar-post with ``secret``."""
    form = {
        "grant_type": "client_credentials",
        "client_id": POST_CLIENT,
        "client_secret": secret,
        **extra,
    }
    return post_token(idp.token_url, form)


def assertion(
    client_id: str, key_path: Path, alg: str, kid: str, aud: str | list[str]
) -> str:
    """Build a private_key_jwt client assertion."""
    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": aud,
        "jti": secrets.token_urlsafe(16),
        "iat": now,
        "exp": now + 60,
    }
    return jwt.encode(
        claims, key_path.read_bytes(), algorithm=alg, headers={"kid": kid}
    )


def jwt_form(token: str, **extra: str) -> dict[str, str]:
    """Form fields for a private_key_jwt token request."""
    return {
        "grant_type": "client_credentials",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": token,
        **extra,
    }


def verify_access_token(
    idp: OidcProviderProcess, token: str
) -> dict[str, Any]:
    """Check the JWT access token's signature and return its claims."""
    with _OPENER.open(idp.jwks_uri, timeout=10) as resp:
        jwks = jwt.PyJWKSet.from_dict(json.load(resp))
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in jwks.keys if k.key_id == kid)
    return jwt.decode(
        token,
        key.key,
        algorithms=["RS256"],
        audience=DEFAULT_AUDIENCE,
        issuer=idp.issuer,
    )


def test_ready_line_describes_loopback_issuer(
    idp: OidcProviderProcess,
) -> None:
    """The process reports a 127.0.0.1 issuer and its token endpoint."""
    assert idp.port > 0
    assert idp.issuer == f"http://127.0.0.1:{idp.port}"
    assert idp.token_url == f"{idp.issuer}/token"
    assert idp.running


def test_post_with_audience_yields_jwt_for_audience(
    idp: OidcProviderProcess,
) -> None:
    """``audience`` selects the resource server: JWT, its aud, the TTL."""
    secret = oidc_idp.client_secret(POST_CLIENT)
    status, body = secret_post(
        idp, secret, audience=DEFAULT_AUDIENCE, scope="orders.read"
    )
    assert status == 200, body
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == TTL
    assert body["scope"] == "orders.read"
    claims = verify_access_token(idp, body["access_token"])
    assert claims["aud"] == DEFAULT_AUDIENCE
    assert claims["client_id"] == POST_CLIENT
    assert claims["exp"] - claims["iat"] == TTL


def test_basic_without_audience_yields_opaque_token(
    idp: OidcProviderProcess,
) -> None:
    """No resource: an opaque token that still lives ``--ttl`` seconds."""
    creds = (BASIC_CLIENT, oidc_idp.client_secret(BASIC_CLIENT))
    status, body = post_token(
        idp.token_url, {"grant_type": "client_credentials"}, basic=creds
    )
    assert status == 200, body
    assert body["expires_in"] == TTL
    assert body["access_token"].count(".") == 0  # opaque, not a JWT


@pytest.mark.parametrize(
    "alg, key_index, kid",
    [
        ("RS256", 0, "rs"),
        ("ES256", 1, "es"),
    ],
)
@pytest.mark.parametrize("aud_kind", ["issuer", "token_url", "list"])
def test_private_key_jwt(
    idp: OidcProviderProcess,
    keys: Keys,
    alg: str,
    key_index: int,
    kid: str,
    aud_kind: str,
) -> None:
    """RS256 and ES256 assertions work with each accepted ``aud`` form."""
    auds: dict[str, str | list[str]] = {
        "issuer": idp.issuer,
        "token_url": idp.token_url,
        "list": [idp.issuer, "https://elsewhere.example/"],
    }
    token = assertion(JWT_CLIENT, keys[key_index], alg, kid, auds[aud_kind])
    status, body = post_token(
        idp.token_url, jwt_form(token, audience=DEFAULT_AUDIENCE)
    )
    assert status == 200, body
    claims = verify_access_token(idp, body["access_token"])
    assert claims["sub"] == JWT_CLIENT
    assert claims["exp"] - claims["iat"] == TTL


def test_private_key_jwt_rejects_foreign_aud_and_replay(
    idp: OidcProviderProcess, keys: Keys
) -> None:
    """A wrong ``aud`` and a reused assertion are both invalid_client."""
    wrong = assertion(
        JWT_CLIENT, keys[0], "RS256", "rs", "https://elsewhere.example/"
    )
    status, body = post_token(idp.token_url, jwt_form(wrong))
    assert (status, body["error"]) == (401, "invalid_client")

    once = assertion(JWT_CLIENT, keys[1], "ES256", "es", idp.issuer)
    assert post_token(idp.token_url, jwt_form(once))[0] == 200
    status, body = post_token(idp.token_url, jwt_form(once))
    assert (status, body["error"]) == (401, "invalid_client")


def test_wrong_secret_is_invalid_client(idp: OidcProviderProcess) -> None:
    """Bad secrets fail with invalid_client for post and basic alike.

    oidc-provider answers invalid_client with 401 even when the client
    did not use the Authorization header (RFC 6749 5.2 would allow 400),
    so the sidecar must treat both statuses alike.
    """
    status, body = secret_post(idp, "not-the-secret")
    assert (status, body["error"]) == (401, "invalid_client")
    status, body = post_token(
        idp.token_url,
        {"grant_type": "client_credentials"},
        basic=(BASIC_CLIENT, "not-the-secret"),
    )
    assert (status, body["error"]) == (401, "invalid_client")


def test_unknown_audience_is_invalid_target(
    idp: OidcProviderProcess,
) -> None:
    """An audience the IdP does not serve is refused, not ignored."""
    secret = oidc_idp.client_secret(POST_CLIENT)
    status, body = secret_post(idp, secret, audience="https://unknown.example")
    assert (status, body["error"]) == (400, "invalid_target")


def test_stats_count_requests_and_issued_tokens(
    idp: OidcProviderProcess,
) -> None:
    """Counters see every token POST, per client, and successes apart."""
    idp.reset()
    assert idp.stats() == {"token_requests": 0, "by_client": {}, "issued": 0}
    secret = oidc_idp.client_secret(POST_CLIENT)
    assert secret_post(idp, secret)[0] == 200
    assert secret_post(idp, secret, audience=DEFAULT_AUDIENCE)[0] == 200
    assert secret_post(idp, "not-the-secret")[0] == 401
    creds = (BASIC_CLIENT, oidc_idp.client_secret(BASIC_CLIENT))
    assert (
        post_token(
            idp.token_url, {"grant_type": "client_credentials"}, basic=creds
        )[0]
        == 200
    )
    # Unknown client: counted in the total only.
    assert (
        post_token(
            idp.token_url,
            {
                "grant_type": "client_credentials",
                "client_id": "nobody",
                "client_secret": "x",
            },
        )[0]
        == 401
    )
    assert idp.stats() == {
        "token_requests": 5,
        "by_client": {POST_CLIENT: 3, BASIC_CLIENT: 1},
        "issued": 3,
    }
    idp.reset()
    assert idp.stats()["token_requests"] == 0


def test_rotate_secret_then_restart(own_idp: OidcProviderProcess) -> None:
    """Rotation takes effect at once; restart keeps port, resets state."""
    old = oidc_idp.client_secret(POST_CLIENT)
    new = "post-secret-rotated-" + secrets.token_hex(4)
    assert secret_post(own_idp, old)[0] == 200

    own_idp.rotate_secret(POST_CLIENT, new)
    status, body = secret_post(own_idp, old)
    assert (status, body["error"]) == (401, "invalid_client")
    assert secret_post(own_idp, new)[0] == 200
    # The other clients are untouched.
    creds = (BASIC_CLIENT, oidc_idp.client_secret(BASIC_CLIENT))
    assert (
        post_token(
            own_idp.token_url,
            {"grant_type": "client_credentials"},
            basic=creds,
        )[0]
        == 200
    )

    port, issuer = own_idp.port, own_idp.issuer
    own_idp.restart()
    assert (own_idp.port, own_idp.issuer) == (port, issuer)
    assert own_idp.stats()["token_requests"] == 0
    assert secret_post(own_idp, old)[0] == 200
    assert secret_post(own_idp, new)[0] == 401


def test_rotate_secret_rejects_unknown_and_keyed_clients(
    own_idp: OidcProviderProcess,
) -> None:
    """Only existing client_secret_* clients can get a new secret."""
    with pytest.raises(IdpError, match="404"):
        own_idp.rotate_secret("nobody", "x")
    with pytest.raises(IdpError, match="400"):
        own_idp.rotate_secret(JWT_CLIENT, "x")


def test_sigterm_exits_cleanly(keys: Keys) -> None:
    """stop() sends SIGTERM and the server exits with status 0."""
    proc = OidcProviderProcess().start(TTL, keys[2])
    assert proc.stop() == 0
    assert not proc.running


def test_a_silent_start_is_described(keys: Keys) -> None:
    """
    An IdP that misses its deadline is reported with its state, CPU time
    and the machine's load (a deadline of 0 has passed before it starts),
    and is not left running.
    """
    proc = OidcProviderProcess()
    with pytest.raises(
        IdpError,
        match=r"no ready line within 0 s \(pid \d+ state [A-Z], "
        r"\d+\.\d\d s CPU; load average [\d.]+ [\d.]+ [\d.]+ on \d+ CPUs\)",
    ):
        proc.start(TTL, keys[2], timeout=0)
    assert not proc.running


def test_start_failure_reports_stderr(tmp_path: Path) -> None:
    """A server that dies at startup raises with its stderr attached."""
    proc = OidcProviderProcess()
    with pytest.raises(IdpError, match=r"(?s)exited with status.*ENOENT"):
        proc.start(TTL, tmp_path / "missing-jwks.json")
    assert not proc.running


def test_write_test_keys_files(tmp_path: Path) -> None:
    """Private keys are owner-only PEM; the JWKS holds public keys only."""
    rsa_pem, ec_pem, jwks_path = oidc_idp.write_test_keys(tmp_path)
    for pem in (rsa_pem, ec_pem):
        assert pem.stat().st_mode & 0o777 == 0o600
        assert pem.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    keys = json.loads(jwks_path.read_text())["keys"]
    assert [(k["kid"], k["kty"], k["alg"]) for k in keys] == [
        ("rs", "RSA", "RS256"),
        ("es", "EC", "ES256"),
    ]
    assert not any("d" in k for k in keys)


def test_ensure_installed_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without node_modules the error says which command to run."""
    monkeypatch.setattr(oidc_idp, "IDP_DIR", tmp_path)
    with pytest.raises(IdpError, match="npm ci --prefix tests/interop/idp"):
        oidc_idp.ensure_installed()
