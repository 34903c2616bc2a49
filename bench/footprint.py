"""
Start-to-ready time: from starting ``python -m sidecar run`` to the
first 200 from ``/readyz``, with the IdP's own answer time taken apart.
"""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import dataclass

import aiohttp

from bench.procs import IdP, prime_bytecode, start_sidecar


@dataclass(frozen=True, slots=True)
class Start:
    """
    One start: to ready in all, and the IdP's answer time within it.
    """

    ready_seconds: float
    idp_answer_seconds: float
    idle_rss_bytes: int

    @property
    def own_seconds(self) -> float:
        """
        The sidecar's own part: to ready, less the IdP's answer time.
        """
        return self.ready_seconds - self.idp_answer_seconds


@dataclass(frozen=True, slots=True)
class StartReport:
    """
    Several starts, summed up by their median and worst.
    """

    loop: str
    starts: list[Start]

    @property
    def median_own_seconds(self) -> float:
        """
        The median of the sidecar's own part of the start.
        """
        return statistics.median(s.own_seconds for s in self.starts)

    @property
    def worst_own_seconds(self) -> float:
        """
        The slowest of the sidecar's own part of the start.
        """
        return max(s.own_seconds for s in self.starts)

    @property
    def median_ready_seconds(self) -> float:
        """
        The median time to ready, all in.
        """
        return statistics.median(s.ready_seconds for s in self.starts)

    @property
    def median_idp_seconds(self) -> float:
        """
        The median IdP answer time.
        """
        return statistics.median(s.idp_answer_seconds for s in self.starts)


async def measure_starts(
    idp: IdP, loop: str, count: int, cores: set[int] | None
) -> StartReport:
    """
    Start a fresh sidecar ``count`` times, one after the other, each
    with its own state directory (so none starts warm); one unmeasured
    start first, so that the files it reads are in the page cache.
    """
    await prime_bytecode(loop)
    starts = []
    for number in range(count + 1):
        base = await idp.count()
        sidecar = await start_sidecar(idp, loop, cores)
        try:
            async with aiohttp.ClientSession() as session:
                ready = await sidecar.wait_ready(session)
            records = (await idp.stats(since=base))["records"]
            answer = records[0]["answered_at"] - records[0]["arrived_at"]
            # A moment for start-up garbage to go, then the footprint.
            await asyncio.sleep(0.5)
            if number:
                starts.append(Start(ready, answer, sidecar.child.rss_bytes()))
        finally:
            await sidecar.child.stop()

    return StartReport(loop, starts)
