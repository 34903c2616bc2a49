"""
The fleet's token requests this month, counted in Redis, so that the
budget guard and ``token-sidecar quota`` speak for every sidecar sharing
the credential.

One Redis hash per credential and calendar month (UTC)::

    <prefix>quota:<name>:<YYYY-MM>   requests, reason:<r>, outcome:<o>

``<name>`` is a SHA-256 of a fixed domain and the credential's
fingerprint. Unlike the shared token's name it is not keyed by the
secret, so that the month's count survives a secret rotation.

Each sidecar still keeps its own ledger file: it paces a crash loop,
and it counts while Redis is away. Redis trouble never stops a request
the local ledger allows; it is counted and logged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from redis.asyncio import Redis

from sidecar.clock import Clock
from sidecar.config import FleetSettings
from sidecar.fleet import FleetMetrics, FleetUnavailableError, call_redis
from sidecar.ledger import (
    NAME,
    PENDING,
    MonthSpend,
    QuotaLedger,
    month_bounds,
)
from sidecar.seal import Binding

# Limitation: the hash's name is a plain hash of the credential's
# fingerprint, so whoever knows the token URL, client id, audience,
# scope and auth method can tell which hash is theirs (not its tokens).

log = structlog.get_logger("sidecar.fleetspend")

NAME_DOMAIN = b"token-sidecar fleet quota name v1\x00"
#: Kept a month past its own, for `token-sidecar quota` to look back.
KEEP_SECONDS = 62 * 24 * 3600


class SharedSpend:
    """
    This month's token requests of the whole fleet, in Redis.
    """

    def __init__(
        self,
        client: Redis,
        settings: FleetSettings,
        binding: Binding,
        clock: Clock,
        metrics: FleetMetrics,
    ) -> None:
        self._client = client
        self._settings = settings
        self._clock = clock
        self._metrics = metrics
        self._name = hashlib.sha256(
            NAME_DOMAIN + binding.fingerprint()
        ).hexdigest()[:32]
        self._latest: MonthSpend | None = None
        self._unavailable = False

    def key(self, at: float) -> str:
        """
        The Redis hash of the month holding ``at``.
        """
        month, _, _ = month_bounds(at)

        return f"{self._settings.key_prefix}quota:{self._name}:{month}"

    def latest(self, at: float) -> MonthSpend | None:
        """
        The fleet's spend as last read, if it is of the month of ``at``.
        """
        latest = self._latest
        if latest is None or latest.month != month_bounds(at)[0]:
            return None

        return latest

    async def record(self, reason: str) -> None:
        """
        Count a request about to be sent, as pending.
        """
        await self._add({"requests": 1, f"reason:{reason}": 1, PENDING_: 1})

    async def settle(self, outcome: str) -> None:
        """
        Give the pending request its outcome.
        """
        await self._add({PENDING_: -1, f"outcome:{outcome}": 1})

    async def withdraw(self, reason: str) -> None:
        """
        Take back a request that was never sent.
        """
        await self._add({"requests": -1, f"reason:{reason}": -1, PENDING_: -1})

    async def read(self) -> MonthSpend | None:
        """
        The fleet's spend this month, read afresh; ``None`` when Redis
        cannot say.
        """
        now = self._clock.now()
        key = self.key(now)

        async def hgetall() -> Any:
            return await self._client.hgetall(key)

        fields = await self._guarded(hgetall)
        if fields is not None:
            self._latest = _spend_of(fields, now)

        return self._latest

    async def _add(self, increments: dict[str, int]) -> None:
        now = self._clock.now()
        key = self.key(now)

        async def add() -> Any:
            async with self._client.pipeline(transaction=True) as pipe:
                for field, amount in increments.items():
                    pipe.hincrby(key, field, amount)
                pipe.expire(key, KEEP_SECONDS)
                pipe.hgetall(key)
                return (await pipe.execute())[-1]

        fields = await self._guarded(add)
        if fields is not None:
            self._latest = _spend_of(fields, now)

    async def _guarded(self, call: Callable[[], Awaitable[Any]]) -> Any:
        # Said once per outage, not for each of a fetch's three calls;
        # sidecar_fleet_redis_errors_total counts every failure.
        try:
            result = await call_redis(
                call(), self._settings.operation_timeout_seconds, self._metrics
            )
        except FleetUnavailableError as exc:
            if not self._unavailable:
                self._unavailable = True
                log.info(
                    "fleet.spend_unavailable",
                    error=str(exc),
                    hint="counted in this host's ledger only",
                )
            return None
        if self._unavailable:
            self._unavailable = False
            log.info("fleet.spend_available")

        return result


PENDING_ = f"outcome:{PENDING}"


def _spend_of(fields: dict[bytes, bytes], at: float) -> MonthSpend:
    counts = _counts(fields)

    def positive(prefix: str) -> dict[str, int]:
        return {
            name.removeprefix(prefix): count
            for name, count in counts.items()
            if name.startswith(prefix) and count > 0
        }

    return MonthSpend.of(
        at,
        max(0, counts.get("requests", 0)),
        positive("reason:"),
        positive("outcome:"),
    )


def _counts(fields: dict[bytes, bytes]) -> dict[str, int]:
    # Anyone who can write to Redis can write here: a field that is not
    # one of ours, with a count, is skipped rather than trusted or fatal.
    counts = {}
    for key, value in fields.items():
        try:
            name = key.decode("ascii")
            count = int(value)
        except (UnicodeDecodeError, ValueError):
            continue
        kind, _, label = name.partition(":")
        # Labels end up in metrics and on a terminal: only names our own
        # code could have written, never control characters.
        if name == "requests" or (
            kind in ("reason", "outcome") and NAME.fullmatch(label)
        ):
            counts[name] = max(-(10**9), min(count, 10**9))

    return counts


class CombinedSpend:
    """
    What the budget judges in fleet mode: the fleet's month spend when
    Redis has told it, else this host's; always this host's last request
    (it paces this host's restarts).
    """

    def __init__(self, local: QuotaLedger, shared: SharedSpend) -> None:
        self.local = local
        self.shared = shared

    def month_spend(self, at: float | None = None) -> MonthSpend:
        """
        The spend of the month holding ``at`` (default: now).
        """
        local = self.local.month_spend(at)
        shared = self.shared.latest(local.month_start)
        if shared is None or shared.requests < local.requests:
            return local

        return shared

    def last_request_at(self) -> float | None:
        """
        When this host's latest request was sent.
        """
        return self.local.last_request_at()
