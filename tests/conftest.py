"""
Fixtures shared by the test modules: a fake IdP on a real loopback
server, settings that point at it, and a running sidecar.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp.test_utils import TestServer

from sidecar.clock import Clock
from sidecar.config import Settings
from sidecar.configload import settings_from_dict
from sidecar.daemon import Sidecar
from tests.fakes import TOKEN_PATH, FakeIdP

CLIENT_SECRET = "s3cr3t-client-value-4242"

AiohttpServer = Callable[..., Awaitable[TestServer]]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak", action="store_true", help="run the long soak tests"
    )


@pytest.fixture(autouse=True)
def _private_runtime_directory(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Give each test its own runtime directory, where the token cache and
    the ledger go by default, so that no test sees another's state.
    """
    directory = tmp_path_factory.mktemp("run")
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(directory))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)


@pytest.fixture(autouse=True)
def _plain_structlog() -> None:
    """
    Reset structlog between tests, so capture_logs sees every event.
    """
    structlog.reset_defaults()


@pytest.fixture
def fake_idp() -> FakeIdP:
    return FakeIdP()


@pytest.fixture
async def idp_server(
    fake_idp: FakeIdP, aiohttp_server: AiohttpServer
) -> TestServer:
    return await aiohttp_server(fake_idp.app(), host="127.0.0.1")


@pytest.fixture
def token_url(idp_server: TestServer) -> str:
    return str(idp_server.make_url(TOKEN_PATH))


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """
    Merge two settings dicts, one table deep.
    """
    merged = {k: dict(v) for k, v in base.items()}
    for table, values in extra.items():
        merged.setdefault(table, {}).update(values)
    return merged


@pytest.fixture
def make_settings(token_url: str) -> Callable[..., Settings]:
    """
    Settings for a sidecar talking to the fake IdP, with quick back-off
    and ephemeral ports; keyword tables override.
    """

    def make(**tables: dict[str, Any]) -> Settings:
        base = {
            "idp": {
                "token_url": token_url,
                "client_id": "billing",
                "client_secret": CLIENT_SECRET,
            },
            "retry": {
                "backoff_initial_seconds": 0.01,
                "backoff_max_seconds": 0.05,
                "rejected_backoff_initial_seconds": 0.02,
                "rejected_backoff_max_seconds": 0.1,
            },
            "listen": {"port": 0, "wait_for_token_seconds": 5},
            "ops": {"port": 0},
        }
        return settings_from_dict(merge(base, tables))

    return make


@pytest.fixture
async def start_sidecar() -> AsyncIterator[Callable[..., Awaitable[Sidecar]]]:
    """
    Start sidecars on loopback; all are stopped after the test.
    """
    started: list[Sidecar] = []

    async def start(settings: Settings, clock: Clock | None = None) -> Sidecar:
        sidecar = Sidecar(settings, clock=clock)
        await sidecar.start()
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        await sidecar.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def token_url_of(sidecar: Sidecar) -> str:
    """
    The running sidecar's /token URL.
    """
    assert sidecar.token_address is not None
    host, port = sidecar.token_address
    return f"http://{host}:{port}/token"


def ops_url_of(sidecar: Sidecar, path: str) -> str:
    """
    A URL on the running sidecar's ops listener.
    """
    assert sidecar.ops_address is not None
    host, port = sidecar.ops_address
    return f"http://{host}:{port}{path}"


METADATA = {"Metadata": "true"}
