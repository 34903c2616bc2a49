"""
The one task that talks to the IdP: it fetches at start, renews the token
before it expires, and backs off when the IdP fails.

Callers never fetch; they `demand` a token and wait on the cache. A
demand only wakes the task early when a fetch is due anyway, so no
number of callers can make the sidecar ask the IdP more often than its
policy allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from sidecar.cache import CacheClosedError, TokenCache
from sidecar.clock import Clock
from sidecar.config import RetrySettings
from sidecar.errors import (
    CredentialError,
    IdPError,
    IdPRejectedError,
    IdPResponseError,
    IdPUnavailableError,
    NoTokenError,
)
from sidecar.fleet import (
    FleetUnavailableError,
    Lease,
    Plan,
    SharedToken,
    plan_refresh,
)
from sidecar.log import redact_value
from sidecar.metrics import Metrics
from sidecar.quota import QuotaGuard
from sidecar.response import ParsedResponse
from sidecar.sink import TokenSink
from sidecar.source import TokenSource
from sidecar.store import TokenStore
from sidecar.token import Token

log = structlog.get_logger("sidecar.refresher")

#: While the IdP rejects the credentials, the credential file is checked
#: this often, so that a fixed secret is used without waiting out the
#: back-off.
CREDENTIAL_POLL_SECONDS = 5.0

#: The loop re-reads the wall clock at least this often: asyncio sleeps on
#: the monotonic clock, which stands still while a machine is suspended.
MAX_SLEEP_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Backoff:
    """
    Exponential back-off with full jitter, capped.
    """

    initial_seconds: float
    max_seconds: float

    def delay(self, failures: int, draw: float) -> float:
        """
        Seconds to wait after ``failures`` consecutive failures (>= 1).

        ``draw`` in [0, 1) picks the point in the jitter window; a tenth
        of the initial delay is the floor, so retries never spin.
        """
        exponent = min(failures - 1, 62)
        ceiling = min(self.max_seconds, self.initial_seconds * 2.0**exponent)

        return max(self.initial_seconds / 10, ceiling * draw)


class Refresher:
    """
    Keeps a servable token in the cache, asking the IdP only when due.
    """

    def __init__(
        self,
        source: TokenSource,
        cache: TokenCache,
        clock: Clock,
        metrics: Metrics,
        retry: RetrySettings,
        *,
        wait_for_token_seconds: float = 10.0,
        invalidate_interval_seconds: float = 60.0,
        idle_after_seconds: float = 0.0,
        store: TokenStore | None = None,
        quota: QuotaGuard | None = None,
        sinks: Sequence[TokenSink] = (),
        fleet: SharedToken | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._source = source
        self._cache = cache
        self._clock = clock
        self._metrics = metrics
        self._retry = retry
        self._wait_for_token_seconds = wait_for_token_seconds
        self._rng = rng or random.Random()  # noqa: S311 -- jitter only
        self._outage_backoff = Backoff(
            retry.backoff_initial_seconds, retry.backoff_max_seconds
        )
        self._rejected_backoff = Backoff(
            retry.rejected_backoff_initial_seconds,
            retry.rejected_backoff_max_seconds,
        )
        self._store = store
        self._quota = quota
        self._sinks = tuple(sinks)
        self._fleet = fleet
        self._requests_sent = 0
        self._idle_after_seconds = idle_after_seconds
        self._last_asked_at = clock.now()
        self._was_idle = False
        # Set while the budget holds requests back: when to ask again.
        self._held_until: float | None = None
        self._demanded = asyncio.Event()
        self._refresh_due_at = 0.0
        self._retry_at: float | None = None
        self._failures = 0
        self._last_error: IdPError | CredentialError | None = None
        # What callers asked for beyond the policy: more life, or a new
        # token in place of one they saw rejected.
        self._wanted_ttl_seconds = 0.0
        self._invalidated: str | None = None
        self._invalidate_interval_seconds = invalidate_interval_seconds
        self._next_invalidation_at = float("-inf")

    @property
    def consecutive_failures(self) -> int:
        """
        Failed token requests since the last success.
        """
        return self._failures

    def demand(self) -> None:
        """
        Wake the task: a caller found no servable token.
        """
        self._demanded.set()

    async def get_token(self, min_ttl_seconds: float = 0.0) -> Token:
        """
        Return a servable token, waiting a bounded time for a fetch.

        ``min_ttl_seconds`` asks for a token with at least that much life
        left, honoured up to half a token's lifetime (so asking costs at
        most one extra request per half lifetime); a valid token that falls
        short is still returned when no fresher one can be had in time.
        Raises `NoTokenError` (with a ``retry_after_seconds``) when none
        can be had: never an expired token.
        """
        self._last_asked_at = self._clock.now()
        token = self._cache.servable()
        if token is None:
            return await self._wait_for_token()
        if self._fits(token, min_ttl_seconds):
            return token

        return await self._fresher_than(token, min_ttl_seconds)

    def invalidate(self, token_sha256: str) -> str:
        """
        Ask for a new token because a caller saw this one rejected.

        Returns ``refreshing``, ``already_refreshing``, ``not_current``
        (the hash names another token: ask /token again),
        ``rate_limited`` or ``quota_held`` (the budget allows no new token
        now).
        """
        token = self._cache.token
        if token is None or not hmac.compare_digest(
            token.sha256, token_sha256.strip().lower()
        ):
            return "not_current"
        if self._held_until is not None:
            return "quota_held"
        if self._invalidated == token.fingerprint:
            return "already_refreshing"
        now = self._clock.now()
        if now < self._next_invalidation_at:
            return "rate_limited"

        self._next_invalidation_at = now + self._invalidate_interval_seconds
        self._invalidated = token.fingerprint
        log.info("token.invalidated", token_fingerprint=token.fingerprint)
        self.demand()

        return "refreshing"

    def _fits(self, token: Token, min_ttl_seconds: float) -> bool:
        if token.fingerprint == self._invalidated:
            return False
        wanted = min(min_ttl_seconds, token.lifetime_seconds / 2)

        return token.remaining_seconds(self._clock.now()) >= wanted

    async def _fresher_than(
        self, token: Token, min_ttl_seconds: float
    ) -> Token:
        # The token is valid but short of what the caller asked for, or a
        # caller saw it rejected: a refresh is worth a wait, never a 503.
        if self._next_try_at() is not None:
            return token
        self._wanted_ttl_seconds = max(
            self._wanted_ttl_seconds, min_ttl_seconds
        )
        self.demand()
        try:
            return await self._cache.wait_for_outcome(
                self._wait_for_token_seconds
            )
        except (IdPError, CredentialError, TimeoutError, CacheClosedError):
            current = self._cache.servable()
            if current is None:
                raise self._no_token(self._clock.now()) from None
            return current

    async def _wait_for_token(self) -> Token:
        # Wait across failed attempts as long as the next retry falls
        # within the caller's budget: a passing glitch costs a delay, not
        # a 503.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_for_token_seconds
        while True:
            now = self._clock.now()
            budget = deadline - loop.time()
            next_try = self._next_try_at()
            if next_try is not None and next_try - now > budget:
                raise self._no_token(now)
            self.demand()
            try:
                return await self._cache.wait_for_outcome(max(0.0, budget))
            except CacheClosedError:
                raise NoTokenError(
                    "no valid token: the sidecar is stopping",
                    retry_after_seconds=1,
                ) from None
            except TimeoutError:
                raise self._no_token(self._clock.now()) from None
            except (IdPError, CredentialError):
                continue

    async def run(self) -> None:
        """
        Fetch, renew and retry until cancelled.
        """
        log.info("refresher.started")
        await self._restore()
        while True:
            try:
                await self._step()
                _raise_if_cancelling()
            except asyncio.CancelledError:
                raise
            except Exception:
                # Even logging may fail here (a closed log pipe); the
                # pause keeps a persistent fault from spinning the loop.
                with contextlib.suppress(Exception):
                    log.exception("refresher.step_failed")
                await self._clock.sleep(1.0)

    async def ensure_token(self) -> tuple[Token, str]:
        """
        One pass without the loop, for ``run --once``: the cached token if
        it is servable, else one request to the IdP (if the budget allows).

        Returns the token and ``cached``, ``shared`` (from the fleet) or
        ``fetched``; raises the
        request's `IdPError` or `CredentialError`, or `NoTokenError` when
        the budget holds the request back.
        """
        await self._restore()
        token = self._cache.servable()
        if token is not None:
            return token, "cached"

        plan = await self._plan()
        if plan.token is not None:
            await self._adopt(plan.token, "startup")
            return plan.token, "shared"
        try:
            if self._quota is not None:
                await self._quota.read_fleet_spend()
            self._hold_once_for_quota()
            await self._attempt("startup", plan.lease)
        finally:
            if plan.lease is not None and self._fleet is not None:
                await self._fleet.release(plan.lease)
        token = self._cache.servable()
        if token is None:
            assert self._last_error is not None
            raise self._last_error

        return token, "fetched"

    def _hold_once_for_quota(self) -> None:
        now = self._clock.now()
        if self._quota is None:
            return
        held = self._quota.hold_until(
            now, self._cache.token, first_request=True
        )
        if held is not None:
            raise NoTokenError(
                "the quota guard holds token requests back (the monthly "
                "budget, or the interval after the last request); see "
                "the log for which and until when",
                retry_after_seconds=max(1, math.ceil(held - now)),
            )

    async def _restore(self) -> None:
        # A token cached by an earlier run is used as if just fetched: a
        # restart within its life costs no IdP request.
        if self._store is None:
            return
        token = await asyncio.to_thread(self._store.load)
        if token is None or not self._cache.policy.is_servable(
            token, self._clock.now()
        ):
            return
        redact_value(token.access_token)
        await self._write_sinks(token)
        self._install(token)
        log.info("token.restored", **self._installed_fields(token))

    async def _step(self) -> None:
        now = self._clock.now()
        due_at, reason = self._next_attempt(now)
        if self._held_until is not None:
            due_at = max(due_at, self._held_until)
        self._metrics.next_refresh.set(due_at)
        if due_at <= now:
            await self._refresh(reason, now)
        elif not isinstance(self._last_error, IdPRejectedError):
            await self._wait(due_at - now)
        elif self._source.credentials_changed():
            # Rejected, and the operator has since rotated the secret or
            # key: try it now rather than at the end of a long back-off.
            log.info("credential.changed")
            self._retry_at = None
            self._last_error = None
        else:
            await self._wait(min(due_at - now, CREDENTIAL_POLL_SECONDS))

    async def _refresh(self, reason: str, now: float) -> None:
        # In a fleet, another sidecar's token costs no request, so it is
        # adopted before the budget is asked.
        plan = await self._plan()
        if plan.token is not None:
            await self._adopt(plan.token, reason)
            return
        try:
            if self._quota is not None:
                await self._quota.read_fleet_spend()
                self._held_until = self._quota.hold_until(
                    now,
                    self._cache.token,
                    first_request=not self._requests_sent,
                )
                if self._held_until is not None:
                    return
            await self._attempt(reason, plan.lease)
        finally:
            if plan.lease is not None and self._fleet is not None:
                await self._fleet.release(plan.lease)

    async def _plan(self) -> Plan:
        if self._fleet is None:
            return Plan()

        return await plan_refresh(self._fleet, self._worth_adopting)

    def _worth_adopting(self, shared: Token) -> bool:
        # Newer than ours, servable, not the one a caller saw rejected,
        # and with the life a caller asked for.
        now = self._clock.now()
        held = self._cache.token
        if held is not None and shared.expires_at <= held.expires_at:
            return False
        if shared.fingerprint == self._invalidated:
            return False
        if not self._cache.policy.is_servable(shared, now):
            return False
        wanted = min(self._wanted_ttl_seconds, shared.lifetime_seconds / 2)

        return shared.remaining_seconds(now) >= wanted

    async def _adopt(self, token: Token, reason: str) -> None:
        redact_value(token.access_token)
        if self._store is not None:
            await asyncio.to_thread(self._store.save, token)
        await self._write_sinks(token)
        self._install(token)
        log.info(
            "token.adopted", reason=reason, **self._installed_fields(token)
        )

    def _next_attempt(self, now: float) -> tuple[float, str]:
        if self._retry_at is not None:
            return self._retry_at, "retry"
        token = self._cache.token
        if token is None:
            return now, "startup"
        idle = self.is_idle(now)
        if idle != self._was_idle:
            self._was_idle = idle
            log.info(
                "refresher.idle" if idle else "refresher.active",
                idle_after_seconds=self._idle_after_seconds,
            )
        if not self._cache.policy.is_servable(token, now):
            # Idle: the next caller's request fetches, lazily.
            return (math.inf, "expired") if idle else (now, "expired")
        if token.fingerprint == self._invalidated:
            return now, "invalidated"
        wanted = min(self._wanted_ttl_seconds, token.lifetime_seconds / 2)
        if token.remaining_seconds(now) < wanted:
            return now, "min_ttl"

        if idle:
            return math.inf, "proactive"

        return self._refresh_due_at, "proactive"

    def is_idle(self, now: float | None = None) -> bool:
        """
        Whether no caller has asked for ``idle_after`` seconds, so that
        proactive refreshes have stopped.
        """
        if not self._idle_after_seconds:
            return False
        now = self._clock.now() if now is None else now

        return now - self._last_asked_at > self._idle_after_seconds

    async def _wait(self, seconds: float) -> None:
        sleeper = asyncio.ensure_future(
            self._clock.sleep(min(seconds, MAX_SLEEP_SECONDS))
        )
        woken = asyncio.ensure_future(self._demanded.wait())
        try:
            await asyncio.wait(
                {sleeper, woken}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            sleeper.cancel()
            woken.cancel()
            self._demanded.clear()

    async def _attempt(self, reason: str, lease: Lease | None = None) -> None:
        started = time.perf_counter()
        try:
            parsed = await self._fetch_once_more_if_rotated(reason)
        except CredentialError as exc:
            self._record_credential_error(exc, reason)
            return
        except IdPError as exc:
            self._record_failure(exc, reason, time.perf_counter() - started)
            return
        except Exception as exc:
            log.exception("refresher.unexpected_error", reason=reason)
            wrapped = IdPUnavailableError(
                f"unexpected {exc.__class__.__name__} while fetching"
            )
            self._record_failure(
                wrapped, reason, time.perf_counter() - started
            )
            return

        duration = time.perf_counter() - started
        if not self._cache.policy.is_servable(parsed.token, self._clock.now()):
            # Without this, a token that arrives (nearly) dead would make
            # the loop fetch again at once, and again: a request storm.
            error = IdPResponseError(
                "IdP token arrived with less than its minimum TTL left; "
                "its lifetime is too short or the IdP too slow"
            )
            self._record_failure(error, reason, duration)
            await self._settle("bad_response")
            return

        # Persist before handing out: a kill right after the first answer
        # must not cost a new request at the next start. The token files
        # go first too, so a caller served a token finds it there.
        await self._settle("success")
        if self._store is not None:
            await asyncio.to_thread(self._store.save, parsed.token)
        await self._write_sinks(parsed.token)
        self._record_success(parsed.token, reason, duration)
        if lease is not None and self._fleet is not None:
            await self._share(lease, parsed.token)
        for warning in parsed.warnings:
            log.warning("idp.response_questionable", detail=warning)

    async def _share(self, lease: Lease, token: Token) -> None:
        assert self._fleet is not None
        with contextlib.suppress(FleetUnavailableError):
            await self._fleet.share(lease, token, self._clock.now())

    async def _write_sinks(self, token: Token) -> None:
        # Sinks never raise; each failure is its own log line.
        if self._sinks:
            await asyncio.to_thread(_write_all, self._sinks, token)

    async def _fetch_recorded(self, reason: str) -> ParsedResponse:
        # One request, in the ledger before it is sent, so that one a
        # crash cuts short still counts against the quota.
        self._requests_sent += 1
        if self._quota is not None:
            await self._quota.record_sending(reason)
        try:
            parsed = await self._source.fetch()
        except CredentialError:
            if self._quota is not None:
                await self._quota.withdraw()  # nothing was sent
            raise
        except IdPError as exc:
            await self._settle(_outcome_of(exc))
            raise
        except Exception:
            await self._settle("unavailable")
            raise

        return parsed

    async def _settle(self, outcome: str) -> None:
        if self._quota is not None:
            await self._quota.record_outcome(outcome)

    async def _fetch_once_more_if_rotated(self, reason: str) -> ParsedResponse:
        try:
            return await self._fetch_recorded(reason)
        except IdPRejectedError as exc:
            # The file may have been rotated between our read and the
            # IdP's answer (Kubernetes swaps it at any moment); one more
            # request with the new one beats a long back-off.
            if exc.status != 401 and exc.oauth_error != "invalid_client":
                raise
            if not self._source.credentials_changed():
                raise
            if self._quota is not None and self._quota.hold_until(
                self._clock.now(), self._cache.token, first_request=False
            ):
                raise
            self._metrics.idp_requests.labels(outcome="rejected").inc()
            log.info("credential.changed", after="invalid_client")
            return await self._fetch_recorded("rotated")

    def _record_success(
        self, token: Token, reason: str, duration: float
    ) -> None:
        self._metrics.idp_requests.labels(outcome="success").inc()
        self._metrics.idp_request_duration.observe(duration)
        redact_value(token.access_token)
        self._install(token)
        log.info(
            "token.fetched",
            reason=reason,
            duration_seconds=round(duration, 4),
            **self._installed_fields(token),
        )

    def _installed_fields(self, token: Token) -> dict[str, object]:
        # What the log says of a token just installed, however it came.
        now = self._clock.now()

        return {
            "token_fingerprint": token.fingerprint,
            "expires_in_seconds": round(token.remaining_seconds(now), 3),
            "refresh_in_seconds": round(self._refresh_due_at - now, 3),
        }

    def _install(self, token: Token) -> None:
        # A new token to serve, fetched, adopted or restored: the failure
        # state ends, and the next refresh is planned from its lifetime.
        self._metrics.token_expiry.set(token.expires_at)
        self._metrics.consecutive_failures.set(0)
        self._failures = 0
        self._retry_at = None
        self._last_error = None
        self._wanted_ttl_seconds = 0.0
        self._invalidated = None
        self._refresh_due_at = self._cache.policy.refresh_due_at(
            token, self._rng.random()
        )
        self._cache.publish(token)

    def _record_failure(
        self, error: IdPError, reason: str, duration: float
    ) -> None:
        now = self._clock.now()
        outcome = _outcome_of(error)
        self._metrics.idp_requests.labels(outcome=outcome).inc()
        self._metrics.idp_request_duration.observe(duration)
        self._failures += 1
        self._metrics.consecutive_failures.set(self._failures)
        self._last_error = error

        delay = self._backoff_for(error)
        self._retry_at = now + delay
        self._cache.publish_failure(error)

        token = self._cache.token
        still_valid = token is not None and token.remaining_seconds(now) > 0
        fields = {
            "reason": reason,
            "outcome": outcome,
            "status": error.status,
            "oauth_error": error.oauth_error,
            "error": str(error),
            "consecutive_failures": self._failures,
            "retry_in_seconds": round(delay, 3),
            "serving_valid_token": still_valid,
            "duration_seconds": round(duration, 4),
        }
        if isinstance(error, IdPRejectedError):
            log.error("idp.client_rejected", **fields)
        elif still_valid:
            log.warning("idp.request_failed", **fields)
        else:
            log.error("idp.request_failed", **fields)

    def _record_credential_error(
        self, error: CredentialError, reason: str
    ) -> None:
        # Nothing reached the IdP: no IdP metrics, and the outage back-off,
        # since the cause (a file mid-rewrite, no free descriptors) tends
        # to pass.
        self._failures += 1
        self._metrics.consecutive_failures.set(self._failures)
        self._last_error = error
        delay = self._outage_backoff.delay(self._failures, self._rng.random())
        self._retry_at = self._clock.now() + delay
        self._cache.publish_failure(error)
        log.error(
            "credential.unusable",
            reason=reason,
            error=str(error),
            consecutive_failures=self._failures,
            retry_in_seconds=round(delay, 3),
        )

    def _backoff_for(self, error: IdPError) -> float:
        draw = self._rng.random()
        if isinstance(error, IdPRejectedError):
            delay = self._rejected_backoff.delay(self._failures, draw)
        else:
            delay = self._outage_backoff.delay(self._failures, draw)
        if error.retry_after_seconds is not None:
            asked = min(
                error.retry_after_seconds, self._retry.max_retry_after_seconds
            )
            delay = max(delay, asked)

        return delay

    def _next_try_at(self) -> float | None:
        # When the next request may go: after a back-off, or when the
        # budget allows again.
        times = [t for t in (self._retry_at, self._held_until) if t]
        return max(times) if times else None

    def _no_token(self, now: float) -> NoTokenError:
        next_try = self._next_try_at()
        retry_at = next_try if next_try is not None else now
        retry_after = max(1, math.ceil(retry_at - now))

        return NoTokenError(
            f"no valid token: {self._no_token_cause()}; "
            f"retry in {retry_after} s",
            retry_after_seconds=retry_after,
        )

    def _no_token_cause(self) -> str:
        # The words a caller reads in a 503: why there is no token.
        causes: tuple[tuple[type[Exception], str], ...] = (
            (IdPRejectedError, "the IdP rejected the sidecar's request"),
            (IdPResponseError, "the IdP's answer was unusable"),
            (IdPUnavailableError, "the IdP is unavailable"),
            (CredentialError, "the sidecar cannot read its own credentials"),
        )
        for kind, cause in causes:
            if isinstance(self._last_error, kind):
                return cause
        if self._held_until is not None:
            return "the month's token budget holds requests back"
        if self._cache.token is not None:
            return "the token expired and a new one has not arrived yet"

        return "the first token has not arrived yet"


def _raise_if_cancelling() -> None:
    # A library can swallow a cancellation that lands as its own timeout
    # fires (aiohttp's, redis-py's, Python 3.11's wait_for), turning it
    # into a timeout error we handle; the request to stop still stands.
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _write_all(sinks: Sequence[TokenSink], token: Token) -> None:
    for sink in sinks:
        sink.write(token)


def _outcome_of(error: IdPError) -> str:
    if isinstance(error, IdPRejectedError):
        return "rejected"
    if isinstance(error, IdPResponseError):
        return "bad_response"

    return "unavailable"
