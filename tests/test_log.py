"""
Tests for sidecar.log: the redaction processor and the logging setup.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from sidecar.log import (
    MIN_REDACTED_LENGTH,
    REDACTED,
    HandOutLog,
    LogLimiter,
    configure_logging,
    redact,
    redact_value,
)


def fresh_secret(prefix: str = "secret") -> str:
    """
    A value no other test has registered, long enough to be scrubbed.
    """
    return f"{prefix}-{secrets.token_hex(12)}"


def run_redact(**fields: Any) -> dict[str, Any]:
    """
    Pass ``fields`` through the processor as structlog would.
    """
    return dict(redact(None, "info", dict(fields)))


@pytest.fixture
def root_logging() -> Iterator[None]:
    """
    Restore the root logger's handlers and level after the test.
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


@pytest.fixture
def stream(root_logging: None) -> io.StringIO:
    """
    A text stream for configure_logging to write to.
    """
    return io.StringIO()


def lines_of(stream: io.StringIO) -> list[dict[str, Any]]:
    """
    Parse each line written to ``stream`` as one JSON object.
    """
    lines = stream.getvalue().splitlines()

    return [json.loads(line) for line in lines]


class TestRedactKeys:
    """
    Fields whose names say they hold a secret are blanked.
    """

    @pytest.mark.parametrize(
        "key",
        [
            "access_token",
            "assertion",
            "authorization",
            "Authorization",
            "client_assertion",
            "client_secret",
            "CLIENT_SECRET",
            "password",
            "private_key",
            "secret",
            "token",
        ],
    )
    def test_sensitive_keys_are_blanked(self, key: str) -> None:
        """
        A sensitive key's value is replaced, whatever its case.
        """
        event = run_redact(event="x.happened", **{key: "Bearer abc.def"})

        assert event[key] == REDACTED
        assert event["event"] == "x.happened"

    @pytest.mark.parametrize(
        "value",
        [
            pytest.param(12345678, id="int"),
            pytest.param({"value": "abc"}, id="dict"),
            pytest.param(["abc"], id="list"),
        ],
    )
    def test_non_string_sensitive_values_are_blanked(
        self, value: object
    ) -> None:
        """
        A sensitive key is blanked even when its value is not a string.
        """
        event = run_redact(client_secret=value)

        assert event["client_secret"] == REDACTED

    def test_an_unset_secret_stays_unset(self) -> None:
        """
        ``None`` reveals nothing and a mask would suggest a secret is set
        (the settings dump of a sidecar that reads its secret from a
        file), so it is kept.
        """
        event = run_redact(client_secret=None, password=None)

        assert event["client_secret"] is None
        assert event["password"] is None

    @pytest.mark.parametrize(
        "key",
        [
            "token_fingerprint",
            "client_id",
            "token_url",
            "client_secret_file",
            "expires_in_seconds",
        ],
    )
    def test_other_keys_are_kept(self, key: str) -> None:
        """
        Keys that merely mention a secret keep their (harmless) values.
        """
        event = run_redact(**{key: "kept-value"})

        assert event[key] == "kept-value"


