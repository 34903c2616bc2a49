"""
IdP requests against the number of concurrent clients, at a cold start
and at an expiry boundary. The goal is exactly one request each time.

The IdP holds its answer while every client's request reaches the
sidecar and waits (the sidecar's ``sidecar_token_waiters`` gauge says
when all do), then answers; the IdP's own count tells how many requests
the moment cost.

Ten thousand concurrent clients need, on the sidecar's side,
``[listen] max_connections`` above the client count (the default is
4096) and an open-files limit above it (the sidecar raises its soft
limit to the hard one); the bench's own process needs the same limit
for its clients. Clients connect before the moment comes, so the
``request_head_timeout_seconds`` (5 s by default) is raised for the
idle connections to stay open, and the IdP deadline and the callers'
wait for a token are raised for the held answer.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.client import Answer, Connection, request_head
from bench.procs import LOOPBACK, IdP, Sidecar, start_sidecar

#: The lifetime of tokens at the expiry boundary: short, so the
#: boundary comes soon, and long enough to connect ten thousand clients.
EXPIRY_LIFETIME_SECONDS = 8.0

#: How long any one step may take before the bench gives up.
STEP_DEADLINE_SECONDS = 120.0

#: Connections opened at once; more would overflow the accept queue.
CONNECT_BATCH = 256


@dataclass(frozen=True, slots=True)
class FanoutResult:
    """
    One moment with ``clients`` concurrent clients.
    """

    moment: str
    clients: int
    idp_requests: int
    statuses: Counter[int]
    distinct_tokens: int
    answer_seconds: float
    sidecar_rss_bytes: int

    @property
    def problems(self) -> list[str]:
        """
        Every way the moment missed its goal; empty when it met it.
        """
        problems = []
        if self.idp_requests != 1:
            problems.append(
                f"{self.moment}, {self.clients} clients: "
                f"{self.idp_requests} IdP requests, not 1"
            )
        if self.statuses != Counter({200: self.clients}):
            problems.append(
                f"{self.moment}, {self.clients} clients: answers "
                f"{dict(self.statuses)}"
            )
        if self.distinct_tokens != 1:
            problems.append(
                f"{self.moment}, {self.clients} clients: "
                f"{self.distinct_tokens} different tokens"
            )

        return problems


def sidecar_tables(clients: int) -> dict[str, dict[str, Any]]:
    """
    The sidecar settings the fan-out needs for ``clients`` clients.
    """
    return {
        "listen": {
            "max_connections": max(4096, clients + 256),
            "request_head_timeout_seconds": 300,
            "keepalive_timeout_seconds": 300,
            "wait_for_token_seconds": 120,
        },
        "idp": {"timeout_seconds": 300},
    }


def raise_open_files_limit(needed: int) -> int:
    """
    Lift this process's open-files limit to the hard one; return it.

    Raises `RuntimeError` when even the hard limit is below ``needed``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise RuntimeError(
            f"{needed} open files are needed but the hard limit is {hard}; "
            f"run 'ulimit -Hn {needed}' (as root) first"
        )

    return hard


async def open_connections(port: int, count: int) -> list[Connection]:
    """
    ``count`` keep-alive connections to ``port``, opened in batches.
    """
    connections: list[Connection] = []
    while len(connections) < count:
        batch = min(CONNECT_BATCH, count - len(connections))
        connections += await asyncio.gather(
            *(Connection.open(LOOPBACK, port) for _ in range(batch))
        )

    return connections


async def until(
    condition: Any, what: str, deadline_seconds: float = STEP_DEADLINE_SECONDS
) -> None:
    """
    Poll the coroutine function ``condition`` until it returns true.
    """
    deadline = time.monotonic() + deadline_seconds
    while not await condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what}")
        # Polling a condition against a deadline, not timing a wait.
        await asyncio.sleep(0.01)


async def moment(
    name: str,
    idp: IdP,
    sidecar: Sidecar,
    session: aiohttp.ClientSession,
    connections: list[Connection],
    base: int,
) -> FanoutResult:
    """
    Fire every connection's request at once while the IdP holds its
    answer; release it once all wait, and count what it cost.
    """
    head = request_head(LOOPBACK, sidecar.token_port)
    pending = [connection.send(head) for connection in connections]

    async def all_wait() -> bool:
        waiters = await sidecar.metric(session, "sidecar_token_waiters")
        return waiters == len(connections)

    await until(all_wait, f"{len(connections)} callers to wait")
    started = time.monotonic()
    rss = sidecar.child.rss_bytes()
    await idp.control(hold=False)
    answers: list[Answer] = await asyncio.gather(*pending)
    elapsed = time.monotonic() - started
    for connection in connections:
        connection.close()

    return FanoutResult(
        moment=name,
        clients=len(connections),
        idp_requests=await idp.count() - base,
        statuses=Counter(answer.status for answer in answers),
        distinct_tokens=len({_token_of(answer) for answer in answers}),
        answer_seconds=elapsed,
        sidecar_rss_bytes=max(rss, sidecar.child.rss_bytes()),
    )


def _token_of(answer: Answer) -> str | None:
    try:
        token: str = json.loads(answer.body)["access_token"]
    except (ValueError, KeyError, TypeError):
        return None

    return token


async def cold_start(
    idp: IdP, clients: int, loop: str, cores: set[int] | None
) -> FanoutResult:
    """
    ``clients`` callers arriving while a new sidecar's first request is
    under way.
    """
    await idp.control(hold=True, lifetime_seconds=3600)
    base = await idp.count()
    sidecar = await start_sidecar(idp, loop, cores, sidecar_tables(clients))
    try:
        async with aiohttp.ClientSession() as session:

            async def first_request_held() -> bool:
                return await idp.count() == base + 1

            await until(first_request_held, "the first IdP request")
            connections = await open_connections(sidecar.token_port, clients)
            return await moment(
                "cold start", idp, sidecar, session, connections, base
            )
    finally:
        await idp.control(hold=False)
        await sidecar.child.stop()


async def expiry_boundaries(
    idp: IdP, counts: list[int], loop: str, cores: set[int] | None
) -> list[FanoutResult]:
    """
    For each client count, callers arriving when the token has just
    stopped being servable and its refresh is under way.
    """
    await idp.control(hold=False, lifetime_seconds=EXPIRY_LIFETIME_SECONDS)
    sidecar = await start_sidecar(
        idp, loop, cores, sidecar_tables(max(counts))
    )
    results = []
    try:
        async with aiohttp.ClientSession() as session:
            await sidecar.wait_ready(session)
            for clients in counts:
                results.append(await _boundary(idp, sidecar, session, clients))
    finally:
        await idp.control(hold=False)
        await sidecar.child.stop()

    return results


async def _boundary(
    idp: IdP, sidecar: Sidecar, session: aiohttp.ClientSession, clients: int
) -> FanoutResult:
    await idp.control(hold=True)
    base = await idp.count()
    connections = await open_connections(sidecar.token_port, clients)

    async def refresh_held() -> bool:
        return await idp.count() == base + 1

    async def token_unservable() -> bool:
        async with session.get(sidecar.ops_url("/readyz")) as response:
            return response.status == 503

    await until(refresh_held, "the proactive refresh")
    await until(token_unservable, "the token to run out")

    return await moment("expiry", idp, sidecar, session, connections, base)
