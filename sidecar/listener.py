"""
Listening sockets, TCP and Unix, with the connection limits aiohttp lacks.

aiohttp caps header sizes and closes idle keep-alive connections, but it
neither caps concurrent connections nor gives a client a deadline to
finish sending a request head, so a slow client could hold connections
open forever. `GuardedSite` serves an app on a socket bound here and
enforces both, per connection, below aiohttp's protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import structlog
from aiohttp import web

from sidecar.errors import SidecarError
from sidecar.peer import Peer, peer_of_tcp, peer_of_unix_socket

log = structlog.get_logger("sidecar.listener")


class ListenerError(SidecarError):
    """
    A listening socket could not be set up; the message says why.
    """


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """
    Per-listener caps on connections.
    """

    max_connections: int = 4096
    request_head_timeout_seconds: float = 5.0


@dataclass(slots=True)
class ConnectionStats:
    """
    What a listener has done to connections, for metrics and tests.
    """

    active: int = 0
    refused: int = 0
    timed_out: int = 0


def bind_tcp(host: str, port: int) -> socket.socket:
    """
    A TCP socket bound to ``host``:``port``, not yet listening.

    Raises `OSError` as ``bind`` does (address in use, not available).
    """
    infos = socket.getaddrinfo(
        host.strip("[]"),
        port,
        type=socket.SOCK_STREAM,
        flags=socket.AI_PASSIVE,
    )
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        # Name the address: a sidecar binds two, and "address already in
        # use" alone does not say which.
        shown = f"[{host}]" if ":" in host.strip("[]") else host
        raise OSError(exc.errno, f"{exc.strerror} on {shown}:{port}") from exc
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)

    return sock


def bind_unix(path: Path, mode: int, group_id: int | None) -> socket.socket:
    """
    A Unix socket bound at ``path`` with ``mode`` and group, not listening.

    A socket file left behind by a dead process is replaced; a live one,
    or anything at ``path`` that is not a socket, is left alone and
    reported with `ListenerError`.
    """
    _clear_stale_socket(path)
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o755)

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The socket is created with the umask's mode; a tight umask closes
    # the window before chmod in which anyone could connect.
    previous_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(previous_umask)

    try:
        if group_id is not None:
            os.chown(path, -1, group_id)
        os.chmod(path, mode)
    except OSError as exc:
        sock.close()
        path.unlink(missing_ok=True)
        raise ListenerError(
            f"cannot set the group or mode of {str(path)!r} "
            f"({exc.strerror}); the sidecar must own it and belong to "
            "listen.socket_group"
        ) from None
    sock.setblocking(False)

    return sock


def file_identity(path: Path) -> tuple[int, int]:
    """
    The device and inode of ``path`` itself (not a symlink's target).
    """
    status = os.lstat(path)

    return status.st_dev, status.st_ino


def remove_unix_socket(path: Path, identity: tuple[int, int]) -> None:
    """
    Delete the socket file at ``path`` if it is still the one we bound.

    A newer socket at the same path (another sidecar started since) has
    another identity and is left alone.
    """
    with contextlib.suppress(OSError):
        if file_identity(path) == identity:
            path.unlink()


def _clear_stale_socket(path: Path) -> None:
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(status.st_mode):
        raise ListenerError(
            f"{str(path)!r} exists and is not a socket; refusing to delete "
            "it. Remove it yourself or choose another listen.unix_socket"
        )

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # A live listener with a full accept queue would block a plain
    # connect for ever; not answering in time counts as alive.
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (TimeoutError, BlockingIOError):
        # BlockingIOError: the listener's accept queue is full.
        raise ListenerError(
            f"another process is serving on {str(path)!r} but does not "
            "answer; stop it or choose another listen.unix_socket"
        ) from None
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ListenerError(
                f"cannot tell whether {str(path)!r} is in use "
                f"({exc.strerror}); remove it if no sidecar runs"
            ) from None
    else:
        raise ListenerError(
            f"another process is serving on {str(path)!r}; stop it or "
            "choose another listen.unix_socket"
        )
    finally:
        probe.close()

    log.info("listener.stale_socket_removed", path=str(path))
    path.unlink()


class GuardedSite(web.BaseSite):
    """
    Serves a runner's app on an already bound socket, within limits.
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        limits: ConnectionLimits,
        stats: ConnectionStats | None = None,
    ) -> None:
        # A deep accept queue absorbs a burst of callers at a cold start.
        super().__init__(runner, backlog=1024)
        self._sock = sock
        self._limits = limits
        self.stats = stats or ConnectionStats()

    @property
    def name(self) -> str:
        address = self._sock.getsockname()
        if self._sock.family == socket.AF_UNIX:
            return f"unix:{address}"

        return f"http://{address[0]}:{address[1]}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None  # BaseSite.__init__ checked it
        loop = asyncio.get_running_loop()

        def guarded() -> asyncio.Protocol:
            return GuardedProtocol(server(), self._limits, self.stats)

        self._server = await loop.create_server(
            guarded, sock=self._sock, backlog=self._backlog
        )


