"""
Tests for sidecar.ledger: the persisted quota ledger and the budget guard.
"""

from __future__ import annotations

import json
import os
import random
import stat
import tempfile
from collections.abc import MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from sidecar.budget import BudgetPolicy, Verdict, judge
from sidecar.ledger import (
    MAX_ENTRIES,
    MAX_LEDGER_BYTES,
    OUTCOMES,
    REASONS,
    LedgerEntry,
    LedgerUnreadableError,
    QuotaLedger,
    month_bounds,
)
from tests.fakes import FakeClock

DAY = 24 * 3600.0
HOUR = 3600.0
OCT_1 = datetime(2026, 10, 1, tzinfo=UTC).timestamp()
NOV_1 = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
DEC_1 = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
JAN_1 = datetime(2027, 1, 1, tzinfo=UTC).timestamp()
NOV_30_LAST_SECOND = datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC).timestamp()
NOBODY = 65534


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.json"


def ledger_at(
    path: Path | None, at: float, keep_months: int = 2
) -> tuple[QuotaLedger, FakeClock]:
    """
    A ledger on ``path`` whose clock reads ``at``.
    """
    clock = FakeClock(at)

    return QuotaLedger(path, clock, keep_months=keep_months), clock


def record_at(
    ledger: QuotaLedger,
    clock: FakeClock,
    at: float,
    reason: str = "proactive",
    outcome: str = "success",
) -> None:
    """
    Move ``clock`` to ``at`` and record a request there.
    """
    clock.advance(at - clock.now())
    ledger.record(reason, outcome)


def write_ledger(path: Path, document: object, mode: int = 0o600) -> None:
    """
    Write a ledger file by hand, as JSON, with ``mode``.
    """
    path.write_text(json.dumps(document))
    path.chmod(mode)


def ignored_events(
    logs: list[MutableMapping[str, Any]],
) -> list[MutableMapping[str, Any]]:
    """
    The ``ledger.ignored`` events among captured logs.
    """
    return [e for e in logs if e["event"] == "ledger.ignored"]


