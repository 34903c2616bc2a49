"""
Auth0's quota headers, parsed and exported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.clock import SystemClock
from sidecar.config import Settings
from sidecar.errors import IdPUnavailableError
from sidecar.idpquota import QuotaBucket, quota_buckets
from sidecar.metrics import Metrics
from sidecar.source import ClientCredentialsSource
from tests.fakes import FakeIdP, Reply, token_reply


def _headers(**values: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(
        CIMultiDict({k.replace("_", "-"): v for k, v in values.items()})
    )


def test_both_scopes_and_buckets_are_read() -> None:
    """
    Client and organization headers give one bucket per window.
    """
    headers = _headers(
        Auth0_Client_Quota_Limit=(
            "b=per_hour;q=100;r=99;t=1200,b=per_day;q=1000;r=900;t=40000"
        ),
        Auth0_Organization_Quota_Limit="b=per_day;q=5000;r=10;t=3600",
    )

    buckets = quota_buckets(headers)

    assert buckets == [
        QuotaBucket("client", "per_hour", 100, 99, 1200),
        QuotaBucket("client", "per_day", 1000, 900, 40000),
        QuotaBucket("organization", "per_day", 5000, 10, 3600),
    ]


@pytest.mark.parametrize(
    "value",
    [
        "b=per_hour;q=x;r=1;t=1",
        "b=per_week;q=1;r=1;t=1",
        "q=1;r=1;t=1",
        "b=per_hour;q=-1;r=1;t=1",
        "b=per_hour;q=\uff11;r=1;t=1",
        "",
    ],
    ids=[
        "not-a-number",
        "unknown-bucket",
        "no-bucket",
        "negative",
        "non-ascii-digit",
        "empty",
    ],
)
def test_malformed_buckets_are_skipped(value: str) -> None:
    """
    A bucket that is not well formed, or of an unknown window, is left
    out, so metric labels stay bounded.
    """
    assert quota_buckets(_headers(Auth0_Client_Quota_Limit=value)) == []


@given(st.text())
def test_any_header_value_parses_without_raising(value: str) -> None:
    """
    Whatever the IdP sends, parsing never raises.
    """
    quota_buckets(_headers(Auth0_Client_Quota_Limit=value))


@pytest.mark.parametrize(
    "reply",
    [
        token_reply(),
        Reply(status=429, body={"error": "too_many_requests"}),
    ],
    ids=["success", "429"],
)
async def test_source_reports_quota_headers_to_metrics(
    reply: Reply,
    fake_idp: FakeIdP,
    make_settings: Callable[..., Settings],
) -> None:
    """
    Quota headers on a success or a 429 reach the quota gauges.
    """
    reply.headers["Auth0-Client-Quota-Limit"] = "b=per_day;q=1000;r=7;t=60"
    fake_idp.then(reply)
    metrics = Metrics()
    settings = make_settings()

    async with aiohttp.ClientSession() as session:
        source = ClientCredentialsSource(
            settings.idp,
            session,
            SystemClock(),
            on_quota=metrics.observe_idp_quota,
        )
        with contextlib.suppress(IdPUnavailableError):
            await source.fetch()

    labels = {"scope": "client", "bucket": "per_day"}
    assert metrics.idp_quota_remaining.labels(**labels)._value.get() == 7
    assert metrics.idp_quota_limit.labels(**labels)._value.get() == 1000
