"""
The quota ledger: every token request sent to the IdP, kept across
restarts. The budget that reads it is in `sidecar.budget`.

The IdP grants a monthly quota of token requests. The ledger records each
request (when, why, how it ended) in a small file beside the token cache,
so spend is visible and bounded even when the sidecar restarts or crash
loops. Months are calendar months in UTC.

The file is one JSON document on one line, written atomically (a new
file, mode 0600, fsynced, renamed over the old one)::

    {"version":1,"entries":[[1796083200.125,"startup","success"],...]}

Each entry is ``[at, reason, outcome]``: ``at`` in wall-clock epoch
seconds (rounded to milliseconds), ``reason`` and ``outcome`` short
lower-case names. Entries are sorted by ``at``. Months older than
``keep_months`` are dropped at each write, so the file stays small.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import attrgetter
from pathlib import Path
from typing import Literal, Protocol, get_args

import structlog

from sidecar.clock import Clock
from sidecar.errors import SidecarError
from sidecar.files import remove_stale_temporaries, write_private_file

log = structlog.get_logger("sidecar.ledger")

Reason = Literal[
    "startup",
    "proactive",
    "forced",
    "retry",
    "expired",
    "invalidated",
    "min_ttl",
    "rotated",
]
Outcome = Literal["success", "unavailable", "rejected", "bad_response"]

#: The outcome of a request sent but not yet answered (or cut short).
PENDING = "pending"

#: The reasons and outcomes the sidecar records; others that are
#: well-formed names load too, so an older version reads a newer file.
REASONS: tuple[str, ...] = get_args(Reason)
OUTCOMES: tuple[str, ...] = get_args(Outcome)

LEDGER_FORMAT_VERSION = 1

#: A file larger than this is refused unread. Entries are at most about
#: 70 bytes, so `MAX_ENTRIES` of them fit with room to spare.
MAX_LEDGER_BYTES = 4 * 1024 * 1024

#: Entries kept at most: one request a minute for four weeks.
MAX_ENTRIES = 40_000

#: Entries with a time outside [0, this) are corrupt (this is in 5138).
MAX_TIMESTAMP = 1e11

#: What a reason or an outcome may be called: a short lower-case name.
NAME = re.compile(r"[a-z][a-z_]{0,23}")
_AT = attrgetter("at")


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """
    One token request: when it was sent, why, and how it ended.
    """

    at: float
    reason: str
    outcome: str


@dataclass(frozen=True, slots=True)
class MonthSpend:
    """
    The token requests of one calendar month (UTC).

    ``projected`` scales the count so far to the whole month, linearly;
    it is never below the count. ``month_start`` and ``month_end`` are
    epoch seconds, the end being the next month's start.
    """

    month: str
    requests: int
    by_reason: dict[str, int]
    by_outcome: dict[str, int]
    projected: float
    month_start: float
    month_end: float

    @classmethod
    def of(
        cls,
        at: float,
        requests: int,
        by_reason: dict[str, int],
        by_outcome: dict[str, int],
    ) -> MonthSpend:
        """
        The spend of the month holding ``at``, ``requests`` so far,
        projected linearly to the month's end.
        """
        month, start, end = month_bounds(at)
        elapsed = at - start
        projected = float(requests)
        if elapsed > 0:
            projected = max(projected, requests * (end - start) / elapsed)

        return cls(
            month=month,
            requests=requests,
            by_reason=by_reason,
            by_outcome=by_outcome,
            projected=projected,
            month_start=start,
            month_end=end,
        )


class SpendRecord(Protocol):
    """
    What the budget reads: a month's spend and the latest request.
    `QuotaLedger` is one; in fleet mode, the fleet's view is another.
    """

    def month_spend(self, at: float | None = None) -> MonthSpend: ...

    def last_request_at(self) -> float | None: ...


def month_bounds(at: float) -> tuple[str, float, float]:
    """
    The UTC calendar month holding ``at``: its name ("2026-12"), start
    and end, in epoch seconds.
    """
    moment = datetime.fromtimestamp(at, UTC)
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    if moment.month == 12:
        end = datetime(moment.year + 1, 1, 1, tzinfo=UTC)
    else:
        end = datetime(moment.year, moment.month + 1, 1, tzinfo=UTC)

    return (
        f"{moment.year:04d}-{moment.month:02d}",
        start.timestamp(),
        end.timestamp(),
    )


class QuotaLedger:
    """
    The token requests sent to the IdP, persisted to ``path``.

    With ``path`` None the ledger lives in memory only. Existing entries
    are loaded at once; a file that is corrupt, unreadable, too large,
    not ours or readable by others is ignored with one ``ledger.ignored``
    warning, and replaced at the next `record`. ``keep_months`` counts
    the current month: 2 keeps this month and the last.
    """

    def __init__(
        self,
        path: Path | None,
        clock: Clock,
        keep_months: int = 2,
        *,
        reader: bool = False,
    ) -> None:
        if keep_months < 1:
            raise ValueError(
                f"keep_months must be 1 or more, not {keep_months}"
            )
        self._path = path
        self._clock = clock
        self._keep_months = keep_months
        self._entries: list[LedgerEntry] = []
        self._persist_failing = False

        if path is not None and reader:
            # A reader (``token-sidecar quota``) is often another user, and
            # must change nothing: it neither trusts by owner nor moves an
            # untrusted file aside, and an unusable file is its error.
            self._entries = _read_entries(path)
            self._prune()
        elif path is not None:
            remove_stale_temporaries(path)
            self._entries = _load(path)
            self._prune()

    def record(self, reason: str, outcome: str) -> None:
        """
        Record a token request sent now, and persist the ledger.

        A failed write is logged (once until a write succeeds again) and
        never raised. Raises `ValueError` for a ``reason`` or ``outcome``
        that is not a short lower-case name: a caller's bug.

        Limitation: the write blocks, fsync included, for a few
        milliseconds on a local disk and longer on a slow one; callers on
        the event loop run it in a thread.
        """
        for name in (reason, outcome):
            if not NAME.fullmatch(name):
                raise ValueError(f"not a ledger name: {name!r}")
        entry = LedgerEntry(round(self._clock.now(), 3), reason, outcome)

        bisect.insort(self._entries, entry, key=_AT)
        self._prune()
        if self._path is not None:
            self._persist(self._path)

    def settle(self, outcome: str) -> None:
        """
        Give the newest entry, recorded as ``pending`` before its request
        was sent, the request's outcome; persist the ledger.

        Recording first means a request a crash cut short still counts.
        """
        if not NAME.fullmatch(outcome):
            raise ValueError(f"not a ledger name: {outcome!r}")
        index = self._newest_pending()
        if index is None:
            return
        entry = self._entries[index]
        self._entries[index] = LedgerEntry(entry.at, entry.reason, outcome)
        if self._path is not None:
            self._persist(self._path)

    def withdraw(self) -> None:
        """
        Remove the newest ``pending`` entry: its request was never sent.
        """
        index = self._newest_pending()
        if index is None:
            return
        del self._entries[index]
        if self._path is not None:
            self._persist(self._path)

    def _newest_pending(self) -> int | None:
        for index in range(len(self._entries) - 1, -1, -1):
            if self._entries[index].outcome == PENDING:
                return index

        return None

    def last_request_at(self) -> float | None:
        """
        When the latest recorded request was sent, if any was.
        """
        return self._entries[-1].at if self._entries else None

    def month_spend(self, at: float | None = None) -> MonthSpend:
        """
        The spend of the calendar month holding ``at`` (default: now).

        Every entry of that month counts, even one later than ``at``
        (after the wall clock stepped back): those requests were sent.
        """
        at = self._clock.now() if at is None else at
        _, start, end = month_bounds(at)
        low = bisect.bisect_left(self._entries, start, key=_AT)
        high = bisect.bisect_left(self._entries, end, key=_AT)
        entries = self._entries[low:high]

        by_reason: dict[str, int] = {}
        by_outcome: dict[str, int] = {}
        for entry in entries:
            by_reason[entry.reason] = by_reason.get(entry.reason, 0) + 1
            by_outcome[entry.outcome] = by_outcome.get(entry.outcome, 0) + 1

        return MonthSpend.of(at, len(entries), by_reason, by_outcome)

    def entries(self) -> list[LedgerEntry]:
        """
        Every entry kept, oldest first.
        """
        return list(self._entries)

    def _prune(self) -> None:
        # Counted back from the clock's month, not from the newest entry,
        # so one entry dated ahead by a clock once wrong cannot erase the
        # rest.
        _, start, _ = month_bounds(self._clock.now())
        for _ in range(self._keep_months - 1):
            _, start, _ = month_bounds(start - 1)
        cut = bisect.bisect_left(self._entries, start, key=_AT)
        # Limitation: past MAX_ENTRIES the oldest entries go, even from
        # this month, so spend is undercounted; only a sidecar asking
        # more than once a minute all month gets there.
        cut = max(cut, len(self._entries) - MAX_ENTRIES)
        del self._entries[:cut]

    def _persist(self, path: Path) -> None:
        document = {
            "version": LEDGER_FORMAT_VERSION,
            "entries": [[e.at, e.reason, e.outcome] for e in self._entries],
        }
        data = json.dumps(document, separators=(",", ":")).encode() + b"\n"
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_private_file(path, data)
        except OSError as exc:
            if not self._persist_failing:
                log.warning(
                    "ledger.persist_failed",
                    path=str(path),
                    error_type=type(exc).__name__,
                    error=str(exc),
                    hint="requests since the last good write are forgotten "
                    "at restart; make the directory writable by the sidecar",
                )
            self._persist_failing = True
            return

        if self._persist_failing:
            log.info("ledger.persist_recovered", path=str(path))
        self._persist_failing = False


class _IgnoredError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class LedgerUnreadableError(SidecarError):
    """
    A reader found the ledger file unusable; the message says why.
    """


def _read_entries(path: Path) -> list[LedgerEntry]:
    try:
        data = _read(path, owner_checked=False)
        return _parse(data) if data is not None else []
    except _IgnoredError as exc:
        raise LedgerUnreadableError(
            f"the ledger {str(path)!r} cannot be used ({exc.reason}: {exc})"
        ) from None


def _load(path: Path) -> list[LedgerEntry]:
    try:
        data = _read(path)
        if data is None:
            return []
        entries = _parse(data)
    except _IgnoredError as exc:
        kept = _keep_aside(path)
        log.error(
            "ledger.ignored",
            path=str(path),
            reason=exc.reason,
            error=str(exc),
            kept_as=str(kept) if kept else None,
            hint="this month's spend restarts from zero, so the budget "
            "cannot hold; find out who changed the file",
        )
        return []

    return entries


def _read(path: Path, owner_checked: bool = True) -> bytes | None:
    # O_NOFOLLOW: a symlink planted in place of the ledger is not read;
    # O_NONBLOCK: nor does a FIFO hang the start.
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _IgnoredError("unreadable", str(exc)) from exc

    try:
        status = os.fstat(descriptor)
        _check_trusted(status, owner_checked)
        # fdopen() only now: it raises for a directory.
        with os.fdopen(descriptor, "rb", closefd=False) as file:
            data = file.read(MAX_LEDGER_BYTES + 1)
    except OSError as exc:
        raise _IgnoredError("unreadable", str(exc)) from exc
    finally:
        os.close(descriptor)
    if len(data) > MAX_LEDGER_BYTES:
        raise _IgnoredError(
            "too_large", f"larger than {MAX_LEDGER_BYTES} bytes"
        )

    return data


def _check_trusted(status: os.stat_result, owner_checked: bool) -> None:
    if not stat.S_ISREG(status.st_mode):
        raise _IgnoredError("not_regular", "not a regular file")
    if owner_checked and status.st_uid != os.geteuid():
        raise _IgnoredError("foreign_owner", f"owned by uid {status.st_uid}")
    # Others may read it (it holds no secret); writing would let them
    # rewrite the spend.
    if status.st_mode & 0o022:
        mode = stat.S_IMODE(status.st_mode)
        raise _IgnoredError("too_open", f"mode {mode:04o}, writable by others")


def _keep_aside(path: Path) -> Path | None:
    # An untrusted ledger is evidence: keep it rather than overwrite it.
    # Only a regular file is moved; anything else stays where it is (and
    # writes there fail), since moving a device could break the host.
    aside = path.with_name(f"{path.name}.ignored")
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        os.replace(path, aside)
    except OSError:
        return None

    return aside


def _parse(data: bytes) -> list[LedgerEntry]:
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise _IgnoredError("corrupt", "not JSON") from exc
    if not isinstance(document, dict):
        raise _IgnoredError("corrupt", "not a JSON object")
    if document.get("version") != LEDGER_FORMAT_VERSION:
        raise _IgnoredError("corrupt", "unknown format version")
    rows = document.get("entries")
    if not isinstance(rows, list):
        raise _IgnoredError("corrupt", "no entries list")

    entries = [_parse_entry(row) for row in rows]
    entries.sort(key=_AT)

    return entries


def _parse_entry(row: object) -> LedgerEntry:
    match row:
        case [float() | int() as at, str() as reason, str() as outcome] if (
            not isinstance(at, bool)
            and math.isfinite(at)
            and 0 <= at < MAX_TIMESTAMP
            and NAME.fullmatch(reason)
            and NAME.fullmatch(outcome)
        ):
            return LedgerEntry(float(at), reason, outcome)

    raise _IgnoredError("corrupt", "an entry is not [at, reason, outcome]")