class TestPersistence:
    """
    The ledger survives a restart, in a small private file.
    """

    def test_round_trip(self, path: Path) -> None:
        """
        Entries recorded by one ledger are loaded by the next.
        """
        ledger, clock = ledger_at(path, DEC_1 + 10.5)
        ledger.record("startup", "unavailable")
        record_at(ledger, clock, DEC_1 + 70.25, "retry", "success")
        record_at(ledger, clock, DEC_1 + DAY, "proactive", "rejected")

        reloaded, _ = ledger_at(path, DEC_1 + DAY)

        assert reloaded.entries() == [
            LedgerEntry(DEC_1 + 10.5, "startup", "unavailable"),
            LedgerEntry(DEC_1 + 70.25, "retry", "success"),
            LedgerEntry(DEC_1 + DAY, "proactive", "rejected"),
        ]
        assert reloaded.last_request_at() == DEC_1 + DAY

    def test_file_is_private_json(self, path: Path) -> None:
        """
        The file is mode 0600 and holds one versioned JSON document.
        """
        ledger, _ = ledger_at(path, DEC_1 + 0.0004)

        ledger.record("startup", "success")

        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert json.loads(path.read_text()) == {
            "version": 1,
            "entries": [[DEC_1, "startup", "success"]],
        }

    def test_no_temporary_files_left(self, path: Path) -> None:
        """
        Writing replaces the file and leaves nothing else in the directory.
        """
        ledger, clock = ledger_at(path, DEC_1)

        for step in range(5):
            record_at(ledger, clock, DEC_1 + step * HOUR)

        assert [p.name for p in path.parent.iterdir()] == [path.name]

    def test_in_memory_only(self, tmp_path: Path) -> None:
        """
        Without a path the ledger records in memory and writes no file.
        """
        ledger, _ = ledger_at(None, DEC_1)

        ledger.record("startup", "success")

        assert len(ledger.entries()) == 1
        assert list(tmp_path.iterdir()) == []

    def test_missing_file_is_an_empty_ledger(self, path: Path) -> None:
        """
        A first start, with no file yet, is silent and empty.
        """
        with capture_logs() as logs:
            ledger, _ = ledger_at(path, DEC_1)

        assert ledger.entries() == []
        assert ledger.last_request_at() is None
        assert logs == []

    def test_missing_directory_is_created(self, tmp_path: Path) -> None:
        """
        The first write creates the ledger's directory, private, so the
        first request of a fresh install is counted.
        """
        path = tmp_path / "state" / "ledger.json"
        ledger, _ = ledger_at(path, DEC_1)

        ledger.record("startup", "success")

        assert len(ledger_at(path, DEC_1)[0].entries()) == 1
        assert path.parent.stat().st_mode & 0o777 == 0o700

    def test_write_failure_logged_once_never_raised(
        self, tmp_path: Path
    ) -> None:
        """
        Failed writes are logged once, not raised; a later success says so.
        """
        path = tmp_path / "blocked" / "ledger.json"
        path.parent.write_text("a file where the directory should be")
        ledger, clock = ledger_at(path, DEC_1)

        with capture_logs() as logs:
            ledger.record("startup", "success")
            record_at(ledger, clock, DEC_1 + 60, "retry", "success")
            path.parent.unlink()
            record_at(ledger, clock, DEC_1 + 120, "forced", "success")

        assert [(e["event"], e["log_level"]) for e in logs] == [
            ("ledger.persist_failed", "warning"),
            ("ledger.persist_recovered", "info"),
        ]
        assert logs[0]["error_type"] == "FileExistsError"
        assert len(ledger_at(path, DEC_1 + 120)[0].entries()) == 3

    def test_entries_out_of_order_are_sorted(self, path: Path) -> None:
        """
        After the clock steps back, entries stay sorted and the last
        request is the latest one.
        """
        ledger, _ = ledger_at(path, DEC_1 + HOUR)
        ledger.record("startup", "success")

        clock_back, _ = ledger_at(path, DEC_1 + 60)
        clock_back.record("startup", "success")

        times = [e.at for e in clock_back.entries()]
        assert times == [DEC_1 + 60, DEC_1 + HOUR]
        assert clock_back.last_request_at() == DEC_1 + HOUR

    @pytest.mark.parametrize(
        "reason", ["", "Startup", "start up", "x" * 25, "ok\n"]
    )
    def test_record_refuses_malformed_names(
        self, path: Path, reason: str
    ) -> None:
        """
        A reason that is not a short lower-case name is a caller's bug.
        """
        ledger, _ = ledger_at(path, DEC_1)

        with pytest.raises(ValueError, match="not a ledger name"):
            ledger.record(reason, "success")

        assert ledger.entries() == []
        assert not path.exists()

    def test_keep_months_must_be_positive(self) -> None:
        """
        A ledger that keeps no month at all is refused.
        """
        with pytest.raises(ValueError, match="keep_months"):
            ledger_at(None, DEC_1, keep_months=0)

    def test_size_stays_bounded(self, path: Path) -> None:
        """
        At MAX_ENTRIES of the longest names the file still loads; the
        oldest entry makes way for a new one.
        """
        name = "n" * 24
        start = DEC_1 - MAX_ENTRIES * 60.0
        rows = [[start + i * 60.125, name, name] for i in range(MAX_ENTRIES)]
        write_ledger(path, {"version": 1, "entries": rows})
        ledger, _ = ledger_at(path, DEC_1 + DAY)

        ledger.record(name, name)

        assert path.stat().st_size <= MAX_LEDGER_BYTES
        entries = ledger_at(path, DEC_1 + DAY)[0].entries()
        assert len(entries) == MAX_ENTRIES
        assert entries[0].at == rows[1][0]
        assert entries[-1].at == DEC_1 + DAY


