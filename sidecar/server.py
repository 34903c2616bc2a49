"""
The HTTP surface: the ``/token`` app and the ops app, kept apart.

``/token`` is served only on the listen address, behind a guard against
server-side request forgery and browsers. The ops app (health, readiness,
metrics) may bind wider for probes and Prometheus and never serves a
token.

The token listener's path is kept short, since it is the one callers
hit in loops: no middleware (each route is wrapped once, by
`TokenEndpoint.front`), its state on one object instead of looked up in
the app per request, and each token's answer rendered once.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping

import structlog
from aiohttp import HttpVersion10, HttpVersion11, hdrs, web
from multidict import CIMultiDict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar.access import AccessPolicy
from sidecar.cache import TokenCache
from sidecar.clock import Clock
from sidecar.config import ListenSettings, is_loopback_host
from sidecar.errors import NoTokenError
from sidecar.listener import peer_of_transport
from sidecar.log import HandOutLog, LogLimiter
from sidecar.metrics import Metrics
from sidecar.peer import Peer
from sidecar.refresher import Refresher
from sidecar.token import Token

log = structlog.get_logger("sidecar.server")

CACHE_KEY = web.AppKey("cache", TokenCache)
METRICS_KEY = web.AppKey("metrics", Metrics)
ALIVE_KEY: web.AppKey[Callable[[], bool]] = web.AppKey("alive")
IDLE_KEY: web.AppKey[Callable[[], bool]] = web.AppKey("idle")

#: Only /token/invalidate takes a body, a few dozen bytes of JSON.
MAX_BODY_BYTES = 1024

#: The longest long-poll, and the most life a caller may ask for.
MAX_WAIT_SECONDS = 300.0
MAX_MIN_TTL_SECONDS = 366 * 24 * 3600.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: A token listener handler: the request and the caller the kernel named.
CallerHandler = Callable[
    [web.Request, Peer | None], Awaitable[web.StreamResponse]
]

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

    Every path and method, known or not, goes through
    `TokenEndpoint.front`, so the guard comes first everywhere and
    unknown paths and methods get JSON errors.
    """
    endpoint = TokenEndpoint(refresher, cache, clock, metrics, listen, access)
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[TOKEN_ENDPOINT_KEY] = endpoint
    router, front = app.router, endpoint.front
    router.add_get(
        "/token",
        front(endpoint.get_token),
        allow_head=False,
        expect_handler=_no_expect,
    )
    router.add_route("*", "/token", front(_method_not_allowed("GET")))
    router.add_post(
        "/token/invalidate",
        front(endpoint.invalidate),
        expect_handler=_no_expect,
    )
    router.add_route(
        "*", "/token/invalidate", front(_method_not_allowed("POST"))
    )
    router.add_route("*", "/{path:.*}", front(_not_found))
    app.on_cleanup.append(endpoint.close)

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
    metrics.watch_waiters(lambda: cache.waiters)
    app[CACHE_KEY] = cache
    app[ALIVE_KEY] = is_alive
    app[IDLE_KEY] = is_idle
    app[METRICS_KEY] = metrics
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)

    return app


