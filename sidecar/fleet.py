"""
Fleet mode: sidecars on many hosts share one token, and one refresh,
through Redis.

For one credential (token URL, client, audience, scope, auth method)
every sidecar uses three Redis names, all in one Cluster hash slot::

    <prefix>{<name>}:token   the token, sealed (`sidecar.seal`), expiring
                             in Redis when the token does
    <prefix>{<name>}:lock    the refresh lease (a redis-py `Lock`)
    <prefix>{<name>}:news    the pub/sub channel that announces a new token

``<name>`` is an HMAC of the credential's fingerprint under a key derived
from the client secret (or private key), so names reveal nothing, and
the sealed value can be opened only by a sidecar holding that secret.

When its refresh is due, a sidecar first reads the shared token and
adopts it if it is newer and fresh enough. Otherwise it tries the lease:
the holder fetches from the IdP, writes the token only while it still
holds the lease (a script compares the lock's token), and announces it;
the others wait for the announcement, bounded, and read. A holder that
dies loses the lease when it expires, and a waiter takes over. Any Redis
trouble makes the sidecar fetch alone, as on a single host.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter
from redis.asyncio import Redis
from redis.asyncio.lock import Lock
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.credentials import CredentialProvider
from redis.exceptions import LockError, RedisError, ResponseError

from sidecar.config import FleetSettings
from sidecar.errors import SidecarError
from sidecar.files import read_secret_file
from sidecar.log import redact_value
from sidecar.seal import (
    Binding,
    Purpose,
    UnsealError,
    derive_key,
    seal,
    unseal,
)
from sidecar.token import Token

log = structlog.get_logger("sidecar.fleet")

FLEET_PURPOSE = Purpose(
    b"TSKF",
    b"token-sidecar fleet entry salt v1",
    b"token-sidecar fleet entry key v1\x00",
)
#: The key of the HMAC that names the Redis keys, derived like the
#: sealing key but for its own purpose.
NAME_PURPOSE = Purpose(
    b"TSKN",
    b"token-sidecar fleet key name salt v1",
    b"token-sidecar fleet key name v1\x00",
)
ANNOUNCEMENT = b"new"

#: Compare the lease's lock token, then write and announce, atomically:
#: a holder whose lease expired (and was taken over) writes nothing.
_SHARE_IF_LEADING = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    redis.call('set', KEYS[2], ARGV[2], 'PX', ARGV[3])
    redis.call('publish', KEYS[3], ARGV[4])
    return 1
end
return 0
"""


class FleetUnavailableError(SidecarError):
    """
    The shared store could not be used; the sidecar fetches alone.
    """


class WrongTypeError(FleetUnavailableError):
    """
    A key of ours holds a value of another Redis type (someone else
    wrote it); overwriting it heals it.
    """