class TestIgnoredFiles:
    """
    A file the ledger cannot trust is ignored with one warning.
    """

    @pytest.mark.parametrize(
        "contents",
        [
            b"",
            b"{",
            b"\xff\xfe",
            b"[]",
            b'{"version": 2, "entries": []}',
            b'{"version": 1}',
            b'{"version": 1, "entries": {}}',
            b'{"version": 1, "entries": [[1, "startup"]]}',
            b'{"version": 1, "entries": [["1", "startup", "success"]]}',
            b'{"version": 1, "entries": [[true, "startup", "success"]]}',
            b'{"version": 1, "entries": [[NaN, "startup", "success"]]}',
            b'{"version": 1, "entries": [[-1, "startup", "success"]]}',
            b'{"version": 1, "entries": [[1e300, "startup", "success"]]}',
            b'{"version": 1, "entries": [[1, "START", "success"]]}',
            b'{"version": 1, "entries": [[1, "startup", 7]]}',
            b"[" * 200_000,
        ],
        ids=[
            "empty",
            "open-brace",
            "not-utf8",
            "array",
            "version-2",
            "no-entries",
            "entries-object",
            "short-entry",
            "string-time",
            "bool-time",
            "nan-time",
            "negative-time",
            "far-future",
            "upper-case-reason",
            "number-outcome",
            "deep-nesting",
        ],
    )
    def test_corrupt(self, path: Path, contents: bytes) -> None:
        """
        A file that is not a ledger document loads as an empty ledger.
        """
        path.write_bytes(contents)
        path.chmod(0o600)

        with capture_logs() as logs:
            ledger, _ = ledger_at(path, DEC_1)

        assert ledger.entries() == []
        assert [e["reason"] for e in ignored_events(logs)] == ["corrupt"]
        assert len(logs) == 1

    def test_truncated(self, path: Path) -> None:
        """
        A file cut short mid-write is ignored, and the next write
        replaces it.
        """
        ledger, clock = ledger_at(path, DEC_1)
        for step in range(3):
            record_at(ledger, clock, DEC_1 + step * HOUR)
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])

        with capture_logs() as logs:
            restarted, clock = ledger_at(path, DEC_1 + DAY)
            restarted.record("startup", "success")

        assert [e["reason"] for e in ignored_events(logs)] == ["corrupt"]
        assert len(logs) == 1
        assert len(ledger_at(path, DEC_1 + DAY)[0].entries()) == 1

    @pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
    def test_foreign_owner(self, path: Path) -> None:
        """
        A file owned by another user is not trusted.
        """
        ledger, _ = ledger_at(path, DEC_1)
        ledger.record("startup", "success")
        os.chown(path, NOBODY, NOBODY)

        with capture_logs() as logs:
            reloaded, _ = ledger_at(path, DEC_1)

        assert reloaded.entries() == []
        [event] = logs
        assert event["event"] == "ledger.ignored"
        assert event["log_level"] == "error"
        assert event["reason"] == "foreign_owner"
        assert event["path"] == str(path)

    @pytest.mark.parametrize("mode", [0o640, 0o644], ids=oct)
    def test_readable_by_others_is_trusted(
        self, path: Path, mode: int
    ) -> None:
        """
        A file others may only read is still ours and counts: it holds no
        secret, and ignoring it would reset the month's spend.
        """
        ledger, _ = ledger_at(path, DEC_1)
        ledger.record("startup", "success")
        path.chmod(mode)

        reloaded, _ = ledger_at(path, DEC_1)

        assert len(reloaded.entries()) == 1

    @pytest.mark.parametrize("mode", [0o620, 0o660, 0o602], ids=oct)
    def test_too_open(self, path: Path, mode: int) -> None:
        """
        A file others may write is not trusted, and is kept aside rather
        than overwritten.
        """
        ledger, _ = ledger_at(path, DEC_1)
        ledger.record("startup", "success")
        path.chmod(mode)

        with capture_logs() as logs:
            reloaded, _ = ledger_at(path, DEC_1)

        assert reloaded.entries() == []
        assert [e["reason"] for e in ignored_events(logs)] == ["too_open"]
        assert len(logs) == 1
        assert path.with_name(path.name + ".ignored").exists()

    def test_too_large(self, path: Path) -> None:
        """
        A file past MAX_LEDGER_BYTES is refused without parsing it.
        """
        path.write_bytes(b" " * (MAX_LEDGER_BYTES + 1))
        path.chmod(0o600)

        with capture_logs() as logs:
            ledger, _ = ledger_at(path, DEC_1)

        assert ledger.entries() == []
        assert [e["reason"] for e in ignored_events(logs)] == ["too_large"]

    def test_directory(self, path: Path) -> None:
        """
        A directory in the ledger's place is ignored, and writing over it
        fails softly.
        """
        path.mkdir(mode=0o700)

        with capture_logs() as logs:
            ledger, _ = ledger_at(path, DEC_1)
            ledger.record("startup", "success")

        assert [e["event"] for e in logs] == [
            "ledger.ignored",
            "ledger.persist_failed",
        ]
        assert logs[0]["reason"] == "not_regular"
        assert ledger.entries()[0].reason == "startup"

    def test_fifo(self, path: Path) -> None:
        """
        A FIFO in the ledger's place neither hangs the start nor loads.
        """
        os.mkfifo(path, 0o600)

        with capture_logs() as logs:
            ledger, _ = ledger_at(path, DEC_1)

        assert ledger.entries() == []
        assert [e["reason"] for e in ignored_events(logs)] == ["not_regular"]

    def test_symlink(self, path: Path, tmp_path: Path) -> None:
        """
        A symlink in the ledger's place is not followed.
        """
        target = tmp_path / "elsewhere.json"
        write_ledger(target, {"version": 1, "entries": [[1, "a", "b"]]})
        path.symlink_to(target)

        with capture_logs() as logs:
            ledger, _ = ledger_at(path, DEC_1)

        assert ledger.entries() == []
        assert [e["reason"] for e in ignored_events(logs)] == ["unreadable"]


