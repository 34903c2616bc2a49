"""
Structured logs: one event per line, JSON off a terminal, no secrets.

Two layers keep secrets out. Fields whose names say they hold a secret are
blanked, and any string that contains a value registered with
`redact_value` (the current token, the client secret) has it replaced,
wherever it turns up: in a message, an error text or a traceback.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal, TextIO, cast

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from structlog.typing import EventDict, Processor, WrappedLogger

REDACTED = "[redacted]"

#: Field names (lower case, "-" read as "_") whose values are never logged.
SENSITIVE_KEYS = frozenset(
    {
        "access_token",
        "api_key",
        "assertion",
        "authorization",
        "client_assertion",
        "client_secret",
        "cookie",
        "id_token",
        "password",
        "private_key",
        "proxy_authorization",
        "refresh_token",
        "secret",
        "set_cookie",
        "token",
    }
)

#: Shortest value worth scrubbing by content: shorter ones would blank
#: innocent words.
MIN_REDACTED_LENGTH = 8

_known_values: deque[str] = deque(maxlen=16)
# The same values, longest first: a short secret that occurs inside a
# token must not be blanked there first, leaving the rest of the token
# to show. Sorted when a value is registered, not for every event.
_scrub_order: list[str] = []


def redact_value(value: str, *, secret: bool = False) -> None:
    """
    Make the redaction processor scrub ``value`` from every log event.

    A ``secret`` (a credential, which a peer may echo back) is scrubbed
    whatever its length: a short one blanks innocent words too, but it
    never shows. Other values (tokens) only from `MIN_REDACTED_LENGTH`.
    """
    if not value or (len(value) < MIN_REDACTED_LENGTH and not secret):
        return
    # A value registered again moves to the newest end, so a secret
    # re-registered at every fetch is never pushed out by tokens.
    if value in _known_values:
        _known_values.remove(value)
    _known_values.append(value)
    _scrub_order[:] = sorted(_known_values, key=len, reverse=True)


def redact(
    logger: WrappedLogger, method_name: str, event_dict: EventDict
) -> EventDict:
    """
    structlog processor: blank sensitive fields and scrub known secrets.
    """
    for key, value in event_dict.items():
        event_dict[key] = _redacted(key, value)

    return event_dict


class LogLimiter:
    """
    Lets one event per key through per interval and counts the rest.

    For events a client can cause at will (refusals, 503s): without a
    limit, one busy client could fill the disk.
    """

    def __init__(
        self,
        interval_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval = interval_seconds
        self._clock = clock
        self._next_at: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """
        ``None`` to drop this event, else how many were dropped before it.
        """
        now = self._clock()
        if now < self._next_at.get(key, float("-inf")):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._next_at[key] = now + self._interval

        return self._suppressed.pop(key, 0)


class HandOutLog:
    """
    Logs who got the token, without a line per request.

    The first hand-out of each token to each caller (uid and pid) is an
    info event, ``token.handed_out``; later ones to the same caller are
    counted, and logged as the same event at debug when debug is on.
    When another token is first handed out, and at `flush`, one
    ``token.hand_outs_counted`` event sums up the token before: its
    hand-outs, its callers, and the busiest of them with their counts.

    Past ``max_callers`` callers of one token, newcomers are counted but
    not named, so no number of callers can grow the log or the memory.
    """

    def __init__(
        self, logger: Any, max_callers: int = 256, max_listed: int = 16
    ) -> None:
        self._log = logger
        self._max_callers = max_callers
        self._max_listed = max_listed
        self._fingerprint: str | None = None
        self._by_caller: dict[tuple[int | None, int | None], int] = {}
        self._hand_outs = 0
        self._unnamed = 0
        self._debug = False

    def record(
        self,
        fingerprint: str,
        uid: int | None,
        pid: int | None,
        expires_in_seconds: float,
    ) -> None:
        """
        Note one hand-out of the token ``fingerprint`` to a caller.
        """
        if fingerprint != self._fingerprint:
            self.flush()
            self._fingerprint = fingerprint
            # Read once per token, not per request: asking structlog
            # costs as much as the rest of the hand-out.
            self._debug = _is_debug_enabled(self._log)
        self._hand_outs += 1
        caller = (uid, pid)
        count = self._by_caller.get(caller)
        if count is None and len(self._by_caller) < self._max_callers:
            self._by_caller[caller] = 1
            log_event = self._log.info
        else:
            if count is None:
                self._unnamed += 1
            else:
                self._by_caller[caller] = count + 1
            if not self._debug:
                return
            log_event = self._log.debug

        log_event(
            "token.handed_out",
            uid=uid,
            pid=pid,
            token_fingerprint=fingerprint,
            expires_in_seconds=round(expires_in_seconds, 3),
        )

    def flush(self) -> None:
        """
        Log the sum of the current token's hand-outs, and start afresh.
        """
        if self._hand_outs:
            busiest = sorted(
                self._by_caller.items(), key=lambda item: -item[1]
            )[: self._max_listed]
            self._log.info(
                "token.hand_outs_counted",
                token_fingerprint=self._fingerprint,
                hand_outs=self._hand_outs,
                callers=len(self._by_caller),
                busiest_callers=[
                    {"uid": uid, "pid": pid, "hand_outs": count}
                    for (uid, pid), count in busiest
                ],
                hand_outs_to_unnamed_callers=self._unnamed,
            )
        self._fingerprint = None
        self._by_caller = {}
        self._hand_outs = 0
        self._unnamed = 0


def _is_debug_enabled(logger: Any) -> bool:
    try:
        return bool(logger.is_enabled_for(logging.DEBUG))
    except AttributeError:
        # A logger without levels (a test's or a custom wrapper) logs all.
        return True


def configure_logging(
    level: str = "info",
    format: Literal["auto", "json", "console"] = "auto",
    stream: TextIO | None = None,
) -> None:
    """
    Configure structlog, and route the standard library's logs through it.

    Logs go to ``stream`` (stderr by default) so that stdout stays free
    for command output such as ``token-sidecar token``.
    """
    stream = stream or sys.stderr
    if format == "auto":
        format = "console" if stream.isatty() else "json"
    level_number = logging.getLevelNamesMapping()[level.upper()]

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Tracebacks are rendered to text first, so that they are scrubbed
    # like any other field.
    tail: list[Processor] = [structlog.processors.format_exc_info, redact]
    renderer: Processor
    if format == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())

    tolerant = cast(TextIO, _TolerantStream(stream))
    structlog.configure(
        processors=[*shared, *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level_number),
        logger_factory=structlog.WriteLoggerFactory(file=tolerant),
        cache_logger_on_first_use=False,
    )

    handler = logging.StreamHandler(tolerant)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, *tail],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    logging.getLogger("aiohttp.server").addFilter(_drop_malformed_requests)
    # Library chatter below WARNING (aiohttp's access log among it) is
    # noise next to the sidecar's own events.
    root.setLevel(max(level_number, logging.WARNING))


class _TolerantStream(io.TextIOBase):
    """
    A log stream whose write errors are dropped, not raised.

    A log collector that goes away (a closed pipe, a full disk) must not
    take the refresher down with it; the lost lines are the lesser harm.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):
            return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()


def _drop_malformed_requests(record: logging.LogRecord) -> bool:
    # aiohttp logs every unparsable request or body (a gzip body that is
    # not gzip), and every write to a client that hung up (after Expect:
    # 100-continue, say), with a traceback at ERROR; none is the
    # sidecar's fault, and a client can cause any number of them.
    error = record.exc_info[1] if record.exc_info else None

    return not isinstance(
        error,
        HttpProcessingError | web.RequestPayloadError | ConnectionResetError,
    )


def _redacted(key: object, value: object) -> object:
    if (
        isinstance(key, str)
        and key.lower().replace("-", "_") in SENSITIVE_KEYS
    ):
        # An unset secret stays visibly unset: a mask would suggest one.
        return None if value is None else REDACTED
    if isinstance(value, str):
        return _scrub(value)
    if isinstance(value, dict):
        return {k: _redacted(k, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(None, item) for item in value]

    return value


def scrub(text: str) -> str:
    """
    ``text`` with every value registered by `redact_value` blanked: for
    messages printed outside the log, such as the CLI's errors.
    """
    return _scrub(text)


def _scrub(text: str) -> str:
    for value in _scrub_order:
        if value in text:
            text = text.replace(value, REDACTED)

    return text
