"""
The monthly budget: whether one more token request may go, judged from
the ledger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from sidecar.ledger import MonthSpend, SpendRecord


@dataclass(frozen=True, slots=True)
class BudgetPolicy:
    """
    How many token requests a month may spend, and how fast.

    From ``warn_fraction`` of ``monthly_budget`` on, verdicts warn. At
    the budget, requests go only when the token is about to expire, or
    (``hard_stop``) not at all until the next month.
    ``min_request_interval_seconds`` spaces requests, across restarts
    too, so a crash loop cannot drain the quota.
    """

    monthly_budget: int | None = None
    warn_fraction: float = 0.8
    hard_stop: bool = False
    min_request_interval_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.monthly_budget is not None and self.monthly_budget < 0:
            raise ValueError("monthly_budget must be 0 or more")
        if not 0.0 <= self.warn_fraction <= 1.0:
            raise ValueError("warn_fraction must be within [0, 1]")
        interval = self.min_request_interval_seconds
        if not (math.isfinite(interval) and interval >= 0.0):
            raise ValueError("min_request_interval_seconds must be >= 0")


@dataclass(frozen=True, slots=True)
class Verdict:
    """
    Whether a token request may be sent now, and why (``message``).

    ``not_before`` is set only when the request interval holds it back:
    the time it may go. Otherwise a refused request waits for the token
    to near expiry (``over_budget``) or for the next month
    (``stopped``).
    """

    allowed: bool
    not_before: float | None
    state: Literal["ok", "warning", "over_budget", "stopped"]
    message: str


def judge(
    ledger: SpendRecord,
    policy: BudgetPolicy,
    now: float,
    *,
    token_expiring: bool,
) -> Verdict:
    """
    Whether a token request may be sent at ``now``.

    ``token_expiring`` says whether the current token is absent or about
    to expire. Under ``warn_fraction`` of the budget the state is "ok",
    from there "warning"; both allow. At or over the budget, "over_budget"
    allows only when ``token_expiring``, and "stopped" (``hard_stop``)
    never does. An allowed request is still held back until
    ``min_request_interval_seconds`` after the last one (``not_before``).
    """
    spend = ledger.month_spend(now)
    budget = policy.monthly_budget
    spent = _describe_spend(spend, budget)
    until = _format_utc(spend.month_end)

    if budget is None or spend.requests < budget * policy.warn_fraction:
        return _hold_for_interval(ledger, policy, now, "ok", spent)
    if spend.requests < budget:
        status = (
            f"{spent}; find what asks for tokens so often, or raise the "
            "monthly budget"
        )
        return _hold_for_interval(ledger, policy, now, "warning", status)
    if policy.hard_stop:
        status = (
            f"{spent}: monthly budget used up, no token requests until "
            f"{until}; raise the budget or turn off the hard stop to "
            "resume sooner"
        )
        return Verdict(False, None, "stopped", status)
    if not token_expiring:
        status = (
            f"{spent}: over budget, so the token is renewed only when it "
            f"is about to expire, until {until}"
        )
        return Verdict(False, None, "over_budget", status)

    status = f"{spent}: over budget, renewing the expiring token only"

    return _hold_for_interval(ledger, policy, now, "over_budget", status)


def _hold_for_interval(
    ledger: SpendRecord,
    policy: BudgetPolicy,
    now: float,
    state: Literal["ok", "warning", "over_budget"],
    status: str,
) -> Verdict:
    last_at = ledger.last_request_at()
    interval = policy.min_request_interval_seconds
    if last_at is None or interval <= 0:
        return Verdict(True, None, state, status)

    # A last request "in the future" means the wall clock stepped back
    # (across a restart): wait one interval from now, not until then.
    not_before = min(last_at, now) + interval
    if not_before <= now:
        return Verdict(True, None, state, status)
    if last_at > now:
        last = f"is dated {_format_utc(last_at)}, later than now"
    else:
        last = f"was {now - last_at:.0f} s ago"

    return Verdict(
        False,
        not_before,
        state,
        f"{status}; the last token request {last}, so the next waits "
        f"until {_format_utc(not_before)} (at least {interval:g} s apart, "
        "so a crash loop cannot drain the quota)",
    )


def _describe_spend(spend: MonthSpend, budget: int | None) -> str:
    of_budget = "" if budget is None else f" of {budget}"

    return (
        f"{spend.requests}{of_budget} token requests used in {spend.month} "
        f"(UTC), {spend.projected:.0f} projected by month end"
    )


def _format_utc(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