class TestReader:
    """
    A reader (token-sidecar quota) sees the spend and changes nothing.
    """

    def test_reads_a_ledger_another_user_owns(self, path: Path) -> None:
        """
        The owner is not judged, and the file stays where it was.
        """
        writer, _ = ledger_at(path, NOV_1 + DAY)
        writer.record("startup", "success")
        if os.geteuid() == 0:
            os.chown(path, NOBODY, NOBODY)

        reader = QuotaLedger(path, FakeClock(NOV_1 + DAY), reader=True)

        assert reader.month_spend().requests == 1
        assert path.exists()
        assert not path.with_name(path.name + ".ignored").exists()

    def test_unusable_file_is_an_error_and_stays(self, path: Path) -> None:
        """
        A corrupt ledger raises, naming the reason, and is not moved.
        """
        path.write_text("{not json")

        with pytest.raises(LedgerUnreadableError, match="corrupt"):
            QuotaLedger(path, FakeClock(NOV_1), reader=True)

        assert path.read_text() == "{not json"

    def test_missing_file_is_no_spend(self, path: Path) -> None:
        """
        Before the first request there is no file: zero requests.
        """
        reader = QuotaLedger(path, FakeClock(NOV_1), reader=True)

        assert reader.month_spend().requests == 0


class TestMonths:
    """
    Spend is counted per calendar month in UTC, and old months go.
    """

    def test_rollover_at_midnight_utc(self, path: Path) -> None:
        """
        The last second of November and the first of December fall in
        different months.
        """
        ledger, clock = ledger_at(path, NOV_30_LAST_SECOND)
        ledger.record("proactive", "success")
        record_at(ledger, clock, DEC_1, "retry", "unavailable")

        november = ledger.month_spend(NOV_30_LAST_SECOND)
        december = ledger.month_spend(DEC_1)

        assert (november.month, november.requests) == ("2026-11", 1)
        assert november.by_reason == {"proactive": 1}
        assert (november.month_start, november.month_end) == (NOV_1, DEC_1)
        assert (december.month, december.requests) == ("2026-12", 1)
        assert december.by_outcome == {"unavailable": 1}
        assert (december.month_start, december.month_end) == (DEC_1, JAN_1)

    @pytest.mark.parametrize(
        ("moment", "month", "days"),
        [
            (datetime(2026, 12, 31, 23, 59, 59), "2026-12", 31),
            (datetime(2027, 1, 1), "2027-01", 31),
            (datetime(2028, 2, 29, 12), "2028-02", 29),
            (datetime(2027, 2, 28, 23), "2027-02", 28),
            (datetime(2026, 4, 15), "2026-04", 30),
        ],
        ids=["december", "january", "leap-february", "february", "april"],
    )
    def test_month_bounds(
        self, moment: datetime, month: str, days: int
    ) -> None:
        """
        Months have their calendar lengths, and December ends in January.
        """
        at = moment.replace(tzinfo=UTC).timestamp()

        name, start, end = month_bounds(at)

        assert name == month
        assert start <= at < end
        assert end - start == days * DAY

    @given(st.floats(min_value=0, max_value=4e9))
    def test_months_tile_time(self, at: float) -> None:
        """
        Every moment lies in one month, which the next month adjoins.
        """
        name, start, end = month_bounds(at)
        next_name, next_start, _ = month_bounds(end)

        assert start <= at < end
        assert next_start == end
        assert next_name != name
        assert month_bounds(start) == (name, start, end)

    def test_old_months_pruned_on_write(self, path: Path) -> None:
        """
        With keep_months=2, a December write drops October and keeps
        November.
        """
        ledger, clock = ledger_at(path, OCT_1 + DAY, keep_months=3)
        ledger.record("startup", "success")
        record_at(ledger, clock, NOV_30_LAST_SECOND)
        restarted, clock = ledger_at(path, DEC_1, keep_months=2)
        assert len(restarted.entries()) == 1

        restarted.record("proactive", "success")

        on_disk = ledger_at(path, DEC_1, keep_months=3)[0].entries()
        assert [e.at for e in on_disk] == [NOV_30_LAST_SECOND, DEC_1]

    def test_keep_one_month(self, path: Path) -> None:
        """
        With keep_months=1 only the clock's month stays.
        """
        ledger, clock = ledger_at(path, NOV_30_LAST_SECOND, keep_months=1)
        ledger.record("startup", "success")

        record_at(ledger, clock, DEC_1 + HOUR)

        assert [e.at for e in ledger.entries()] == [DEC_1 + HOUR]

    def test_pruned_from_the_clock_month(self, path: Path) -> None:
        """
        Entries ahead of a clock that stepped back are kept, not taken
        as the current month.
        """
        ledger, _ = ledger_at(path, JAN_1 + DAY)
        ledger.record("startup", "success")

        restarted, _ = ledger_at(path, OCT_1 + DAY)
        restarted.record("startup", "success")

        assert len(ledger_at(path, OCT_1)[0].entries()) == 2

    @pytest.mark.parametrize(
        ("requests", "elapsed", "projected"),
        [
            (10, 7.75 * DAY, 40.0),
            (10, 30 * DAY, 10 * 31 / 30),
            (31, 31 * DAY - 1, 31 * 31 * DAY / (31 * DAY - 1)),
            (3, 0.0, 3.0),
            (0, 10 * DAY, 0.0),
        ],
        ids=["quarter", "day-30", "last-second", "at-start", "none"],
    )
    def test_projection(
        self, requests: int, elapsed: float, projected: float
    ) -> None:
        """
        The count so far scales to the month's length, linearly.
        """
        ledger, _ = ledger_at(None, DEC_1)
        for _ in range(requests):
            ledger.record("forced", "success")

        spend = ledger.month_spend(DEC_1 + elapsed)

        assert spend.requests == requests
        assert spend.projected == pytest.approx(projected)

    def test_projection_never_below_count(self) -> None:
        """
        Entries later than the asked moment count, and the projection
        does not fall under them.
        """
        ledger, _ = ledger_at(None, DEC_1 + 20 * DAY)
        for _ in range(5):
            ledger.record("forced", "success")

        spend = ledger.month_spend(DEC_1 + 20 * DAY - 1)

        assert spend.requests == 5
        assert spend.projected >= 5

    def test_month_spend_defaults_to_now(self) -> None:
        """
        Without a moment, the clock's month is reported.
        """
        ledger, clock = ledger_at(None, NOV_30_LAST_SECOND)
        ledger.record("startup", "success")
        clock.advance(1)

        spend = ledger.month_spend()

        assert (spend.month, spend.requests) == ("2026-12", 0)

    def test_breakdown(self) -> None:
        """
        Requests are counted by reason and by outcome.
        """
        ledger, _ = ledger_at(None, DEC_1)
        for reason, outcome in [
            ("startup", "unavailable"),
            ("retry", "unavailable"),
            ("retry", "success"),
            ("forced", "rejected"),
        ]:
            ledger.record(reason, outcome)

        spend = ledger.month_spend()

        assert spend.by_reason == {"startup": 1, "retry": 2, "forced": 1}
        assert spend.by_outcome == {
            "unavailable": 2,
            "success": 1,
            "rejected": 1,
        }


