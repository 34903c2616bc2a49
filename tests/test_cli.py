"""
Tests for sidecar.cli, run as the real console script in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar import __version__
from sidecar.cli import token_url
from tests.conftest import CLIENT_SECRET, METADATA, AiohttpServer
from tests.fakes import FakeIdP, free_port
from tests.tools import STARTUP_DEADLINE_SECONDS

#: Generous: these bound a hung child, they measure nothing.
COMMAND_TIMEOUT_SECONDS = 30.0
SHUTDOWN_DEADLINE_SECONDS = 10.0
POLL_INTERVAL_SECONDS = 0.05

TOKEN_URL = "https://idp.example.com/oauth/token"


@dataclass
class Completed:
    """
    What a finished command left behind.
    """

    returncode: int
    stdout: str
    stderr: str


def child_environment() -> dict[str, str]:
    """
    This process's environment without SIDECAR_* variables.
    """
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("SIDECAR_")
    }


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> Completed:
    """
    Run ``python -m sidecar ARGS`` to completion and capture its output.
    """
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        cwd=cwd,
        env={**child_environment(), **(env or {})},
        check=False,
    )

    return Completed(result.returncode, result.stdout, result.stderr)


async def start_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """
    Start ``python -m sidecar ARGS`` without waiting, so this loop runs on;
    ``env`` adds to the environment.
    """
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env={**child_environment(), **(env or {})},
    )


async def finish(
    process: asyncio.subprocess.Process,
    timeout_seconds: float = COMMAND_TIMEOUT_SECONDS,
) -> Completed:
    """
    Wait for ``process`` to exit and collect its output.
    """
    stdout, stderr = await asyncio.wait_for(
        process.communicate(), timeout_seconds
    )
    assert process.returncode is not None

    return Completed(process.returncode, stdout.decode(), stderr.decode())


async def run_cli_async(*args: str, cwd: Path) -> Completed:
    """
    Run ``python -m sidecar ARGS`` while this event loop keeps serving.
    """
    return await finish(await start_cli(*args, cwd=cwd))


def write_config(directory: Path, text: str) -> Path:
    """
    Write a config file into ``directory`` and return its path.
    """
    path = directory / "sidecar.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")

    return path


def config_text(token_url: str, listen_port: int) -> str:
    """
    A config for the fake IdP: JSON debug logs, quick back-off.
    """
    return f"""
        [idp]
        token_url = "{token_url}"
        client_id = "billing"
        client_secret = "{CLIENT_SECRET}"

        [listen]
        port = {listen_port}

        [ops]
        port = 0

        [retry]
        backoff_initial_seconds = 0.05
        backoff_max_seconds = 0.2

        [log]
        level = "debug"
        format = "json"
    """


class TestCheckConfig:
    """
    check-config validates the config and prints it, redacted.
    """

    def test_prints_the_effective_config_redacted(
        self, tmp_path: Path
    ) -> None:
        """
        A valid config exits 0 and prints TOML with the secret masked.
        """
        path = write_config(tmp_path, config_text(TOKEN_URL, 8787))

        result = run_cli("check-config", "--config", str(path), cwd=tmp_path)

        assert result.returncode == 0, result.stderr
        printed = tomllib.loads(result.stdout)
        assert printed["idp"]["client_id"] == "billing"
        assert printed["idp"]["token_url"] == TOKEN_URL
        assert printed["idp"]["client_secret"] == "**********"
        assert printed["listen"]["port"] == 8787
        assert printed["refresh"]["refresh_at"] == 0.9
        assert CLIENT_SECRET not in result.stdout + result.stderr

    def test_printed_lists_are_toml_lists(self, tmp_path: Path) -> None:
        """
        List values print as TOML arrays, so the output reads back.
        """
        path = write_config(
            tmp_path,
            config_text(TOKEN_URL, 8787) + "\n[access]\nallow_uids = [0, 1]\n",
        )

        result = run_cli("check-config", "--config", str(path), cwd=tmp_path)

        assert result.returncode == 0, result.stderr
        assert tomllib.loads(result.stdout)["access"]["allow_uids"] == [0, 1]

    def test_secret_from_the_environment_is_not_printed(
        self, tmp_path: Path
    ) -> None:
        """
        A secret given as SIDECAR_IDP__CLIENT_SECRET is masked as well.
        """
        secret = "env-only-secret-31415926"
        path = write_config(
            tmp_path,
            f"""
            [idp]
            token_url = "{TOKEN_URL}"
            client_id = "billing"
            """,
        )

        result = run_cli(
            "check-config",
            "--config",
            str(path),
            cwd=tmp_path,
            env={"SIDECAR_IDP__CLIENT_SECRET": secret},
        )

        assert result.returncode == 0, result.stderr
        assert "**********" in result.stdout
        assert secret not in result.stdout + result.stderr

    def test_sidecar_config_names_the_file(self, tmp_path: Path) -> None:
        """
        Without --config, $SIDECAR_CONFIG names the file to check.
        """
        path = write_config(tmp_path, config_text(TOKEN_URL, 8787))

        result = run_cli(
            "check-config", cwd=tmp_path, env={"SIDECAR_CONFIG": str(path)}
        )

        assert result.returncode == 0, result.stderr
        assert 'client_id = "billing"' in result.stdout

    def test_missing_client_id_exits_2_naming_the_key(
        self, tmp_path: Path
    ) -> None:
        """
        A config without idp.client_id exits 2 with a line naming it.
        """
        path = write_config(
            tmp_path,
            f"""
            [idp]
            token_url = "{TOKEN_URL}"
            client_secret = "{CLIENT_SECRET}"
            """,
        )

        result = run_cli("check-config", "--config", str(path), cwd=tmp_path)

        assert result.returncode == 2
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert any(
            line.startswith("config error: idp.client_id: required")
            for line in lines
        ), result.stderr
        assert CLIENT_SECRET not in result.stderr

    def test_wrong_key_exits_2_naming_it(self, tmp_path: Path) -> None:
        """
        A misspelt key exits 2 with one line per problem, the typo named.
        """
        path = write_config(
            tmp_path,
            f"""
            [idp]
            token_url = "{TOKEN_URL}"
            clientid = "billing"
            client_secret = "{CLIENT_SECRET}"
            """,
        )

        result = run_cli("check-config", "--config", str(path), cwd=tmp_path)

        assert result.returncode == 2
        lines = result.stderr.splitlines()
        assert "config error: idp.clientid: unknown key" in result.stderr
        assert sum(line.startswith("config error: ") for line in lines) == 2

    def test_missing_file_exits_2_naming_it(self, tmp_path: Path) -> None:
        """
        A config file that does not exist exits 2 with its path.
        """
        path = tmp_path / "absent.toml"

        result = run_cli("check-config", "--config", str(path), cwd=tmp_path)

        assert result.returncode == 2
        assert f"config error: {path}: cannot read" in result.stderr


class TestArguments:
    """
    The parser answers --version and refuses a missing command.
    """

    def test_version(self, tmp_path: Path) -> None:
        """
        --version prints the program name and version and exits 0.
        """
        result = run_cli("--version", cwd=tmp_path)

        assert result.returncode == 0
        assert result.stdout == f"token-sidecar {__version__}\n"

    def test_no_command_is_a_usage_error(self, tmp_path: Path) -> None:
        """
        Without a command the usage is printed and the exit code is 2.
        """
        result = run_cli(cwd=tmp_path)

        assert result.returncode == 2
        assert "usage: token-sidecar" in result.stderr


@pytest.fixture
def served() -> list[dict[str, str]]:
    """
    Headers of the requests the stand-in sidecar received.
    """
    return []


async def stand_in(
    aiohttp_server: AiohttpServer,
    served: list[dict[str, str]],
    response: web.Response,
) -> str:
    """
    Serve ``response`` on /token from a loopback server; return its URL.
    """

    async def handle(request: web.Request) -> web.Response:
        served.append(dict(request.headers))
        return response

    app = web.Application()
    app.router.add_get("/token", handle)
    server = await aiohttp_server(app, host="127.0.0.1")

    return str(server.make_url("/token"))


class TestTokenCommand:
    """
    token asks a running sidecar for the token and prints it bare.
    """

    def test_nothing_listening_exits_1(self, tmp_path: Path) -> None:
        """
        With no sidecar at the URL the command says so and exits 1.
        """
        url = f"http://127.0.0.1:{free_port()}/token"

        result = run_cli("token", "--url", url, cwd=tmp_path)

        assert result.returncode == 1
        assert result.stdout == ""
        assert f"no sidecar answered at {url}" in result.stderr

    def test_non_http_url_exits_2(self, tmp_path: Path) -> None:
        """
        A URL that is not http(s) is a usage error.
        """
        result = run_cli("token", "--url", "file:///etc/passwd", cwd=tmp_path)

        assert result.returncode == 2
        assert "is not an http:// URL" in result.stderr

    @pytest.mark.parametrize(
        ("config", "key"),
        [
            pytest.param(
                '[listen]\nport = "eighty"\n', "listen.port", id="port"
            ),
            pytest.param("listen = 5\n", "listen", id="not-a-table"),
        ],
    )
    def test_bad_listen_table_is_a_config_error(
        self, tmp_path: Path, config: str, key: str
    ) -> None:
        """
        A [listen] table that token cannot use exits 2, naming the key.
        """
        path = write_config(tmp_path, config)

        result = run_cli("token", "--config", str(path), cwd=tmp_path)

        assert "Traceback" not in result.stderr
        assert result.returncode == 2
        assert key in result.stderr

    async def test_prints_the_bare_token(
        self,
        aiohttp_server: AiohttpServer,
        served: list[dict[str, str]],
        tmp_path: Path,
    ) -> None:
        """
        A text answer is printed bare, after a request with Metadata: true.
        """
        response = web.Response(text="tok-abc.123\n")
        url = await stand_in(aiohttp_server, served, response)

        result = await run_cli_async("token", "--url", url, cwd=tmp_path)

        assert result.returncode == 0, result.stderr
        assert result.stdout == "tok-abc.123\n"
        [headers] = served
        assert headers["Metadata"] == "true"
        assert headers["Accept"] == "text/plain"

    async def test_a_base_url_is_enough(
        self,
        aiohttp_server: AiohttpServer,
        served: list[dict[str, str]],
        tmp_path: Path,
    ) -> None:
        """
        --url may name the sidecar without the /token path.
        """
        response = web.Response(text="tok-base.456\n")
        url = await stand_in(aiohttp_server, served, response)
        base = url.removesuffix("/token")

        result = await run_cli_async("token", "--url", base, cwd=tmp_path)

        assert result.returncode == 0, result.stderr
        assert result.stdout == "tok-base.456\n"

    @pytest.mark.parametrize(
        ("given", "asked"),
        [
            ("http://127.0.0.1:8787", "http://127.0.0.1:8787/token"),
            ("http://127.0.0.1:8787/", "http://127.0.0.1:8787/token"),
            ("http://[::1]:8787?x=1", "http://[::1]:8787/token?x=1"),
            ("http://127.0.0.1:8787/token", "http://127.0.0.1:8787/token"),
            ("http://127.0.0.1:80/p/token", "http://127.0.0.1:80/p/token"),
        ],
    )
    def test_token_url_keeps_a_path_and_adds_a_missing_one(
        self, given: str, asked: str
    ) -> None:
        """
        A URL with a path is the user's; one without gets /token.
        """
        assert token_url(given) == asked

    async def test_url_comes_from_the_listen_table(
        self,
        aiohttp_server: AiohttpServer,
        served: list[dict[str, str]],
        tmp_path: Path,
    ) -> None:
        """
        Without --url, the config's [listen] table gives host and port.
        """
        response = web.Response(text="tok-from-config")
        url = await stand_in(aiohttp_server, served, response)
        port = url.rsplit(":", 1)[1].split("/")[0]
        path = write_config(tmp_path, f"[listen]\nport = {port}\n")

        result = await run_cli_async(
            "token", "--config", str(path), cwd=tmp_path
        )

        assert result.returncode == 0, result.stderr
        assert result.stdout == "tok-from-config\n"

    async def test_503_prints_the_description_and_retry_after(
        self,
        aiohttp_server: AiohttpServer,
        served: list[dict[str, str]],
        tmp_path: Path,
    ) -> None:
        """
        A 503 JSON answer exits 1, printing its description and Retry-After.
        """
        response = web.json_response(
            {
                "error": "temporarily_unavailable",
                "error_description": "no valid token: the IdP is unavailable",
            },
            status=503,
            headers={"Retry-After": "7"},
        )
        url = await stand_in(aiohttp_server, served, response)

        result = await run_cli_async("token", "--url", url, cwd=tmp_path)

        assert result.returncode == 1
        assert result.stdout == ""
        assert "HTTP 503" in result.stderr
        assert "no valid token: the IdP is unavailable" in result.stderr
        assert "retry after 7 s" in result.stderr

    async def test_error_without_json_prints_the_reason(
        self,
        aiohttp_server: AiohttpServer,
        served: list[dict[str, str]],
        tmp_path: Path,
    ) -> None:
        """
        An error answer that is not JSON falls back to the HTTP reason.
        """
        response = web.Response(status=403, text="<html>no</html>")
        url = await stand_in(aiohttp_server, served, response)

        result = await run_cli_async("token", "--url", url, cwd=tmp_path)

        assert result.returncode == 1
        assert "HTTP 403: Forbidden" in result.stderr
        assert "retry after" not in result.stderr

    async def test_empty_answer_exits_1(
        self,
        aiohttp_server: AiohttpServer,
        served: list[dict[str, str]],
        tmp_path: Path,
    ) -> None:
        """
        A 200 without a token is a failure, not an empty line.
        """
        url = await stand_in(aiohttp_server, served, web.Response(text=""))

        result = await run_cli_async("token", "--url", url, cwd=tmp_path)

        assert result.returncode == 1
        assert result.stdout == ""
        assert "no token" in result.stderr


@dataclass
class RunningSidecar:
    """
    A ``run`` subprocess that has served a token, and how to reach it.
    """

    process: asyncio.subprocess.Process
    config: Path
    token_url: str
    first_answer: dict[str, Any]


async def poll_for_token(
    process: asyncio.subprocess.Process, url: str
) -> dict[str, Any]:
    """
    GET ``url`` until it answers 200; fail if the child exits or time runs out.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTUP_DEADLINE_SECONDS
    async with aiohttp.ClientSession() as session:
        while loop.time() < deadline:
            if process.returncode is not None:
                break
            try:
                async with session.get(url, headers=METADATA) as response:
                    if response.status == 200:
                        answer: dict[str, Any] = await response.json()
                        return answer
            except aiohttp.ClientConnectionError:
                pass
            # Polling a condition against a deadline, not timing a wait.
            await asyncio.sleep(POLL_INTERVAL_SECONDS)

    raise AssertionError(f"no token from {url} before the deadline")


