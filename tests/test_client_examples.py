"""
The README's client snippets, run as written against a real sidecar on
loopback, with a dead proxy in the environment that they must ignore.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from sidecar.config import Settings
from sidecar.daemon import Sidecar
from tests.fakes import FakeIdP, free_port
from tests.tools import require_tool

README = Path(__file__).resolve().parent.parent / "README.md"
README_ADDRESS = "127.0.0.1:8787"
DEADLINE_SECONDS = 60.0


def readme_examples() -> dict[str, str]:
    """
    The README's snippets marked ``<!-- example: NAME -->``, by name.
    """
    found = re.findall(
        r"<!-- example: (\w+) -->\n```\w+\n(.*?)```",
        README.read_text(),
        re.DOTALL,
    )

    return dict(found)


async def run_example(words: list[str], cwd: Path) -> tuple[int, str, str]:
    """
    Run a snippet's interpreter with a dead proxy in the environment.
    """
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    process = await asyncio.create_subprocess_exec(
        *words,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env={
            **os.environ,
            "HTTP_PROXY": dead_proxy,
            "http_proxy": dead_proxy,
            "NO_PROXY": "",
            "no_proxy": "",
        },
    )
    stdout, stderr = await asyncio.wait_for(
        process.communicate(), DEADLINE_SECONDS
    )
    assert process.returncode is not None

    return process.returncode, stdout.decode(), stderr.decode()


def shell_words(snippet: str, directory: Path) -> list[str]:
    """
    Run the shell snippet with bash, then print the token it set.
    """
    require_tool("curl")

    return ["bash", "-euc", snippet + '\nprintf "%s\\n" "$TOKEN"\n']


def python_words(snippet: str, directory: Path) -> list[str]:
    """
    Run a Python snippet, then print what its bearer_token() returns.
    """
    return [sys.executable, "-c", snippet + "\nprint(bearer_token())\n"]


def java_words(snippet: str, directory: Path) -> list[str]:
    """
    Run the Java snippet with the JDK's source launcher.
    """
    java = require_tool("java")
    source = directory / "SidecarToken.java"
    source.write_text(snippet)

    return [java, str(source)]


RUNNERS: dict[str, Callable[[str, Path], list[str]]] = {
    "shell": shell_words,
    "requests": python_words,
    "httpx": python_words,
    "java": java_words,
}


def test_every_example_is_run() -> None:
    """
    Each marked snippet in the README has a runner here, and vice versa.
    """
    assert set(readme_examples()) == set(RUNNERS)


@pytest.mark.parametrize("name", sorted(RUNNERS))
async def test_example_gets_the_token(
    name: str,
    make_settings: Callable[..., Settings],
    start_sidecar: Callable[..., Awaitable[Sidecar]],
    fake_idp: FakeIdP,
    tmp_path: Path,
) -> None:
    """
    The snippet, pointed at the sidecar, prints the token the IdP issued.
    """
    sidecar = await start_sidecar(make_settings())
    assert sidecar.token_address is not None
    host, port = sidecar.token_address
    snippet = readme_examples()[name].replace(README_ADDRESS, f"{host}:{port}")
    assert snippet != readme_examples()[name]

    status, stdout, stderr = await run_example(
        RUNNERS[name](snippet, tmp_path), tmp_path
    )

    assert status == 0, stderr
    assert stdout == f"{fake_idp.issued[0]}\n"