class GuardedProtocol(asyncio.Protocol):
    """
    Wraps aiohttp's protocol: refuses connections over the cap, closes
    those that take too long to send a request head, and remembers who
    the caller is for the connection's life.
    """

    def __init__(
        self,
        inner: asyncio.Protocol,
        limits: ConnectionLimits,
        stats: ConnectionStats,
    ) -> None:
        self._inner = inner
        self._limits = limits
        self._stats = stats
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        # The last bytes seen, so a head end split across reads is found.
        self._tail = b""
        self._head_started = False
        self._peer: Peer | None = None
        self._peer_resolved = False

    async def peer(self) -> Peer | None:
        """
        The caller as the kernel reports it, looked up once per connection.
        """
        if not self._peer_resolved and self._transport is not None:
            self._peer = await _resolve_peer(self._transport)
            self._peer_resolved = True

        return self._peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # create_server's transports are streams: asyncio's own, or
        # uvloop's, which have the same methods but subclass neither.
        stream = cast(asyncio.Transport, transport)
        if self._stats.active >= self._limits.max_connections:
            self._stats.refused += 1
            stream.abort()
            return
        self._stats.active += 1
        self._transport = stream
        self._arm()
        self._inner.connection_made(stream)

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return
        if self._deadline is None:
            self._arm()  # the first byte of the next request
        # Blank lines before a request line are skipped by the parser, so
        # they neither start a request nor may end its deadline.
        if not self._head_started and data.strip(b"\r\n"):
            self._head_started = True
            data_seen = self._tail + data.lstrip(b"\r\n")
        else:
            data_seen = self._tail + data
        if self._head_started and b"\r\n\r\n" in data_seen:
            self._disarm()
            self._head_started = False
        self._tail = data_seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._transport is None:
            return None
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is None:
            return
        self._stats.active -= 1
        self._disarm()
        self._transport = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(
            self._limits.request_head_timeout_seconds, self._expire
        )

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self._transport is not None:
            self._stats.timed_out += 1
            log.debug("listener.slow_request_closed")
            self._transport.abort()


async def peer_of_transport(
    transport: asyncio.BaseTransport | None,
) -> Peer | None:
    """
    The caller at the other end of a request's connection, if known.
    """
    if transport is None:
        return None
    protocol = transport.get_protocol()
    if isinstance(protocol, GuardedProtocol):
        return await protocol.peer()

    return await _resolve_peer(transport)


async def _resolve_peer(transport: asyncio.BaseTransport) -> Peer | None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    if sock.family == socket.AF_UNIX:
        return peer_of_unix_socket(sock)
    server = transport.get_extra_info("sockname")
    client = transport.get_extra_info("peername")
    if not server or not client:
        return None

    # Once per connection, in a thread: the sock_diag query takes tens of
    # microseconds, but its /proc fallback milliseconds.
    return await asyncio.to_thread(peer_of_tcp, server[:2], client[:2])


def describe(sock: socket.socket) -> str:
    """
    The address of a bound socket, for logs and banners.
    """
    address: Any = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{address}"
    host, port = address[0], address[1]

    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
