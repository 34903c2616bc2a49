"""
The running sidecar: its parts wired together, started and stopped in
order.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp import web

from sidecar import __version__
from sidecar.access import AccessPolicy
from sidecar.budget import BudgetPolicy
from sidecar.cache import TokenCache
from sidecar.clock import Clock, SystemClock
from sidecar.config import Settings, redacted, resolve_id
from sidecar.fleet import FleetMetrics, SharedToken, connect
from sidecar.fleetspend import SharedSpend
from sidecar.ledger import QuotaLedger
from sidecar.listener import (
    ConnectionLimits,
    ConnectionStats,
    GuardedSite,
    bind_tcp,
    bind_unix,
    file_identity,
    remove_unix_socket,
)
from sidecar.metrics import Metrics
from sidecar.quota import QuotaGuard
from sidecar.refresher import Refresher
from sidecar.server import build_ops_app, build_token_app
from sidecar.sink import build_sinks
from sidecar.source import ClientCredentialsSource
from sidecar.statelock import StateLock
from sidecar.store import Binding, TokenStore
from sidecar.token import RefreshPolicy, Token

log = structlog.get_logger("sidecar.daemon")

#: In-flight answers get this long at shutdown; SIGTERM to exit must stay
#: under two seconds.
SHUTDOWN_GRACE_SECONDS = 1.0


class Sidecar:
    """
    One sidecar: refresher task, token listener and ops listener.

    Use ``await start()`` then ``await stop()``; the bound addresses are
    in `token_address` and `ops_address` once started.
    """

    def __init__(
        self,
        settings: Settings,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.metrics = metrics or Metrics()
        refresh = settings.refresh
        self.cache = TokenCache(
            RefreshPolicy(
                refresh_at=refresh.refresh_at,
                jitter=refresh.jitter,
                min_ttl_seconds=refresh.min_ttl_seconds,
            ),
            self.clock,
        )
        self.token_address: tuple[str, int] | None = None
        self.token_socket: Path | None = None
        self.ops_address: tuple[str, int] | None = None
        self.token_connections = ConnectionStats()
        self.ops_connections = ConnectionStats()
        self.metrics.watch_connections("token", self.token_connections)
        self.metrics.watch_connections("ops", self.ops_connections)
        self._session: aiohttp.ClientSession | None = None
        self._refresher_task: asyncio.Task[None] | None = None
        self._runners: list[web.AppRunner] = []
        self._unix_sockets: list[tuple[Path, tuple[int, int]]] = []
        self._fleet: SharedToken | None = None
        self._fleet_metrics: FleetMetrics | None = None
        self.state_lock = StateLock(state_files(settings))

    def build_refresher(self, session: aiohttp.ClientSession) -> Refresher:
        """
        The refresher and all it works with, as the settings ask.
        """
        settings = self.settings
        source = ClientCredentialsSource(
            settings.idp,
            session,
            self.clock,
            on_quota=self.metrics.observe_idp_quota,
        )
        self._fleet = self._build_shared_token(source)
        shared_spend = None
        if self._fleet is not None:
            assert self._fleet_metrics is not None
            shared_spend = SharedSpend(
                self._fleet.client,
                settings.fleet,
                Binding.of(settings.idp),
                self.clock,
                self._fleet_metrics,
            )

        return Refresher(
            source,
            self.cache,
            self.clock,
            self.metrics,
            settings.retry,
            store=build_token_store(settings, source, self.clock),
            quota=build_quota_guard(
                settings,
                self.cache.policy,
                self.metrics,
                self.clock,
                shared_spend,
            ),
            sinks=build_sinks(settings),
            wait_for_token_seconds=settings.listen.wait_for_token_seconds,
            invalidate_interval_seconds=(
                settings.refresh.invalidate_min_interval_seconds
            ),
            idle_after_seconds=settings.refresh.idle_after,
            fleet=self._fleet,
        )

    def _build_shared_token(
        self, source: ClientCredentialsSource
    ) -> SharedToken | None:
        fleet = self.settings.fleet
        if fleet.backend == "none":
            return None
        if self._fleet_metrics is None:
            self._fleet_metrics = FleetMetrics(self.metrics.registry)
        log.info(
            "fleet.enabled",
            backend=fleet.backend,
            redis=_redis_location(fleet.redis_url),
            lease_seconds=fleet.lease_seconds,
        )

        return SharedToken(
            connect(fleet),
            fleet,
            Binding.of(self.settings.idp),
            source.key_material,
            self._fleet_metrics,
        )

    async def close_fleet(self) -> None:
        """
        Close the connections to the fleet's Redis, if any.
        """
        if self._fleet is not None:
            await self._fleet.close()
            self._fleet = None

    def is_alive(self) -> bool:
        """
        Whether the refresher task is still running.
        """
        task = self._refresher_task
        return task is not None and not task.done()

    async def start(self) -> None:
        """
        Lock the state, open the listeners, then start fetching.

        Raises `StateInUseError` when another sidecar holds this one's
        state files, and `OSError` when an address cannot be bound;
        everything started so far is stopped again first.
        """
        settings = self.settings
        # Before anything reads the state.
        self.state_lock.acquire()
        try:
            # trust_env stays off: a proxy from the environment must not
            # see the client secret, and the IdP URL is configured
            # explicitly.
            self._session = aiohttp.ClientSession(trust_env=False)
            refresher = self.build_refresher(self._session)
            # Listeners first: a port already in use must not cost an
            # IdP request on every restart of a crash loop.
            await self._open_listeners(refresher)
        except BaseException:
            await self.stop()
            raise
        self._refresher_task = asyncio.create_task(
            refresher.run(), name="token-refresher"
        )

        log.info(
            "server.started",
            version=__version__,
            token_address=_format(self.token_address),
            token_socket=str(self.token_socket) if self.token_socket else None,
            ops_address=_format(self.ops_address),
            idp_host=urlsplit(settings.idp.resolved_token_url).netloc,
            settings=redacted(settings),
        )

    async def stop(self) -> None:
        """
        Stop in order: release waiting callers, close the listeners
        (finishing in-flight answers), stop the refresher, close the
        IdP client.
        """
        if self._session is None:
            self.state_lock.release()  # a start that failed early
            return  # never started, or stopped already
        # A start that failed to bind stops too, but it never served.
        served = self._refresher_task is not None
        try:
            await self._stop_parts()
        finally:
            self.state_lock.release()
        if served:
            log.info("server.stopped")

    async def _stop_parts(self) -> None:
        self.cache.close()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        for path, identity in self._unix_sockets:
            remove_unix_socket(path, identity)
        self._unix_sockets.clear()
        if self._refresher_task is not None:
            self._refresher_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher_task
            self._refresher_task = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.close_fleet()

    async def _open_listeners(self, refresher: Refresher) -> None:
        listen, ops = self.settings.listen, self.settings.ops
        token_app = build_token_app(
            refresher,
            self.cache,
            self.clock,
            self.metrics,
            listen,
            AccessPolicy(self.settings.access),
        )
        token_sockets: list[socket.socket] = []
        try:
            if listen.tcp:
                token_sockets.append(bind_tcp(listen.host, listen.port))
                self.token_address = token_sockets[-1].getsockname()[:2]
            if listen.unix_socket is not None:
                group = listen.socket_group
                token_sockets.append(
                    bind_unix(
                        listen.unix_socket,
                        listen.socket_mode_bits,
                        resolve_id(group, "group") if group else None,
                    )
                )
                self._unix_sockets.append(
                    (listen.unix_socket, file_identity(listen.unix_socket))
                )
                self.token_socket = listen.unix_socket
        except BaseException:
            # Sockets not yet handed to a site would leak otherwise.
            for sock in token_sockets:
                sock.close()
            raise
        await self._serve(token_app, token_sockets, self.token_connections)

        if ops.enabled:
            ops_socket = bind_tcp(ops.host, ops.port)
            self.ops_address = ops_socket.getsockname()[:2]
            await self._serve(
                build_ops_app(
                    self.cache, self.metrics, self.is_alive, refresher.is_idle
                ),
                [ops_socket],
                self.ops_connections,
            )

    async def _serve(
        self,
        app: web.Application,
        sockets: list[socket.socket],
        stats: ConnectionStats,
    ) -> None:
        listen = self.settings.listen
        runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=SHUTDOWN_GRACE_SECONDS,
            handle_signals=False,
            keepalive_timeout=listen.keepalive_timeout_seconds,
            max_line_size=listen.max_header_bytes,
            max_field_size=listen.max_header_bytes,
        )
        await runner.setup()
        self._runners.append(runner)
        limits = ConnectionLimits(
            max_connections=listen.max_connections,
            request_head_timeout_seconds=listen.request_head_timeout_seconds,
        )
        for sock in sockets:
            await GuardedSite(runner, sock, limits, stats).start()


def state_files(settings: Settings) -> list[tuple[str, Path]]:
    """
    The files a sidecar rewrites and must not share, with their keys.
    """
    # Limitation: the token sinks are not locked; two sidecars given one
    # sink.path take turns writing it.
    named = [
        ("cache.path", settings.cache.resolved_path()),
        ("quota.ledger_path", settings.quota.resolved_ledger_path()),
    ]

    return [(key, path) for key, path in named if path is not None]


def build_token_store(
    settings: Settings, source: ClientCredentialsSource, clock: Clock
) -> TokenStore | None:
    """
    The warm-restart cache the settings ask for, if any.
    """
    path = settings.cache.resolved_path()
    if path is None:
        log.info(
            "cache.disabled",
            hint="set cache.path to keep the token across restarts",
        )
        return None

    return TokenStore(
        path, Binding.of(settings.idp), source.key_material, clock=clock
    )


def build_quota_guard(
    settings: Settings,
    policy: RefreshPolicy,
    metrics: Metrics,
    clock: Clock,
    shared: SharedSpend | None = None,
) -> QuotaGuard:
    """
    The ledger and budget the settings ask for; in fleet mode, with the
    fleet's spend in Redis.
    """
    quota = settings.quota
    ledger = QuotaLedger(quota.resolved_ledger_path(), clock)
    budget = BudgetPolicy(
        monthly_budget=quota.monthly_budget,
        warn_fraction=quota.warn_fraction,
        hard_stop=quota.hard_stop,
        min_request_interval_seconds=quota.min_request_interval_seconds,
    )

    return QuotaGuard(ledger, budget, policy, metrics, shared)


async def run_once(settings: Settings) -> tuple[Token, str]:
    """
    Make sure a valid token is cached, without serving it: the cached one
    or one new request. For init containers and batch jobs.

    Raises like `Refresher.ensure_token`.
    """
    sidecar = Sidecar(settings)
    sidecar.state_lock.acquire()
    try:
        async with aiohttp.ClientSession(trust_env=False) as session:
            refresher = sidecar.build_refresher(session)
            try:
                return await refresher.ensure_token()
            finally:
                await sidecar.close_fleet()
    finally:
        sidecar.state_lock.release()


async def run_until_signalled(
    sidecar: Sidecar, on_started: Callable[[], None] | None = None
) -> None:
    """
    Run ``sidecar`` until SIGTERM or SIGINT, then stop it.

    ``on_started`` is called once its listeners are open. The previous
    signal handlers are restored on the way out.
    """
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stopping.set)
    try:
        await sidecar.start()
        if on_started is not None:
            on_started()
        await stopping.wait()
        log.info("server.stopping")
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        await sidecar.stop()


def _redis_location(url: str) -> str:
    # Host and port, or the socket path: never a user name or password.
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}"

    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}"


def _format(address: tuple[str, int] | None) -> str | None:
    if address is None:
        return None
    host, port = address

    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
