"""
The token cache's waits: a caller's cancellation is never lost, even when
it lands as the wait ends.
"""

from __future__ import annotations

import asyncio

import pytest

from sidecar.cache import TokenCache
from sidecar.token import RefreshPolicy, Token
from tests.fakes import FakeClock, wait_until

NOW = 1_800_000_000.0


def make_cache() -> TokenCache:
    return TokenCache(RefreshPolicy(0.9, 0.1, 0.0), FakeClock(NOW))


def fresh_token(value: str) -> Token:
    return Token(value, issued_at=NOW, expires_at=NOW + 3600)


async def test_a_cancelled_outcome_wait_stays_cancelled() -> None:
    """
    A caller cancelled in the same loop turn as the fetch ends is
    cancelled, not handed the token (Python 3.11's wait_for would swallow
    the cancellation), and the other waiters still get the token.
    """
    cache = make_cache()
    cancelled = asyncio.create_task(cache.wait_for_outcome(60))
    other = asyncio.create_task(cache.wait_for_outcome(60))
    await wait_until(lambda: cache.waiters == 2)

    token = fresh_token("token-a")
    cache.publish(token)
    cancelled.cancel()

    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert await other is token
    assert cache.waiters == 0


async def test_a_cancelled_change_wait_stays_cancelled() -> None:
    """
    The same holds for a caller waiting for a token other than its own.
    """
    cache = make_cache()
    cache.publish(fresh_token("token-a"))
    held = cache.token
    assert held is not None
    waiting = asyncio.create_task(cache.wait_for_change(held.fingerprint, 60))
    # One loop turn runs the new task up to its wait (asyncio runs ready
    # tasks in order); a change wait has no waiter count to poll.
    await asyncio.sleep(0)

    cache.publish(fresh_token("token-b"))
    waiting.cancel()

    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_waits_end_at_their_timeout() -> None:
    """
    With no fetch ending, an outcome wait raises TimeoutError and a change
    wait returns None.
    """
    cache = make_cache()
    cache.publish(fresh_token("token-a"))
    held = cache.token
    assert held is not None

    with pytest.raises(TimeoutError):
        await cache.wait_for_outcome(0)
    assert await cache.wait_for_change(held.fingerprint, 0) is None
    assert cache.waiters == 0