class TestRedactValues:
    """
    Registered values are scrubbed from every string field.
    """

    def test_registered_value_is_scrubbed_from_strings(self) -> None:
        """
        A registered value is replaced inside the message and any field.
        """
        value = fresh_secret()
        redact_value(value)

        event = run_redact(
            event=f"got {value} from the IdP",
            error=f"header was 'Bearer {value}' twice: {value}",
            status=401,
        )

        assert event["event"] == f"got {REDACTED} from the IdP"
        assert event["error"] == (
            f"header was 'Bearer {REDACTED}' twice: {REDACTED}"
        )
        assert event["status"] == 401

    def test_rendered_traceback_is_scrubbed(self) -> None:
        """
        A traceback rendered to text loses the registered value too.
        """
        value = fresh_secret("token")
        redact_value(value)
        try:
            raise RuntimeError(f"request with {value} failed")
        except RuntimeError:
            rendered = structlog.processors.format_exc_info(
                None, "error", {"event": "x.failed", "exc_info": True}
            )

        event = run_redact(**rendered)

        assert "Traceback" in event["exception"]
        assert value not in event["exception"]
        assert f"request with {REDACTED} failed" in event["exception"]

    def test_several_values_are_all_scrubbed(self) -> None:
        """
        Every registered value is scrubbed, not only the latest.
        """
        first, second = fresh_secret("first"), fresh_secret("second")
        redact_value(first)
        redact_value(second)

        event = run_redact(event=f"{first} and {second}")

        assert event["event"] == f"{REDACTED} and {REDACTED}"

    def test_short_values_are_not_scrubbed(self) -> None:
        """
        Values shorter than 8 characters are ignored, sparing common words.
        """
        short = secrets.token_hex(8)[: MIN_REDACTED_LENGTH - 1]
        redact_value(short)

        event = run_redact(event=f"word {short} stays")

        assert MIN_REDACTED_LENGTH == 8
        assert event["event"] == f"word {short} stays"

    def test_a_short_secret_is_scrubbed_all_the_same(self) -> None:
        """
        A credential is scrubbed whatever its length: an IdP may echo a
        short client secret back in its error description.
        """
        short = f"~{secrets.token_hex(2)}"
        redact_value(short, secret=True)

        event = run_redact(event=f"invalid secret {short}!")

        assert event["event"] == f"invalid secret {REDACTED}!"

    def test_a_token_holding_a_short_secret_is_scrubbed_whole(self) -> None:
        """
        A secret that also occurs inside a token does not break the
        token's scrubbing: the longer value goes first.
        """
        # "~" occurs in no token or log text: registered for the rest of
        # the run, this secret blanks nothing else.
        secret = "A~3"
        token = f"eyJ{secrets.token_hex(12)}{secret}{secrets.token_hex(12)}"
        redact_value(secret, secret=True)
        redact_value(token)

        event = run_redact(event=f"got {token}")

        assert event["event"] == f"got {REDACTED}"

    def test_value_of_the_minimum_length_is_scrubbed(self) -> None:
        """
        A value of exactly 8 characters is scrubbed.
        """
        value = secrets.token_hex(4)
        redact_value(value)

        event = run_redact(event=f"word {value} goes")

        assert len(value) == MIN_REDACTED_LENGTH
        assert event["event"] == f"word {REDACTED} goes"

    def test_unregistered_values_are_kept(self) -> None:
        """
        Strings holding no registered value pass unchanged.
        """
        text = f"nothing to hide in {fresh_secret('public')}"

        event = run_redact(event=text)

        assert event["event"] == text

    def test_values_nested_in_containers_are_scrubbed(self) -> None:
        """
        A registered value inside a dict or list field is scrubbed too.
        """
        value = fresh_secret("nested")
        redact_value(value)

        event = run_redact(
            headers={"X-Debug": f"Bearer {value}"}, args=[value]
        )

        assert value not in repr(event)

    def test_re_registered_value_survives_newer_values(self) -> None:
        """
        A value registered again recently is still scrubbed.
        """
        client_secret = fresh_secret("client-secret")
        redact_value(client_secret)
        for number in range(15):
            redact_value(fresh_secret(f"token-{number}"))
        redact_value(client_secret)
        redact_value(fresh_secret("token-15"))

        event = run_redact(event=f"posting {client_secret}")

        assert event["event"] == f"posting {REDACTED}"


