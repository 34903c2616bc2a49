"""
The fault matrix and the fan-out, run as the bench runs them: the
sidecar and the scripted IdP in processes of their own, the IdP's own
record the judge.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bench.fanout import (
    cold_start,
    expiry_boundaries,
    raise_open_files_limit,
)
from bench.faults import fault_matrix
from bench.procs import IdP, start_idp

#: Enough concurrent clients to show the fan-in, few enough for CI.
CLIENTS = 1000


async def test_one_fault_cycle_serves_no_expired_token() -> None:
    """
    Through latency, 5xx storms, 429s, resets, hangs, malformed bodies
    and recovery, no answer carries an expired or empty token, and no
    IdP request comes sooner than the policy allows.
    """
    result = await fault_matrix(cycles=1)

    assert result.problems == []
    assert set(result.by_kind) >= {
        "ok",
        "latency",
        "storm",
        "throttle",
        "reset",
        "hang",
        "malformed",
    }
    assert result.tally.by_status[200] > 0
    assert set(result.tally.by_status) <= {200, 503}


@pytest.fixture
async def idp() -> AsyncIterator[IdP]:
    """
    The scripted IdP in its own process, stopped after the test; and
    descriptors enough for the clients (a soft limit of 1024 is common).
    """
    raise_open_files_limit(CLIENTS + 256)
    started = await start_idp(3600)
    yield started
    await started.child.stop()


async def test_a_thousand_clients_at_a_cold_start_cost_one_request(
    idp: IdP,
) -> None:
    """
    A thousand callers waiting on a new sidecar's first request share it.
    """
    result = await cold_start(idp, CLIENTS, "asyncio", None)

    assert result.problems == []


async def test_a_thousand_clients_at_an_expiry_cost_one_request(
    idp: IdP,
) -> None:
    """
    A thousand callers arriving when the token has run out and its
    refresh is under way share that one request.
    """
    [result] = await expiry_boundaries(idp, [CLIENTS], "asyncio", None)

    assert result.problems == []
