"""
Tests for ``token-sidecar health``, the container health check: it asks
the ops port of a real sidecar, started on loopback.
"""

from __future__ import annotations

import grp
import socket
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from sidecar.cli import probe_url
from sidecar.client import _describe_denied
from sidecar.config import Settings
from sidecar.daemon import Sidecar
from tests.fakes import FakeIdP, free_port, wait_until
from tests.test_cli import run_cli, run_cli_async

StartSidecar = Callable[..., Awaitable[Sidecar]]


def ops_base_of(sidecar: Sidecar) -> str:
    """
    The running sidecar's ops base URL, without a path.
    """
    assert sidecar.ops_address is not None
    host, port = sidecar.ops_address

    return f"http://{host}:{port}"


async def test_alive_sidecar_is_healthy(
    make_settings: Callable[..., Settings],
    start_sidecar: StartSidecar,
    tmp_path: Path,
) -> None:
    """
    health exits 0 and prints "ok" when the sidecar's refresher runs.
    """
    sidecar = await start_sidecar(make_settings())

    result = await run_cli_async(
        "health", "--url", ops_base_of(sidecar), cwd=tmp_path
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"


async def test_a_probe_url_is_accepted_too(
    make_settings: Callable[..., Settings],
    start_sidecar: StartSidecar,
    fake_idp: FakeIdP,
    tmp_path: Path,
) -> None:
    """
    --url may be the /readyz URL itself; naming it asks readiness.
    """
    fake_idp.hold()
    sidecar = await start_sidecar(make_settings())

    result = await run_cli_async(
        "health", "--url", ops_base_of(sidecar) + "/readyz", cwd=tmp_path
    )
    fake_idp.release()

    assert result.returncode == 1
    assert "HTTP 503: no valid token" in result.stderr


async def test_the_token_port_is_named_as_the_wrong_one(
    make_settings: Callable[..., Settings],
    start_sidecar: StartSidecar,
    tmp_path: Path,
) -> None:
    """
    health pointed at the /token port says that is not the ops port,
    rather than only relaying its 403.
    """
    sidecar = await start_sidecar(make_settings())
    assert sidecar.token_address is not None
    host, port = sidecar.token_address

    result = await run_cli_async(
        "health", "--url", f"http://{host}:{port}", cwd=tmp_path
    )

    assert result.returncode == 1
    assert "is not a sidecar's ops port" in result.stderr
    assert "9464 by default" in result.stderr


@pytest.mark.parametrize(
    ("given", "ready", "asked"),
    [
        ("http://127.0.0.1:9090", False, "http://127.0.0.1:9090/healthz"),
        ("http://127.0.0.1:9090/", True, "http://127.0.0.1:9090/readyz"),
        (
            "http://127.0.0.1:9090/healthz",
            False,
            "http://127.0.0.1:9090/healthz",
        ),
        (
            "http://127.0.0.1:9090/healthz",
            True,
            "http://127.0.0.1:9090/readyz",
        ),
        (
            "http://127.0.0.1:9090/readyz",
            False,
            "http://127.0.0.1:9090/readyz",
        ),
        (
            "http://127.0.0.1:9090/p/readyz/",
            False,
            "http://127.0.0.1:9090/p/readyz",
        ),
        (
            "http://127.0.0.1:9090/?x=1",
            False,
            "http://127.0.0.1:9090/healthz?x=1",
        ),
        (
            "http://127.0.0.1:9090/metrics",
            False,
            "http://127.0.0.1:9090/healthz",
        ),
    ],
)
def test_probe_url(given: str, ready: bool, asked: str) -> None:
    """
    The probe asked for the URL given: --ready or a /readyz path asks
    readiness, anything else liveness.
    """
    assert probe_url(given, ready=ready) == asked


async def test_ready_needs_a_valid_token(
    make_settings: Callable[..., Settings],
    start_sidecar: StartSidecar,
    fake_idp: FakeIdP,
    tmp_path: Path,
) -> None:
    """
    health --ready exits 1 until the first token is held, then 0.
    """
    fake_idp.hold()
    sidecar = await start_sidecar(make_settings())
    url = ops_base_of(sidecar)

    waiting = await run_cli_async(
        "health", "--ready", "--url", url, cwd=tmp_path
    )
    fake_idp.release()
    await wait_until(lambda: sidecar.cache.servable() is not None)
    ready = await run_cli_async(
        "health", "--ready", "--url", url, cwd=tmp_path
    )

    assert waiting.returncode == 1
    assert waiting.stdout == ""
    assert "unhealthy:" in waiting.stderr
    assert "HTTP 503: no valid token" in waiting.stderr
    assert ready.returncode == 0, ready.stderr
    assert ready.stdout == "ready\n"


async def test_reads_only_the_ops_table_of_the_config(
    make_settings: Callable[..., Settings],
    start_sidecar: StartSidecar,
    tmp_path: Path,
) -> None:
    """
    Without --url, health finds the ops port in a config holding no [idp].
    """
    sidecar = await start_sidecar(make_settings())
    assert sidecar.ops_address is not None
    config = tmp_path / "ops-only.toml"
    config.write_text(f"[ops]\nport = {sidecar.ops_address[1]}\n")

    result = await run_cli_async(
        "health", "--config", str(config), cwd=tmp_path
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"


def test_no_sidecar_is_unhealthy(tmp_path: Path) -> None:
    """
    With nothing on the port, health exits 1 and names the URL it tried.
    """
    url = f"http://127.0.0.1:{free_port()}"

    result = run_cli("health", "--url", url, cwd=tmp_path)

    assert result.returncode == 1
    assert f"no sidecar answered at {url}/healthz" in result.stderr


def test_disabled_ops_is_a_config_error(tmp_path: Path) -> None:
    """
    A config with [ops] disabled exits 2 and says what to change.
    """
    config = tmp_path / "sidecar.toml"
    config.write_text(textwrap.dedent("[ops]\nenabled = false\n"))

    result = run_cli("health", "--config", str(config), cwd=tmp_path)

    assert result.returncode == 2
    assert "[ops] enabled is false" in result.stderr


def test_url_must_be_http(tmp_path: Path) -> None:
    """
    A --url that is not http:// is refused with a message, exit 1.
    """
    result = run_cli("health", "--url", "ftp://127.0.0.1:1", cwd=tmp_path)

    assert result.returncode == 1
    assert "is not an http:// URL" in result.stderr


def test_socket_permission_denied_names_the_group(tmp_path: Path) -> None:
    """
    A user the socket's mode keeps out is told which group to join.
    """
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = tmp_path / "token.sock"
    holder.bind(str(path))
    group = grp.getgrgid(path.stat().st_gid).gr_name

    message = _describe_denied(
        f"unix:{path}", path, PermissionError(13, "Permission denied")
    )
    holder.close()

    assert f"ask to be added to {group}, then log in again" in message
    assert str(path) in message