class TokenEndpoint:
    """
    The token listener's handlers, and all they work with.

    The state sits on this object rather than under app keys: looking
    it up in the app on every request cost more than the rest of a
    hand-out. The app keeps the endpoint under ``TOKEN_ENDPOINT_KEY``.
    """

    def __init__(
        self,
        refresher: Refresher,
        cache: TokenCache,
        clock: Clock,
        metrics: Metrics,
        listen: ListenSettings,
        access: AccessPolicy,
    ) -> None:
        self._refresher = refresher
        self._cache = cache
        self._clock = clock
        self._metrics = metrics
        self._listen = listen
        self._access = access
        # The sidecar's clock, so that tests can drive the interval.
        self._limiter = LogLimiter(clock=clock.now)
        self._hand_outs = HandOutLog(log)
        self._answer: _Answer | None = None

    def front(self, handler: CallerHandler) -> Handler:
        """
        ``handler`` behind, in order, the guard against forged requests,
        the access policy, JSON errors, and the count of answers by
        status.

        One wrapper instead of a middleware per step: each layer costs
        a coroutine per request, and a whole answer only a few dozen
        microseconds.
        """

        async def guarded(request: web.Request) -> web.StreamResponse:
            peer = None
            response = self._refuse_forged(request)
            if response is None:
                peer = await peer_of_transport(request.transport)
                response = self._refuse_caller(request, peer)
            if response is None:
                try:
                    return self._counted(await handler(request, peer))
                except web.HTTPException as exc:
                    if exc.status < 400:
                        raise
                    response = _json_error_of(exc)
                except Exception:
                    response = self._internal_error()

            return self._counted(response)

        return guarded

    async def get_token(
        self, request: web.Request, peer: Peer | None
    ) -> web.Response:
        """
        ``GET /token[?min_ttl=S][&wait=S&after=ETAG]``.

        ``min_ttl`` asks for at least that much life left; ``wait`` with
        ``after`` long-polls until the token differs from the ``after``
        ETag (304 when it does not change in time); ``If-None-Match``
        gets a 304 while the token is unchanged.
        """
        # The plain GET, nearly every request, skips parsing the query.
        min_ttl = wait = 0.0
        after = ""
        if "?" in request.raw_path:
            try:
                min_ttl = _seconds_param(
                    request, "min_ttl", MAX_MIN_TTL_SECONDS
                )
                wait = _seconds_param(request, "wait", MAX_WAIT_SECONDS)
            except ValueError as exc:
                return json_error(400, "invalid_request", str(exc))
            after = request.query.get("after", "").strip('"')

        try:
            token = await self._refresher.get_token(min_ttl)
        except NoTokenError as exc:
            return self._unavailable(exc)

        answer = self._answer_for(token)
        if after and wait and answer.fingerprint == after:
            changed = await self._cache.wait_for_change(after, wait)
            if changed is None:
                return answer.not_modified()
            answer = self._answer_for(changed)
        if_none_match = request.headers.get(hdrs.IF_NONE_MATCH)
        if if_none_match and _matches(if_none_match, answer.fingerprint):
            return answer.not_modified()

        return self._hand_out(request, peer, answer)

    async def invalidate(
        self, request: web.Request, peer: Peer | None
    ) -> web.Response:
        """
        ``POST /token/invalidate`` with ``{"token_sha256": HEX}``: the API
        rejected this token; ask for one new token.
        """
        try:
            body = await request.json()
            token_sha256 = body["token_sha256"]
            if not isinstance(token_sha256, str) or not _SHA256_HEX.fullmatch(
                token_sha256.strip()
            ):
                raise TypeError
        # RecursionError: deeply nested arrays, a cheap way to crash
        # parsers; LookupError: a charset Python does not know;
        # RequestPayloadError: a body that does not decode (bad gzip).
        except (
            ValueError,
            KeyError,
            TypeError,
            RecursionError,
            LookupError,
            web.RequestPayloadError,
        ):
            return json_error(
                400,
                "invalid_request",
                'send JSON {"token_sha256": "<hex SHA-256 of the rejected '
                'token>"}',
            )

        outcome = self._refresher.invalidate(token_sha256)
        if outcome == "quota_held":
            return json_error(
                429,
                "quota_held",
                "the monthly budget (or the restart interval) allows no "
                "new token now; see the sidecar's log",
                headers={"Retry-After": "60"},
            )
        if outcome == "rate_limited":
            return json_error(
                429,
                "rate_limited",
                "a new token was asked for recently; retry later",
                headers={"Retry-After": "60"},
            )
        status = (
            202 if outcome in ("refreshing", "already_refreshing") else 200
        )

        return web.json_response(
            {"status": outcome}, status=status, headers=NO_STORE
        )

    async def close(self, app: web.Application) -> None:
        """
        Log the hand-outs not yet summed up; the app's cleanup calls it.
        """
        self._hand_outs.flush()

    def _hand_out(
        self, request: web.Request, peer: Peer | None, answer: _Answer
    ) -> web.Response:
        remaining = answer.token.remaining_seconds(self._clock.now())
        if peer is None:
            self._hand_outs.record(answer.fingerprint, None, None, remaining)
        else:
            self._hand_outs.record(
                answer.fingerprint, peer.uid, peer.pid, remaining
            )
        self._metrics.count_hand_out(self._access.uid_label(peer))
        if _prefers_text(request.headers.get(hdrs.ACCEPT)):
            return answer.text()

        return answer.json(remaining)

    def _answer_for(self, token: Token) -> _Answer:
        answer = self._answer
        if answer is None or answer.token is not token:
            answer = self._answer = _Answer(token)

        return answer

    def _internal_error(self) -> web.Response:
        # A bug, but one a caller may trigger at will: logged with its
        # traceback at most once per interval, answered in JSON, counted.
        suppressed = self._limiter.allow("internal_error")
        if suppressed is not None:
            log.exception(
                "token.internal_error", suppressed_since_last=suppressed
            )

        return json_error(
            500,
            "internal_error",
            "the sidecar failed to answer this request; its log says why",
        )

    def _counted(self, response: web.StreamResponse) -> web.StreamResponse:
        self._metrics.count_token_response(response.status)

        return response

    def _unavailable(self, exc: NoTokenError) -> web.Response:
        suppressed = self._limiter.allow("unavailable")
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

    def _refuse_forged(self, request: web.Request) -> web.Response | None:
        # What a local caller would not send but a forged request would.
        if request.body_exists and request.method != "POST":
            self._refused("request_body_not_allowed")
            response = json_error(
                413,
                "request_body_not_allowed",
                "/token takes no request body; send a plain GET",
            )
            # The unread body would be parsed as the next request.
            response.force_close()
            return response
        refusal = _refusal(request, self._listen)
        if refusal is not None:
            self._refused(refusal[0])
            return json_error(403, refusal[0], refusal[1])

        return None

    def _refuse_caller(
        self, request: web.Request, peer: Peer | None
    ) -> web.Response | None:
        # Only callers the access policy admits reach the token.
        refusal = self._access.refusal(
            peer, request.headers.get(hdrs.AUTHORIZATION)
        )
        if refusal is None:
            return None
        self._refused(refusal.error, peer)

        return json_error(403, refusal.error, refusal.description)

    def _refused(self, reason: str, peer: Peer | None = None) -> None:
        self._metrics.count_refusal(reason)
        suppressed = self._limiter.allow(reason)
        if suppressed is not None:
            log.warning(
                "token.request_refused",
                reason=reason,
                uid=peer.uid if peer else None,
                pid=peer.pid if peer else None,
                suppressed_since_last=suppressed,
            )


