"""
Secret rotation without a restart, against the real IdP (oidc-provider
on loopback): the secret lives in a Kubernetes-style secret volume, the
IdP's secret is replaced through its test endpoint, and the IdP's own
counters say how many token requests the sidecar made and how many were
refused.

oidc-provider counts every POST to its token endpoint and every token it
issues; with one client and nothing else wrong, the difference is the
number of ``invalid_client`` answers.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from sidecar.config import Settings
from sidecar.configload import settings_from_dict
from sidecar.daemon import Sidecar
from sidecar.refresher import CREDENTIAL_POLL_SECONDS
from tests.conftest import METADATA, AiohttpServer, token_url_of
from tests.interop.oidc_idp import (
    DEFAULT_AUDIENCE,
    POST_CLIENT,
    OidcProviderProcess,
    client_secret,
    write_test_keys,
)

pytestmark = pytest.mark.interop

#: Token lifetime at the IdP: a refresh every few seconds.
TTL_SECONDS = 4

SECRET_NAME = "client_secret"


@pytest.fixture(scope="module")
def jwks_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_keys(tmp_path_factory.mktemp("keys"))[2]


@pytest.fixture
def idp(jwks_path: Path) -> Iterator[OidcProviderProcess]:
    """
    oidc-provider issuing tokens that live `TTL_SECONDS`.
    """
    process = OidcProviderProcess().start(TTL_SECONDS, jwks_path)
    with process:
        yield process


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def publish(volume: Path, version: str, secret: str) -> None:
    """
    Publish ``secret`` as Kubernetes updates a secret volume: write it in
    a new timestamped directory, then swap the ``..data`` symlink to that
    directory atomically. ``client_secret`` links through ``..data``.
    """
    (volume / version).mkdir()
    (volume / version / SECRET_NAME).write_text(secret)
    staged = volume / "..data_tmp"
    staged.symlink_to(version)
    os.replace(staged, volume / "..data")
    if not (volume / SECRET_NAME).is_symlink():
        (volume / SECRET_NAME).symlink_to(Path("..data") / SECRET_NAME)


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    """
    An empty directory standing in for a mounted secret volume.
    """
    path = tmp_path / "secret-volume"
    path.mkdir()

    return path


def settings_for(token_url: str, volume: Path, **tables: Any) -> Settings:
    """
    Settings for the client_secret_post client, its secret read from the
    volume at every request; keyword tables override.
    """
    data: dict[str, Any] = {
        "idp": {
            "token_url": token_url,
            "client_id": POST_CLIENT,
            "client_secret_file": str(volume / SECRET_NAME),
            "audience": DEFAULT_AUDIENCE,
            "scope": "orders.read",
        },
        "retry": {"backoff_initial_seconds": 0.2, "backoff_max_seconds": 1},
        "listen": {"port": 0},
        "ops": {"port": 0},
    }
    for table, values in tables.items():
        data.setdefault(table, {}).update(values)

    return settings_from_dict(data)


@dataclass
class Answer:
    """
    One /token answer, and whether the refresher was running then.
    """

    status: int
    token: str | None
    refresher_alive: bool


@dataclass
class Watcher:
    """
    Asks /token over and over in the background and records each answer.
    """

    http: aiohttp.ClientSession
    sidecar: Sidecar
    answers: list[Answer] = field(default_factory=list)

    async def run(self) -> None:
        url = token_url_of(self.sidecar)
        while True:
            async with self.http.get(url, headers=METADATA) as response:
                body = await response.json()
            self.answers.append(
                Answer(
                    response.status,
                    body.get("access_token"),
                    self.sidecar.is_alive(),
                )
            )
            # Pacing the load, not waiting for an event.
            await asyncio.sleep(0.05)

    def tokens(self, start: int = 0) -> list[str]:
        """
        The distinct tokens served from answer ``start`` on, in order.
        """
        seen: dict[str, None] = {}
        for answer in self.answers[start:]:
            if answer.token is not None:
                seen.setdefault(answer.token)

        return list(seen)


@pytest.fixture
async def watch(
    http: aiohttp.ClientSession,
) -> AsyncIterator[Callable[[Sidecar], Watcher]]:
    """
    Start a `Watcher` on a sidecar; it is stopped after the test.
    """
    tasks: list[asyncio.Task[None]] = []

    def start(sidecar: Sidecar) -> Watcher:
        watcher = Watcher(http, sidecar)
        tasks.append(asyncio.create_task(watcher.run()))
        return watcher

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def wait_until(
    check: Callable[[], bool], timeout_seconds: float, what: str
) -> None:
    """
    Poll ``check`` until it holds; fail naming ``what`` after the
    deadline.
    """
    deadline = time.monotonic() + timeout_seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_seconds} s")
        await asyncio.sleep(0.02)


async def stats(idp: OidcProviderProcess) -> dict[str, Any]:
    return await asyncio.to_thread(idp.stats)


def idp_requests(sidecar: Sidecar, outcome: str) -> float:
    """
    The sidecar's own count of token requests with ``outcome``.
    """
    value = sidecar.metrics.registry.get_sample_value(
        "sidecar_idp_requests_total", {"outcome": outcome}
    )

    return value or 0.0


async def refused_secret(
    http: aiohttp.ClientSession, idp: OidcProviderProcess, secret: str
) -> str | None:
    """
    The OAuth error the IdP gives ``secret`` now, or None if it works.
    """
    form = {
        "grant_type": "client_credentials",
        "client_id": POST_CLIENT,
        "client_secret": secret,
        "audience": DEFAULT_AUDIENCE,
    }
    async with http.post(idp.token_url, data=form) as response:
        body = await response.json()

    return None if response.status == 200 else str(body.get("error"))


def new_secret() -> str:
    return "post-secret-rotated-" + secrets.token_hex(8)


@pytest.mark.parametrize(
    "idp_first", [True, False], ids=["idp-then-file", "file-then-idp"]
)
async def test_rotation_without_restart(
    idp_first: bool,
    idp: OidcProviderProcess,
    volume: Path,
    start_sidecar: Any,
    watch: Callable[[Sidecar], Watcher],
    http: aiohttp.ClientSession,
    record_property: Callable[[str, object], None],
) -> None:
    """
    Rotating the secret at the IdP and in the volume, in either order,
    right after a refresh: every answer stays 200 (the old token is still
    valid meanwhile), the next refreshes use the new secret, and the
    same sidecar keeps running.
    """
    old, new = client_secret(POST_CLIENT), new_secret()
    publish(volume, "..2026_12_04_a", old)
    sidecar = await start_sidecar(settings_for(idp.token_url, volume))
    watcher = watch(sidecar)
    # Rotate just after a refresh, so that the next one is most of a
    # lifetime away and cannot fall between the two steps.
    await wait_until(lambda: len(watcher.tokens()) >= 2, 15, "a refresh")
    before = await stats(idp)
    tokens_before = set(watcher.tokens())
    rotated_at = len(watcher.answers)

    if idp_first:
        await asyncio.to_thread(idp.rotate_secret, POST_CLIENT, new)
        publish(volume, "..2026_12_04_b", new)
    else:
        publish(volume, "..2026_12_04_b", new)
        await asyncio.to_thread(idp.rotate_secret, POST_CLIENT, new)
    await wait_until(
        lambda: len(set(watcher.tokens(rotated_at)) - tokens_before) >= 2,
        15,
        "two tokens fetched with the new secret",
    )
    after = await stats(idp)
    answers = list(watcher.answers)

    record_property("idp_token_requests", after["token_requests"])
    record_property("idp_issued", after["issued"])
    record_property(
        "invalid_client", after["token_requests"] - after["issued"]
    )
    assert {a.status for a in answers} == {200}
    assert all(a.refresher_alive for a in answers)
    assert after["issued"] >= before["issued"] + 2
    # The IdP saw exactly what the sidecar says it sent.
    assert idp_requests(sidecar, "success") == after["issued"]
    assert (
        idp_requests(sidecar, "rejected")
        == after["token_requests"] - after["issued"]
    )
    # The rotation was real: the IdP no longer takes the old secret.
    assert await refused_secret(http, idp, old) == "invalid_client"


@dataclass
class HoldingRelay:
    """
    A loopback HTTP relay to the IdP's token endpoint that can hold
    requests: while `open` is clear, a request waits in the relay, and
    `held` says one arrived.
    """

    upstream: str
    http: aiohttp.ClientSession
    open: asyncio.Event = field(default_factory=asyncio.Event)
    held: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self._relay)
        return app

    async def _relay(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not self.open.is_set():
            self.held.set()
            await self.open.wait()
        async with self.http.post(
            self.upstream,
            data=body,
            headers={"Content-Type": request.content_type},
        ) as response:
            answer = await response.read()

        return web.Response(
            status=response.status,
            body=answer,
            content_type=response.content_type,
        )


async def test_rotation_landing_during_a_refresh_costs_one_retry(
    idp: OidcProviderProcess,
    volume: Path,
    start_sidecar: Any,
    watch: Callable[[Sidecar], Watcher],
    http: aiohttp.ClientSession,
    aiohttp_server: AiohttpServer,
    record_property: Callable[[str, object], None],
) -> None:
    """
    When the IdP and the volume are rotated while a refresh with the old
    secret is in flight, the IdP's invalid_client meets a changed file
    and the sidecar retries at once with the new secret: one refused
    request, no 503, no back-off.
    """
    relay = HoldingRelay(idp.token_url, http)
    relay.open.set()
    server: TestServer = await aiohttp_server(relay.app(), host="127.0.0.1")
    publish(volume, "..2026_12_04_a", client_secret(POST_CLIENT))
    # Refreshing at half the lifetime leaves the old token ample life for
    # the few milliseconds the rotation below takes.
    settings = settings_for(
        str(server.make_url("/token")),
        volume,
        refresh={"refresh_at": 0.5},
        # A long rejection back-off, so no recovery can come from it.
        retry={
            "rejected_backoff_initial_seconds": 300,
            "rejected_backoff_max_seconds": 600,
        },
    )
    sidecar = await start_sidecar(settings)
    watcher = watch(sidecar)
    await wait_until(lambda: len(watcher.tokens()) >= 1, 10, "a token")
    new = new_secret()

    with capture_logs() as logs:
        relay.open.clear()
        await asyncio.wait_for(relay.held.wait(), 3 * TTL_SECONDS)
        await asyncio.to_thread(idp.rotate_secret, POST_CLIENT, new)
        publish(volume, "..2026_12_04_b", new)
        relay.open.set()
        await wait_until(
            lambda: len(watcher.tokens()) >= 2, 5, "a token after rotation"
        )
    after = await stats(idp)
    answers = list(watcher.answers)

    record_property("idp_token_requests", after["token_requests"])
    record_property("idp_issued", after["issued"])
    record_property(
        "invalid_client", after["token_requests"] - after["issued"]
    )
    assert {a.status for a in answers} == {200}
    assert all(a.refresher_alive for a in answers)
    assert after == {
        "token_requests": 3,
        "by_client": {POST_CLIENT: 3},
        "issued": 2,
    }
    assert idp_requests(sidecar, "rejected") == 1
    # Retried within the same attempt, not after a recorded rejection.
    assert [
        e.get("after") for e in logs if e["event"] == "credential.changed"
    ] == ["invalid_client"]
    assert not [e for e in logs if e["event"] == "idp.client_rejected"]


@pytest.mark.parametrize(
    "symlink_swap", [True, False], ids=["symlink-swap", "rewrite-in-place"]
)
async def test_rejected_secret_fixed_by_the_operator_recovers_quickly(
    symlink_swap: bool,
    idp: OidcProviderProcess,
    volume: Path,
    start_sidecar: Any,
    http: aiohttp.ClientSession,
    record_property: Callable[[str, object], None],
) -> None:
    """
    With a wrong secret the sidecar is refused and, holding no token,
    answers 503 with a long Retry-After; once the operator writes the
    right secret it recovers within one credential poll, long before the
    rejection back-off (300 s and up) would end.
    """
    publish(volume, "..2026_12_04_a", "wrong-" + secrets.token_hex(8))
    retry = {
        "rejected_backoff_initial_seconds": 300,
        "rejected_backoff_max_seconds": 600,
    }
    sidecar = await start_sidecar(
        settings_for(idp.token_url, volume, retry=retry)
    )
    url = token_url_of(sidecar)
    async with http.get(url, headers=METADATA) as rejected:
        rejected_body = await rejected.json()
    refused = await stats(idp)

    fixed_at = time.monotonic()
    if symlink_swap:
        publish(volume, "..2026_12_04_b", client_secret(POST_CLIENT))
    else:
        (volume / SECRET_NAME).write_text(client_secret(POST_CLIENT))
    statuses: list[int] = []

    async def healed() -> bool:
        async with http.get(url, headers=METADATA) as response:
            statuses.append(response.status)
            return response.status == 200

    deadline = fixed_at + CREDENTIAL_POLL_SECONDS + 3
    while not await healed():
        assert time.monotonic() < deadline, "no recovery within a poll"
        await asyncio.sleep(0.05)
    recovered_in = time.monotonic() - fixed_at
    after = await stats(idp)

    record_property("recovered_in_seconds", round(recovered_in, 2))
    record_property("idp_token_requests", after["token_requests"])
    record_property(
        "invalid_client", after["token_requests"] - after["issued"]
    )
    assert rejected.status == 503
    assert rejected_body["error"] == "temporarily_unavailable"
    assert int(rejected.headers["Retry-After"]) >= 30
    assert refused["token_requests"] == 1
    assert refused["issued"] == 0
    assert set(statuses[:-1]) <= {503}
    assert recovered_in <= CREDENTIAL_POLL_SECONDS + 3
    assert after["token_requests"] == 2
    assert after["issued"] == 1
