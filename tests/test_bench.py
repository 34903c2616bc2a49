"""
The bench's own parts that can be checked without a run: parsing wrk
and HTTP answers, percentiles, judging answers against the IdP's record,
and the refresh and back-off policies it holds the sidecar to.
"""

from __future__ import annotations

import json

import pytest

from bench.client import parse_answer, request_head
from bench.faults import BACKOFF_INITIAL_SECONDS, policy_breaches
from bench.idp import FAULT_CYCLE, MALFORMED_BODIES
from bench.load import parse_wrk, percentile
from bench.poll import Tally, judge
from bench.soak import expected_requests

WRK_OUTPUT = """\
Running 5s test @ http://127.0.0.1:8787/token
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.85ms  312.44us  12.01ms   91.20%
    Req/Sec    10.82k   401.12    11.31k    86.00%
  Latency Distribution
     50%    5.80ms
     75%    5.95ms
     90%    6.10ms
     99%  800.00us
  53840 requests in 5.00s, 17.81MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  10768.04
Transfer/sec:      3.56MB
"""


def test_wrk_output_is_parsed_with_its_units() -> None:
    """
    Requests, rate, median and p99 in milliseconds, answers other than
    2xx/3xx and socket errors come out of wrk's report.
    """
    result = parse_wrk(WRK_OUTPUT, 64)

    assert result.requests == 53840
    assert result.requests_per_second == pytest.approx(10768.04)
    assert result.p50_ms == pytest.approx(5.8)
    assert result.p99_ms == pytest.approx(0.8)
    assert (result.non_2xx, result.socket_errors) == (4, 3)


def test_wrk_output_without_a_rate_is_an_error() -> None:
    """
    A report that lacks a figure is refused, not read as zero.
    """
    with pytest.raises(ValueError, match="requests in"):
        parse_wrk("unable to connect to 127.0.0.1:1\n", 1)


@pytest.mark.parametrize(
    ("fraction", "expected"),
    [(0.5, 50.0), (0.99, 99.0), (1.0, 100.0), (0.0, 1.0)],
    ids=["median", "p99", "max", "min"],
)
def test_percentile_is_nearest_rank(fraction: float, expected: float) -> None:
    """
    Percentiles take the nearest rank in the sorted values.
    """
    values = [float(n) for n in range(1, 101)]

    assert percentile(values, fraction) == expected


def test_percentile_of_nothing_is_zero() -> None:
    """
    No latencies give 0, not an error.
    """
    assert percentile([], 0.99) == 0.0


def test_answers_are_parsed_once_complete() -> None:
    """
    An answer is returned with its length only when its whole body has
    arrived; what follows it stays for the next.
    """
    whole = b'HTTP/1.1 200 OK\r\nContent-Length: 5\r\nETag: "x"\r\n\r\nhello'

    assert parse_answer(whole[:-1]) is None
    parsed = parse_answer(whole + b"HTTP/1.1")
    assert parsed is not None
    answer, length = parsed
    assert (answer.status, answer.body, length) == (200, b"hello", len(whole))
    assert answer.headers["etag"] == '"x"'


def test_request_head_carries_metadata_and_host() -> None:
    """
    The bench's request is a plain GET with a loopback Host and the
    Metadata header the sidecar requires.
    """
    head = request_head("127.0.0.1", 8787)

    assert head.startswith(b"GET /token HTTP/1.1\r\n")
    assert b"\r\nHost: 127.0.0.1:8787\r\n" in head
    assert b"\r\nMetadata: true\r\n" in head
    assert head.endswith(b"\r\n\r\n")


def body(token: str, expires_at: float) -> bytes:
    """
    A sidecar answer for ``token``.
    """
    return json.dumps(
        {"access_token": token, "expires_at": int(expires_at)}
    ).encode()


def test_judge_tells_certainly_expired_from_late() -> None:
    """
    A token asked for after its true expiry is a violation; one asked
    for before but arriving after is only counted as late.
    """
    records = [
        {"access_token": "a", "expires_at": 100.0},
        {"access_token": "b", "expires_at": 200.0},
    ]
    tally = Tally()
    tally.note(200, body("a", 100), sent_at=100.5, at=100.6)
    tally.note(200, body("b", 200), sent_at=199.9, at=200.1)

    verdict = judge(tally, records)

    assert verdict.expired_served == 1
    assert verdict.expired_on_arrival == 1
    assert len(verdict.violations) == 1


