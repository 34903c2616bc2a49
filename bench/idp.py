"""
A scripted token endpoint, run as its own process for the benchmarks.

``python -m bench.idp [--lifetime S] [--cycle faults]`` listens on a free
loopback port and prints ``{"port": P}`` on one line once it serves.
Every request is answered by the next step of a cycle of phases (good
tokens, latency, 5xx storms, 429 with ``Retry-After``, connection
resets, hangs, malformed bodies) and recorded, with the truth about each
token it issued: when it really expires. The bench reads that record
from ``GET /stats`` and steers the endpoint with ``POST /control``
(hold every answer, release them, change the lifetime or the cycle).

Like ``tests/fakes.py``, but out of process, so that the sidecar's
memory and start-up are measured alone.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import secrets
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web

from bench.serving import serve_until_cancelled

TOKEN_PATH = "/oauth/token"  # noqa: S105 -- a path, not a secret
CLIENT_ID = "bench"
CLIENT_SECRET = "bench-secret-0123456789"  # noqa: S105 -- a local fake

#: How long a "hang" holds a request before dropping it; far beyond any
#: sensible idp.timeout_seconds.
HANG_SECONDS = 60.0

#: 5xx statuses a storm rotates through.
STORM_STATUSES = (500, 502, 503, 504)

#: Bodies a "malformed" phase rotates through, all with status 200.
MALFORMED_BODIES: tuple[tuple[str, bytes], ...] = (
    ("text/html", b"<html><body>Bad gateway</body></html>"),
    ("application/json", b""),
    ("application/json", b'{"access_tok'),
    ("application/json", b"[]"),
    (
        "application/json",
        b'{"access_token": "", "token_type": "Bearer", "expires_in": 60}',
    ),
    (
        "application/json",
        b'{"access_token": "has space", "token_type": "Bearer", '
        b'"expires_in": 60}',
    ),
    (
        "application/json",
        b'{"access_token": "expired-on-arrival", "token_type": "Bearer", '
        b'"expires_in": -5}',
    ),
    (
        "application/json",
        b'{"access_token": "dpop-token", "token_type": "DPoP", '
        b'"expires_in": 60}',
    ),
)


@dataclass(frozen=True, slots=True)
class Phase:
    """
    ``count`` consecutive answers of one kind.

    Kinds: ``ok``, ``latency`` (a token after ``delay_seconds``),
    ``storm`` (5xx), ``throttle`` (429 with ``Retry-After:
    retry_after_seconds``), ``reset``, ``hang``, ``malformed``.
    """

    kind: str
    count: int
    delay_seconds: float = 0.0
    retry_after_seconds: int = 1


#: One round of every fault, ending in recovery.
FAULT_CYCLE = (
    Phase("ok", 1),
    Phase("latency", 2, delay_seconds=0.6),
    Phase("storm", 4),
    Phase("throttle", 2, retry_after_seconds=1),
    Phase("reset", 3),
    Phase("hang", 2),
    Phase("malformed", len(MALFORMED_BODIES)),
    Phase("ok", 2),
)

CYCLES = {"ok": (Phase("ok", 1),), "faults": FAULT_CYCLE}


@dataclass(slots=True)
class Record:
    """
    One token request and what it was answered.

    Times are epoch seconds (``time.time``, the clock the sidecar uses
    for expiry); ``expires_at`` is set when a token was issued.
    """

    number: int
    kind: str
    arrived_at: float
    answered_at: float | None = None
    status: int | None = None
    retry_after_seconds: int | None = None
    access_token: str | None = None
    expires_at: float | None = None


@dataclass
class ScriptedIdP:
    """
    The endpoint's state: the cycle, the hold gate and the record.
    """

    lifetime_seconds: float
    cycle: tuple[Phase, ...]
    records: list[Record] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    _steps: itertools.cycle[tuple[Phase, int]] | None = None
    _ids: itertools.count[int] = field(
        default_factory=lambda: itertools.count(1)
    )

    def __post_init__(self) -> None:
        self.gate.set()
        self.restart_cycle(self.cycle)

    def restart_cycle(self, cycle: tuple[Phase, ...]) -> None:
        """
        Answer the next request with the first step of ``cycle``.
        """
        self.cycle = cycle
        self._steps = itertools.cycle(
            [(phase, i) for phase in cycle for i in range(phase.count)]
        )

    def next_step(self) -> tuple[Phase, int]:
        """
        The phase the next answer comes from, and its index within it.
        """
        assert self._steps is not None  # set in __post_init__
        return next(self._steps)

    def issue(self, record: Record) -> bytes:
        """
        A good token response body; the record learns the truth.
        """
        token = f"bench-{next(self._ids)}-{secrets.token_hex(12)}"
        record.access_token = token
        record.expires_at = time.time() + self.lifetime_seconds
        body = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.lifetime_seconds,
        }

        return json.dumps(body).encode()


IDP_KEY = web.AppKey("idp", ScriptedIdP)


def build_app(idp: ScriptedIdP) -> web.Application:
    """
    The endpoint's app: the token route, ``/stats`` and ``/control``.
    """
    app = web.Application()
    app[IDP_KEY] = idp
    app.router.add_post(TOKEN_PATH, _token)
    app.router.add_get("/stats", _stats)
    app.router.add_post("/control", _control)

    return app


async def _token(request: web.Request) -> web.StreamResponse:
    idp = request.app[IDP_KEY]
    form = await request.post()
    record = Record(len(idp.records) + 1, "ok", time.time())
    idp.records.append(record)
    if (
        form.get("grant_type") != "client_credentials"
        or form.get("client_id") != CLIENT_ID
        or form.get("client_secret") != CLIENT_SECRET
    ):
        record.kind = "refused"
        return _answer(record, 401, b'{"error": "invalid_client"}')

    await idp.gate.wait()
    phase, index = idp.next_step()
    record.kind = phase.kind
    if phase.kind == "latency":
        await asyncio.sleep(phase.delay_seconds)
    if phase.kind in ("ok", "latency"):
        return _answer(record, 200, idp.issue(record))
    if phase.kind == "storm":
        status = STORM_STATUSES[index % len(STORM_STATUSES)]
        return _answer(
            record, status, b"<html>upstream trouble</html>", "text/html"
        )
    if phase.kind == "throttle":
        record.retry_after_seconds = phase.retry_after_seconds
        return _answer(
            record,
            429,
            b'{"error": "too_many_requests"}',
            headers={"Retry-After": str(phase.retry_after_seconds)},
        )
    if phase.kind == "malformed":
        content_type, body = MALFORMED_BODIES[index % len(MALFORMED_BODIES)]
        return _answer(record, 200, body, content_type)
    if phase.kind == "hang":
        await asyncio.sleep(HANG_SECONDS)
    _reset(request)
    record.answered_at = time.time()

    raise ConnectionResetError("reset on purpose")


def _answer(
    record: Record,
    status: int,
    body: bytes,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> web.Response:
    record.status = status
    record.answered_at = time.time()

    return web.Response(
        status=status,
        body=body,
        headers={"Content-Type": content_type, **(headers or {})},
    )


def _reset(request: web.Request) -> None:
    # SO_LINGER with a zero timeout turns close() into a TCP reset.
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
    transport.abort()


async def _stats(request: web.Request) -> web.Response:
    idp = request.app[IDP_KEY]
    since = int(request.query.get("since", "0"))
    records = [asdict(r) for r in idp.records[since:]]

    return web.json_response({"count": len(idp.records), "records": records})


async def _control(request: web.Request) -> web.Response:
    idp = request.app[IDP_KEY]
    orders: dict[str, Any] = await request.json()
    if "lifetime_seconds" in orders:
        idp.lifetime_seconds = float(orders["lifetime_seconds"])
    if "cycle" in orders:
        idp.restart_cycle(CYCLES[orders["cycle"]])
    if orders.get("hold") is True:
        idp.gate.clear()
    if orders.get("hold") is False:
        idp.gate.set()

    return web.json_response({"count": len(idp.records)})


async def serve(lifetime_seconds: float, cycle: str) -> None:
    """
    Serve until cancelled, on a free loopback port that is printed.
    """
    idp = ScriptedIdP(lifetime_seconds, CYCLES[cycle])
    await serve_until_cancelled(build_app(idp))


def main() -> None:
    """
    Parse the flags and serve until killed.
    """
    parser = argparse.ArgumentParser(prog="python -m bench.idp")
    parser.add_argument("--lifetime", type=float, default=3600.0)
    parser.add_argument("--cycle", choices=sorted(CYCLES), default="ok")
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.lifetime, args.cycle))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
