"""
``python -m bench``: every benchmark in one run, and a Markdown report.

Sections (``--sections``, all by default): ``throughput`` (``/token``
against a bare aiohttp handler and nginx, on each event loop, with
memory), ``fanout`` (IdP requests against concurrent clients),
``start`` (start-to-ready time), ``soak`` and ``faults``. Exits 1 when
a correctness check failed (an IdP request too many, an expired or
empty token served, memory or descriptors growing, a policy breach);
the performance targets are reported, never enforced.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.fanout import (
    FanoutResult,
    cold_start,
    expiry_boundaries,
    raise_open_files_limit,
)
from bench.faults import FaultResult, fault_matrix
from bench.footprint import StartReport, measure_starts
from bench.load import load_tool
from bench.loops import available_loops
from bench.procs import server_and_load_cores, start_idp
from bench.soak import SoakResult, soak
from bench.throughput import ThroughputReport, measure_throughput, ratio

SECTIONS = ("throughput", "fanout", "start", "soak", "faults")

#: The issue's targets.
MIN_BARE_RATIO = 0.9
MAX_P99_RATIO = 1.2
MIN_NGINX_RATIO = 0.5
MAX_RSS_BYTES = 60_000_000
MAX_OWN_START_SECONDS = 0.5

MB = 1_000_000


def main(argv: Sequence[str] | None = None) -> int:
    """
    Parse the flags, run the sections, print the report.
    """
    args = _parser().parse_args(argv)
    loops = args.loops or available_loops()
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        print(f"error: unknown sections {sorted(unknown)}", file=sys.stderr)
        return 2
    report = Report(args, loops)
    print(report.header(), flush=True)
    ok = asyncio.run(report.run())

    return 0 if ok else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--sections",
        type=_names,
        default=list(SECTIONS),
        help="comma-separated, of " + ", ".join(SECTIONS),
    )
    parser.add_argument(
        "--loops",
        type=_names,
        help="event loops to run the servers on (default: all installed)",
    )
    parser.add_argument("--connections", type=_numbers, default=[1, 64, 512])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--tool",
        choices=("wrk", "builtin"),
        help="load generator (default: wrk when installed)",
    )
    parser.add_argument(
        "--clients", type=_numbers, default=[1, 10, 100, 1000, 10000]
    )
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--soak-seconds", type=float, default=600.0)
    parser.add_argument("--soak-lifetime", type=float, default=2.0)
    parser.add_argument("--soak-refresh-at", type=float, default=0.25)
    parser.add_argument("--soak-clients", type=int, default=16)
    parser.add_argument("--fault-cycles", type=int, default=2)
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another source tree (a checkout of an older commit) whose "
        "sidecar runs beside this one in the throughput section",
    )

    return parser


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _numbers(text: str) -> list[int]:
    return [int(part) for part in _names(text)]


class Report:
    """
    Runs the sections one after the other and prints each as it ends.
    """

    def __init__(self, args: argparse.Namespace, loops: list[str]) -> None:
        self.args = args
        self.loops = loops
        self.problems: list[str] = []
        self.targets: list[tuple[str, str, bool | None]] = []

    async def run(self) -> bool:
        """
        Run the chosen sections; true when every check held.
        """
        sections = self.args.sections
        if "throughput" in sections:
            self._print(self.throughput(await self._throughput()))
        if "fanout" in sections:
            self._print(self.fanout(await self._fanout()))
        if "start" in sections:
            self._print(self.start(await self._starts()))
        if "soak" in sections:
            self._print(self.soak(await self._soak()))
        if "faults" in sections:
            self._print(self.faults(await self._faults()))
        self._print(self.summary())

        return not self.problems

    def _print(self, text: str) -> None:
        print(text, flush=True)

    def header(self) -> str:
        """
        The machine, the versions and the command.
        """
        server, load = server_and_load_cores()
        command = shlex.join(["python", "-m", "bench", *sys.argv[1:]])
        lines = [
            "# token-sidecar benchmarks",
            "",
            f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} "
            "UTC",
            f"- command: `{command}`",
            f"- machine: {_cpu_model()}, {os.cpu_count()} cores, "
            f"{_memory_gib():.0f} GiB, Linux {platform.release()}",
            f"- pinning: server on cores {_cores(server)}, load on "
            f"{_cores(load)}",
            f"- load generator: {_load_tool_version(self.args.tool)}",
            f"- nginx: {_version(['nginx', '-v'])}",
            "- versions: Python "
            f"{platform.python_version()}, token-sidecar "
            f"{_package('token-sidecar')}, aiohttp {_package('aiohttp')}, "
            f"uvloop {_package('uvloop')}",
            f"- event loops: {', '.join(self.loops)}",
        ]
        if "uvloop" in self.loops:
            lines.append(
                "- the uvloop sidecar runs under `python -O`: "
                "sidecar/listener.py asserts that a transport is asyncio's "
                "own, which uvloop's are not (see docs/benchmarks.md)"
            )

        return "\n".join(lines) + "\n"

    async def _throughput(self) -> ThroughputReport:
        args = self.args
        return await measure_throughput(
            self.loops,
            args.connections,
            args.duration,
            args.warmup,
            args.repeat,
            args.tool,
            args.baseline,
        )

    def throughput(self, report: ThroughputReport) -> str:
        """
        The throughput tables, ratios and memory.
        """
        lines = [
            "## Throughput and latency of GET /token",
            "",
            f"{report.tool}, {report.duration_seconds:g} s per run, median "
            f"of {report.repeat} runs by requests/s; CPU is the server "
            "process's CPU time per request.",
            "",
            "| connections | server | loop | requests/s | p50 ms | p99 ms "
            "| non-2xx | socket errors | server CPU µs/request |",
            "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        kinds = [("sidecar", loop) for loop in report.loops]
        if report.has_baseline:
            kinds += [("baseline", loop) for loop in report.loops]
        kinds += [("bare", loop) for loop in report.loops]
        if report.has_nginx:
            kinds.append(("nginx", "-"))
        for count in report.connections:
            for target, loop in kinds:
                run = report.median(target, loop, count)
                if run is None:
                    continue
                load = run.load
                lines.append(
                    f"| {count} | {target} | {loop} | "
                    f"{load.requests_per_second:,.0f} | {load.p50_ms:.2f} | "
                    f"{load.p99_ms:.2f} | {load.non_2xx} | "
                    f"{load.socket_errors} | "
                    f"{run.server_cpu_us_per_request:.1f} |"
                )
                if target == "sidecar" and load.non_2xx:
                    self.problems.append(
                        f"the sidecar ({loop}, {count} connections) gave "
                        f"{load.non_2xx} answers other than 200 under load"
                    )
        lines += [
            "",
            "Ratios of the sidecar to the ceilings (requests/s; p99 "
            "latency; server CPU per request, ceiling over sidecar):",
            "",
            "| connections | loop | ÷ bare req/s | ÷ bare p99 | bare CPU ÷ "
            "sidecar CPU | ÷ nginx req/s |",
            "| ---: | --- | ---: | ---: | ---: | ---: |",
        ]
        for count in report.connections:
            for loop in report.loops:
                lines.append(self._ratio_row(report, count, loop))
        lines += [
            "",
            "Resident memory of the sidecar (MB = 10^6 bytes):",
            "",
            "| sidecar | loop | idle | peak under load | after the load |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for memory in report.memory:
            lines.append(
                f"| {memory.target} | {memory.loop} | "
                f"{memory.idle_bytes / MB:.1f} | "
                f"{memory.peak_bytes / MB:.1f} | "
                f"{memory.after_bytes / MB:.1f} |"
            )
            if memory.target != "sidecar":
                continue
            worst = max(
                memory.idle_bytes, memory.peak_bytes, memory.after_bytes
            )
            self._target(
                f"resident memory under 60 MB ({memory.loop})",
                f"idle {memory.idle_bytes / MB:.1f}, peak "
                f"{memory.peak_bytes / MB:.1f}, after "
                f"{memory.after_bytes / MB:.1f} MB",
                worst < MAX_RSS_BYTES,
            )
        if report.has_baseline:
            lines += self._against_baseline(report)
        self._throughput_targets(report)

        return "\n".join(lines) + "\n"

    def _against_baseline(self, report: ThroughputReport) -> list[str]:
        lines = [
            "",
            f"This tree's sidecar against the baseline "
            f"(`{self.args.baseline}`), in the same run:",
            "",
            "| connections | loop | requests/s | baseline | ratio | "
            "CPU µs/request | baseline | ÷ bare req/s | baseline ÷ bare |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for count in report.connections:
            for loop in report.loops:
                new = report.median("sidecar", loop, count)
                old = report.median("baseline", loop, count)
                bare = report.median("bare", loop, count)
                if new is None or old is None or bare is None:
                    continue
                new_rate = new.load.requests_per_second
                old_rate = old.load.requests_per_second
                bare_rate = bare.load.requests_per_second
                lines.append(
                    f"| {count} | {loop} | {new_rate:,.0f} | "
                    f"{old_rate:,.0f} | {ratio(new_rate, old_rate):.2f} | "
                    f"{new.server_cpu_us_per_request:.1f} | "
                    f"{old.server_cpu_us_per_request:.1f} | "
                    f"{ratio(new_rate, bare_rate):.2f} | "
                    f"{ratio(old_rate, bare_rate):.2f} |"
                )

        return lines

    def _ratio_row(
        self, report: ThroughputReport, count: int, loop: str
    ) -> str:
        sidecar = report.median("sidecar", loop, count)
        bare = report.median("bare", loop, count)
        nginx = report.median("nginx", "-", count)
        if sidecar is None or bare is None:
            return f"| {count} | {loop} | - | - | - | - |"
        cells = [
            ratio(
                sidecar.load.requests_per_second,
                bare.load.requests_per_second,
            ),
            ratio(sidecar.load.p99_ms, bare.load.p99_ms),
            ratio(
                bare.server_cpu_us_per_request,
                sidecar.server_cpu_us_per_request,
            ),
        ]
        text = " | ".join(f"{cell:.2f}" for cell in cells)
        to_nginx = "-"
        if nginx is not None:
            share = ratio(
                sidecar.load.requests_per_second,
                nginx.load.requests_per_second,
            )
            to_nginx = f"{share:.2f}"

        return f"| {count} | {loop} | {text} | {to_nginx} |"

    def _throughput_targets(self, report: ThroughputReport) -> None:
        for loop in report.loops:
            pairs = [
                (
                    report.median("sidecar", loop, c),
                    report.median("bare", loop, c),
                )
                for c in report.connections
            ]
            throughput = [
                ratio(s.load.requests_per_second, b.load.requests_per_second)
                for s, b in pairs
                if s and b
            ]
            latency = [
                ratio(s.load.p99_ms, b.load.p99_ms)
                for s, b in pairs
                if s and b
            ]
            if throughput:
                self._target(
                    f"throughput at least {MIN_BARE_RATIO}x bare aiohttp "
                    f"({loop})",
                    "lowest " + f"{min(throughput):.2f}x",
                    min(throughput) >= MIN_BARE_RATIO,
                )
            if latency:
                self._target(
                    f"p99 at most {MAX_P99_RATIO}x bare aiohttp ({loop})",
                    "highest " + f"{max(latency):.2f}x",
                    max(latency) <= MAX_P99_RATIO,
                )
        if report.has_nginx and "uvloop" in report.loops:
            to_nginx = [
                ratio(s.load.requests_per_second, n.load.requests_per_second)
                for c in report.connections
                if (s := report.median("sidecar", "uvloop", c))
                and (n := report.median("nginx", "-", c))
            ]
            self._target(
                f"with uvloop at least {MIN_NGINX_RATIO}x nginx, one worker",
                "lowest " + f"{min(to_nginx):.2f}x",
                min(to_nginx) >= MIN_NGINX_RATIO,
            )

    async def _fanout(self) -> list[FanoutResult]:
        counts = self.args.clients
        raise_open_files_limit(max(counts) + 256)
        loop = self.loops[0]
        server, load = server_and_load_cores()
        idp = await start_idp(3600, cores=load)
        try:
            results = [
                await cold_start(idp, count, loop, server) for count in counts
            ]
            results += await expiry_boundaries(idp, counts, loop, server)
        finally:
            await idp.child.stop()

        return results

    def fanout(self, results: list[FanoutResult]) -> str:
        """
        The fan-out table.
        """
        lines = [
            "## IdP requests against concurrent clients",
            "",
            f"Sidecar on {self.loops[0]}; every client's request waits in "
            "the sidecar before the IdP answers.",
            "",
            "| moment | clients | IdP requests | answers | tokens | "
            "all answered in s | sidecar RSS MB |",
            "| --- | ---: | ---: | --- | ---: | ---: | ---: |",
        ]
        for r in results:
            answers = _statuses(r.statuses)
            lines.append(
                f"| {r.moment} | {r.clients:,} | {r.idp_requests} | "
                f"{answers} | {r.distinct_tokens} | {r.answer_seconds:.3f} | "
                f"{r.sidecar_rss_bytes / MB:.1f} |"
            )
            self.problems += r.problems
        self._target(
            "exactly one IdP request per refresh, any number of clients",
            f"{len(results)} moments, up to "
            f"{max(r.clients for r in results):,} clients",
            all(not r.problems for r in results),
        )

        return "\n".join(lines) + "\n"

    async def _starts(self) -> list[StartReport]:
        server, load = server_and_load_cores()
        idp = await start_idp(3600, cores=load)
        try:
            return [
                await measure_starts(idp, loop, self.args.starts, server)
                for loop in self.loops
            ]
        finally:
            await idp.child.stop()

    def start(self, reports: list[StartReport]) -> str:
        """
        The start-to-ready table.
        """
        lines = [
            "## Start to ready",
            "",
            "From starting the process to the first 200 from /readyz; the "
            "IdP's answer time is taken out for the sidecar's own part.",
            "",
            "| loop | starts | median to ready s | median IdP answer ms | "
            "median own s | worst own s | idle RSS MB |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for report in reports:
            rss = max(s.idle_rss_bytes for s in report.starts)
            lines.append(
                f"| {report.loop} | {len(report.starts)} | "
                f"{report.median_ready_seconds:.3f} | "
                f"{report.median_idp_seconds * 1000:.2f} | "
                f"{report.median_own_seconds:.3f} | "
                f"{report.worst_own_seconds:.3f} | {rss / MB:.1f} |"
            )
            self._target(
                f"start to ready under {MAX_OWN_START_SECONDS} s plus the "
                f"IdP ({report.loop})",
                f"median {report.median_own_seconds:.3f} s, worst "
                f"{report.worst_own_seconds:.3f} s",
                report.median_own_seconds < MAX_OWN_START_SECONDS,
            )

        return "\n".join(lines) + "\n"

    async def _soak(self) -> SoakResult:
        args = self.args
        server, load = server_and_load_cores()
        return await soak(
            args.soak_seconds,
            args.soak_lifetime,
            args.soak_refresh_at,
            args.soak_clients,
            self.loops[0],
            server,
            load,
        )

    def soak(self, result: SoakResult) -> str:
        """
        The soak's figures and checks.
        """
        tally = result.tally
        low, high = result.expected_requests
        rss = [s.rss_bytes for s in result.samples]
        fds = [s.open_fds for s in result.samples]
        lines = [
            "## Soak",
            "",
            f"- {result.duration_seconds:.0f} s, tokens living "
            f"{result.lifetime_seconds:g} s, refreshed at "
            f"{result.refresh_at:g} of their life, {result.clients} "
            "clients polling",
            f"- answers: {_statuses(tally.by_status)}; "
            f"{len(tally.tokens):,} different tokens served; "
            f"{tally.connection_errors} connection errors",
            f"- IdP requests: {result.idp_requests:,} (the policy: "
            f"{low:,} to {high:,}); shortest gap "
            f"{result.shortest_gap_seconds:.3f} s (policy: at least "
            f"{result.least_gap_allowed_seconds:.3f} s)",
            f"- expired tokens served: {result.verdict.expired_served}; "
            f"arrived after expiry: {result.verdict.expired_on_arrival}; "
            "empty or unknown: "
            f"{tally.unusable + result.verdict.unknown_tokens}; "
            "least life left on arrival: "
            f"{_seconds(result.verdict.least_life_left_seconds)}",
            f"- resident memory: {min(rss, default=0) / MB:.1f} to "
            f"{max(rss, default=0) / MB:.1f} MB, growth "
            f"{result.rss_growth_bytes / MB:+.2f} MB (median of the last "
            "quarter less the second)",
            f"- open descriptors: {min(fds, default=0)} to "
            f"{max(fds, default=0)}, growth {result.fd_growth:+d}",
        ]
        if result.problems:
            lines.append(f"- **problems**: {'; '.join(result.problems)}")
        self.problems += result.problems
        self._target(
            "resident memory flat over the soak",
            f"{result.rss_growth_bytes / MB:+.2f} MB",
            result.rss_growth_bytes <= result.rss_growth_limit_bytes,
        )

        return "\n".join(lines) + "\n"

    async def _faults(self) -> FaultResult:
        server, load = server_and_load_cores()
        return await fault_matrix(
            self.args.fault_cycles,
            loop=self.loops[0],
            server_cores=server,
            load_cores=load,
            deadline_seconds=120.0 * self.args.fault_cycles,
        )

    def faults(self, result: FaultResult) -> str:
        """
        The fault matrix's figures and checks.
        """
        kinds = ", ".join(
            f"{kind} {n}" for kind, n in sorted(result.by_kind.items())
        )
        lines = [
            "## Fault matrix",
            "",
            f"- {result.cycles} cycles in {result.duration_seconds:.0f} s; "
            f"IdP answers by kind: {kinds}",
            f"- answers: {_statuses(result.tally.by_status)}; "
            f"{result.tally.connection_errors} connection errors",
            f"- expired tokens served: {result.verdict.expired_served}; "
            f"arrived after expiry: {result.verdict.expired_on_arrival}; "
            "empty or unknown: "
            f"{result.tally.unusable + result.verdict.unknown_tokens}; least "
            "life left on arrival: "
            f"{_seconds(result.verdict.least_life_left_seconds)}",
            f"- IdP requests sooner than the policy allows: "
            f"{len(result.policy_breaches)}",
        ]
        if result.problems:
            lines.append(f"- **problems**: {'; '.join(result.problems)}")
        self.problems += result.problems

        return "\n".join(lines) + "\n"

    def _target(self, name: str, measured: str, met: bool | None) -> None:
        self.targets.append((name, measured, met))

    def summary(self) -> str:
        """
        The targets, met or missed, and the failed checks.
        """
        lines = [
            "## Targets",
            "",
            "| target | measured | |",
            "| --- | --- | --- |",
        ]
        for name, measured, met in self.targets:
            verdict = "met" if met else "**missed**"
            lines.append(f"| {name} | {measured} | {verdict} |")
        lines.append("")
        if self.problems:
            lines.append("Failed checks:")
            lines += [f"- {problem}" for problem in self.problems]
        else:
            lines.append("Every correctness check held.")

        return "\n".join(lines) + "\n"


def _statuses(by_status: dict[int, int]) -> str:
    return (
        ", ".join(
            f"{n:,} x {status}" for status, n in sorted(by_status.items())
        )
        or "none"
    )


def _seconds(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"

    return f"{value:.3f} s"


def _cores(cores: set[int] | None) -> str:
    return ",".join(map(str, sorted(cores))) if cores else "any"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass

    return platform.processor() or "unknown CPU"


def _memory_gib() -> float:
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass

    return math.nan


def _version(command: list[str]) -> str:
    if shutil.which(command[0]) is None and not os.path.exists(
        f"/usr/sbin/{command[0]}"
    ):
        return "not installed"
    try:
        done = subprocess.run(  # noqa: S603 -- fixed commands
            command, capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return "not installed"
    text = (done.stdout + done.stderr).strip().splitlines()

    return text[0] if text else "unknown"


def _load_tool_version(tool: str | None) -> str:
    tool = tool or load_tool()
    if tool == "wrk":
        return f"wrk ({_version(['wrk', '-v'])})"

    return "built-in (bench/load.py; wrk is not used)"


def _package(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
