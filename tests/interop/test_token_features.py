"""
min_ttl, invalidation and long-polling against the real IdP, judged by
its own request counter.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.config import Settings
from sidecar.configload import settings_from_dict
from tests.conftest import METADATA, token_url_of
from tests.interop.oidc_idp import (
    DEFAULT_AUDIENCE,
    POST_CLIENT,
    OidcProviderProcess,
    client_secret,
    write_test_keys,
)

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def jwks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_keys(tmp_path_factory.mktemp("keys"))[2]


@pytest.fixture
def start_idp(jwks: Path) -> Iterator[Callable[[int], OidcProviderProcess]]:
    started: list[OidcProviderProcess] = []

    def start(ttl_seconds: int) -> OidcProviderProcess:
        idp = OidcProviderProcess().start(ttl_seconds, jwks)
        started.append(idp)
        return idp

    yield start
    for idp in started:
        idp.stop()


def settings_for(idp: OidcProviderProcess, **tables: Any) -> Settings:
    data: dict[str, Any] = {
        "idp": {
            "token_url": idp.token_url,
            "client_id": POST_CLIENT,
            "client_secret": client_secret(POST_CLIENT),
            "audience": DEFAULT_AUDIENCE,
        },
        "listen": {"port": 0},
        "ops": {"port": 0},
        "refresh": {"invalidate_min_interval_seconds": 0},
    }
    for table, values in tables.items():
        data.setdefault(table, {}).update(values)
    return settings_from_dict(data)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get(
    http: aiohttp.ClientSession, url: str
) -> tuple[int, dict[str, Any], str]:
    async with http.get(url, headers=METADATA) as response:
        body = await response.json() if response.status == 200 else {}
        return response.status, body, response.headers.get("ETag", "")


async def requests_at(idp: OidcProviderProcess) -> int:
    stats = await asyncio.to_thread(idp.stats)
    return int(stats["token_requests"])


async def test_min_ttl_gets_one_fresher_token(
    start_idp: Callable[[int], OidcProviderProcess],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    Once the token has less life than a caller asks for, one request to
    the IdP gets a fresher token, and only one.
    """
    idp = start_idp(20)
    sidecar = await start_sidecar(settings_for(idp))
    url = token_url_of(sidecar)
    _, first, _ = await get(http, url)

    deadline = time.monotonic() + 30
    while (await get(http, url))[1]["expires_in"] >= 9:
        assert time.monotonic() < deadline, "the token never aged"
        await asyncio.sleep(0.1)  # pacing: the token ages in real time
    before = await requests_at(idp)
    answers = await asyncio.gather(
        *(get(http, url + "?min_ttl=9") for _ in range(10))
    )
    after = await requests_at(idp)

    assert {status for status, _, _ in answers} == {200}
    tokens = {body["access_token"] for _, body, _ in answers}
    assert len(tokens) == 1
    assert tokens != {first["access_token"]}
    assert all(body["expires_in"] >= 9 for _, body, _ in answers)
    assert after == before + 1


async def test_invalidate_and_long_poll(
    start_idp: Callable[[int], OidcProviderProcess],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    A long-poll waiting on the current ETag returns the new token once a
    caller reports the current one rejected; the IdP sees one request
    for the report, however many callers make it.
    """
    idp = start_idp(300)
    sidecar = await start_sidecar(settings_for(idp))
    url = token_url_of(sidecar)
    _, first, etag = await get(http, url)
    rejected = hashlib.sha256(first["access_token"].encode()).hexdigest()

    poll = asyncio.create_task(get(http, url + f"?wait=60&after={etag[1:-1]}"))
    reports = []
    for _ in range(5):
        async with http.post(
            url + "/invalidate",
            headers=METADATA,
            json={"token_sha256": rejected},
        ) as response:
            reports.append(response.status)
    status, renewed, new_etag = await poll

    assert reports[0] == 202
    assert set(reports) <= {200, 202}
    assert status == 200
    assert renewed["access_token"] != first["access_token"]
    assert new_etag != etag
    assert await requests_at(idp) == 2


async def test_long_poll_times_out_with_304(
    start_idp: Callable[[int], OidcProviderProcess],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    A long-poll on a token that does not change ends with 304 and costs
    the IdP nothing.
    """
    idp = start_idp(300)
    sidecar = await start_sidecar(settings_for(idp))
    url = token_url_of(sidecar)
    _, _, etag = await get(http, url)

    async with http.get(
        url + f"?wait=0.5&after={etag[1:-1]}", headers=METADATA
    ) as response:
        status = response.status

    assert status == 304
    assert await requests_at(idp) == 1


async def test_file_sink_follows_the_token(
    start_idp: Callable[[int], OidcProviderProcess],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """
    The sink file holds the token /token serves, and the new one after a
    real refresh, replaced whole each time.
    """
    idp = start_idp(4)
    sink = tmp_path / "token"
    sidecar = await start_sidecar(
        settings_for(idp, sink={"path": str(sink), "mode": "0640"})
    )
    url = token_url_of(sidecar)
    _, first, _ = await get(http, url)
    on_disk = sink.read_text().strip()

    deadline = time.monotonic() + 20
    while (await get(http, url))[1]["access_token"] == first["access_token"]:
        assert time.monotonic() < deadline, "the token was never refreshed"
        await asyncio.sleep(0.1)  # pacing: refreshes come in real time
    # A refresh may land between reading /token and the file: compare a
    # few times, one pair must agree.
    pairs = []
    for _ in range(3):
        _, current, _ = await get(http, url)
        pairs.append((current["access_token"], sink.read_text().strip()))

    assert on_disk == first["access_token"]
    assert any(served == written for served, written in pairs)
    assert all(written != first["access_token"] for _, written in pairs)
    assert sink.stat().st_mode & 0o777 == 0o640
