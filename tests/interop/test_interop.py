"""
The sidecar against a real, independent IdP: oidc-provider on loopback,
with tokens living a few seconds so that real refreshes happen.

The IdP's own counters are the judge of how many token requests the
sidecar made.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from sidecar.config import Settings
from sidecar.configload import settings_from_dict
from sidecar.token import RefreshPolicy
from tests.conftest import METADATA, token_url_of
from tests.interop.oidc_idp import (
    BASIC_CLIENT,
    DEFAULT_AUDIENCE,
    JWT_CLIENT,
    POST_CLIENT,
    OidcProviderProcess,
    client_secret,
    write_test_keys,
)

pytestmark = pytest.mark.interop

Keys = tuple[Path, Path, Path]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return write_test_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def start_idp(keys: Keys) -> Iterator[Callable[[int], OidcProviderProcess]]:
    """
    Start oidc-provider with a given token lifetime; stopped afterwards.
    """
    started: list[OidcProviderProcess] = []

    def start(ttl_seconds: int) -> OidcProviderProcess:
        idp = OidcProviderProcess().start(ttl_seconds, keys[2])
        started.append(idp)
        return idp

    yield start
    for idp in started:
        idp.stop()


def sidecar_settings(
    idp: OidcProviderProcess, keys: Keys, client: str, **tables: Any
) -> Settings:
    """
    Settings for ``client`` of the real IdP, asking for its audience.
    """
    idp_table: dict[str, Any] = {
        "token_url": idp.token_url,
        "client_id": client,
        "audience": DEFAULT_AUDIENCE,
        "scope": "orders.read",
    }
    if client == JWT_CLIENT:
        idp_table |= {
            "auth_method": "private_key_jwt",
            "private_key_file": str(keys[1]),
            "private_key_id": "es",
        }
    else:
        idp_table |= {"client_secret": client_secret(client)}
        if client == BASIC_CLIENT:
            idp_table["auth_method"] = "client_secret_basic"
    data = {
        "idp": idp_table,
        "retry": {"backoff_initial_seconds": 0.2, "backoff_max_seconds": 1},
        "listen": {"port": 0},
        "ops": {"port": 0},
    }
    for table, values in tables.items():
        data.setdefault(table, {}).update(values)

    return settings_from_dict(data)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


async def get_token(
    http: aiohttp.ClientSession, url: str
) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    async with http.get(url, headers=METADATA) as response:
        return response.status, await response.json(), response.headers


async def idp_verified_claims(
    http: aiohttp.ClientSession, idp: OidcProviderProcess, token: str
) -> dict[str, Any]:
    """
    The token's claims, its signature checked with the IdP's own keys.
    """
    async with http.get(idp.jwks_uri) as response:
        jwks = jwt.PyJWKSet.from_dict(await response.json())
    kid = jwt.get_unverified_header(token)["kid"]

    return jwt.decode(
        token,
        jwks[kid].key,
        algorithms=["RS256", "ES256", "PS256"],
        audience=DEFAULT_AUDIENCE,
    )


@pytest.mark.parametrize(
    "client",
    [POST_CLIENT, BASIC_CLIENT, JWT_CLIENT],
    ids=["client_secret_post", "client_secret_basic", "private_key_jwt"],
)
async def test_each_auth_method_gets_a_token_for_the_audience(
    client: str,
    keys: Keys,
    start_idp: Callable[[int], OidcProviderProcess],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    With every client authentication method the sidecar obtains a token
    that the IdP signed for the configured audience, in one request.
    """
    idp = start_idp(60)
    sidecar = await start_sidecar(sidecar_settings(idp, keys, client))

    status, body, _ = await get_token(http, token_url_of(sidecar))
    claims = await idp_verified_claims(http, idp, body["access_token"])

    assert status == 200
    assert claims["aud"] == DEFAULT_AUDIENCE
    assert claims["client_id"] == client
    assert "orders.read" in claims["scope"].split()
    assert await asyncio.to_thread(idp.stats) == {
        "token_requests": 1,
        "by_client": {client: 1},
        "issued": 1,
    }


async def test_500_concurrent_cold_start_requests_cost_one_idp_request(
    keys: Keys,
    start_idp: Callable[[int], OidcProviderProcess],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    500 callers at a cold start: the IdP counts one token request, and
    all callers get the same token.
    """
    idp = start_idp(60)
    sidecar = await start_sidecar(sidecar_settings(idp, keys, POST_CLIENT))
    url = token_url_of(sidecar)

    results = await asyncio.gather(*(get_token(http, url) for _ in range(500)))

    assert {status for status, _, _ in results} == {200}
    assert len({body["access_token"] for _, body, _ in results}) == 1
    assert (await asyncio.to_thread(idp.stats))["token_requests"] == 1


async def test_five_second_tokens_for_thirty_seconds(
    keys: Keys,
    start_idp: Callable[[int], OidcProviderProcess],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    With 5-second tokens, every answer over 30 seconds is 200 with at
    least the scaled minimum TTL left by the IdP's own exp, and the IdP
    sees about one request per refresh_at of a lifetime.
    """
    idp = start_idp(5)
    sidecar = await start_sidecar(sidecar_settings(idp, keys, POST_CLIENT))
    url = token_url_of(sidecar)
    # The scaled minimum for a token that lives at least 4 s (the IdP's
    # exp is whole seconds) under the default policy.
    min_ttl = RefreshPolicy().min_ttl_for_lifetime(4.0)
    answers = []

    started = time.monotonic()
    while time.monotonic() - started < 30:
        status, body, _ = await get_token(http, url)
        received_at = time.time()
        exp = jwt.decode(
            body.get("access_token", ""),
            options={"verify_signature": False},
        )["exp"]
        answers.append((status, exp - received_at))
        # Pacing the load, not waiting for an event.
        await asyncio.sleep(0.05)
    requests = (await asyncio.to_thread(idp.stats))["token_requests"]

    assert {status for status, _ in answers} == {200}
    assert min(left for _, left in answers) >= min_ttl
    # 30 s / (0.88..0.9 of a 4-5 s life) is 6.7 to 8.5; plus the first.
    assert 7 <= requests <= 10


async def test_idp_outage_expiry_and_recovery(
    keys: Keys,
    start_idp: Callable[[int], OidcProviderProcess],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    Stopping the IdP changes nothing while the token is valid; after
    expiry callers get 503 with Retry-After; restarting the IdP heals
    the sidecar without a restart.
    """
    idp = start_idp(6)
    sidecar = await start_sidecar(sidecar_settings(idp, keys, POST_CLIENT))
    url = token_url_of(sidecar)
    _, first, _ = await get_token(http, url)

    await asyncio.to_thread(idp.stop)
    during = await get_token(http, url)
    outage: list[tuple[int, Any]] = []

    async def expired() -> bool:
        status, _, headers = await get_token(http, url)
        outage.append((status, headers.get("Retry-After")))
        return status == 503

    await _poll(expired, timeout_seconds=15)
    await asyncio.to_thread(idp.restart)

    async def healed() -> bool:
        status, body, _ = await get_token(http, url)
        return status == 200 and body["access_token"] != first["access_token"]

    await _poll(healed, timeout_seconds=15)

    assert during[0] == 200
    assert during[1]["access_token"] == first["access_token"]
    assert outage[-1][0] == 503
    assert int(outage[-1][1]) >= 1
    assert {s for s, _ in outage[:-1]} <= {200}


async def _poll(check: Callable[[], Any], timeout_seconds: float) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.05)
