"""
Stateful fakes: a scripted IdP on a real aiohttp server, and a clock.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

TOKEN_PATH = "/oauth/token"


@dataclass
class Reply:
    """
    One scripted IdP answer: status, headers, body, and an optional delay.

    ``body`` may be bytes (sent as is) or any JSON value.
    """

    status: int = 200
    body: object = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_seconds: float = 0.0
    content_type: str = "application/json"

    def encoded_body(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        return json.dumps(self.body).encode()


def token_reply(
    lifetime_seconds: float = 3600, access_token: str | None = None
) -> Reply:
    """
    A well-formed token answer.
    """
    return Reply(
        body={
            "access_token": access_token or "tok-" + secrets.token_hex(8),
            "token_type": "Bearer",
            "expires_in": lifetime_seconds,
        }
    )


def oauth_error(status: int, error: str, **headers: str) -> Reply:
    """
    An OAuth error answer such as ``invalid_client``.
    """
    return Reply(status=status, body={"error": error}, headers=headers)


@dataclass
class RecordedRequest:
    """
    What the fake IdP received, for assertions.
    """

    form: dict[str, str]
    headers: dict[str, str]


class FakeIdP:
    """
    A token endpoint that plays back scripted replies and records requests.

    With the script empty it issues a fresh token living
    ``default_lifetime_seconds``. `hold` makes every reply wait until
    `release`, to pile up concurrent callers.
    """

    def __init__(self, default_lifetime_seconds: float = 3600) -> None:
        self.default_lifetime_seconds = default_lifetime_seconds
        self.script: deque[Reply] = deque()
        self.requests: list[RecordedRequest] = []
        self.issued: list[str] = []
        self._gate = asyncio.Event()
        self._gate.set()
        self._ids = itertools.count(1)

    @property
    def count(self) -> int:
        """
        Token requests received so far.
        """
        return len(self.requests)

    def then(self, *replies: Reply) -> FakeIdP:
        """
        Queue replies for the next requests, in order.
        """
        self.script.extend(replies)
        return self

    def hold(self) -> None:
        """
        Make replies wait until `release`.
        """
        self._gate.clear()

    def release(self) -> None:
        """
        Let held replies go.
        """
        self._gate.set()

    def app(self) -> web.Application:
        """
        The aiohttp app serving ``POST /oauth/token``.
        """
        app = web.Application()
        app.router.add_post(TOKEN_PATH, self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.requests.append(RecordedRequest(form, dict(request.headers)))
        await self._gate.wait()

        reply = self.script.popleft() if self.script else self._fresh()
        if reply.delay_seconds:
            await asyncio.sleep(reply.delay_seconds)
        body = reply.encoded_body()
        if isinstance(reply.body, dict) and "access_token" in reply.body:
            self.issued.append(str(reply.body["access_token"]))
        return web.Response(
            status=reply.status,
            body=body,
            headers={"Content-Type": reply.content_type, **reply.headers},
        )

    def _fresh(self) -> Reply:
        number = next(self._ids)
        return token_reply(
            self.default_lifetime_seconds,
            f"tok-{number}-{secrets.token_hex(8)}",
        )


class FakeClock:
    """
    A wall clock that moves only when told to.

    `sleep` returns once `advance` has moved the clock past its end.
    """

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self._now = now
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._now + max(0.0, seconds), future))
        try:
            await future
        finally:
            self._sleepers = [s for s in self._sleepers if s[1] is not future]

    def advance(self, seconds: float) -> None:
        """
        Move time forward and wake the sleepers whose time has come.
        """
        self._now += seconds
        waking = [s for s in self._sleepers if s[0] <= self._now]
        self._sleepers = [s for s in self._sleepers if s[0] > self._now]
        for _, future in waking:
            if not future.done():
                future.set_result(None)

    def advance_to_next_deadline(self) -> None:
        """
        Move time to the earliest sleeper's wake-up time.
        """
        self.advance(min(d for d, _ in self._sleepers) - self._now)

    @property
    def sleepers(self) -> int:
        """
        How many tasks are asleep on this clock.
        """
        return len(self._sleepers)


async def wait_until(
    predicate: Callable[[], bool], timeout_seconds: float = 10.0
) -> None:
    """
    Poll ``predicate`` until it holds; fail the test after the deadline.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_seconds
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.002)


def free_port() -> int:
    """
    A loopback port that nothing listens on (bound, then released).
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]

    return port
