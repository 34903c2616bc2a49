"""
Prometheus metrics, on a registry that each sidecar instance owns.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
)

from sidecar import __version__

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
        self.token_responses = Counter(
            "sidecar_token_responses",
            "Answers of the /token endpoint, by HTTP status.",
            ["status"],
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