class TestConfigureLogging:
    """
    configure_logging writes JSON lines, filters by level, scrubs stdlib.
    """

    def test_json_lines(self, stream: io.StringIO) -> None:
        """
        Each event becomes one JSON object on its own line.
        """
        configure_logging("info", "json", stream=stream)
        log = structlog.get_logger("test")

        log.info("token.fetched", expires_in_seconds=3600)
        log.warning("idp.request_failed", status=503)

        first, second = lines_of(stream)
        assert first["event"] == "token.fetched"
        assert first["level"] == "info"
        assert first["expires_in_seconds"] == 3600
        assert first["timestamp"].endswith("Z")
        assert second["event"] == "idp.request_failed"
        assert second["level"] == "warning"

    def test_auto_format_off_a_terminal_is_json(
        self, stream: io.StringIO
    ) -> None:
        """
        The auto format writes JSON to a stream that is not a terminal.
        """
        configure_logging("info", "auto", stream=stream)

        structlog.get_logger().info("server.started")

        [line] = lines_of(stream)
        assert line["event"] == "server.started"

    @pytest.mark.parametrize(
        ("level", "expected"),
        [
            ("debug", ["debug", "info", "warning", "error"]),
            ("info", ["info", "warning", "error"]),
            ("warning", ["warning", "error"]),
            ("error", ["error"]),
        ],
    )
    def test_events_below_the_level_are_dropped(
        self, stream: io.StringIO, level: str, expected: list[str]
    ) -> None:
        """
        Only events at or above the configured level are written.
        """
        configure_logging(level, "json", stream=stream)
        log = structlog.get_logger()

        log.debug("a.debug")
        log.info("a.info")
        log.warning("a.warning")
        log.error("a.error")

        assert [line["level"] for line in lines_of(stream)] == expected

    def test_sensitive_fields_are_blanked_in_output(
        self, stream: io.StringIO
    ) -> None:
        """
        The configured chain blanks sensitive keys and registered values.
        """
        value = fresh_secret("token")
        redact_value(value)
        configure_logging("info", "json", stream=stream)

        structlog.get_logger().info(
            "token.served", access_token="abc", note=f"sent {value}"
        )

        [line] = lines_of(stream)
        assert line["access_token"] == REDACTED
        assert line["note"] == f"sent {REDACTED}"
        assert value not in stream.getvalue()

    def test_exception_traceback_is_scrubbed(
        self, stream: io.StringIO
    ) -> None:
        """
        A logged exception's traceback is rendered and scrubbed.
        """
        value = fresh_secret("token")
        redact_value(value)
        configure_logging("info", "json", stream=stream)
        log = structlog.get_logger()

        try:
            raise ValueError(f"cannot parse {value}")
        except ValueError:
            log.exception("refresher.unexpected_error")

        [line] = lines_of(stream)
        assert "Traceback" in line["exception"]
        assert f"ValueError: cannot parse {REDACTED}" in line["exception"]
        assert value not in stream.getvalue()

    def test_context_variables_are_merged(self, stream: io.StringIO) -> None:
        """
        Fields bound through contextvars appear on every event.
        """
        configure_logging("info", "json", stream=stream)
        structlog.contextvars.bind_contextvars(request_id="r-1")

        structlog.get_logger().info("token.served")

        [line] = lines_of(stream)
        assert line["request_id"] == "r-1"

    def test_stdlib_records_are_scrubbed(self, stream: io.StringIO) -> None:
        """
        Standard library records become JSON lines, scrubbed the same way.
        """
        value = fresh_secret("secret")
        redact_value(value)
        configure_logging("info", "json", stream=stream)

        logging.getLogger("aiohttp.client").warning("posted %s", value)

        [line] = lines_of(stream)
        assert line["event"] == f"posted {REDACTED}"
        assert line["level"] == "warning"
        assert value not in stream.getvalue()

    def test_stdlib_tracebacks_are_scrubbed(self, stream: io.StringIO) -> None:
        """
        A standard library record's traceback is rendered and scrubbed.
        """
        value = fresh_secret("secret")
        redact_value(value)
        configure_logging("info", "json", stream=stream)

        try:
            raise OSError(f"lost {value}")
        except OSError:
            logging.getLogger("asyncio").error("task failed", exc_info=True)

        [line] = lines_of(stream)
        assert "Traceback" in line["exception"]
        assert value not in stream.getvalue()

    @pytest.mark.parametrize(
        ("level", "kept"),
        [
            pytest.param("debug", ["warning", "error"], id="debug"),
            pytest.param("info", ["warning", "error"], id="info"),
            pytest.param("error", ["error"], id="error"),
        ],
    )
    def test_stdlib_records_below_warning_or_the_level_are_dropped(
        self, stream: io.StringIO, level: str, kept: list[str]
    ) -> None:
        """
        Library records below WARNING, or below the level, are dropped.
        """
        configure_logging(level, "json", stream=stream)
        library = logging.getLogger("aiohttp.access")

        library.debug("debug chatter")
        library.info("info chatter")
        library.warning("a warning")
        library.error("an error")

        assert [line["level"] for line in lines_of(stream)] == kept

    def test_console_format_is_scrubbed_too(self, stream: io.StringIO) -> None:
        """
        The console renderer gets the same redaction as JSON.
        """
        value = fresh_secret("token")
        redact_value(value)
        configure_logging("info", "console", stream=stream)

        structlog.get_logger().info("token.served", client_secret="hunter2")
        structlog.get_logger().info(f"saw {value}")

        output = stream.getvalue()
        assert "token.served" in output
        assert REDACTED in output
        assert "hunter2" not in output
        assert value not in output


