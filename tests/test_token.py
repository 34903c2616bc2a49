"""
Tests for sidecar.token: the Token value object and the refresh arithmetic.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sidecar.token import RefreshPolicy, Token

ISSUED_AT = 1_800_000_000.0
YEAR_SECONDS = 366 * 24 * 3600
SECRET_VALUE = "eyJhbGciOi.secret-access-token.value"

lifetimes = st.floats(min_value=1.0, max_value=YEAR_SECONDS)
issue_times = st.floats(min_value=0.0, max_value=4e9)
draws = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)
refresh_fractions = st.floats(min_value=0.5, max_value=0.95, exclude_min=True)
jitters = st.floats(min_value=0.0, max_value=0.1)
min_ttls = st.floats(min_value=0.0, max_value=3600.0)


def token_of(lifetime_seconds: float, issued_at: float = ISSUED_AT) -> Token:
    """
    A token issued at ``issued_at`` living ``lifetime_seconds``.
    """
    return Token(
        access_token=SECRET_VALUE,
        issued_at=issued_at,
        expires_at=issued_at + lifetime_seconds,
    )


@st.composite
def policies(draw: st.DrawFn) -> RefreshPolicy:
    """
    Refresh policies within the ranges the sidecar is meant for.
    """
    return RefreshPolicy(
        refresh_at=draw(refresh_fractions),
        jitter=draw(jitters),
        min_ttl_seconds=draw(min_ttls),
    )


class TestToken:
    """
    Token carries the token and its window, and keeps the value hidden.
    """

    def test_repr_hides_the_token(self) -> None:
        """
        repr() and str() show the window but never the token itself.
        """
        token = token_of(3600)

        shown = repr(token) + str(token)

        assert SECRET_VALUE not in shown
        assert "secret-access-token" not in shown
        assert "expires_at" in shown

    def test_fingerprint_is_short_and_stable(self) -> None:
        """
        Equal tokens share a 12-hex-digit fingerprint, whatever their window.
        """
        first = token_of(3600)
        second = token_of(60, issued_at=ISSUED_AT + 5000)

        fingerprint = first.fingerprint

        assert fingerprint == second.fingerprint
        assert len(fingerprint) == 12
        assert set(fingerprint) <= set("0123456789abcdef")
        assert fingerprint not in SECRET_VALUE

    def test_fingerprint_is_pinned(self) -> None:
        """
        The fingerprint is the SHA-256 prefix, so it matches across runs.
        """
        token = Token(access_token="abc", issued_at=0.0, expires_at=1.0)

        fingerprint = token.fingerprint

        assert fingerprint == "ba7816bf8f01"

    @given(a=st.text(min_size=1), b=st.text(min_size=1))
    def test_different_tokens_have_different_fingerprints(
        self, a: str, b: str
    ) -> None:
        """
        Distinct tokens get distinct fingerprints (48 bits make clashes rare).
        """
        first = Token(access_token=a, issued_at=0.0, expires_at=1.0)
        second = Token(access_token=b, issued_at=0.0, expires_at=1.0)

        same = first.fingerprint == second.fingerprint

        assert same == (a == b)

    def test_lifetime_and_remaining(self) -> None:
        """
        lifetime_seconds spans the window; remaining_seconds counts down.
        """
        token = token_of(600)

        remaining = token.remaining_seconds(ISSUED_AT + 650)

        assert token.lifetime_seconds == 600
        assert token.remaining_seconds(ISSUED_AT + 100) == 500
        assert remaining == -50

    def test_is_frozen(self) -> None:
        """
        A Token cannot be changed once made.
        """
        token = token_of(600)

        with pytest.raises(dataclasses.FrozenInstanceError):
            token.expires_at = 0.0  # type: ignore[misc]


class TestRefreshPolicy:
    """
    The refresh point falls inside the window and leaves time to serve.
    """

    def test_defaults(self) -> None:
        """
        The default policy refreshes at 90 % with 2 % jitter and 30 s TTL.
        """
        policy = RefreshPolicy()

        values = (policy.refresh_at, policy.jitter, policy.min_ttl_seconds)

        assert values == (0.9, 0.02, 30.0)

    @given(
        lifetime=lifetimes,
        issued_at=issue_times,
        draw=draws,
        policy=policies(),
    )
    @example(
        lifetime=1.0,
        issued_at=4e9,
        draw=0.0,
        policy=RefreshPolicy(0.95, 0.0, 3600.0),
    )
    @example(
        lifetime=1.0,
        issued_at=0.0,
        draw=0.9999999999999999,
        policy=RefreshPolicy(0.5000000000000001, 0.1, 0.0),
    )
    @example(
        lifetime=float(YEAR_SECONDS),
        issued_at=ISSUED_AT,
        draw=0.0,
        policy=RefreshPolicy(0.95, 0.1, 30.0),
    )
    def test_refresh_falls_after_issue_and_before_the_min_ttl(
        self,
        lifetime: float,
        issued_at: float,
        draw: float,
        policy: RefreshPolicy,
    ) -> None:
        """
        refresh_due_at lies after issue and before expiry less the min TTL.
        """
        token = token_of(lifetime, issued_at)

        due_at = policy.refresh_due_at(token, draw)

        assert token.issued_at < due_at
        assert due_at < token.expires_at - policy.min_ttl_for(token)

    @given(lifetime=lifetimes, issued_at=issue_times, policy=policies())
    def test_fresh_token_is_servable(
        self, lifetime: float, issued_at: float, policy: RefreshPolicy
    ) -> None:
        """
        A token is servable the moment it is issued, however short-lived.
        """
        token = token_of(lifetime, issued_at)

        servable = policy.is_servable(token, issued_at)

        assert servable

    @given(
        lifetime=lifetimes,
        issued_at=issue_times,
        draw=draws,
        policy=policies(),
    )
    def test_token_is_still_servable_when_its_refresh_starts(
        self,
        lifetime: float,
        issued_at: float,
        draw: float,
        policy: RefreshPolicy,
    ) -> None:
        """
        While its successor is fetched, the old token is still served.
        """
        token = token_of(lifetime, issued_at)
        due_at = policy.refresh_due_at(token, draw)

        servable = policy.is_servable(token, due_at)

        assert servable

    @given(lifetime=lifetimes, draw=draws)
    @example(lifetime=1.0, draw=0.9999999999999999)
    @example(lifetime=float(YEAR_SECONDS), draw=0.9999999999999999)
    def test_default_policy_costs_at_most_1_15_requests_per_lifetime(
        self, lifetime: float, draw: float
    ) -> None:
        """
        With the defaults a token is used for at least 1/1.15 of its life.
        """
        policy = RefreshPolicy()
        token = token_of(lifetime)

        used_seconds = policy.refresh_due_at(token, draw) - token.issued_at

        cost = token.lifetime_seconds / used_seconds
        assert cost <= 1.15
        # Epoch seconds near 1.8e9 carry about 2e-7 s of rounding.
        assert cost <= 1 / (0.9 - 0.02) + 1e-6

    def test_jitter_moves_the_refresh_earlier(self) -> None:
        """
        Draw 0 refreshes at refresh_at; a higher draw refreshes earlier.
        """
        policy = RefreshPolicy(refresh_at=0.9, jitter=0.1)
        token = token_of(1000)

        at_zero = policy.refresh_due_at(token, 0.0)
        at_half = policy.refresh_due_at(token, 0.5)

        assert at_zero == pytest.approx(ISSUED_AT + 900)
        assert at_half == pytest.approx(ISSUED_AT + 850)

    @pytest.mark.parametrize(
        ("lifetime", "expected"),
        [
            pytest.param(86400, 30.0, id="day"),
            pytest.param(3600, 30.0, id="hour"),
            pytest.param(600, 30.0, id="ten-minutes-at-the-cap"),
            pytest.param(300, 15.0, id="five-minutes"),
            pytest.param(60, 3.0, id="minute"),
            pytest.param(10, 0.5, id="ten-seconds"),
            pytest.param(1, 0.05, id="second"),
        ],
    )
    def test_min_ttl_scales_down_for_short_tokens(
        self, lifetime: float, expected: float
    ) -> None:
        """
        The minimum TTL is the configured one, or half the refresh slack.
        """
        policy = RefreshPolicy(refresh_at=0.9, min_ttl_seconds=30)
        token = token_of(lifetime)

        min_ttl = policy.min_ttl_for(token)

        assert min_ttl == pytest.approx(expected)

    @given(lifetime=lifetimes, policy=policies())
    def test_min_ttl_never_exceeds_the_setting_or_the_slack(
        self, lifetime: float, policy: RefreshPolicy
    ) -> None:
        """
        The minimum TTL is at most the setting and half the refresh slack.
        """
        token = token_of(lifetime)

        min_ttl = policy.min_ttl_for(token)

        slack = token.lifetime_seconds * (1 - policy.refresh_at)
        assert 0 <= min_ttl <= policy.min_ttl_seconds
        assert min_ttl <= slack / 2

    def test_servable_until_the_min_ttl(self) -> None:
        """
        A token is served with exactly min TTL left and not a moment less.
        """
        policy = RefreshPolicy(min_ttl_seconds=30)
        token = token_of(3600)

        at_limit = policy.is_servable(token, token.expires_at - 30)
        past_limit = policy.is_servable(token, token.expires_at - 29.999)

        assert at_limit
        assert not past_limit

    def test_expired_token_is_not_servable(self) -> None:
        """
        A token past its expiry is never servable, even with no min TTL.
        """
        policy = RefreshPolicy(min_ttl_seconds=0)
        token = token_of(3600)

        servable = policy.is_servable(token, token.expires_at + 1)

        assert not servable