def spent(count: int, at: float = DEC_1 + HOUR) -> QuotaLedger:
    """
    An in-memory ledger with ``count`` December requests, the last at
    ``at``.
    """
    ledger, _ = ledger_at(None, at)
    for _ in range(count):
        ledger.record("forced", "success")

    return ledger


class TestJudge:
    """
    judge lets requests go by budget state, token state and spacing.
    """

    @pytest.mark.parametrize(
        ("count", "policy", "expiring", "allowed", "state"),
        [
            (500, BudgetPolicy(), False, True, "ok"),
            (7, BudgetPolicy(10), False, True, "ok"),
            (8, BudgetPolicy(10), False, True, "warning"),
            (9, BudgetPolicy(10), True, True, "warning"),
            (10, BudgetPolicy(10), False, False, "over_budget"),
            (10, BudgetPolicy(10), True, True, "over_budget"),
            (12, BudgetPolicy(10), True, True, "over_budget"),
            (10, BudgetPolicy(10, hard_stop=True), False, False, "stopped"),
            (10, BudgetPolicy(10, hard_stop=True), True, False, "stopped"),
            (0, BudgetPolicy(0), True, True, "over_budget"),
            (0, BudgetPolicy(0, hard_stop=True), True, False, "stopped"),
            (0, BudgetPolicy(10, warn_fraction=0.0), False, True, "warning"),
            (9, BudgetPolicy(10, warn_fraction=1.0), False, True, "ok"),
        ],
        ids=[
            "no-budget",
            "under-warning",
            "at-warning",
            "warning-expiring",
            "at-budget",
            "at-budget-expiring",
            "over-budget-expiring",
            "stopped",
            "stopped-expiring",
            "zero-budget-expiring",
            "zero-budget-stopped",
            "warn-from-zero",
            "warn-at-budget",
        ],
    )
    def test_states(
        self,
        count: int,
        policy: BudgetPolicy,
        expiring: bool,
        allowed: bool,
        state: str,
    ) -> None:
        """
        Each budget state allows or refuses as documented, in one line.
        """
        ledger = spent(count)

        verdict = judge(ledger, policy, DEC_1 + DAY, token_expiring=expiring)

        assert (verdict.allowed, verdict.state) == (allowed, state)
        assert verdict.not_before is None
        assert f"{count}" in verdict.message
        assert "2026-12" in verdict.message
        assert "\n" not in verdict.message

    def test_stopped_says_until_when(self) -> None:
        """
        A hard stop names the month's end and what lifts it sooner.
        """
        ledger = spent(3)

        verdict = judge(
            ledger,
            BudgetPolicy(3, hard_stop=True),
            DEC_1 + DAY,
            token_expiring=True,
        )

        assert "until 2027-01-01T00:00:00Z" in verdict.message
        assert "raise the budget" in verdict.message

    def test_next_month_starts_afresh(self) -> None:
        """
        A budget used up in November allows requests again on December 1.
        """
        ledger = spent(3, at=NOV_30_LAST_SECOND)
        policy = BudgetPolicy(3, hard_stop=True)

        before = judge(ledger, policy, NOV_30_LAST_SECOND, token_expiring=True)
        after = judge(ledger, policy, DEC_1, token_expiring=False)

        assert (before.allowed, before.state) == (False, "stopped")
        assert (after.allowed, after.state) == (True, "ok")

    def test_interval_across_restart(self, path: Path) -> None:
        """
        A restarted sidecar waits out the interval since the request its
        predecessor sent.
        """
        ledger, _ = ledger_at(path, DEC_1 + HOUR)
        ledger.record("startup", "unavailable")
        policy = BudgetPolicy(min_request_interval_seconds=60)

        restarted, clock = ledger_at(path, DEC_1 + HOUR + 10)
        held = judge(restarted, policy, clock.now(), token_expiring=True)
        clock.advance(50)
        released = judge(restarted, policy, clock.now(), token_expiring=True)

        assert (held.allowed, held.not_before) == (False, DEC_1 + HOUR + 60)
        assert held.state == "ok"
        assert "10 s ago" in held.message
        assert "crash loop" in held.message
        assert (released.allowed, released.not_before) == (True, None)

    def test_interval_after_clock_stepped_back(self) -> None:
        """
        A last request in the future holds back one interval from now,
        not until then.
        """
        ledger = spent(1, at=DEC_1 + DAY)
        policy = BudgetPolicy(min_request_interval_seconds=60)

        verdict = judge(ledger, policy, DEC_1 + HOUR, token_expiring=True)

        assert (verdict.allowed, verdict.not_before) == (
            False,
            DEC_1 + HOUR + 60,
        )
        assert "later than now" in verdict.message

    def test_interval_holds_over_budget_renewal(self) -> None:
        """
        An expiring token past the budget is still renewed no sooner
        than the interval allows.
        """
        ledger = spent(5)
        policy = BudgetPolicy(5, min_request_interval_seconds=60)

        verdict = judge(ledger, policy, DEC_1 + HOUR + 1, token_expiring=True)

        assert verdict == Verdict(
            False, DEC_1 + HOUR + 60, "over_budget", verdict.message
        )

    @pytest.mark.parametrize("hard_stop", [True, False], ids=["stop", "over"])
    def test_budget_refusal_has_no_not_before(self, hard_stop: bool) -> None:
        """
        A refusal by budget leaves not_before unset, even within the
        interval: no wait makes the request allowed.
        """
        ledger = spent(5)
        policy = BudgetPolicy(
            5, hard_stop=hard_stop, min_request_interval_seconds=60
        )

        verdict = judge(ledger, policy, DEC_1 + HOUR, token_expiring=False)

        assert (verdict.allowed, verdict.not_before) == (False, None)

    @pytest.mark.parametrize(
        "fields",
        [
            {"monthly_budget": -1},
            {"warn_fraction": 1.5},
            {"warn_fraction": -0.1},
            {"min_request_interval_seconds": -1.0},
            {"min_request_interval_seconds": float("inf")},
            {"min_request_interval_seconds": float("nan")},
        ],
        ids=[
            "negative-budget",
            "warn-over-1",
            "warn-negative",
            "negative-interval",
            "infinite-interval",
            "nan-interval",
        ],
    )
    def test_policy_validation(self, fields: dict[str, float]) -> None:
        """
        A policy that makes no sense is refused when built.
        """
        with pytest.raises(ValueError):
            BudgetPolicy(**fields)  # type: ignore[arg-type]


