"""
The soak, run as the bench runs it: the sidecar and the scripted IdP in
processes of their own, short-lived tokens refreshed over and over while
clients poll. CI runs it for seconds; ``--soak`` for ten minutes.
"""

from __future__ import annotations

import pytest

from bench.soak import soak

#: Long enough for a few dozen refreshes and a dozen memory samples.
SHORT_SOAK_SECONDS = 15.0
LONG_SOAK_SECONDS = 600.0


async def test_short_soak_keeps_every_promise() -> None:
    """
    Over a short soak no answer carries an expired or empty token, the
    IdP is asked no more often than the refresh policy allows, and
    memory and descriptors stay flat.
    """
    result = await soak(duration_seconds=SHORT_SOAK_SECONDS, clients=8)

    assert result.problems == []
    assert result.tally.by_status[200] == result.tally.answers
    assert result.idp_requests >= 2
    assert len(result.tally.tokens) >= 2


@pytest.mark.soak
async def test_long_soak(request: pytest.FixtureRequest) -> None:
    """
    The same over ten minutes: over a thousand refreshes.
    """
    if not request.config.getoption("--soak"):
        pytest.skip("soak test; run with --soak")

    result = await soak(duration_seconds=LONG_SOAK_SECONDS)

    assert result.problems == []
    assert result.idp_requests >= 1000
