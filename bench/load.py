"""
Load: wrk when it is installed, else a built-in generator, each run in
its own process on the load cores.

``python -m bench.load --url URL --connections N --duration S`` is the
built-in generator: N keep-alive connections, each sending the next
request when the last is answered (as wrk does), on uvloop when it is
installed. It prints one JSON line with the result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

from bench.client import Connection, request_head
from bench.loops import available_loops, loop_factory
from bench.procs import pinned


@dataclass(frozen=True, slots=True)
class LoadResult:
    """
    What one load run measured.

    ``non_2xx`` counts answers other than 2xx/3xx (a correctness
    problem); ``socket_errors`` connections that failed or requests
    not answered within the tool's timeout (a performance one);
    latencies are in milliseconds.
    """

    tool: str
    connections: int
    requests: int
    non_2xx: int
    socket_errors: int
    requests_per_second: float
    p50_ms: float
    p99_ms: float


def load_tool() -> str:
    """
    ``wrk`` when installed, else ``builtin``.
    """
    return "wrk" if shutil.which("wrk") else "builtin"


async def run_load(
    url: str,
    connections: int,
    duration_seconds: float,
    cores: set[int] | None,
    tool: str | None = None,
) -> LoadResult:
    """
    Drive ``url`` with ``connections`` connections for the duration.
    """
    tool = tool or load_tool()
    threads = max(1, min(len(cores or {0}), connections))
    if tool == "wrk":
        command = [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(duration_seconds))}s",
            "--latency",
            "-H",
            "Metadata: true",
            url,
        ]
    else:
        command = [
            sys.executable,
            "-m",
            "bench.load",
            "--url",
            url,
            "--connections",
            str(connections),
            "--duration",
            str(duration_seconds),
        ]
    process = await asyncio.create_subprocess_exec(
        *pinned(command, cores),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{tool} failed: {err.decode(errors='replace')}")
    text = out.decode(errors="replace")
    if tool == "wrk":
        return parse_wrk(text, connections)

    return LoadResult(**json.loads(text))


def parse_wrk(text: str, connections: int) -> LoadResult:
    """
    The result of ``wrk --latency`` from its output.
    """
    requests = int(_find(r"(\d+) requests in", text))
    rate = float(_find(r"Requests/sec:\s+([\d.]+)", text))
    p50 = _milliseconds(_find(r"\n\s+50%\s+(\S+)", text))
    p99 = _milliseconds(_find(r"\n\s+99%\s+(\S+)", text))
    non_2xx = socket_errors = 0
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        non_2xx = int(match[1])
    if match := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), "
        r"timeout (\d+)",
        text,
    ):
        socket_errors = sum(int(n) for n in match.groups())

    return LoadResult(
        "wrk", connections, requests, non_2xx, socket_errors, rate, p50, p99
    )


def _find(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        raise ValueError(f"no {pattern!r} in the load tool's output")

    return match[1]


#: wrk's latency units, in milliseconds.
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _milliseconds(value: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    if match is None:
        raise ValueError(f"{value!r} is not a wrk latency")

    return float(match[1]) * _UNITS[match[2]]


def percentile(sorted_values: list[float], fraction: float) -> float:
    """
    The value below which ``fraction`` of ``sorted_values`` lie
    (nearest rank); 0 for none.
    """
    if not sorted_values:
        return 0.0
    rank = round(fraction * len(sorted_values)) - 1
    rank = max(0, min(len(sorted_values) - 1, rank))

    return sorted_values[rank]


async def generate(
    url: str, connections: int, duration_seconds: float
) -> LoadResult:
    """
    The built-in generator: keep ``connections`` busy for the duration.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = request_head(host, port, parts.path or "/")
    latencies: list[float] = []
    non_2xx = socket_errors = 0
    deadline = time.perf_counter() + duration_seconds

    async def drive() -> None:
        nonlocal non_2xx, socket_errors
        connection = await Connection.open(host, port)
        try:
            while time.perf_counter() < deadline:
                sent_at = time.perf_counter()
                try:
                    answer = await connection.ask(head)
                except ConnectionError:
                    socket_errors += 1
                    connection = await Connection.open(host, port)
                    continue
                latencies.append(time.perf_counter() - sent_at)
                if answer.status >= 400:
                    non_2xx += 1
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(drive() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    latencies.sort()

    return LoadResult(
        "builtin",
        connections,
        len(latencies),
        non_2xx,
        socket_errors,
        len(latencies) / elapsed,
        percentile(latencies, 0.50) * 1000,
        percentile(latencies, 0.99) * 1000,
    )


def main() -> None:
    """
    Run the built-in generator and print its result as JSON.
    """
    parser = argparse.ArgumentParser(prog="python -m bench.load")
    parser.add_argument("--url", required=True)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    loop = available_loops()[-1]
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        result = runner.run(
            generate(args.url, args.connections, args.duration)
        )
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
