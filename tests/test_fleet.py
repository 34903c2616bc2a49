"""
Tests for fleet mode: sidecars sharing one token through a real
redis-server on loopback, against the fake IdP.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from sidecar.clock import SystemClock
from sidecar.config import Settings
from sidecar.daemon import Sidecar
from sidecar.errors import ConfigError
from sidecar.fleet import FleetMetrics, SharedToken, connect
from sidecar.fleetspend import SharedSpend
from sidecar.log import REDACTED, scrub
from sidecar.seal import Binding
from sidecar.token import Token
from tests.conftest import CLIENT_SECRET, METADATA, token_url_of
from tests.fakes import FakeIdP, free_port, wait_until
from tests.redis_server import RedisServer
from tests.test_cli import run_cli_async
from tests.tools import require_tool

StartSidecar = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """
    A redis-server of this test's own on a free loopback port.
    """
    server = RedisServer(
        require_tool("redis-server", "redis-server"), tmp_path
    ).start()
    yield server
    server.stop()


@pytest.fixture
def fleet_settings(
    make_settings: Callable[..., Settings],
    redis: RedisServer,
    tmp_path: Path,
) -> Callable[..., Settings]:
    """
    Settings of a fleet member on ``redis``: short leases, quick polls,
    and a state directory of its own, as on a host of its own.
    """
    hosts = itertools.count(1)

    def make(**tables: dict[str, Any]) -> Settings:
        state = tmp_path / f"host-{next(hosts)}"
        cache = {"path": str(state / "token.cache"), **tables.pop("cache", {})}
        quota = {
            "ledger_path": str(state / "ledger.json"),
            **tables.pop("quota", {}),
        }
        tables = {**tables, "cache": cache, "quota": quota}
        fleet = {
            "backend": "redis",
            "redis_url": redis.url,
            "lease_seconds": 3.0,
            "operation_timeout_seconds": 0.5,
            "connect_timeout_seconds": 0.5,
            **tables.pop("fleet", {}),
        }
        idp = {"timeout_seconds": 2.0, **tables.pop("idp", {})}
        return make_settings(fleet=fleet, idp=idp, **tables)

    return make


async def get_token(session: aiohttp.ClientSession, sidecar: Sidecar) -> str:
    """
    Ask ``sidecar`` for its token; fail the test on anything but 200.
    """
    async with session.get(token_url_of(sidecar), headers=METADATA) as answer:
        assert answer.status == 200, await answer.text()
        body: dict[str, Any] = await answer.json()

    return str(body["access_token"])


def shared_token_for(
    redis: RedisServer, settings: Settings, secret: bytes
) -> SharedToken:
    """
    A SharedToken on ``redis`` for ``settings``' credential and ``secret``.
    """
    return SharedToken(
        connect(settings.fleet),
        settings.fleet,
        Binding.of(settings.idp),
        lambda: secret,
        FleetMetrics(CollectorRegistry()),
    )


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """
    A client that opens a connection per request, so that none is left
    to a sidecar the test stopped or a Redis it restarted.
    """
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


async def test_cold_fleet_costs_one_request(
    fleet_settings: Callable[..., Settings],
    start_sidecar: StartSidecar,
    fake_idp: FakeIdP,
    http: aiohttp.ClientSession,
) -> None:
    """
    Five sidecars starting together on one Redis make one IdP request and
    all serve its token.
    """
    fake_idp.hold()
    sidecars = [await start_sidecar(fleet_settings()) for _ in range(5)]
    asking = [
        asyncio.ensure_future(get_token(http, sidecar))
        for sidecar in sidecars
        for _ in range(20)
    ]

    await wait_until(lambda: fake_idp.count >= 1)
    fake_idp.release()
    tokens = await asyncio.gather(*asking)

    assert fake_idp.count == 1
    assert set(tokens) == {fake_idp.issued[0]}


async def test_fleet_refreshes_once_per_lifetime(
    fleet_settings: Callable[..., Settings],
    start_sidecar: StartSidecar,
    fake_idp: FakeIdP,
    http: aiohttp.ClientSession,
) -> None:
    """
    Over three lifetimes of a 3-second token, four sidecars polling all
    along make one request per lifetime, not one per sidecar.
    """
    fake_idp.default_lifetime_seconds = 3
    sidecars = [
        await start_sidecar(
            fleet_settings(refresh={"refresh_at": 0.6, "jitter": 0.05})
        )
        for _ in range(4)
    ]
    served: set[str] = set()

    async def poll(sidecar: Sidecar) -> None:
        while len(fake_idp.issued) < 4:
            served.add(await get_token(http, sidecar))
            await asyncio.sleep(0.05)  # a client's pace, not a sync

    await asyncio.wait_for(
        asyncio.gather(*(poll(sidecar) for sidecar in sidecars)), 30
    )

    # Four tokens were minted over three refreshes, whatever the timing:
    # each refresh was one request for the whole fleet.
    assert fake_idp.count == 4
    assert served <= set(fake_idp.issued)


async def test_keyspace_reveals_no_token_or_credential(
    fleet_settings: Callable[..., Settings],
    start_sidecar: StartSidecar,
    fake_idp: FakeIdP,
    http: aiohttp.ClientSession,
    redis: RedisServer,
) -> None:
    """
    Every key name and value in Redis is free of the token, the secret,
    the client id and the token URL.
    """
    settings = fleet_settings()
    sidecar = await start_sidecar(settings)
    await get_token(http, sidecar)
    client = connect(settings.fleet)

    dump = []
    async for name in client.scan_iter("*"):
        dump.append(name)
        kind = await client.type(name)
        if kind == b"string":
            dump.append(await client.get(name))
        elif kind == b"hash":
            for field, value in (await client.hgetall(name)).items():
                dump += [field, value]
    await client.aclose()

    assert dump
    text = b"\n".join(dump)
    for secret in (
        fake_idp.issued[0],
        CLIENT_SECRET,
        settings.idp.client_id,
        settings.idp.resolved_token_url,
    ):
        assert secret.encode() not in text


async def test_other_secret_finds_nothing(
    fleet_settings: Callable[..., Settings], redis: RedisServer
) -> None:
    """
    A token shared under one secret is invisible to another secret.
    """
    settings = fleet_settings()
    writer = shared_token_for(redis, settings, b"secret-one")
    reader = shared_token_for(redis, settings, b"secret-two")
    token = Token("shared-value-1234", 1000.0, 4_000_000_000.0)

    lease = await writer.try_lead()
    assert lease is not None
    written = await writer.share(lease, token, now=2000.0)

    assert written
    assert (await writer.read()) == token
    assert await reader.read() is None
    await writer.close()
    await reader.close()


async def test_expired_lease_writes_nothing(
    fleet_settings: Callable[..., Settings], redis: RedisServer
) -> None:
    """
    A holder whose lease another sidecar took over cannot overwrite.
    """
    settings = fleet_settings(fleet={"lease_seconds": 3.0})
    first = shared_token_for(redis, settings, b"secret")
    second = shared_token_for(redis, settings, b"secret")
    lease = await first.try_lead()
    assert lease is not None
    _, lock_key, _ = first.keys()

    # The lease ends (as after lease_seconds) and another takes it.
    assert redis.command("DEL", lock_key) == ":1"
    taken = await second.try_lead()
    written = await first.share(
        lease, Token("late-token-5678", 1000.0, 4_000_000_000.0), 2000.0
    )

    assert taken is not None
    assert not written
    assert await first.read() is None
    await first.close()
    await second.close()


async def test_dead_holder_is_taken_over(
    fleet_settings: Callable[..., Settings],
    start_sidecar: StartSidecar,
    fake_idp: FakeIdP,
    http: aiohttp.ClientSession,
    redis: RedisServer,
) -> None:
    """
    With the lease held by a sidecar that never finishes, another one
    fetches once that lease has run out.
    """
    settings = fleet_settings(fleet={"lease_seconds": 3.0})
    dead = shared_token_for(redis, settings, CLIENT_SECRET.encode())
    assert await dead.try_lead() is not None

    sidecar = await start_sidecar(settings)
    token = await get_token(http, sidecar)

    assert fake_idp.count == 1
    assert token == fake_idp.issued[0]
    takeovers = sidecar.metrics.registry.get_sample_value(
        "sidecar_fleet_lock_takeovers_total"
    )
    assert takeovers == 1
    await dead.close()


async def test_redis_outage_falls_back_and_recovers(
    fleet_settings: Callable[..., Settings],
    start_sidecar: StartSidecar,
    fake_idp: FakeIdP,
    http: aiohttp.ClientSession,
    redis: RedisServer,
) -> None:
    """
    With Redis stopped, each sidecar keeps serving and refreshes alone,
    saying so once (not per Redis call); with Redis back on the same
    port, they share one token again.
    """
    fake_idp.default_lifetime_seconds = 3
    sidecars = [
        await start_sidecar(
            fleet_settings(refresh={"refresh_at": 0.6, "jitter": 0.05})
        )
        for _ in range(3)
    ]
    for sidecar in sidecars:
        await get_token(http, sidecar)
    assert fake_idp.count == 1

    with capture_logs() as events:
        redis.stop()
        loop = asyncio.get_running_loop()
        stopped_at, before = loop.time(), fake_idp.count
        # Each refreshes alone: three different tokens at once.
        await wait_until(
            lambda: len({s.cache.token for s in sidecars}) == 3, 15
        )
        outage = loop.time() - stopped_at
        alone = fake_idp.count - before
        redis.start()
        # Back to one token for all, with no restart.
        await wait_until(
            lambda: len({s.cache.token for s in sidecars}) == 1, 20
        )
        # And the fleet's count is kept again, which is said once.
        await wait_until(
            lambda: any(e["event"] == "fleet.spend_available" for e in events),
            20,
        )

    said = [e["event"] for e in events if e["event"].startswith("fleet.")]
    assert 1 <= said.count("fleet.spend_unavailable") <= len(sidecars)

    # At most one request per sidecar per renewal (every 55 % of a
    # lifetime at the soonest) while Redis was away.
    assert alone <= 3 * (math.ceil(outage / (3 * 0.55)) + 1)
    fallbacks = sum(
        s.metrics.registry.get_sample_value(
            "sidecar_fleet_local_fetches_total"
        )
        or 0
        for s in sidecars
    )
    # A sidecar that held the lease as Redis went may have fetched as
    # leader instead; the others fell back, and that is counted.
    assert fallbacks >= 1


def quota_state(sidecar: Sidecar, state: str) -> float:
    """
    The sidecar's sidecar_quota_state gauge for ``state``.
    """
    value = sidecar.metrics.registry.get_sample_value(
        "sidecar_quota_state", {"state": state}
    )

    return value or 0.0


async def test_budget_is_the_fleets(
    fleet_settings: Callable[..., Settings],
    start_sidecar: StartSidecar,
    fake_idp: FakeIdP,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """
    With a hard stop at two requests a month, two sidecars make two
    requests in all, not two each: the budget counts the fleet's spend.
    """
    fake_idp.default_lifetime_seconds = 3
    sidecars = [
        await start_sidecar(
            fleet_settings(
                refresh={"refresh_at": 0.6, "jitter": 0.05},
                quota={
                    "monthly_budget": 2,
                    "hard_stop": True,
                    "min_request_interval_seconds": 0,
                    "ledger_path": str(tmp_path / f"ledger-{n}.json"),
                },
            )
        )
        for n in range(2)
    ]
    for sidecar in sidecars:
        await get_token(http, sidecar)

    await wait_until(
        lambda: any(quota_state(s, "stopped") == 1 for s in sidecars), 20
    )

    assert fake_idp.count == 2


async def test_quota_command_reports_the_fleet(
    fleet_settings: Callable[..., Settings],
    start_sidecar: StartSidecar,
    fake_idp: FakeIdP,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """
    'token-sidecar quota' in fleet mode prints the fleet's requests, as
    the IdP counted them, before this host's own; it needs no secret (the
    config it reads has none), and stdout holds only the report.
    """
    fake_idp.default_lifetime_seconds = 3
    settings = [
        fleet_settings(
            refresh={"refresh_at": 0.6, "jitter": 0.05},
            quota={"ledger_path": str(tmp_path / f"ledger-{n}.json")},
        )
        for n in range(3)
    ]
    sidecars = [await start_sidecar(s) for s in settings]
    for sidecar in sidecars:
        await get_token(http, sidecar)
    await wait_until(lambda: fake_idp.count >= 3, 20)
    for sidecar in sidecars:
        await sidecar.stop()
    config = tmp_path / "sidecar.toml"
    config.write_text(config_toml(settings[0]))
    assert CLIENT_SECRET not in config.read_text()  # a config without it

    result = await run_cli_async(
        "quota", "--config", str(config), cwd=tmp_path
    )

    assert result.returncode == 0, result.stderr
    fleet, _, host = result.stdout.partition("this host:")
    assert f": {fake_idp.count} token requests" in fleet
    assert result.stdout.startswith("fleet (every sidecar")
    assert "token requests" in host


async def test_quota_command_without_redis_reports_the_host(
    fleet_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """
    With Redis away, 'token-sidecar quota' says so once on stderr and
    prints this host's count alone on stdout, no log lines among it.
    """
    settings = fleet_settings(
        fleet={"redis_url": f"redis://127.0.0.1:{free_port()}/0"},
        quota={"ledger_path": str(tmp_path / "ledger.json")},
    )
    config = tmp_path / "sidecar.toml"
    config.write_text(config_toml(settings))

    result = await run_cli_async(
        "quota", "--config", str(config), cwd=tmp_path
    )

    assert result.returncode == 0, result.stderr
    first, *details = result.stdout.splitlines()
    assert first.endswith("(UTC): 0 token requests")
    assert all(line.startswith("  ") for line in details)
    assert result.stderr.startswith("error: Redis did not answer")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0?password=hunter2-x"],
)
async def test_quota_command_checks_the_redis_url(
    url: str, tmp_path: Path
) -> None:
    """
    'token-sidecar quota' checks the Redis URL as the sidecar does: a
    config error naming the key, with no password shown.
    """
    config = tmp_path / "sidecar.toml"
    config.write_text(
        "[idp]\n"
        'token_url = "http://127.0.0.1:9/token"\n'
        'client_id = "billing"\n'
        "[fleet]\n"
        'backend = "redis"\n'
        f"redis_url = {json.dumps(url)}\n"
    )

    result = await run_cli_async(
        "quota", "--config", str(config), cwd=tmp_path
    )

    assert result.returncode == 2
    assert result.stderr.startswith("config error: fleet.redis_url:")
    assert "hunter2" not in result.stdout + result.stderr


def config_toml(settings: Settings) -> str:
    """
    ``settings`` as a config file (the tables the quota command reads),
    without the secret.
    """
    lines = []
    for table in ("idp", "quota", "fleet"):
        lines.append(f"[{table}]")
        values = getattr(settings, table).model_dump(mode="json")
        for key, value in values.items():
            if value is None:
                continue
            if key == "client_secret":
                continue
            lines.append(f"{key} = {json.dumps(value)}")

    return "\n".join(lines) + "\n"


async def test_foreign_writes_do_not_stop_the_fleet(
    fleet_settings: Callable[..., Settings],
    start_sidecar: StartSidecar,
    fake_idp: FakeIdP,
    http: aiohttp.ClientSession,
    redis: RedisServer,
) -> None:
    """
    A junk field in the spend hash, a list where the token should be and
    a lease key with no expiry: the fleet keeps serving and heals.
    """
    fake_idp.default_lifetime_seconds = 3
    settings = [
        fleet_settings(
            refresh={"refresh_at": 0.6, "jitter": 0.05},
            fleet={"lease_seconds": 3.0},
        )
        for _ in range(2)
    ]
    sidecars = [await start_sidecar(member) for member in settings]
    first = await get_token(http, sidecars[0])
    writer = shared_token_for(redis, settings[0], CLIENT_SECRET.encode())
    token_key, lock_key, _ = writer.keys()
    client = writer.client
    async for name in client.scan_iter("*quota*"):
        await client.hset(name, "requests", "not-a-number")
        await client.hset(name, b"\xff", "1")
    await client.delete(token_key)
    await client.rpush(token_key, "not a token")
    await client.set(lock_key, "held forever")

    await wait_until(
        lambda: all(
            s.cache.token is not None and s.cache.token.access_token != first
            for s in sidecars
        ),
        20,
    )
    healed = await client.type(token_key)
    lock_life = await client.pttl(lock_key)
    answers = {await get_token(http, sidecar) for sidecar in sidecars}
    await writer.close()

    assert healed in (b"string", b"none")
    assert lock_life != -1
    assert answers <= set(fake_idp.issued)


async def test_foreign_labels_in_the_spend_are_dropped(
    fleet_settings: Callable[..., Settings],
) -> None:
    """
    Reasons and outcomes in the spend hash that our code could not have
    written (control characters, a fake report line) are dropped: they
    would reach metrics and 'quota' on a terminal.
    """
    settings = fleet_settings()
    client = connect(settings.fleet)
    spend = SharedSpend(
        client,
        settings.fleet,
        Binding.of(settings.idp),
        SystemClock(),
        FleetMetrics(CollectorRegistry()),
    )
    await spend.record("startup")
    await spend.settle("success")
    key = spend.key(SystemClock().now())
    await client.hset(key, "reason:\x1b[2Jx\nbudget: 100000", "5")
    await client.hset(key, "outcome:Success", "5")

    month = await spend.read()
    await client.aclose()

    assert month is not None
    assert month.by_reason == {"startup": 1}
    assert month.by_outcome == {"success": 1}


def test_the_redis_password_is_scrubbed_from_logs(
    fleet_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """
    The Redis password, read from its file at each connect, is scrubbed
    from every log line from then on, however short.
    """
    password_file = tmp_path / "redis_password"
    password = f"~{secrets.token_hex(2)}"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    settings = fleet_settings(
        fleet={"redis_password_file": str(password_file)}
    )
    client = connect(settings.fleet)
    provider = client.connection_pool.connection_kwargs["credential_provider"]

    assert provider.get_credentials() == (password,)
    assert scrub(f"AUTH {password} refused") == f"AUTH {REDACTED} refused"


def test_malformed_redis_url_is_a_config_error(
    fleet_settings: Callable[..., Settings],
) -> None:
    """
    A URL urlsplit cannot read, or a port out of range, is reported as
    a config problem naming fleet.redis_url.
    """
    for url in ("redis://[::1", "redis://127.0.0.1:99999/0"):
        with pytest.raises(ConfigError) as caught:
            fleet_settings(fleet={"redis_url": url})

        assert "fleet.redis_url" in str(caught.value.problems)
