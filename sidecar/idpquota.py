"""
The IdP's own word on its token quota: Auth0's quota headers.

Auth0 sends ``Auth0-Client-Quota-Limit`` and
``Auth0-Organization-Quota-Limit`` on token answers (successes and 429s):
comma-separated buckets, each ``b=<bucket>;q=<quota>;r=<remaining>;
t=<seconds until reset>``.
"""

from __future__ import annotations

from dataclasses import dataclass

from multidict import CIMultiDictProxy

#: Header name per quota scope.
QUOTA_HEADERS = {
    "client": "Auth0-Client-Quota-Limit",
    "organization": "Auth0-Organization-Quota-Limit",
}

#: Buckets exported as metric labels; others are ignored, so the label
#: set stays bounded whatever the IdP sends.
KNOWN_BUCKETS = frozenset({"per_hour", "per_day", "per_month"})


@dataclass(frozen=True, slots=True)
class QuotaBucket:
    """
    One quota window as the IdP reports it.
    """

    scope: str
    bucket: str
    quota: int
    remaining: int
    reset_after_seconds: int


def quota_buckets(headers: CIMultiDictProxy[str]) -> list[QuotaBucket]:
    """
    Every well-formed bucket of known name in the quota headers.

    Malformed parts are skipped; this never raises.
    """
    buckets = []
    for scope, name in QUOTA_HEADERS.items():
        for value in headers.getall(name, ()):
            buckets.extend(_parse(scope, value))

    return buckets


def _parse(scope: str, value: str) -> list[QuotaBucket]:
    buckets = []
    for part in value.split(",")[:8]:
        fields = {}
        for attribute in part.split(";"):
            key, _, number = attribute.strip().partition("=")
            fields[key] = number.strip()
        bucket = fields.get("b", "")
        numbers = [fields.get(key, "") for key in ("q", "r", "t")]
        if bucket not in KNOWN_BUCKETS or not all(
            n.isascii() and n.isdigit() and len(n) < 16 for n in numbers
        ):
            continue
        quota, remaining, reset_after = (int(n) for n in numbers)
        buckets.append(
            QuotaBucket(scope, bucket, quota, remaining, reset_after)
        )

    return buckets
