"""
The HTTP surface: the ``/token`` app and the ops app, kept apart.

``/token`` is served only on the listen address, behind a guard against
server-side request forgery and browsers. The ops app (health, readiness,
metrics) may bind wider for probes and Prometheus and never serves a
token.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import HttpVersion10, HttpVersion11, hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar.access import AccessPolicy
from sidecar.cache import TokenCache
from sidecar.clock import Clock
from sidecar.config import ListenSettings, is_loopback_host
from sidecar.errors import NoTokenError
from sidecar.listener import peer_of_transport
from sidecar.log import LogLimiter
from sidecar.metrics import Metrics
from sidecar.peer import Peer
from sidecar.refresher import Refresher
from sidecar.token import Token

log = structlog.get_logger("sidecar.server")

REFRESHER_KEY = web.AppKey("refresher", Refresher)
CACHE_KEY = web.AppKey("cache", TokenCache)
CLOCK_KEY = web.AppKey("clock", Clock)
METRICS_KEY = web.AppKey("metrics", Metrics)
LISTEN_KEY = web.AppKey("listen", ListenSettings)
ACCESS_KEY = web.AppKey("access", AccessPolicy)
LIMITER_KEY = web.AppKey("log_limiter", LogLimiter)
ALIVE_KEY: web.AppKey[Callable[[], bool]] = web.AppKey("alive")
IDLE_KEY: web.AppKey[Callable[[], bool]] = web.AppKey("idle")

#: Where the access middleware leaves the caller for the handler.
PEER_KEY = web.RequestKey("peer", Peer)

#: Only /token/invalidate takes a body, a few dozen bytes of JSON.
MAX_BODY_BYTES = 1024

#: The longest long-poll, and the most life a caller may ask for.
MAX_WAIT_SECONDS = 300.0
MAX_MIN_TTL_SECONDS = 366 * 24 * 3600.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def json_error(
    status: int,
    error: str,
    description: str,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """
    A short JSON error in the OAuth shape: ``error`` and a description.
    """
    body = {"error": error, "error_description": description}

    return web.json_response(
        body, status=status, headers={**NO_STORE, **(headers or {})}
    )


def build_token_app(
    refresher: Refresher,
    cache: TokenCache,
    clock: Clock,
    metrics: Metrics,
    listen: ListenSettings,
    access: AccessPolicy,
) -> web.Application:
    """
    The app that hands out the token on ``GET /token``.
    """
    app = web.Application(
        middlewares=[_count_token_responses, _json_errors, _guard, _access],
        client_max_size=MAX_BODY_BYTES,
    )
    app[ACCESS_KEY] = access
    app[LIMITER_KEY] = LogLimiter()
    app[REFRESHER_KEY] = refresher
    app[CACHE_KEY] = cache
    app[CLOCK_KEY] = clock
    app[METRICS_KEY] = metrics
    app[LISTEN_KEY] = listen
    app.router.add_get(
        "/token", _get_token, allow_head=False, expect_handler=_no_expect
    )
    app.router.add_post(
        "/token/invalidate", _invalidate, expect_handler=_no_expect
    )

    return app


def build_ops_app(
    cache: TokenCache,
    metrics: Metrics,
    is_alive: Callable[[], bool] = lambda: True,
    is_idle: Callable[[], bool] = lambda: False,
) -> web.Application:
    """
    The app for ``/healthz``, ``/readyz`` and ``/metrics``.

    ``is_alive`` says whether the refresher still runs; without it the
    sidecar can only serve until the token expires, so ``/healthz`` fails
    and a supervisor restarts it. ``is_idle`` says whether refreshes
    have stopped for want of callers; an idle sidecar counts as ready,
    since the next caller's request fetches.
    """
    app = web.Application(middlewares=[_json_errors])
    app[CACHE_KEY] = cache
    app[ALIVE_KEY] = is_alive
    app[IDLE_KEY] = is_idle
    app[METRICS_KEY] = metrics
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)

    return app


async def _get_token(request: web.Request) -> web.Response:
    """
    ``GET /token[?min_ttl=S][&wait=S&after=ETAG]``.

    ``min_ttl`` asks for at least that much life left; ``wait`` with
    ``after`` long-polls until the token differs from the ``after`` ETag
    (304 when it does not change in time); ``If-None-Match`` gets a 304
    while the token is unchanged.
    """
    try:
        min_ttl = _seconds_param(request, "min_ttl", MAX_MIN_TTL_SECONDS)
        wait = _seconds_param(request, "wait", MAX_WAIT_SECONDS)
    except ValueError as exc:
        return json_error(400, "invalid_request", str(exc))
    after = request.query.get("after", "").strip('"')

    refresher = request.app[REFRESHER_KEY]
    try:
        token = await refresher.get_token(min_ttl)
    except NoTokenError as exc:
        return _unavailable(request, exc)

    if after and wait and token.fingerprint == after:
        changed = await request.app[CACHE_KEY].wait_for_change(after, wait)
        if changed is None:
            return _not_modified(token)
        token = changed
    if _matches(request.headers.get(hdrs.IF_NONE_MATCH), token):
        return _not_modified(token)

    return _hand_out(request, token)


async def _invalidate(request: web.Request) -> web.Response:
    """
    ``POST /token/invalidate`` with ``{"token_sha256": HEX}``: the API
    rejected this token; ask for one new token.
    """
    try:
        body = await request.json()
        token_sha256 = body["token_sha256"]
        if not isinstance(token_sha256, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return json_error(
            400,
            "invalid_request",
            'send JSON {"token_sha256": "<hex SHA-256 of the rejected '
            'token>"}',
        )

    outcome = request.app[REFRESHER_KEY].invalidate(token_sha256)
    if outcome == "quota_held":
        return json_error(
            429,
            "quota_held",
            "the monthly budget (or the restart interval) allows no new "
            "token now; see the sidecar's log",
            headers={"Retry-After": "60"},
        )
    if outcome == "rate_limited":
        return json_error(
            429,
            "rate_limited",
            "a new token was asked for recently; retry later",
            headers={"Retry-After": "60"},
        )
    status = 202 if outcome in ("refreshing", "already_refreshing") else 200

    return web.json_response(
        {"status": outcome}, status=status, headers=NO_STORE
    )


def _hand_out(request: web.Request, token: Token) -> web.Response:
    remaining = token.remaining_seconds(request.app[CLOCK_KEY].now())
    peer = request.get(PEER_KEY)
    log.info(
        "token.handed_out",
        uid=peer.uid if peer else None,
        pid=peer.pid if peer else None,
        token_fingerprint=token.fingerprint,
        expires_in_seconds=round(remaining, 3),
    )
    request.app[METRICS_KEY].token_handouts.labels(
        uid=request.app[ACCESS_KEY].uid_label(peer)
    ).inc()
    headers = {**NO_STORE, hdrs.ETAG: f'"{token.fingerprint}"'}
    if _prefers_text(request):
        return web.Response(
            text=token.access_token, content_type="text/plain", headers=headers
        )
    body = {
        "access_token": token.access_token,
        "token_type": "Bearer",
        "expires_in": max(0, math.floor(remaining)),
        "expires_at": math.floor(token.expires_at),
    }

    return web.json_response(body, headers=headers)


def _matches(if_none_match: str | None, token: Token) -> bool:
    # RFC 9110: "*", or a list of tags, compared weakly (W/ ignored).
    if not if_none_match:
        return False
    tags = [tag.strip() for tag in if_none_match.split(",")]

    return any(
        tag == "*" or tag.removeprefix("W/").strip('"') == token.fingerprint
        for tag in tags
    )


def _not_modified(token: Token) -> web.Response:
    return web.Response(
        status=304, headers={**NO_STORE, hdrs.ETAG: f'"{token.fingerprint}"'}
    )


def _unavailable(request: web.Request, exc: NoTokenError) -> web.Response:
    suppressed = request.app[LIMITER_KEY].allow("unavailable")
    if suppressed is not None:
        log.warning(
            "token.unavailable",
            error=str(exc),
            suppressed_since_last=suppressed,
        )

    return json_error(
        503,
        "temporarily_unavailable",
        str(exc),
        headers={"Retry-After": str(exc.retry_after_seconds)},
    )


def _seconds_param(request: web.Request, name: str, limit: float) -> float:
    text = request.query.get(name)
    if text is None:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= limit:
        raise ValueError(
            f"{name} must be a number of seconds from 0 to {limit:g}"
        )

    return value


def _prefers_text(request: web.Request) -> bool:
    accept = request.headers.get(hdrs.ACCEPT, "")
    kinds = [part.split(";")[0].strip().lower() for part in accept.split(",")]

    return "text/plain" in kinds and "application/json" not in kinds


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """
    Refuse what a local caller would not send but a forged request would.
    """
    if request.body_exists and request.method != "POST":
        _refused(request, "request_body_not_allowed")
        response = json_error(
            413,
            "request_body_not_allowed",
            "/token takes no request body; send a plain GET",
        )
        # The unread body would be parsed as the next request.
        response.force_close()
        return response
    listen = request.app[LISTEN_KEY]
    refusal = _refusal(request, listen)
    if refusal is not None:
        _refused(request, refusal[0])
        return json_error(403, refusal[0], refusal[1])

    return await handler(request)


@web.middleware
async def _access(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """
    Let only callers the access policy admits reach the token.
    """
    peer = await peer_of_transport(request.transport)
    refusal = request.app[ACCESS_KEY].refusal(
        peer, request.headers.get(hdrs.AUTHORIZATION)
    )
    if refusal is not None:
        _refused(request, refusal.error, peer)
        return json_error(403, refusal.error, refusal.description)
    if peer is not None:
        request[PEER_KEY] = peer

    return await handler(request)


def _refused(
    request: web.Request, reason: str, peer: Peer | None = None
) -> None:
    request.app[METRICS_KEY].token_refusals.labels(reason=reason).inc()
    suppressed = request.app[LIMITER_KEY].allow(reason)
    if suppressed is not None:
        log.warning(
            "token.request_refused",
            reason=reason,
            uid=peer.uid if peer else None,
            pid=peer.pid if peer else None,
            suppressed_since_last=suppressed,
        )


def _refusal(
    request: web.Request, listen: ListenSettings
) -> tuple[str, str] | None:
    headers = request.headers
    # Limitation: the answer's status line repeats the request's version
    # (aiohttp writes it from the request), so an HTTP/2.0 or /0.9 request
    # line is refused in its own version.
    if request.version not in (HttpVersion10, HttpVersion11):
        return (
            "unsupported_http_version",
            "speak HTTP/1.1 (or 1.0) to the sidecar",
        )
    if not request.raw_path.startswith("/"):
        # An absolute-form target (GET http://other/token) names another
        # host than the Host header; only a proxy would be sent one.
        return (
            "absolute_target",
            "send the request with a path (GET /token), not a full URL",
        )
    if listen.reject_forwarded and any(
        name in headers for name in _PROXY_HEADERS
    ):
        return (
            "forwarded_request",
            "requests relayed by a proxy (X-Forwarded-For, Forwarded, Via "
            "and the like) are refused; call the sidecar directly",
        )
    if listen.require_loopback_host and not _is_loopback_host_header(
        headers.get(hdrs.HOST, "")
    ):
        return (
            "bad_host",
            "the Host header must name a loopback address such as "
            "127.0.0.1 or localhost",
        )
    if (
        listen.require_metadata_header
        and headers.get("Metadata", "").strip().lower() != "true"
    ):
        return (
            "metadata_header_required",
            "send the header 'Metadata: true' to show the request is "
            "deliberate",
        )

    return None


#: Headers a proxy adds when it relays a request.
_PROXY_HEADERS = (
    hdrs.X_FORWARDED_FOR,
    hdrs.X_FORWARDED_HOST,
    hdrs.FORWARDED,
    hdrs.VIA,
    "X-Real-IP",
)


async def _no_expect(request: web.Request) -> web.StreamResponse | None:
    """
    Refuse ``Expect: 100-continue``: the bodies here are tiny, and an
    interim answer to a client that already hung up is an error to log.
    """
    if request.headers.get(hdrs.EXPECT):
        return json_error(
            417,
            "expectation_failed",
            "send the request without an Expect header",
        )

    return None


def _is_loopback_host_header(value: str) -> bool:
    match = _HOST_HEADER.fullmatch(value)
    if match is None:
        return False
    host = match["bracketed"] or match["plain"]

    return is_loopback_host(host)


#: RFC 9110 Host: a name or an IPv4 address, or an IPv6 address in
#: brackets, then an optional numeric port; nothing else may trail.
_HOST_HEADER = re.compile(
    r"(?:\[(?P<bracketed>[0-9A-Fa-f:.]+)\]|(?P<plain>[A-Za-z0-9.-]+))"
    r"(?::[0-9]{1,5})?",
    re.ASCII,
)


@web.middleware
async def _json_errors(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """
    Turn aiohttp's HTML-ish errors (404, 405) into short JSON errors.
    """
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {}
        if isinstance(exc, web.HTTPMethodNotAllowed):
            headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        response = json_error(
            exc.status,
            _ERROR_CODES.get(exc.status, "invalid_request"),
            exc.reason,
            headers=headers,
        )
        if exc.status == 413:
            # The unread body would be parsed as the next request.
            response.force_close()
        return response


_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}


@web.middleware
async def _count_token_responses(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    response = await handler(request)
    request.app[METRICS_KEY].token_responses.labels(
        status=str(response.status)
    ).inc()

    return response


async def _healthz(request: web.Request) -> web.Response:
    if not request.app[ALIVE_KEY]():
        return web.json_response({"status": "refresher stopped"}, status=503)

    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    if request.app[CACHE_KEY].servable() is not None:
        return web.json_response({"status": "ready"})
    if request.app[IDLE_KEY]():
        return web.json_response({"status": "idle"})

    return web.json_response({"status": "no valid token"}, status=503)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS_KEY].registry)
    response = web.Response(body=body)
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    response.charset = "utf-8"

    return response