def test_log_limiter_lets_one_event_per_interval_and_counts_the_rest() -> None:
    """
    Within an interval only the first event per key passes; the next one
    to pass reports how many were left out.
    """
    now = [100.0]
    limiter = LogLimiter(interval_seconds=10, clock=lambda: now[0])

    first = limiter.allow("refused")
    dropped = [limiter.allow("refused") for _ in range(5)]
    other_key = limiter.allow("unavailable")
    now[0] += 10
    after = limiter.allow("refused")

    assert first == 0
    assert dropped == [None] * 5
    assert other_key == 0
    assert after == 5


class RecordingLogger:
    """
    A logger that keeps ``(level, event, fields)`` and logs debug only
    when told to.
    """

    def __init__(self, debug: bool = False) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.debug_on = debug

    def is_enabled_for(self, level: int) -> bool:
        return self.debug_on or level >= logging.INFO

    def info(self, event: str, **fields: Any) -> None:
        self.events.append(("info", event, fields))

    def debug(self, event: str, **fields: Any) -> None:
        self.events.append(("debug", event, fields))

    def named(self, event: str) -> list[tuple[str, dict[str, Any]]]:
        """
        The level and fields of each event called ``event``.
        """
        return [(lvl, f) for lvl, name, f in self.events if name == event]


class TestHandOutLog:
    def test_first_hand_out_per_caller_and_token_is_info(self) -> None:
        """
        Each caller's first hand-out of a token is an info event naming
        it; repeats to the same caller log nothing at info.
        """
        logger = RecordingLogger()
        hand_outs = HandOutLog(logger)

        for _ in range(3):
            hand_outs.record("tok-a", 1000, 41, 120.0)
        hand_outs.record("tok-a", 1001, None, 119.5)

        assert logger.named("token.handed_out") == [
            (
                "info",
                {
                    "uid": 1000,
                    "pid": 41,
                    "token_fingerprint": "tok-a",
                    "expires_in_seconds": 120.0,
                },
            ),
            (
                "info",
                {
                    "uid": 1001,
                    "pid": None,
                    "token_fingerprint": "tok-a",
                    "expires_in_seconds": 119.5,
                },
            ),
        ]

    def test_repeats_are_debug_events_when_debug_is_on(self) -> None:
        """
        With debug on, every repeat is the same event at debug.
        """
        logger = RecordingLogger(debug=True)
        hand_outs = HandOutLog(logger)

        for _ in range(3):
            hand_outs.record("tok-a", 1000, None, 60.0)

        levels = [lvl for lvl, _ in logger.named("token.handed_out")]
        assert levels == ["info", "debug", "debug"]

    def test_a_new_token_sums_up_the_last(self) -> None:
        """
        The first hand-out of another token logs the sum of the one
        before: hand-outs, callers, the busiest first.
        """
        logger = RecordingLogger()
        hand_outs = HandOutLog(logger)
        for _ in range(4):
            hand_outs.record("tok-a", 1000, None, 60.0)
        hand_outs.record("tok-a", 1001, None, 60.0)

        hand_outs.record("tok-b", 1000, None, 60.0)

        [(level, summary)] = logger.named("token.hand_outs_counted")
        assert level == "info"
        assert summary == {
            "token_fingerprint": "tok-a",
            "hand_outs": 5,
            "callers": 2,
            "busiest_callers": [
                {"uid": 1000, "pid": None, "hand_outs": 4},
                {"uid": 1001, "pid": None, "hand_outs": 1},
            ],
            "hand_outs_to_unnamed_callers": 0,
        }
        assert logger.named("token.handed_out")[-1][1][
            "token_fingerprint"
        ] == ("tok-b")

    def test_callers_past_the_cap_are_counted_not_named(self) -> None:
        """
        Past ``max_callers`` callers of one token, newcomers get no info
        line and no entry of their own, only a count in the sum.
        """
        logger = RecordingLogger()
        hand_outs = HandOutLog(logger, max_callers=2, max_listed=1)

        for pid in range(5):
            hand_outs.record("tok-a", 1000, pid, 60.0)
        hand_outs.flush()

        assert len(logger.named("token.handed_out")) == 2
        [(_, summary)] = logger.named("token.hand_outs_counted")
        assert summary["hand_outs"] == 5
        assert summary["callers"] == 2
        assert len(summary["busiest_callers"]) == 1
        assert summary["hand_outs_to_unnamed_callers"] == 3

    def test_flush_without_hand_outs_logs_nothing(self) -> None:
        """
        A sidecar that handed nothing out sums up nothing at shutdown.
        """
        logger = RecordingLogger()

        HandOutLog(logger).flush()

        assert logger.events == []
