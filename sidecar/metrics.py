"""
Prometheus metrics, on a registry that each sidecar instance owns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from sidecar import __version__
from sidecar.idpquota import QuotaBucket
from sidecar.ledger import QuotaLedger
from sidecar.listener import ConnectionStats

#: Outcomes of one token request to the IdP.
IDP_OUTCOMES = ("success", "unavailable", "rejected", "bad_response")


class Metrics:
    """
    Every metric the sidecar exports, registered on ``registry``.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.idp_requests = Counter(
            "sidecar_idp_requests",
            "Token requests sent to the IdP, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.idp_request_duration = Histogram(
            "sidecar_idp_request_duration_seconds",
            "Time from sending a token request to its outcome.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.token_expiry = Gauge(
            "sidecar_token_expiry_timestamp_seconds",
            "When the held token expires (0 while none is held).",
            registry=self.registry,
        )
        self.next_refresh = Gauge(
            "sidecar_token_next_refresh_timestamp_seconds",
            "When the next token request is due.",
            registry=self.registry,
        )
        self.consecutive_failures = Gauge(
            "sidecar_idp_consecutive_failures",
            "Failed token requests since the last success.",
            registry=self.registry,
        )
        # Counted on every /token answer, so kept as plain integers.
        self.token_responses = _LabelCounts(
            "sidecar_token_responses",
            "Answers of the /token endpoint, by HTTP status.",
            "status",
        )
        self.token_handouts = _LabelCounts(
            "sidecar_token_handouts",
            "Tokens handed out, by caller uid ('other': not in the "
            "allowlist, admitted by client token).",
            "uid",
        )
        self.token_refusals = _LabelCounts(
            "sidecar_token_refusals",
            "Requests for the token refused, by reason.",
            "reason",
        )
        for counts in (
            self.token_responses,
            self.token_handouts,
            self.token_refusals,
        ):
            self.registry.register(counts)
        self.token_waiters = Gauge(
            "sidecar_token_waiters",
            "Callers of /token waiting for a token request to end.",
            registry=self.registry,
        )
        self._connections = _ConnectionCollector()
        self.registry.register(self._connections)
        self.idp_quota_limit = Gauge(
            "sidecar_idp_quota_limit",
            "The IdP's token quota per window (Auth0 quota headers).",
            ["scope", "bucket"],
            registry=self.registry,
        )
        self.idp_quota_remaining = Gauge(
            "sidecar_idp_quota_remaining",
            "Tokens the IdP says are left in the window.",
            ["scope", "bucket"],
            registry=self.registry,
        )
        self.idp_quota_reset = Gauge(
            "sidecar_idp_quota_reset_timestamp_seconds",
            "When the IdP's quota window resets.",
            ["scope", "bucket"],
            registry=self.registry,
        )
        self.quota_state = Gauge(
            "sidecar_quota_state",
            "1 for the budget state the sidecar is in: ok, warning, "
            "over_budget (renewing only at expiry), stopped (hard stop).",
            ["state"],
            registry=self.registry,
        )
        self.build = Info(
            "sidecar_build",
            "The running token-sidecar version.",
            registry=self.registry,
        )
        self.build.info({"version": __version__})
        for outcome in IDP_OUTCOMES:
            self.idp_requests.labels(outcome=outcome)

    def count_token_response(self, status: int) -> None:
        """
        Count one ``/token`` answer of HTTP ``status``.
        """
        self.token_responses.inc(str(status))

    def count_hand_out(self, uid_label: str) -> None:
        """
        Count one token handed out to the caller labelled ``uid_label``.
        """
        self.token_handouts.inc(uid_label)

    def count_refusal(self, reason: str) -> None:
        """
        Count one request refused for ``reason``.
        """
        self.token_refusals.inc(reason)

    def watch_waiters(self, count: Callable[[], int]) -> None:
        """
        Export ``count()``, the callers waiting for a token request, at
        scrape time.
        """
        self.token_waiters.set_function(count)

    def observe_idp_quota(self, buckets: list[QuotaBucket]) -> None:
        """
        Export the quota the IdP reported on its last answer.
        """
        now = time.time()
        for bucket in buckets:
            labels = {"scope": bucket.scope, "bucket": bucket.bucket}
            self.idp_quota_limit.labels(**labels).set(bucket.quota)
            self.idp_quota_remaining.labels(**labels).set(bucket.remaining)
            self.idp_quota_reset.labels(**labels).set(
                now + bucket.reset_after_seconds
            )

    def watch_quota(
        self, ledger: QuotaLedger, monthly_budget: int | None
    ) -> None:
        """
        Export this month's token requests from ``ledger`` at scrape time.
        """
        self.registry.register(_QuotaCollector(ledger, monthly_budget))

    def watch_connections(self, listener: str, stats: ConnectionStats) -> None:
        """
        Export a listener's connection counts under ``listener``.
        """
        self._connections.listeners[listener] = stats


