"""
Throughput and latency of ``/token`` against two ceilings, side by side
in one run: a bare aiohttp handler returning the same bytes on the same
event loop (the ceiling for any aiohttp server), and nginx with one
worker serving them as a static file (the ceiling for one core).

Every server runs pinned to one core and the load to the others; the
targets take turns at each connection count, so drifting load from
elsewhere on the machine hits them alike. Besides requests per second
and latency, each run reports the server's CPU time per request, which
other work on the machine disturbs far less.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.load import LoadResult, load_tool, run_load
from bench.procs import (
    ROOT,
    Child,
    Server,
    Sidecar,
    prime_bytecode,
    server_and_load_cores,
    start_bare,
    start_idp,
    start_nginx,
    start_sidecar,
)


@dataclass(frozen=True, slots=True)
class Run:
    """
    One load run against one target.
    """

    target: str
    loop: str
    load: LoadResult
    server_cpu_us_per_request: float


@dataclass(frozen=True, slots=True)
class Memory:
    """
    A sidecar's resident memory idle, at its peak under load, and after.
    """

    target: str
    loop: str
    idle_bytes: int
    peak_bytes: int
    after_bytes: int


@dataclass
class ThroughputReport:
    """
    Every run, and the sidecars' memory.
    """

    tool: str
    server_cores: set[int] | None
    load_cores: set[int] | None
    duration_seconds: float
    repeat: int
    connections: list[int]
    loops: list[str]
    has_nginx: bool
    has_baseline: bool
    runs: list[Run] = field(default_factory=list)
    memory: list[Memory] = field(default_factory=list)

    def median(self, target: str, loop: str, connections: int) -> Run | None:
        """
        Of the repeats, the run with the median requests per second.
        """
        runs = sorted(
            (
                run
                for run in self.runs
                if (run.target, run.loop, run.load.connections)
                == (target, loop, connections)
            ),
            key=lambda run: run.load.requests_per_second,
        )

        return runs[(len(runs) - 1) // 2] if runs else None


async def measure_throughput(
    loops: list[str],
    connections: list[int],
    duration_seconds: float = 5.0,
    warmup_seconds: float = 1.0,
    repeat: int = 3,
    tool: str | None = None,
    baseline: Path | None = None,
) -> ThroughputReport:
    """
    Run the matrix: each target at each connection count, ``repeat``
    times, taking turns. With ``baseline``, another source tree's
    sidecar runs beside this one's, as target ``baseline``.
    """
    server_cores, load_cores = server_and_load_cores()
    tool = tool or load_tool()
    async with contextlib.AsyncExitStack() as stack:
        idp = await start_idp(3600, cores=load_cores)
        stack.push_async_callback(idp.child.stop)
        sidecars: dict[tuple[str, str], Sidecar] = {}
        roots = {"sidecar": ROOT}
        if baseline is not None:
            roots["baseline"] = baseline
        async with aiohttp.ClientSession() as session:
            for loop in loops:
                await prime_bytecode(loop)
                for name, root in roots.items():
                    sidecar = await start_sidecar(
                        idp, loop, server_cores, root=root
                    )
                    stack.push_async_callback(sidecar.child.stop)
                    await sidecar.wait_ready(session)
                    sidecars[name, loop] = sidecar
            body = await _token_body(session, sidecars["sidecar", loops[0]])
        targets: list[tuple[str, str, str, Child]] = []
        for loop in loops:
            bare = await start_bare(body, loop, server_cores)
            stack.push_async_callback(bare.child.stop)
            for name in roots:
                sidecar = sidecars[name, loop]
                targets.append((name, loop, sidecar.token_url, sidecar.child))
            targets.append(("bare", loop, bare.token_url, bare.child))
        nginx = await _nginx_if_installed(body, server_cores)
        if nginx is not None:
            stack.push_async_callback(nginx.child.stop)
            targets.append(("nginx", "-", nginx.token_url, nginx.child))

        report = ThroughputReport(
            tool,
            server_cores,
            load_cores,
            duration_seconds,
            repeat,
            connections,
            loops,
            nginx is not None,
            baseline is not None,
        )
        # Settled after start-up, before any load: the idle footprint.
        await asyncio.sleep(1.0)
        idle: dict[tuple[str, str], int] = {
            key: sidecar.child.rss_bytes() for key, sidecar in sidecars.items()
        }
        peak = dict(idle)
        for count in connections:
            for _ in range(repeat):
                for target, loop, url, child in targets:
                    if warmup_seconds:
                        await run_load(url, count, warmup_seconds, load_cores)
                    run, rss = await _measured(
                        target,
                        loop,
                        url,
                        child,
                        count,
                        duration_seconds,
                        load_cores,
                        tool,
                    )
                    report.runs.append(run)
                    if (target, loop) in peak:
                        peak[target, loop] = max(peak[target, loop], rss)
        async with aiohttp.ClientSession() as session:
            for sidecar in sidecars.values():
                await _until_idle(session, sidecar)
        await asyncio.sleep(1.0)
        for (name, loop), sidecar in sidecars.items():
            report.memory.append(
                Memory(
                    name,
                    loop,
                    idle[name, loop],
                    peak[name, loop],
                    sidecar.child.rss_bytes(),
                )
            )

    return report


async def _measured(
    target: str,
    loop: str,
    url: str,
    child: Child,
    connections: int,
    duration_seconds: float,
    load_cores: set[int] | None,
    tool: str,
) -> tuple[Run, int]:
    # One run, with the server's CPU time and its peak resident memory.
    peak = child.rss_bytes()
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, child.rss_bytes())
            # The sampling pace, not a wait for something to happen.
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    cpu_before = child.cpu_seconds()
    try:
        result = await run_load(
            url, connections, duration_seconds, load_cores, tool
        )
    finally:
        done.set()
        await sampler
    cpu = child.cpu_seconds() - cpu_before
    per_request = cpu / result.requests * 1e6 if result.requests else 0.0

    return Run(target, loop, result, per_request), peak


async def _token_body(
    session: aiohttp.ClientSession, sidecar: Sidecar
) -> bytes:
    # The sidecar's own answer, so the ceilings serve the same bytes.
    async with session.get(
        sidecar.token_url, headers={"Metadata": "true"}
    ) as response:
        response.raise_for_status()
        return await response.read()


async def _nginx_if_installed(
    body: bytes, cores: set[int] | None
) -> Server | None:
    try:
        return await start_nginx(body, cores)
    except FileNotFoundError:
        return None


async def _until_idle(
    session: aiohttp.ClientSession, sidecar: Sidecar
) -> None:
    # The load's connections have closed once the sidecar counts none.
    name = 'sidecar_connections_active{listener="token"}'
    for _ in range(500):
        if await sidecar.metric(session, name) == 0:
            return
        # Polling a condition against a deadline, not timing a wait.
        await asyncio.sleep(0.02)


def ratio(numerator: float, denominator: float) -> float:
    """
    ``numerator / denominator``, or NaN when the denominator is 0.
    """
    return numerator / denominator if denominator else float("nan")


def median_of(values: list[float]) -> float:
    """
    The median, or NaN for none.
    """
    return statistics.median(values) if values else float("nan")