class FleetMetrics:
    """
    The fleet's counters, on the sidecar's registry.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.shared_reads = Counter(
            "sidecar_fleet_shared_reads",
            "Reads of the shared token, by result: hit (adopted), miss "
            "(none, or not newer), unusable (sealed for other credentials).",
            ["result"],
            registry=registry,
        )
        self.lock_acquisitions = Counter(
            "sidecar_fleet_lock_acquisitions",
            "Refresh leases this sidecar took.",
            registry=registry,
        )
        self.lock_waits = Counter(
            "sidecar_fleet_lock_waits",
            "Refreshes that waited for another sidecar's lease.",
            registry=registry,
        )
        self.lock_takeovers = Counter(
            "sidecar_fleet_lock_takeovers",
            "Leases taken after waiting for a holder that announced "
            "nothing (it died or was too slow).",
            registry=registry,
        )
        self.shared_writes = Counter(
            "sidecar_fleet_shared_writes",
            "Tokens written to the shared store, by result: written, or "
            "lease_lost (the lease expired first; nothing written).",
            ["result"],
            registry=registry,
        )
        self.redis_errors = Counter(
            "sidecar_fleet_redis_errors",
            "Redis commands that failed or timed out.",
            registry=registry,
        )
        self.local_fetches = Counter(
            "sidecar_fleet_local_fetches",
            "Refreshes done alone because the shared store failed.",
            registry=registry,
        )
        for result in ("hit", "miss", "unusable"):
            self.shared_reads.labels(result=result)
        for result in ("written", "lease_lost"):
            self.shared_writes.labels(result=result)


@dataclass(frozen=True, slots=True)
class Lease:
    """
    The refresh lease this sidecar holds.
    """

    lock: Lock
    token: bytes


@dataclass(frozen=True, slots=True)
class Plan:
    """
    What a due refresh should do: adopt ``token`` (another sidecar's),
    fetch while holding ``lease`` and share the result, or, with
    neither, fetch alone.
    """

    token: Token | None = None
    lease: Lease | None = None


class _PasswordFile(CredentialProvider):
    """
    The Redis password, read from its file at every connect (rotation).
    """

    def __init__(self, username: str | None, path: Path) -> None:
        self._username = username
        self._path = path

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        password = read_secret_file(self._path).decode().strip()
        redact_value(password, secret=True)
        if self._username:
            return self._username, password

        return (password,)


async def call_redis(
    pending: Awaitable[Any], timeout_seconds: float, metrics: FleetMetrics
) -> Any:
    """
    Await one Redis command (or pipeline) within ``timeout_seconds``.

    Raises `WrongTypeError` when a key holds another type, and otherwise
    `FleetUnavailableError` for any Redis trouble, counted in
    ``metrics``.
    """
    try:
        async with asyncio.timeout(timeout_seconds):
            return await pending
    except (RedisError, OSError, TimeoutError) as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # redis-py can turn a cancellation into a connection error as
            # it tears the connection down; the cancel still holds.
            raise asyncio.CancelledError from exc
        if isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE"):
            raise WrongTypeError(str(exc)) from exc
        metrics.redis_errors.inc()
        raise FleetUnavailableError(
            f"Redis failed: {type(exc).__name__}: {exc}"
        ) from exc


def connect(settings: FleetSettings) -> Redis:
    """
    A Redis client as ``settings`` ask, that does not retry on its own:
    the refresh decides what a failure means.
    """
    options: dict[str, Any] = {
        "socket_connect_timeout": settings.connect_timeout_seconds,
        "socket_timeout": settings.operation_timeout_seconds,
        "retry": Retry(NoBackoff(), 0),
        "client_name": "token-sidecar",
    }
    if settings.redis_password_file is not None:
        options["credential_provider"] = _PasswordFile(
            settings.redis_username, settings.redis_password_file
        )
    elif settings.redis_username:
        options["username"] = settings.redis_username
    if settings.tls_ca_file is not None:
        options["ssl_ca_certs"] = str(settings.tls_ca_file)

    return Redis.from_url(settings.redis_url, **options)


class SharedToken:
    """
    The token of one credential, shared through Redis with the fleet.

    ``key_material`` returns the client secret or private key, as for
    the warm-restart cache; it is read at every call, since it may
    rotate. Every method raises `FleetUnavailableError` on Redis
    trouble, after counting it.
    """

    def __init__(
        self,
        client: Redis,
        settings: FleetSettings,
        binding: Binding,
        key_material: Callable[[], bytes],
        metrics: FleetMetrics,
    ) -> None:
        self._client = client
        self._settings = settings
        self._binding = binding
        self._key_material = key_material
        self.metrics = metrics
        self._share_script = client.register_script(_SHARE_IF_LEADING)
        self._troubled = False
        self._news = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None

    @property
    def client(self) -> Redis:
        """
        The Redis client, for the fleet's other uses (its spend).
        """
        return self._client

    @property
    def lease_seconds(self) -> float:
        """
        How long a lease lasts before another sidecar may take over.
        """
        return self._settings.lease_seconds

    def keys(self) -> tuple[str, str, str]:
        """
        The Redis names of the token, the lease and the channel.
        """
        material = self._key_material()
        name_key = derive_key(NAME_PURPOSE, self._binding, material)
        name = hmac.new(
            name_key, self._binding.fingerprint(), hashlib.sha256
        ).hexdigest()[:32]
        base = f"{self._settings.key_prefix}{{{name}}}"

        return f"{base}:token", f"{base}:lock", f"{base}:news"

    async def read(self) -> Token | None:
        """
        The shared token, or ``None`` when there is none that this
        sidecar's credentials open.
        """
        token_key, _, _ = self.keys()
        try:
            sealed = await self._call(self._client.get(token_key))
        except WrongTypeError:
            sealed = b"not a sealed token"
        if sealed is None:
            return None
        key = derive_key(FLEET_PURPOSE, self._binding, self._key_material())
        try:
            return unseal(bytes(sealed), FLEET_PURPOSE, self._binding, key)
        except UnsealError as exc:
            self.metrics.shared_reads.labels(result="unusable").inc()
            log.warning("fleet.entry_unusable", reason=exc.reason)
            return None

    async def try_lead(self) -> Lease | None:
        """
        Take the refresh lease if no other sidecar holds it.
        """
        _, lock_key, _ = self.keys()
        lock = self._client.lock(
            lock_key,
            timeout=self._settings.lease_seconds,
            blocking=False,
            thread_local=False,
        )
        if not await self._call(lock.acquire()):
            return None
        self.metrics.lock_acquisitions.inc()
        # redis-py keeps the lock's random token here; the share script
        # compares it with the one in Redis.
        token = lock.local.token
        assert isinstance(token, bytes)

        return Lease(lock, token)

    async def share(self, lease: Lease, token: Token, now: float) -> bool:
        """
        Write ``token`` and announce it, if ``lease`` is still held.
        """
        token_key, lock_key, channel = self.keys()
        life_ms = int((token.expires_at - now) * 1000)
        if life_ms <= 0:
            return False
        key = derive_key(FLEET_PURPOSE, self._binding, self._key_material())
        sealed = seal(token, FLEET_PURPOSE, self._binding, key)
        written = await self._call(
            self._share_script(
                keys=[lock_key, token_key, channel],
                args=[lease.token, sealed, life_ms, ANNOUNCEMENT],
            )
        )
        result = "written" if written else "lease_lost"
        self.metrics.shared_writes.labels(result=result).inc()
        if not written:
            log.warning(
                "fleet.lease_lost",
                lease_seconds=self._settings.lease_seconds,
                hint="the IdP answered after the lease ended; raise "
                "fleet.lease_seconds above the IdP's slowest answers",
            )

        return bool(written)

    async def bound_lock(self) -> None:
        """
        Give the lease's key an expiry if it has none: only a foreign
        write leaves it so, and it would hold every refresh back.
        """
        _, lock_key, _ = self.keys()
        lease_ms = int(self._settings.lease_seconds * 1000)
        if await self._call(self._client.pexpire(lock_key, lease_ms, nx=True)):
            log.warning(
                "fleet.lock_without_expiry",
                hint="something other than a sidecar wrote the lease key; "
                "it now expires after fleet.lease_seconds",
            )

    async def release(self, lease: Lease) -> None:
        """
        Give the lease back; never raises.
        """
        with contextlib.suppress(LockError, FleetUnavailableError):
            await self._call(lease.lock.release())

    async def wait_for_news(self, seconds: float) -> bool:
        """
        Whether a new token was announced within ``seconds``.

        The channel is read by a task of its own, started here on first
        use: a refresh cancelled while it waits (at stop) leaves no
        Redis call half done.
        """
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(
                self._listen(), name="fleet-news"
            )
        news = self._news
        # asyncio.timeout, not wait_for: on Python 3.11, wait_for can
        # swallow a cancellation that lands as the event is set, and the
        # refresher would then never stop.
        try:
            async with asyncio.timeout(seconds):
                await news.wait()
        except TimeoutError:
            return False

        return True

    async def _listen(self) -> None:
        # Resubscribes after Redis trouble; never calls PubSub.aclose,
        # which waits (uncancellably) for a read that may never end.
        _, _, channel = self.keys()
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(channel)
                while True:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=None
                    )
                    if message is not None:
                        self._news.set()
                        self._news = asyncio.Event()
            except (RedisError, OSError) as exc:
                log.debug("fleet.news_interrupted", error=str(exc))
            await asyncio.sleep(self._settings.lease_seconds / 4)

    async def close(self) -> None:
        """
        Stop listening and close the connections to Redis, within the
        operation timeout whatever Redis does.
        """
        # Each step runs as a task and is waited for with a deadline, not
        # cancelled: redis-py shields parts of its teardown from
        # cancellation, so a cancelled await there could wait forever.
        deadline = self._settings.operation_timeout_seconds
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.wait({self._listener}, timeout=deadline)
            self._listener = None
        closing = asyncio.ensure_future(self._client.aclose())
        done, _ = await asyncio.wait({closing}, timeout=deadline)
        if not done:
            log.warning("fleet.close_timed_out", timeout_seconds=deadline)
        elif closing.exception() is not None:
            log.debug("fleet.close_failed", error=str(closing.exception()))

    async def _call(self, pending: Any) -> Any:
        try:
            result = await call_redis(
                pending, self._settings.operation_timeout_seconds, self.metrics
            )
        except WrongTypeError:
            raise
        except FleetUnavailableError as exc:
            if not self._troubled:
                self._troubled = True
                log.warning(
                    "fleet.unavailable",
                    error=str(exc),
                    hint="serving the local token and fetching alone "
                    "until Redis answers again",
                )
            raise
        if self._troubled:
            self._troubled = False
            log.info("fleet.available")

        return result


async def plan_refresh(
    shared: SharedToken,
    acceptable: Callable[[Token], bool],
    poll_seconds: float = 1.0,
) -> Plan:
    """
    Decide how a due refresh goes: adopt the fleet's token, lead the
    refresh, or (on Redis trouble, or no refresh in twice the lease)
    fetch alone.

    ``acceptable`` says whether a shared token is worth adopting (newer
    than ours, with life enough). A waiter retries the lease every
    ``poll_seconds``, so it takes over soon after a dead holder's lease
    ends.
    """
    loop = asyncio.get_running_loop()
    try:
        found = await _read_acceptable(shared, acceptable)
        if found is not None:
            return Plan(token=found)
        deadline = loop.time() + 2 * shared.lease_seconds
        waited = False
        while True:
            lease = await shared.try_lead()
            if lease is not None:
                if waited:
                    shared.metrics.lock_takeovers.inc()
                # Another sidecar may have shared a token between
                # our read and the lease.
                found = await _read_acceptable(shared, acceptable)
                if found is None:
                    return Plan(lease=lease)
                await shared.release(lease)
                return Plan(token=found)
            if not waited:
                waited = True
                shared.metrics.lock_waits.inc()
                await shared.bound_lock()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise FleetUnavailableError(
                    "no sidecar shared a token within twice the lease"
                )
            await shared.wait_for_news(min(remaining, poll_seconds))
            found = await _read_acceptable(shared, acceptable)
            if found is not None:
                return Plan(token=found)
    except FleetUnavailableError as exc:
        shared.metrics.local_fetches.inc()
        log.info("fleet.fetching_alone", reason=str(exc))
        return Plan()


async def _read_acceptable(
    shared: SharedToken, acceptable: Callable[[Token], bool]
) -> Token | None:
    token = await shared.read()
    if token is not None and acceptable(token):
        shared.metrics.shared_reads.labels(result="hit").inc()
        return token
    shared.metrics.shared_reads.labels(result="miss").inc()

    return None