TOKEN_ENDPOINT_KEY = web.AppKey("token_endpoint", TokenEndpoint)


class _Answer:
    """
    The ``/token`` answers for one token, rendered once: the JSON body
    around its one changing number, the bare token, and their headers.
    """

    __slots__ = (
        "_json_head",
        "_json_headers",
        "_json_tail",
        "_text_body",
        "_text_headers",
        "etag",
        "fingerprint",
        "token",
    )

    def __init__(self, token: Token) -> None:
        self.token = token
        self.fingerprint = token.fingerprint
        self.etag = f'"{self.fingerprint}"'
        # The bytes json.dumps gives for the whole object; only
        # expires_in changes from one answer to the next.
        self._json_head = (
            f'{{"access_token": {json.dumps(token.access_token)}, '
            '"token_type": "Bearer", "expires_in": '
        ).encode()
        self._json_tail = (
            f', "expires_at": {math.floor(token.expires_at)}}}'.encode()
        )
        self._json_headers = self._headers("application/json; charset=utf-8")
        self._text_body = token.access_token.encode()
        self._text_headers = self._headers("text/plain; charset=utf-8")

    def json(self, remaining_seconds: float) -> web.Response:
        """
        The JSON answer, with ``remaining_seconds`` as ``expires_in``.
        """
        expires_in = str(max(0, math.floor(remaining_seconds))).encode()
        body = self._json_head + expires_in + self._json_tail

        return web.Response(body=body, headers=self._json_headers)

    def text(self) -> web.Response:
        """
        The bare token, for ``Accept: text/plain``.
        """
        return web.Response(body=self._text_body, headers=self._text_headers)

    def not_modified(self) -> web.Response:
        """
        A 304 naming this token.
        """
        return web.Response(
            status=304, headers={**NO_STORE, hdrs.ETAG: self.etag}
        )

    def _headers(self, content_type: str) -> CIMultiDict[str]:
        return CIMultiDict(
            {
                **NO_STORE,
                hdrs.ETAG: self.etag,
                hdrs.CONTENT_TYPE: content_type,
            }
        )


def _method_not_allowed(allowed: str) -> CallerHandler:
    async def refuse(request: web.Request, peer: Peer | None) -> web.Response:
        return json_error(
            405,
            "method_not_allowed",
            "Method Not Allowed",
            headers={"Allow": allowed},
        )

    return refuse


async def _not_found(request: web.Request, peer: Peer | None) -> web.Response:
    return json_error(404, "not_found", "Not Found")


def _matches(if_none_match: str, fingerprint: str) -> bool:
    # RFC 9110: "*", or a list of tags, compared weakly (W/ ignored).
    tags = [tag.strip() for tag in if_none_match.split(",")]

    return any(
        tag == "*" or tag.removeprefix("W/").strip('"') == fingerprint
        for tag in tags
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


# Memoised: clients send the same few Accept values again and again.
@functools.lru_cache(maxsize=64)
def _prefers_text(accept: str | None) -> bool:
    if not accept:
        return False
    kinds = [part.split(";")[0].strip().lower() for part in accept.split(",")]

    return "text/plain" in kinds and "application/json" not in kinds


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
    if listen.reject_forwarded and _is_relayed(headers):
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


_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")

#: Headers a proxy adds when it relays a request.
_PROXY_HEADERS = frozenset(
    name.lower()
    for name in (
        hdrs.X_FORWARDED_FOR,
        hdrs.X_FORWARDED_HOST,
        hdrs.FORWARDED,
        hdrs.VIA,
        "X-Real-IP",
    )
)


def _is_relayed(headers: Mapping[str, str]) -> bool:
    # Spelt with underscores too (X_Forwarded_For): some proxies pass
    # such names on, and some frameworks read them as the dashed ones.
    return any(
        name.lower().replace("_", "-") in _PROXY_HEADERS for name in headers
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


# Memoised: a client sends the same Host again and again, and parsing an
# address costs more than the rest of the guard together.
@functools.lru_cache(maxsize=256)
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
        return _json_error_of(exc)


def _json_error_of(exc: web.HTTPException) -> web.Response:
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