@dataclass
class SimulatedRequest:
    """
    One request the simulation sent, and what the guard knew then.
    """

    at: float
    reason: str
    token_expiring: bool
    spent_before: int


def simulate_month(
    path: Path, policy: BudgetPolicy, seed: int
) -> list[SimulatedRequest]:
    """
    Run December with 24-hour tokens renewed at 0.9 of their life, one
    request in five failing, an hourly forced refresh and a restart on
    the 15th; every would-be request asks `judge` first.
    """
    lifetime, step, retry_after = DAY, 300.0, 600.0
    rng = random.Random(seed)
    clock = FakeClock(DEC_1)
    ledger = QuotaLedger(path, clock)
    issued_at: float | None = None
    retry_at: float | None = None
    starting = True
    sent: list[SimulatedRequest] = []

    while clock.now() < JAN_1:
        now = clock.now()
        if now == DEC_1 + 14 * DAY:
            ledger = QuotaLedger(path, clock)
            issued_at, retry_at, starting = None, None, True
        expiring = issued_at is None or now >= issued_at + 0.9 * lifetime
        if issued_at is None or now >= issued_at + lifetime:
            reason: str | None = "startup" if starting else "expired"
        elif retry_at is not None and now >= retry_at:
            reason = "retry"
        elif expiring:
            reason = "proactive"
        elif (now - DEC_1) % HOUR == 0:
            reason = "forced"
        else:
            reason = None

        if reason is not None:
            verdict = judge(ledger, policy, now, token_expiring=expiring)
            if verdict.allowed:
                spent = ledger.month_spend(now).requests
                outcome = "success"
                if rng.random() < 0.2:
                    outcome = rng.choice(OUTCOMES[1:])
                ledger.record(reason, outcome)
                sent.append(SimulatedRequest(now, reason, expiring, spent))
                if outcome == "success":
                    issued_at, retry_at, starting = now, None, False
                else:
                    retry_at = now + retry_after
        clock.advance(step)

    return sent