class _LabelCounts(Collector):
    """
    A counter with one label, kept as plain integers and exported at
    scrape time.

    For counts taken on every ``/token`` answer: a prometheus_client
    child takes a lock on each increment, and finding it by label builds
    a key, which together cost more than rendering the answer. The label
    values come from small sets (statuses, configured uids, refusal
    reasons), and the loop thread both counts and serves the scrape.
    """

    def __init__(self, name: str, documentation: str, label: str) -> None:
        self._name = name
        self._documentation = documentation
        self._label = label
        self.counts: dict[str, int] = {}

    def inc(self, value: str) -> None:
        """
        Add one to the count labelled ``value``.
        """
        self.counts[value] = self.counts.get(value, 0) + 1

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            self._name, self._documentation, labels=[self._label]
        )
        for value, count in sorted(self.counts.items()):
            family.add_metric([value], count)

        yield family


class _QuotaCollector(Collector):
    """
    Reads this month's spend from the ledger at scrape time.
    """

    def __init__(
        self, ledger: QuotaLedger, monthly_budget: int | None
    ) -> None:
        self._ledger = ledger
        self._budget = monthly_budget

    def collect(self) -> Iterator[Metric]:
        spend = self._ledger.month_spend()
        requests = GaugeMetricFamily(
            "sidecar_quota_month_requests",
            "Token requests sent to the IdP this calendar month (UTC), by "
            "reason and outcome.",
            labels=["reason", "outcome"],
        )
        counts: dict[tuple[str, str], int] = {}
        for entry in self._ledger.entries():
            if spend.month_start <= entry.at < spend.month_end:
                key = (entry.reason, entry.outcome)
                counts[key] = counts.get(key, 0) + 1
        for (reason, outcome), count in sorted(counts.items()):
            requests.add_metric([reason, outcome], count)
        yield requests
        yield GaugeMetricFamily(
            "sidecar_quota_month_projected_requests",
            "This month's token requests projected to the month's end.",
            value=spend.projected,
        )
        if self._budget is not None:
            yield GaugeMetricFamily(
                "sidecar_quota_monthly_budget",
                "The configured monthly budget of token requests.",
                value=self._budget,
            )


class _ConnectionCollector(Collector):
    """
    Reads the listeners' connection counts at scrape time.
    """

    def __init__(self) -> None:
        self.listeners: dict[str, ConnectionStats] = {}

    def collect(self) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "sidecar_connections_active",
            "Open connections, by listener.",
            labels=["listener"],
        )
        refused = CounterMetricFamily(
            "sidecar_connections_refused",
            "Connections closed at once for exceeding "
            "listen.max_connections, by listener.",
            labels=["listener"],
        )
        timed_out = CounterMetricFamily(
            "sidecar_connections_timed_out",
            "Connections closed for sending a request head too slowly, "
            "by listener.",
            labels=["listener"],
        )
        for name, stats in self.listeners.items():
            active.add_metric([name], stats.active)
            refused.add_metric([name], stats.refused)
            timed_out.add_metric([name], stats.timed_out)

        yield from (active, refused, timed_out)
