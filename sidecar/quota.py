"""
The quota guard: the refresher's view of the ledger and the budget.

It records every token request, decides whether the next one may go, and
says so in the log and metrics when that changes.
"""

from __future__ import annotations

import asyncio
import dataclasses

import structlog

from sidecar.budget import BudgetPolicy, Verdict, judge
from sidecar.fleetspend import CombinedSpend, SharedSpend
from sidecar.ledger import PENDING, QuotaLedger, SpendRecord
from sidecar.metrics import Metrics
from sidecar.token import RefreshPolicy, Token

log = structlog.get_logger("sidecar.quota")

#: How often a hard stop looks again (the month may have turned).
STOPPED_RECHECK_SECONDS = 60.0

QUOTA_STATES = ("ok", "warning", "over_budget", "stopped")


class QuotaGuard:
    """
    Holds back token requests the budget does not allow.
    """

    def __init__(
        self,
        ledger: QuotaLedger,
        budget: BudgetPolicy,
        refresh: RefreshPolicy,
        metrics: Metrics,
        shared: SharedSpend | None = None,
    ) -> None:
        self.ledger = ledger
        # In fleet mode the budget is the fleet's: judged on the spend
        # Redis reports, counted there as well as in this host's ledger.
        self._shared = shared
        self._spend: SpendRecord = (
            ledger if shared is None else CombinedSpend(ledger, shared)
        )
        self._pending_reason = "startup"
        self._budget = budget
        # The minimum interval guards against crash loops: it applies to
        # a process's first request; after that, back-off and the refresh
        # policy pace the requests.
        self._budget_running = dataclasses.replace(
            budget, min_request_interval_seconds=0.0
        )
        self._refresh = refresh
        self._metrics = metrics
        self._state: str | None = None
        # The metrics stay this host's; `token-sidecar quota` shows the
        # fleet's.
        metrics.watch_quota(ledger, budget.monthly_budget)

    def hold_until(
        self, now: float, token: Token | None, first_request: bool
    ) -> float | None:
        """
        ``None`` when a token request may go now, else when to ask again.
        """
        expiring = token is None or self._is_expiring(token, now)
        budget = self._budget if first_request else self._budget_running
        verdict = judge(self._spend, budget, now, token_expiring=expiring)
        self._report(verdict)
        if verdict.allowed:
            return None
        if verdict.not_before is not None:
            return verdict.not_before
        if verdict.state == "over_budget" and token is not None:
            return token.expires_at - self._expiring_margin(token)

        return now + STOPPED_RECHECK_SECONDS

    async def record_sending(self, reason: str) -> None:
        """
        Add a token request about to be sent to the ledger, as pending,
        so that a crash before its answer still counts it. Off the event
        loop: it syncs a file.
        """
        await asyncio.to_thread(self.ledger.record, reason, PENDING)
        self._pending_reason = reason
        if self._shared is not None:
            await self._shared.record(reason)

    async def withdraw(self) -> None:
        """
        Drop the pending request: it was never sent.
        """
        await asyncio.to_thread(self.ledger.withdraw)
        if self._shared is not None:
            await self._shared.withdraw(self._pending_reason)

    async def record_outcome(self, outcome: str) -> None:
        """
        Give the pending request its outcome.
        """
        await asyncio.to_thread(self.ledger.settle, outcome)
        if self._shared is not None:
            await self._shared.settle(outcome)

    async def read_fleet_spend(self) -> None:
        """
        In fleet mode, read the fleet's spend afresh before a judgement.
        """
        if self._shared is not None:
            await self._shared.read()

    def _is_expiring(self, token: Token, now: float) -> bool:
        return token.remaining_seconds(now) <= self._expiring_margin(token)

    def _expiring_margin(self, token: Token) -> float:
        # "About to expire": within twice the least life a served token
        # must have, so the renewal still lands before serving stops.
        return 2 * self._refresh.min_ttl_for(token)

    def _report(self, verdict: Verdict) -> None:
        if verdict.state == self._state:
            return
        self._state = verdict.state
        for state in QUOTA_STATES:
            self._metrics.quota_state.labels(state=state).set(
                1 if state == verdict.state else 0
            )
        if verdict.state == "ok":
            log.info("quota.state_changed", state="ok", detail=verdict.message)
        else:
            log.warning(
                "quota.state_changed",
                state=verdict.state,
                detail=verdict.message,
            )
