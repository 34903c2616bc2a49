"""
The running sidecar: its parts wired together, started and stopped in
order.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp import web

from sidecar import __version__
from sidecar.cache import TokenCache
from sidecar.clock import Clock, SystemClock
from sidecar.config import Settings, redacted
from sidecar.metrics import Metrics
from sidecar.refresher import Refresher
from sidecar.server import build_ops_app, build_token_app
from sidecar.source import ClientCredentialsSource
from sidecar.token import RefreshPolicy

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
        self.ops_address: tuple[str, int] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._refresher_task: asyncio.Task[None] | None = None
        self._runners: list[web.AppRunner] = []

    async def start(self) -> None:
        """
        Start fetching, then open the listeners.

        Raises `OSError` when an address cannot be bound; everything
        started so far is stopped again first.
        """
        settings = self.settings
        # trust_env stays off: a proxy from the environment must not see
        # the client secret, and the IdP URL is configured explicitly.
        self._session = aiohttp.ClientSession(trust_env=False)
        source = ClientCredentialsSource(
            settings.idp, self._session, self.clock
        )
        refresher = Refresher(
            source,
            self.cache,
            self.clock,
            self.metrics,
            settings.retry,
            wait_for_token_seconds=settings.listen.wait_for_token_seconds,
        )
        self._refresher_task = asyncio.create_task(
            refresher.run(), name="token-refresher"
        )

        try:
            token_app = build_token_app(
                refresher,
                self.cache,
                self.clock,
                self.metrics,
                settings.listen,
            )
            self.token_address = await self._serve(
                token_app, settings.listen.host, settings.listen.port
            )
            if settings.ops.enabled:
                ops_app = build_ops_app(self.cache, self.metrics)
                self.ops_address = await self._serve(
                    ops_app, settings.ops.host, settings.ops.port
                )
        except BaseException:
            await self.stop()
            raise

        log.info(
            "server.started",
            version=__version__,
            token_address=_format(self.token_address),
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
            return  # never started, or stopped already
        self.cache.close()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self._refresher_task is not None:
            self._refresher_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher_task
            self._refresher_task = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        log.info("server.stopped")

    async def _serve(
        self, app: web.Application, host: str, port: int
    ) -> tuple[str, int]:
        runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=SHUTDOWN_GRACE_SECONDS,
            handle_signals=False,
        )
        await runner.setup()
        self._runners.append(runner)
        await web.TCPSite(runner, host, port).start()
        sockname = runner.addresses[0]

        return str(sockname[0]), int(sockname[1])


async def run_until_signalled(sidecar: Sidecar) -> None:
    """
    Run ``sidecar`` until SIGTERM or SIGINT, then stop it.

    The previous signal handlers are restored on the way out.
    """
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stopping.set)
    try:
        await sidecar.start()
        await stopping.wait()
        log.info("server.stopping")
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        await sidecar.stop()


def _format(address: tuple[str, int] | None) -> str | None:
    if address is None:
        return None
    host, port = address

    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