@pytest.fixture
async def running_sidecar(
    token_url: str, tmp_path: Path
) -> AsyncIterator[RunningSidecar]:
    """
    Start ``python -m sidecar run`` against the fake IdP, ready to serve.
    """
    port = free_port()
    config = write_config(tmp_path, config_text(token_url, port))
    url = f"http://127.0.0.1:{port}/token"
    process = await start_cli("run", "--config", str(config), cwd=tmp_path)
    try:
        answer = await poll_for_token(process, url)
        yield RunningSidecar(process, config, url, answer)
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()


def log_lines(stderr: str) -> list[dict[str, Any]]:
    """
    Parse every stderr line as a JSON log event.
    """
    return [json.loads(line) for line in stderr.splitlines() if line]


class TestRun:
    """
    run serves the fake IdP's token and stops cleanly on SIGTERM.
    """

    async def test_serves_the_idp_token(
        self, running_sidecar: RunningSidecar, fake_idp: FakeIdP
    ) -> None:
        """
        /token answers with the token the IdP issued for the client.
        """
        answer = running_sidecar.first_answer
        request = fake_idp.requests[0]

        assert answer["access_token"] == fake_idp.issued[0]
        assert answer["token_type"] == "Bearer"
        assert 0 < answer["expires_in"] <= 3600
        assert request.form["grant_type"] == "client_credentials"
        assert request.form["client_id"] == "billing"
        assert request.form["client_secret"] == CLIENT_SECRET

    async def test_sigterm_exits_0(
        self, running_sidecar: RunningSidecar
    ) -> None:
        """
        SIGTERM stops the sidecar with exit code 0 within a few seconds.
        """
        process = running_sidecar.process

        process.send_signal(signal.SIGTERM)
        result = await finish(process, SHUTDOWN_DEADLINE_SECONDS)

        assert result.returncode == 0, result.stderr

    async def test_logs_are_json_without_secret_or_token(
        self, running_sidecar: RunningSidecar, fake_idp: FakeIdP
    ) -> None:
        """
        Every stderr line is a JSON event; none holds the secret or token.
        """
        process = running_sidecar.process

        process.send_signal(signal.SIGTERM)
        result = await finish(process, SHUTDOWN_DEADLINE_SECONDS)

        events = [line["event"] for line in log_lines(result.stderr)]
        assert "server.started" in events
        assert "token.fetched" in events
        assert "token.handed_out" in events
        assert events[-1] == "server.stopped"
        output = result.stdout + result.stderr
        assert CLIENT_SECRET not in output
        assert fake_idp.issued
        for token in fake_idp.issued:
            assert token not in output

    async def test_token_command_reads_the_running_config(
        self, running_sidecar: RunningSidecar, fake_idp: FakeIdP
    ) -> None:
        """
        'token --config' finds the running sidecar and prints its token.
        """
        config = running_sidecar.config

        result = await run_cli_async(
            "token", "--config", str(config), cwd=config.parent
        )

        assert result.returncode == 0, result.stderr
        assert result.stdout == f"{fake_idp.issued[0]}\n"

    def test_config_error_exits_2(self, tmp_path: Path) -> None:
        """
        run with an invalid config exits 2 before starting anything.
        """
        path = write_config(tmp_path, "[idp]\nclient_id = 'billing'\n")

        result = run_cli("run", "--config", str(path), cwd=tmp_path)

        assert result.returncode == 2
        assert "config error: idp.token_url:" in result.stderr

    async def test_busy_port_exits_1(
        self, token_url: str, tmp_path: Path
    ) -> None:
        """
        A listen port already taken makes run exit 1, naming the setting
        and the address; it logs no stop of a server that never started.
        """
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            path = write_config(tmp_path, config_text(token_url, port))

            result = await run_cli_async(
                "run", "--config", str(path), cwd=tmp_path
            )

        assert result.returncode == 1
        assert "cannot listen" in result.stderr
        assert f"in use on 127.0.0.1:{port}" in result.stderr
        assert "listen.port" in result.stderr
        assert "server.stopped" not in result.stderr


def test_a_reader_that_went_away_is_no_traceback(tmp_path: Path) -> None:
    """
    Output into a pipe nobody reads ('... | head' after head exited)
    ends the command with exit 1 and no traceback.
    """
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "sidecar", "config-reference"],
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
            cwd=tmp_path,
            env=child_environment(),
            check=False,
        )
    finally:
        os.close(write_end)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