class TestSimulatedMonth:
    """
    An aggressive caller over a whole month cannot spend past the budget.
    """

    @pytest.mark.parametrize("seed", [1, 2, 3])
    def test_hard_stop(self, path: Path, seed: int) -> None:
        """
        Under a hard stop, exactly the budget is spent and no more.
        """
        policy = BudgetPolicy(
            60, hard_stop=True, min_request_interval_seconds=60
        )

        sent = simulate_month(path, policy, seed)

        assert len(sent) == 60
        spend = ledger_at(path, JAN_1 - 1)[0].month_spend()
        assert spend.requests == 60
        assert spend.by_outcome["success"] < 60

    @pytest.mark.parametrize("seed", [1, 2, 3])
    def test_over_budget(self, path: Path, seed: int) -> None:
        """
        Past the budget, requests go only for an expiring token, and the
        token keeps being renewed all month.
        """
        policy = BudgetPolicy(60, min_request_interval_seconds=60)

        sent = simulate_month(path, policy, seed)

        past_budget = [r for r in sent if r.spent_before >= 60]
        assert past_budget
        assert all(r.token_expiring for r in past_budget)
        assert "forced" not in {r.reason for r in past_budget}
        assert max(r.at for r in sent) > JAN_1 - DAY
        spend = ledger_at(path, JAN_1 - 1)[0].month_spend()
        assert spend.requests == len(sent)
        assert spend.by_reason["startup"] >= 2
        assert spend.by_outcome["success"] < len(sent)


