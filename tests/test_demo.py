"""
Tests for ``token-sidecar demo``, the README's first command: the lines
its banner tells a new user to try work as printed, its tokens renew, and
a busy port gets a hint that is itself a working command.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import free_port
from tests.test_cli import (
    SHUTDOWN_DEADLINE_SECONDS,
    child_environment,
    finish,
    start_cli,
)
from tests.tools import STARTUP_DEADLINE_SECONDS, require_tool

#: Short-lived demo tokens, so a renewal comes within the test.
TOKEN_LIFETIME_SECONDS = 4


@dataclass
class RunningDemo:
    process: asyncio.subprocess.Process
    banner: list[str]


StartDemo = Callable[..., Awaitable[RunningDemo]]


async def read_banner(process: asyncio.subprocess.Process) -> list[str]:
    """
    The demo's stdout up to its last banner line.
    """
    assert process.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(STARTUP_DEADLINE_SECONDS):
        while not lines or lines[-1] != "Ctrl-C stops it.":
            line = await process.stdout.readline()
            assert line, f"the demo ended before its banner: {lines}"
            lines.append(line.decode().rstrip("\n"))

    return lines


@pytest.fixture
def runtime(tmp_path: Path) -> Path:
    """
    The demo's runtime directory, where a real sidecar's state would be.
    """
    directory = tmp_path / "runtime"
    directory.mkdir()

    return directory


@pytest.fixture
async def start_demo(
    tmp_path: Path, runtime: Path
) -> AsyncIterator[StartDemo]:
    started: list[asyncio.subprocess.Process] = []

    async def start(*args: str) -> RunningDemo:
        process = await start_cli(
            "demo",
            *args,
            cwd=tmp_path,
            env={"RUNTIME_DIRECTORY": str(runtime)},
        )
        started.append(process)
        return RunningDemo(process, await read_banner(process))

    yield start
    for process in started:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def run_banner_line(line: str) -> str:
    """
    Run a command from the banner as a user would paste it; its stdout.
    """
    words = shlex.split(line)
    words[0] = require_tool(words[0])
    process = await asyncio.create_subprocess_exec(
        *words,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_environment(),
    )
    async with asyncio.timeout(STARTUP_DEADLINE_SECONDS):
        stdout, stderr = await process.communicate()
    assert process.returncode == 0, (line, stderr.decode())

    return stdout.decode()


def idp_successes(metrics: str) -> float:
    """
    The count of successful IdP requests in a /metrics page.
    """
    [family] = [
        family
        for family in text_string_to_metric_families(metrics)
        if family.name == "sidecar_idp_requests"
    ]
    [success] = [
        sample.value
        for sample in family.samples
        if sample.name.endswith("_total")
        and sample.labels["outcome"] == "success"
    ]

    return success


async def test_the_banner_lines_work_as_printed(
    start_demo: StartDemo, runtime: Path
) -> None:
    """
    Every command the banner offers succeeds as printed (the sidecar's own
    command as it was started, here ``python -m sidecar``): the token as
    JSON and bare (the same token), readiness, and metrics. SIGTERM then
    exits 0, no token appears in the demo's output, and nothing was
    written to the runtime directory, where a real sidecar's ledger is.
    """
    demo = await start_demo(
        "--port",
        str(free_port()),
        "--ops-port",
        str(free_port()),
        "--token-lifetime",
        str(TOKEN_LIFETIME_SECONDS),
    )
    tries = [line.strip() for line in demo.banner if line.startswith("  ")]
    commands = [line for line in tries if line.split()[0] != "DEVELOPMENT"]

    outputs = [await run_banner_line(command) for command in commands]
    demo.process.send_signal(signal.SIGTERM)
    result = await finish(demo.process, SHUTDOWN_DEADLINE_SECONDS)

    as_json, bare, ready, metrics = outputs
    token = json.loads(as_json)["access_token"]
    assert bare == f"{token}\n"
    assert json.loads(ready) == {"status": "ready"}
    assert idp_successes(metrics) >= 1
    assert result.returncode == 0, result.stderr
    assert token not in result.stdout + result.stderr
    assert "NOT FOR PRODUCTION" in demo.banner[1]
    assert commands[1].startswith(f"{sys.executable} -m sidecar token")
    assert await asyncio.to_thread(os.listdir, runtime) == []


async def test_demo_tokens_renew(start_demo: StartDemo) -> None:
    """
    With 4-second tokens the demo renews its token and serves the new
    one.
    """
    port = free_port()
    demo = await start_demo(
        "--port",
        str(port),
        "--ops-port",
        str(free_port()),
        "--token-lifetime",
        str(TOKEN_LIFETIME_SECONDS),
    )
    line = (
        f"curl -s --noproxy '*' -H 'Metadata: true' "
        f"http://127.0.0.1:{port}/token"
    )
    first = json.loads(await run_banner_line(line))

    async with asyncio.timeout(STARTUP_DEADLINE_SECONDS):
        while True:
            answer = json.loads(await run_banner_line(line))
            if answer["access_token"] != first["access_token"]:
                break
            await asyncio.sleep(0.2)  # pacing: the renewal comes in time

    assert demo.process.returncode is None


async def test_a_busy_port_gets_a_working_hint(
    start_demo: StartDemo, tmp_path: Path
) -> None:
    """
    A taken port exits 1 naming the address, and the suggested command
    starts a demo.
    """
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        process = await start_cli("demo", "--port", str(busy), cwd=tmp_path)
        result = await finish(process, STARTUP_DEADLINE_SECONDS)

    assert result.returncode == 1
    assert f"Address already in use on 127.0.0.1:{busy}" in result.stderr
    assert result.stdout == ""
    hint = result.stderr.split("try '", 1)[1].split("' (free", 1)[0]
    words = shlex.split(hint)
    assert words[:4] == [sys.executable, "-m", "sidecar", "demo"]
    demo = await start_demo(*words[4:])
    assert demo.banner[0] == "token-sidecar demo"
