"""
The refresher against the fake IdP on a real loopback server, with a
clock the tests move: when it fetches, how it backs off, and what callers
get meanwhile.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from sidecar.budget import BudgetPolicy
from sidecar.cache import TokenCache
from sidecar.config import Settings
from sidecar.errors import NoTokenError
from sidecar.ledger import QuotaLedger
from sidecar.metrics import Metrics
from sidecar.quota import QuotaGuard
from sidecar.refresher import Backoff, Refresher
from sidecar.response import ParsedResponse
from sidecar.source import ClientCredentialsSource, TokenSource
from sidecar.token import RefreshPolicy, Token
from tests.fakes import (
    FakeClock,
    FakeIdP,
    Reply,
    oauth_error,
    token_reply,
    wait_until,
)

#: 1 March 2027, 00:00 UTC.
MARCH_2027 = 1_803_859_200.0


@dataclass
class Stack:
    """
    A running refresher and what it is wired to.
    """

    refresher: Refresher
    cache: TokenCache
    clock: FakeClock
    idp: FakeIdP
    metrics: Metrics

    async def idle(self) -> None:
        """
        Wait until the refresher is asleep again, its work done.
        """
        await wait_until(lambda: self.clock.sleepers == 1)


@pytest.fixture
async def start_refresher(
    fake_idp: FakeIdP, make_settings: Callable[..., Settings]
) -> AsyncIterator[Callable[..., Any]]:
    tasks: list[asyncio.Task[None]] = []
    session = aiohttp.ClientSession()

    async def start(
        source: TokenSource | None = None,
        lifetime_seconds: float = 100,
        budget: BudgetPolicy | None = None,
        idle_after_seconds: float = 0.0,
        start_at: float | None = None,
        **tables: dict[str, Any],
    ) -> Stack:
        fake_idp.default_lifetime_seconds = lifetime_seconds
        settings = make_settings(**tables)
        clock = FakeClock() if start_at is None else FakeClock(start_at)
        metrics = Metrics()
        cache = TokenCache(
            RefreshPolicy(
                settings.refresh.refresh_at,
                settings.refresh.jitter,
                settings.refresh.min_ttl_seconds,
            ),
            clock,
        )
        refresher = Refresher(
            source or ClientCredentialsSource(settings.idp, session, clock),
            cache,
            clock,
            metrics,
            settings.retry,
            wait_for_token_seconds=settings.listen.wait_for_token_seconds,
            quota=(
                QuotaGuard(
                    QuotaLedger(None, clock), budget, cache.policy, metrics
                )
                if budget is not None
                else None
            ),
            idle_after_seconds=idle_after_seconds,
            rng=random.Random(7),
        )
        tasks.append(asyncio.create_task(refresher.run()))
        return Stack(refresher, cache, clock, fake_idp, metrics)

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await session.close()


async def test_fetches_once_at_start(start_refresher: Any) -> None:
    """
    The refresher asks for a token at once and then sleeps.
    """
    stack = await start_refresher()

    await stack.idle()

    assert stack.idp.count == 1
    assert stack.cache.servable() is not None


async def test_refreshes_between_jittered_window_and_refresh_at(
    start_refresher: Any,
) -> None:
    """
    A 100-second token is renewed between 88 and 90 seconds of its life,
    not before.
    """
    stack = await start_refresher()
    await stack.idle()

    stack.clock.advance(87.9)
    await stack.idle()
    before = stack.idp.count
    stack.clock.advance(2.2)
    await wait_until(lambda: stack.idp.count == 2)

    assert before == 1


async def test_default_policy_costs_at_most_115_percent(
    start_refresher: Any,
) -> None:
    """
    Over 100 token lifetimes the IdP sees at most 1.15 times the minimum
    of one request at start and one per lifetime.

    The policy is scale-free, so 100-second tokens stand for 24-hour ones.
    """
    stack = await start_refresher(lifetime_seconds=100)
    await stack.idle()
    end = stack.clock.now() + 100 * 100

    while stack.clock.now() < end:
        stack.clock.advance_to_next_deadline()
        await stack.idle()

    assert 101 < stack.idp.count <= 1.15 * 101


async def test_serves_held_token_while_idp_fails(
    fake_idp: FakeIdP, start_refresher: Any
) -> None:
    """
    While the token is valid, failed refreshes never reach callers.
    """
    stack = await start_refresher()
    await stack.idle()
    first = stack.cache.token
    fake_idp.then(*[Reply(status=503, body=b"down")] * 50)

    stack.clock.advance(91)
    while stack.idp.count < 3:
        await stack.idle()
        stack.clock.advance(0.1)
    token = await stack.refresher.get_token()

    assert token == first
    assert stack.refresher.consecutive_failures >= 1


async def test_honours_retry_after_seconds(
    fake_idp: FakeIdP, start_refresher: Any
) -> None:
    """
    After a 429 with Retry-After: 7 the next request waits 7 seconds.
    """
    fake_idp.then(
        oauth_error(429, "too_many_requests", **{"Retry-After": "7"})
    )
    stack = await start_refresher()
    await stack.idle()

    stack.clock.advance(6.9)
    await stack.idle()
    waited = stack.idp.count
    stack.clock.advance(0.2)
    await wait_until(lambda: stack.idp.count == 2)

    assert waited == 1
    assert stack.cache.servable() is not None


async def test_honours_retry_after_http_date(
    fake_idp: FakeIdP, start_refresher: Any
) -> None:
    """
    A Retry-After given as an HTTP date is waited for too.
    """
    clock_start = FakeClock().now()
    date = email.utils.formatdate(clock_start + 20, usegmt=True)
    fake_idp.then(Reply(status=503, body=b"", headers={"Retry-After": date}))
    stack = await start_refresher()
    await stack.idle()

    stack.clock.advance(19)
    await stack.idle()
    waited = stack.idp.count
    stack.clock.advance(2)
    await wait_until(lambda: stack.idp.count == 2)

    assert waited == 1


async def test_rejected_client_backs_off_long_and_says_what_to_check(
    fake_idp: FakeIdP, start_refresher: Any
) -> None:
    """
    invalid_client backs off by the rejection policy and logs one line
    naming what to check.
    """
    fake_idp.then(oauth_error(401, "invalid_client"))
    retry = {
        "rejected_backoff_initial_seconds": 100,
        "rejected_backoff_max_seconds": 1000,
    }

    with capture_logs() as logs:
        stack = await start_refresher(retry=retry)
        await stack.idle()
        stack.clock.advance(9.9)
        await stack.idle()
        waited = stack.idp.count
        for _ in range(10):
            stack.clock.advance(10)
            await stack.idle()

    rejected = [e for e in logs if e["event"] == "idp.client_rejected"]
    assert waited == 1
    assert stack.idp.count == 2
    assert len(rejected) == 1
    assert "check the client secret" in rejected[0]["error"]
    assert rejected[0]["oauth_error"] == "invalid_client"


async def test_backs_off_exponentially_up_to_the_cap(
    fake_idp: FakeIdP, start_refresher: Any
) -> None:
    """
    Attempts during an outage spread out: never more than one per
    floor interval, and the gap grows to the cap.
    """
    fake_idp.then(*[Reply(status=500, body=b"")] * 200)
    retry = {"backoff_initial_seconds": 1, "backoff_max_seconds": 16}
    stack = await start_refresher(retry=retry)
    await stack.idle()

    for _ in range(600):
        stack.clock.advance(0.1)
        await stack.idle()

    # 60 s of outage: full jitter under a 16 s cap, floor 0.1 s.
    assert 5 <= stack.idp.count <= 40


async def test_never_serves_expired_token_after_clock_jump(
    start_refresher: Any, fake_idp: FakeIdP
) -> None:
    """
    After a suspend longer than the token's life, the old token is not
    served; a new one is fetched.
    """
    stack = await start_refresher()
    await stack.idle()
    old = stack.cache.token
    fake_idp.hold()

    stack.clock.advance(4000)
    served_old = stack.cache.servable()
    fake_idp.release()
    token = await stack.refresher.get_token()

    assert served_old is None
    assert token != old
    assert stack.idp.count == 2


async def test_waiters_share_one_fetch_and_survive_cancellation(
    fake_idp: FakeIdP, start_refresher: Any
) -> None:
    """
    Callers waiting at start share one IdP request; one of them giving
    up cancels nothing for the others.
    """
    fake_idp.hold()
    stack = await start_refresher()
    await wait_until(lambda: stack.idp.count == 1)
    waiters = [
        asyncio.create_task(stack.refresher.get_token()) for _ in range(20)
    ]
    await wait_until(lambda: stack.cache.waiters == 20)

    waiters[0].cancel()
    fake_idp.release()
    results = await asyncio.gather(*waiters[1:])

    assert stack.idp.count == 1
    assert len({t.access_token for t in results}) == 1


async def test_no_token_raises_with_retry_after(
    fake_idp: FakeIdP, start_refresher: Any
) -> None:
    """
    With no valid token and the IdP down, callers get NoTokenError with
    a Retry-After of at least one second, at once.
    """
    fake_idp.then(
        oauth_error(503, "temporarily_unavailable", **{"Retry-After": "120"})
    )
    stack = await start_refresher()
    await stack.idle()

    with pytest.raises(NoTokenError) as caught:
        await stack.refresher.get_token()

    assert 110 <= caught.value.retry_after_seconds <= 120
    assert "unavailable" in str(caught.value)


async def test_callers_cannot_raise_the_request_rate(
    fake_idp: FakeIdP, start_refresher: Any
) -> None:
    """
    Hammering get_token during an outage adds no IdP requests beyond
    the back-off schedule.
    """
    fake_idp.then(*[Reply(status=500, body=b"")] * 100)
    retry = {"backoff_initial_seconds": 50, "backoff_max_seconds": 50}
    stack = await start_refresher(retry=retry)
    await stack.idle()

    for _ in range(200):
        with pytest.raises(NoTokenError):
            await stack.refresher.get_token()

    assert stack.idp.count == 1


async def test_token_arriving_dead_is_not_refetched_at_once(
    fake_idp: FakeIdP, start_refresher: Any
) -> None:
    """
    A token that arrives with less than its minimum TTL left counts as a
    failure and is retried after back-off, not in a loop.
    """
    fake_idp.hold()
    fake_idp.then(token_reply(10))
    retry = {"backoff_initial_seconds": 30, "backoff_max_seconds": 30}
    stack = await start_refresher(retry=retry)
    await wait_until(lambda: stack.idp.count == 1)

    stack.clock.advance(10)
    fake_idp.release()
    await stack.idle()

    assert stack.idp.count == 1
    assert stack.cache.servable() is None
    assert stack.refresher.consecutive_failures == 1


class _ExplodingOnce:
    """
    A token source whose first fetch raises a bug-like error.
    """

    def __init__(self) -> None:
        self.calls = 0

    async def fetch(self) -> ParsedResponse:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("boom")
        return ParsedResponse(Token("tok-after-boom", 1.8e9, 1.8e9 + 600))

    def credentials_changed(self) -> bool:
        return False


async def test_unexpected_error_does_not_stop_the_loop(
    start_refresher: Any,
) -> None:
    """
    An unexpected exception in a fetch is logged and retried.
    """
    source = _ExplodingOnce()
    with capture_logs() as logs:
        stack = await start_refresher(source=source)
        await stack.idle()
        stack.clock.advance(1)
        await wait_until(lambda: source.calls == 2)

    await stack.idle()
    assert stack.cache.servable() is not None
    assert any(e["event"] == "refresher.unexpected_error" for e in logs)


@pytest.mark.parametrize(
    ("failures", "draw", "expected"),
    [(1, 0.5, 0.5), (3, 1.0, 4.0), (30, 0.99, 59.4), (1, 0.0, 0.1)],
    ids=["first", "third", "capped", "floor"],
)
def test_backoff_delay(failures: int, draw: float, expected: float) -> None:
    """
    Back-off doubles per failure, is capped, jittered, and has a floor.
    """
    backoff = Backoff(initial_seconds=1, max_seconds=60)

    assert backoff.delay(failures, draw) == pytest.approx(expected)


async def test_hard_stop_caps_a_month_and_keeps_serving(
    fake_idp: FakeIdP, start_refresher: Any
) -> None:
    """
    With a budget of 10 and a hard stop, a month of 1-day tokens costs
    exactly 10 requests; callers get the current token until it expires,
    then 503s, never an expired token.
    """
    budget = BudgetPolicy(monthly_budget=10, hard_stop=True)
    stack = await start_refresher(
        lifetime_seconds=86400, budget=budget, start_at=MARCH_2027
    )
    await stack.idle()
    served_expired = 0
    unavailable = 0
    causes = set()

    # All of March, in hour steps (it would take 35 tokens).
    for _ in range(31 * 24 - 1):
        stack.clock.advance(3600)
        await stack.idle()
        try:
            token = await stack.refresher.get_token()
        except NoTokenError as error:
            unavailable += 1
            causes.add(str(error).split(";")[0])
            continue
        if token.remaining_seconds(stack.clock.now()) <= 0:
            served_expired += 1

    assert stack.idp.count == 10
    assert served_expired == 0
    assert unavailable > 0
    assert causes == {
        "no valid token: the month's token budget holds requests back"
    }
    assert stack.metrics.quota_state.labels(state="stopped")._value.get() == 1


async def test_over_budget_renews_only_at_expiry(
    fake_idp: FakeIdP, start_refresher: Any
) -> None:
    """
    Past a soft budget, renewals wait until the token is about to expire
    instead of 0.9 of its life, and the token never lapses.
    """
    budget = BudgetPolicy(monthly_budget=3)
    stack = await start_refresher(lifetime_seconds=1000, budget=budget)
    await stack.idle()
    lapses = 0

    for _ in range(10 * 100):
        stack.clock.advance(10)
        await stack.idle()
        if stack.cache.servable() is None:
            lapses += 1

    # 3 requests at 0.88-0.9 of a life, then one per whole life.
    assert 10 <= stack.idp.count <= 12
    assert lapses == 0


async def test_idle_sidecar_stops_refreshing_and_fetches_on_demand(
    fake_idp: FakeIdP, start_refresher: Any
) -> None:
    """
    With idle_after set, no caller for that long stops proactive
    refreshes; the next caller gets a new token fetched on demand.
    """
    stack = await start_refresher(lifetime_seconds=100, idle_after_seconds=150)
    await stack.idle()

    for _ in range(100):
        stack.clock.advance(10)
        await stack.idle()
    idle_count = stack.idp.count
    idle = stack.refresher.is_idle()
    token = await stack.refresher.get_token()

    # The start and one refresh at about 89 s; none after 150 s idle.
    assert idle_count == 2
    assert idle
    assert token.remaining_seconds(stack.clock.now()) > 90
    assert stack.idp.count == 3
    assert not stack.refresher.is_idle()


async def test_a_lapsed_token_is_named_in_the_503(
    fake_idp: FakeIdP, start_refresher: Any
) -> None:
    """
    When an idle sidecar's token has expired and the on-demand fetch has
    not answered within the caller's wait, the error says so rather than
    that the first token has not arrived.
    """
    stack = await start_refresher(
        lifetime_seconds=100,
        idle_after_seconds=150,
        listen={"wait_for_token_seconds": 0},
    )
    await stack.idle()
    for _ in range(30):
        stack.clock.advance(10)
        await stack.idle()
    fake_idp.hold()

    with pytest.raises(NoTokenError) as raised:
        await stack.refresher.get_token()

    assert str(raised.value).startswith(
        "no valid token: the token expired and a new one has not arrived"
    )
    fake_idp.release()