steps = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=3 * DAY),
        st.booleans(),
        st.sampled_from(REASONS),
        st.sampled_from(OUTCOMES),
    ),
    max_size=150,
)


class TestProperties:
    """
    Whatever the pattern of requests, the guard holds.
    """

    @given(
        budget=st.integers(min_value=0, max_value=15),
        interval=st.sampled_from([0.0, 30.0]),
        pattern=steps,
    )
    @example(
        budget=0, interval=0.0, pattern=[(0.0, True, "startup", "success")]
    )
    @example(
        budget=1,
        interval=0.0,
        pattern=[(0.0, True, "startup", "success")] * 3,
    )
    @settings(deadline=None)
    def test_hard_stop_never_exceeds_budget(
        self,
        budget: int,
        interval: float,
        pattern: list[tuple[float, bool, str, str]],
    ) -> None:
        """
        Under a hard stop no month ever records more than the budget.
        """
        clock = FakeClock(NOV_30_LAST_SECOND - DAY)
        ledger = QuotaLedger(None, clock)
        policy = BudgetPolicy(
            budget, hard_stop=True, min_request_interval_seconds=interval
        )
        per_month: dict[str, int] = {}

        for advance, expiring, reason, outcome in pattern:
            clock.advance(advance)
            now = clock.now()
            if judge(ledger, policy, now, token_expiring=expiring).allowed:
                ledger.record(reason, outcome)
                month = month_bounds(now)[0]
                per_month[month] = per_month.get(month, 0) + 1

        assert all(count <= budget for count in per_month.values())

    @given(budget=st.integers(min_value=0, max_value=15), pattern=steps)
    @settings(deadline=None)
    def test_over_budget_only_for_expiring_tokens(
        self, budget: int, pattern: list[tuple[float, bool, str, str]]
    ) -> None:
        """
        Without a hard stop, a request past the budget goes only when the
        token is expiring, and then always.
        """
        clock = FakeClock(NOV_30_LAST_SECOND - DAY)
        ledger = QuotaLedger(None, clock)
        policy = BudgetPolicy(budget)

        for advance, expiring, reason, outcome in pattern:
            clock.advance(advance)
            now = clock.now()
            over = ledger.month_spend(now).requests >= budget
            verdict = judge(ledger, policy, now, token_expiring=expiring)
            if verdict.allowed:
                ledger.record(reason, outcome)

            assert verdict.allowed == (expiring or not over)

    @given(
        rows=st.lists(
            st.tuples(
                st.floats(min_value=NOV_1, max_value=JAN_1 - 1),
                st.sampled_from(REASONS),
                st.sampled_from(OUTCOMES),
            ),
            max_size=30,
        )
    )
    @settings(deadline=None, max_examples=50)
    def test_file_round_trip(self, rows: list[tuple[float, str, str]]) -> None:
        """
        Any entries written are read back the same, oldest first.
        """
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "ledger.json"
            clock = FakeClock(DEC_1)
            ledger = QuotaLedger(path, clock)
            for at, reason, outcome in rows:
                clock.advance(at - clock.now())
                ledger.record(reason, outcome)

            reloaded = QuotaLedger(path, clock)

            assert reloaded.entries() == ledger.entries()
            times = [e.at for e in reloaded.entries()]
            assert times == sorted(times)
            assert len(times) == len(rows)
