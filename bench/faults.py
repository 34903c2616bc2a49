"""
Fault matrix: the IdP cycles through latency, 5xx storms, 429 with
``Retry-After``, connection resets, hangs, malformed bodies and recovery
while clients poll.

The report counts the answers by status, and checks against the IdP's
record that no expired or empty token was served and that every IdP
request kept to the policy: one request in flight (the next arrives
only after the last was answered, or for a hang after the sidecar's
deadline), the next after a token no sooner than its refresh point,
after a failure no sooner than the back-off floor, after a 429 no
sooner than its ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.idp import FAULT_CYCLE
from bench.poll import Tally, Verdict, judge, poll
from bench.procs import start_idp, start_sidecar
from bench.soak import ARRIVAL_SLACK_SECONDS, JITTER

#: The sidecar's settings for the matrix: quick back-off and deadlines,
#: so one cycle takes seconds.
LIFETIME_SECONDS = 2.0
REFRESH_AT = 0.9
BACKOFF_INITIAL_SECONDS = 0.2
BACKOFF_MAX_SECONDS = 1.0
IDP_TIMEOUT_SECONDS = 1.0
WAIT_FOR_TOKEN_SECONDS = 1.0

#: Requests in one round of the cycle.
CYCLE_REQUESTS = sum(phase.count for phase in FAULT_CYCLE)


@dataclass
class FaultResult:
    """
    What the matrix measured, and whether it held.
    """

    cycles: int
    duration_seconds: float
    tally: Tally
    verdict: Verdict
    idp_requests: int
    by_kind: Counter[str]
    completed: bool
    policy_breaches: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """
        Every way the matrix failed; empty when it held.
        """
        problems = [*self.verdict.violations, *self.policy_breaches]
        if not self.completed:
            problems.append(
                f"the cycle did not complete: {self.idp_requests} IdP "
                "requests before the deadline"
            )
        if self.tally.unusable:
            problems.append(f"{self.tally.unusable} 200 answers held no token")

        return problems


def policy_breaches(records: list[dict[str, Any]]) -> list[str]:
    """
    The IdP requests that came sooner than the policy allows.

    Only "too soon" is judged: a slow machine makes requests later,
    never earlier, so this cannot fail for want of CPU.
    """
    breaches = []
    floor = BACKOFF_INITIAL_SECONDS / 10
    for before, after in itertools.pairwise(records):
        gap = after["arrived_at"] - before["arrived_at"]
        kind = before["kind"]
        if kind in ("ok", "latency"):
            # The next is due at the refresh point, counted from sending.
            least = LIFETIME_SECONDS * (REFRESH_AT - JITTER)
        elif kind == "hang":
            least = IDP_TIMEOUT_SECONDS + floor
        else:
            least = floor
        answered = before["answered_at"]
        if answered is not None and kind != "hang":
            least = max(least, answered - before["arrived_at"] + floor)
        if before["retry_after_seconds"]:
            least = max(
                least,
                answered
                - before["arrived_at"]
                + before["retry_after_seconds"],
            )
        if gap < least - ARRIVAL_SLACK_SECONDS:
            breaches.append(
                f"request {after['number']} came {gap:.3f} s after a "
                f"{kind} answer; the policy allows {least:.3f} s at least"
            )

    return breaches


async def fault_matrix(
    cycles: int = 1,
    clients: int = 8,
    loop: str = "asyncio",
    server_cores: set[int] | None = None,
    load_cores: set[int] | None = None,
    deadline_seconds: float = 120.0,
) -> FaultResult:
    """
    Run ``cycles`` rounds of the fault cycle while clients poll.
    """
    idp = await start_idp(LIFETIME_SECONDS, "faults", cores=load_cores)
    sidecar = await start_sidecar(
        idp,
        loop,
        server_cores,
        {
            "idp": {"timeout_seconds": IDP_TIMEOUT_SECONDS},
            "refresh": {"refresh_at": REFRESH_AT},
            "retry": {
                "backoff_initial_seconds": BACKOFF_INITIAL_SECONDS,
                "backoff_max_seconds": BACKOFF_MAX_SECONDS,
            },
            "listen": {"wait_for_token_seconds": WAIT_FOR_TOKEN_SECONDS},
        },
    )
    tally = Tally()
    stop = asyncio.Event()
    wanted = cycles * CYCLE_REQUESTS + 1
    try:
        async with aiohttp.ClientSession() as session:
            await sidecar.wait_ready(session)
        started = time.monotonic()
        pollers = asyncio.create_task(
            poll(sidecar.token_port, clients, stop, tally)
        )
        while await idp.count() < wanted:
            if time.monotonic() - started > deadline_seconds:
                break
            # Polling a condition against a deadline, not timing a wait.
            await asyncio.sleep(0.1)
        stop.set()
        await pollers
        duration = time.monotonic() - started
        records = (await idp.stats())["records"]
    finally:
        await sidecar.child.stop()
        await idp.child.stop()

    return FaultResult(
        cycles=cycles,
        duration_seconds=duration,
        tally=tally,
        verdict=judge(tally, records),
        idp_requests=len(records),
        by_kind=Counter(r["kind"] for r in records),
        completed=len(records) >= wanted,
        policy_breaches=policy_breaches(records),
    )
