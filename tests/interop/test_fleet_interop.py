"""
Fleet mode against the real IdP: twenty ``python -m sidecar run``
processes share one token through one real redis-server, with tokens
living five seconds, while clients poll every sidecar. The IdP's own
counter judges how many token requests the fleet made.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jwt
import pytest

from tests.fakes import free_port
from tests.interop.oidc_idp import OidcProviderProcess
from tests.interop.test_warm_restart import (
    HoldingRelay,
    Launcher,
    StartIdP,
    Workspace,
    ask_for_token,
    idp_requests,
    jwks_path,
    launcher,
    relay,
    start_idp,
    workspace,
)
from tests.redis_server import RedisServer
from tests.tools import require_tool

__all__ = ["jwks_path", "launcher", "relay", "start_idp", "workspace"]

pytestmark = pytest.mark.interop

SIDECARS = 20
TTL_SECONDS = 5
#: Renew at 60 % of the life: a second of margin for the leader's fetch.
REFRESH_AT = 0.6
JITTER = 0.05
LIFETIMES = 4


@pytest.fixture
def idp(start_idp: StartIdP) -> OidcProviderProcess:
    """
    The IdP the workspace names: oidc-provider with five-second tokens.
    """
    return start_idp(ttl_seconds=TTL_SECONDS)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(
        require_tool("redis-server", "redis-server"), tmp_path
    ).start()
    yield server
    server.stop()


def fleet_member(
    base: Workspace, directory: Path, redis: RedisServer
) -> Workspace:
    """
    A workspace like ``base`` in ``directory``, with its own ports and
    files, and fleet mode on ``redis``.
    """
    directory.mkdir()
    tables = copy.deepcopy(base.tables)
    port = free_port()
    tables["listen"]["port"] = port
    tables["ops"]["port"] = free_port()
    tables["cache"]["path"] = str(directory / "token.cache")
    tables["quota"]["ledger_path"] = str(directory / "ledger.json")
    tables["refresh"] = {"refresh_at": REFRESH_AT, "jitter": JITTER}
    tables["log"] = {"level": "warning", "format": "json"}
    tables["fleet"] = {
        "backend": "redis",
        "redis_url": redis.url,
        "lease_seconds": 15,
    }

    return Workspace(directory, base.idp, tables, port)


def test_twenty_sidecars_make_one_request_per_lifetime(
    workspace: Workspace,
    idp: OidcProviderProcess,
    launcher: Launcher,
    redis: RedisServer,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """
    Twenty sidecars over four token lifetimes make about one IdP request
    per lifetime for the whole fleet, and every answer to every client
    is a token the IdP says is still valid.
    """
    members = [
        fleet_member(workspace, tmp_path / f"member-{n}", redis)
        for n in range(SIDECARS)
    ]
    sidecars = [launcher.start(m, m.write()) for m in members]
    for sidecar in sidecars:
        assert sidecar.wait_for_token().status == 200
    redis.reset_stats()
    started_at, counted_before = time.time(), idp_requests(idp)
    stop = threading.Event()
    problems: list[str] = []
    answers = [0]

    def poll(url: str) -> None:
        while not stop.is_set():
            answer = ask_for_token(url)
            answers[0] += 1
            if answer.status != 200:
                problems.append(f"{url}: HTTP {answer.status}")
            else:
                claims = jwt.decode(
                    answer.token, options={"verify_signature": False}
                )
                if claims["exp"] <= time.time():
                    problems.append(f"{url}: expired token")
            stop.wait(0.2)

    pollers = [
        threading.Thread(target=poll, args=(sidecar.token_url,))
        for sidecar in sidecars
    ]
    for poller in pollers:
        poller.start()
    stop.wait(LIFETIMES * TTL_SECONDS)
    stop.set()
    for poller in pollers:
        poller.join(30)
    elapsed = time.time() - started_at
    fleet_requests = idp_requests(idp) - counted_before
    # Each total includes our own INFO command.
    redis_commands = redis.total_commands() - 1

    record_property("fleet_requests", fleet_requests)
    record_property("answers", answers[0])
    record_property("elapsed_seconds", round(elapsed, 1))
    record_property("redis_commands", redis_commands)

    assert problems == []
    assert answers[0] > SIDECARS * LIFETIMES
    # One renewal for the fleet every (REFRESH_AT - JITTER) of a lifetime
    # at the soonest, plus one at the edge; twenty sidecars alone would
    # make twenty each time.
    renewals = math.ceil(elapsed / (TTL_SECONDS * (REFRESH_AT - JITTER)))
    assert fleet_requests <= renewals + 1


def test_a_killed_lease_holder_is_taken_over(
    workspace: Workspace,
    idp: OidcProviderProcess,
    launcher: Launcher,
    redis: RedisServer,
    relay: tuple[HoldingRelay, str],
    tmp_path: Path,
) -> None:
    """
    The sidecar holding the lease is killed with SIGKILL while its token
    request hangs: another takes over once the lease runs out, its
    clients get a valid token (never an expired one), and the fleet made
    one request that reached the IdP.
    """
    holding, relay_url = relay
    workspace.tables["idp"]["token_url"] = relay_url
    workspace.tables["idp"]["timeout_seconds"] = 2
    members = [
        fleet_member(workspace, tmp_path / f"member-{n}", redis)
        for n in range(3)
    ]
    for member in members:
        member.tables["fleet"]["lease_seconds"] = 3
    leader = launcher.start(members[0], members[0].write())
    assert holding.held.wait(30), "the first sidecar never asked the IdP"
    followers = [launcher.start(m, m.write()) for m in members[1:]]
    for follower in followers:
        assert follower.first_answer().status in (200, 503)

    leader.kill()
    answers = [follower.wait_for_token() for follower in followers]

    assert {answer.token for answer in answers} == {answers[0].token}
    claims = jwt.decode(answers[0].token, options={"verify_signature": False})
    assert claims["exp"] > time.time()
    # The killed leader's request is still held in the relay: the one
    # that reached the IdP is the follower's.
    assert idp.stats()["issued"] == 1
