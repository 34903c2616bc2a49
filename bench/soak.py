"""
Soak: short-lived tokens refreshed over and over while clients poll.

The sidecar runs as its own process against the scripted IdP. Every
answer is checked against the IdP's record (no expired or empty token,
ever); resident memory and open descriptors are sampled each second and
must stay flat; the IdP's request count and spacing must match the
refresh policy.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import statistics
import time
from dataclasses import dataclass, field

import aiohttp

from bench.poll import Tally, Verdict, judge, poll
from bench.procs import start_idp, start_sidecar

#: The refresher's default jitter (sidecar.token.RefreshPolicy).
JITTER = 0.02

#: Slack for the gap between two IdP requests: each one's arrival lags
#: its sending by a moment, which can shorten a gap by that much.
ARRIVAL_SLACK_SECONDS = 0.05


@dataclass
class Sample:
    """
    One reading of the sidecar: seconds since the start, memory, fds.
    """

    at_seconds: float
    rss_bytes: int
    open_fds: int


@dataclass
class SoakResult:
    """
    What a soak measured, and whether it held.
    """

    duration_seconds: float
    lifetime_seconds: float
    refresh_at: float
    clients: int
    tally: Tally
    verdict: Verdict
    idp_requests: int
    expected_requests: tuple[int, int]
    shortest_gap_seconds: float
    least_gap_allowed_seconds: float
    samples: list[Sample] = field(default_factory=list)
    rss_growth_limit_bytes: int = 4 * 1024 * 1024

    @property
    def rss_growth_bytes(self) -> int:
        """
        Median memory of the last quarter less that of the second
        quarter (the first is warm-up).
        """
        return _growth([s.rss_bytes for s in self.samples])

    @property
    def fd_growth(self) -> int:
        """
        Open descriptors: the same measure as `rss_growth_bytes`.
        """
        return _growth([s.open_fds for s in self.samples])

    @property
    def problems(self) -> list[str]:
        """
        Every way the soak failed; empty when it held.
        """
        problems = list(self.verdict.violations)
        if self.tally.unusable:
            problems.append(f"{self.tally.unusable} 200 answers held no token")
        _low, high = self.expected_requests
        if self.idp_requests > high:
            problems.append(
                f"{self.idp_requests} IdP requests, more than the policy's "
                f"{high}"
            )
        if self.shortest_gap_seconds < self.least_gap_allowed_seconds:
            problems.append(
                f"two IdP requests {self.shortest_gap_seconds:.3f} s apart, "
                f"under the policy's {self.least_gap_allowed_seconds:.3f} s"
            )
        if self.rss_growth_bytes > self.rss_growth_limit_bytes:
            problems.append(
                f"resident memory grew {self.rss_growth_bytes / 2**20:.1f} MiB"
            )
        if self.fd_growth > 2:
            problems.append(f"open descriptors grew by {self.fd_growth}")

        return problems


def _growth(values: list[int]) -> int:
    if len(values) < 4:
        return 0
    quarter = len(values) // 4
    early = statistics.median(values[quarter : 2 * quarter])
    late = statistics.median(values[-quarter:])

    return int(late - early)


def expected_requests(
    duration_seconds: float, lifetime_seconds: float, refresh_at: float
) -> tuple[int, int]:
    """
    The fewest and most IdP requests the refresh policy makes in the
    duration: one at the start, then one each ``refresh_at`` (less up to
    the jitter) of a lifetime.
    """
    longest = lifetime_seconds * refresh_at
    shortest = lifetime_seconds * (refresh_at - JITTER)

    return (
        math.floor(duration_seconds / longest),
        1 + math.ceil(duration_seconds / shortest),
    )


async def soak(
    duration_seconds: float = 600.0,
    lifetime_seconds: float = 2.0,
    refresh_at: float = 0.25,
    clients: int = 16,
    loop: str = "asyncio",
    server_cores: set[int] | None = None,
    load_cores: set[int] | None = None,
    pause_seconds: float = 0.002,
) -> SoakResult:
    """
    Run a soak and return what it measured.
    """
    idp = await start_idp(lifetime_seconds, cores=load_cores)
    sidecar = await start_sidecar(
        idp,
        loop,
        server_cores,
        {"refresh": {"refresh_at": refresh_at}},
    )
    tally = Tally()
    samples: list[Sample] = []
    stop = asyncio.Event()
    try:
        async with aiohttp.ClientSession() as session:
            await sidecar.wait_ready(session)
        started = time.monotonic()
        pollers = asyncio.create_task(
            poll(sidecar.token_port, clients, stop, tally, pause_seconds)
        )
        while (elapsed := time.monotonic() - started) < duration_seconds:
            samples.append(
                Sample(
                    elapsed,
                    sidecar.child.rss_bytes(),
                    sidecar.child.open_fds(),
                )
            )
            # The sampling pace, not a wait for something to happen.
            await asyncio.sleep(min(1.0, duration_seconds - elapsed))
        stop.set()
        await pollers
        active = time.monotonic() - started
        records = (await idp.stats())["records"]
    finally:
        await sidecar.child.stop()
        await idp.child.stop()

    arrivals = [r["arrived_at"] for r in records]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    least_gap = lifetime_seconds * (refresh_at - JITTER)

    return SoakResult(
        duration_seconds=active,
        lifetime_seconds=lifetime_seconds,
        refresh_at=refresh_at,
        clients=clients,
        tally=tally,
        verdict=judge(tally, records),
        idp_requests=len(records),
        expected_requests=expected_requests(
            active, lifetime_seconds, refresh_at
        ),
        shortest_gap_seconds=min(gaps, default=math.inf),
        least_gap_allowed_seconds=least_gap - ARRIVAL_SLACK_SECONDS,
        samples=samples,
    )