def test_judge_flags_unknown_and_overclaimed_tokens() -> None:
    """
    A token the IdP never issued, and an expires_at later than the
    IdP's, are violations.
    """
    records = [{"access_token": "a", "expires_at": 100.0}]
    tally = Tally()
    tally.note(200, body("a", 101), sent_at=50.0, at=50.1)
    tally.note(200, body("forged", 100), sent_at=50.0, at=50.1)

    verdict = judge(tally, records)

    assert (verdict.unknown_tokens, verdict.overclaimed) == (1, 1)
    assert verdict.least_life_left_seconds == pytest.approx(49.9)


@pytest.mark.parametrize(
    "answer",
    [b"", b"{}", b'{"access_token": ""}', b"[]", b'{"access_token": 5}'],
    ids=["empty", "no-token", "empty-token", "array", "number"],
)
def test_tally_counts_unusable_200s(answer: bytes) -> None:
    """
    A 200 without a usable token is counted as unusable.
    """
    tally = Tally()

    tally.note(200, answer, sent_at=1.0, at=1.1)

    assert tally.unusable == 1
    assert tally.tokens == {}


def test_tally_counts_every_status() -> None:
    """
    Answers are counted by status; only 200s name tokens.
    """
    tally = Tally()

    tally.note(503, b'{"error": "temporarily_unavailable"}', 1.0, 1.1)
    tally.note(200, body("a", 10), 1.0, 1.1)

    assert tally.by_status == {503: 1, 200: 1}
    assert tally.answers == 2
    assert set(tally.tokens) == {"a"}


def test_expected_requests_follow_the_refresh_point() -> None:
    """
    Tokens of 2 s refreshed at 0.25 of their life (less up to 0.02 of
    jitter) cost about two requests a second, plus the first.
    """
    low, high = expected_requests(60.0, 2.0, 0.25)

    assert low == 120
    assert high == 1 + 131


def record(
    number: int,
    kind: str,
    arrived_at: float,
    answered_at: float | None = None,
    retry_after: int | None = None,
) -> dict[str, object]:
    """
    One IdP record as ``/stats`` gives it.
    """
    return {
        "number": number,
        "kind": kind,
        "arrived_at": arrived_at,
        "answered_at": arrived_at if answered_at is None else answered_at,
        "retry_after_seconds": retry_after,
    }


def test_requests_sooner_than_the_policy_are_breaches() -> None:
    """
    A request right after a token, or before a 429's Retry-After ran
    out, breaks the policy; one after a 5xx and the back-off floor does
    not.
    """
    floor = BACKOFF_INITIAL_SECONDS / 10
    records = [
        record(1, "storm", 0.0),
        record(2, "throttle", floor, retry_after=1),
        record(3, "ok", floor + 0.5),
        record(4, "ok", floor + 0.6),
    ]

    breaches = policy_breaches(records)

    assert [b.split()[1] for b in breaches] == ["3", "4"]


def test_a_hang_allows_the_next_request_after_the_deadline() -> None:
    """
    After a hang, the next request may come once the sidecar's deadline
    and the back-off floor have passed, not sooner.
    """
    early = [record(1, "hang", 0.0, answered_at=60.0), record(2, "ok", 0.5)]
    late = [record(1, "hang", 0.0, answered_at=60.0), record(2, "ok", 1.1)]

    assert len(policy_breaches(early)) == 1
    assert policy_breaches(late) == []


def test_the_fault_cycle_has_every_fault_and_ends_in_recovery() -> None:
    """
    One round holds latency, 5xx, 429, resets, hangs and every malformed
    body, and ends with good tokens.
    """
    kinds = [phase.kind for phase in FAULT_CYCLE]
    malformed = next(p for p in FAULT_CYCLE if p.kind == "malformed")

    assert set(kinds) >= {
        "latency",
        "storm",
        "throttle",
        "reset",
        "hang",
        "malformed",
    }
    assert kinds[-1] == "ok"
    assert malformed.count == len(MALFORMED_BODIES)
