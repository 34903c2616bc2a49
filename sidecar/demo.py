"""
``token-sidecar demo``: the sidecar against a built-in development IdP,
both on loopback. Not for production.
"""

from __future__ import annotations

import contextlib
import secrets
import shlex
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from aiohttp import web

from sidecar.config import Settings
from sidecar.configload import settings_from_dict
from sidecar.daemon import Sidecar, run_until_signalled
from sidecar.devidp import build_dev_idp

EXIT_OK = 0
EXIT_FAILURE = 1


async def run_demo(port: int, ops_port: int, token_lifetime: int) -> int:
    """
    Serve a development IdP and a sidecar using it, both on loopback,
    until a signal; return the exit code.
    """
    client_secret = secrets.token_urlsafe(24)
    idp_runner = web.AppRunner(
        build_dev_idp("demo-client", client_secret, token_lifetime),
        access_log=None,
    )
    await idp_runner.setup()
    await web.TCPSite(idp_runner, "127.0.0.1", 0).start()
    idp_port = int(idp_runner.addresses[0][1])
    # The demo's cache and ledger live and die with it: in the runtime
    # directory they would count its requests against a real sidecar's
    # monthly budget there.
    state = tempfile.TemporaryDirectory(prefix="token-sidecar-demo-")
    try:
        settings = _demo_settings(
            port, ops_port, idp_port, client_secret, Path(state.name)
        )
        sidecar = Sidecar(settings)
        try:
            await run_until_signalled(
                sidecar,
                on_started=lambda: print(
                    _demo_banner(settings, idp_port), flush=True
                ),
            )
        except OSError as exc:
            free, free_ops = _free_loopback_ports(2)
            print(
                f"error: cannot listen ({exc.strerror or exc}); stop what "
                f"holds it, or try '{_invocation()} demo --port {free} "
                f"--ops-port {free_ops}' (free just now)",
                file=sys.stderr,
            )
            return EXIT_FAILURE
    finally:
        state.cleanup()
        await idp_runner.cleanup()

    return EXIT_OK


def _invocation() -> str:
    """
    How to run this program again from the same shell: ``token-sidecar``
    when that is what PATH finds, else the path it was started by (a venv
    not activated) or ``python -m sidecar``.
    """
    started_as = Path(sys.argv[0])
    if started_as.name == "__main__.py":
        return f"{shlex.quote(sys.executable)} -m sidecar"
    on_path = shutil.which(started_as.name)
    if on_path is not None and Path(on_path).resolve() == started_as.resolve():
        return started_as.name

    return shlex.quote(sys.argv[0])


def _free_loopback_ports(count: int) -> list[int]:
    """
    Ports free on 127.0.0.1 right now, for a hint: all bound at once, so
    they differ.
    """
    with contextlib.ExitStack() as stack:
        holders = [stack.enter_context(socket.socket()) for _ in range(count)]
        for holder in holders:
            holder.bind(("127.0.0.1", 0))

        return [holder.getsockname()[1] for holder in holders]


def _demo_settings(
    port: int, ops_port: int, idp_port: int, client_secret: str, state: Path
) -> Settings:
    return settings_from_dict(
        {
            "idp": {
                "token_url": f"http://127.0.0.1:{idp_port}/oauth/token",
                "client_id": "demo-client",
                "client_secret": client_secret,
            },
            "listen": {"port": port},
            "ops": {"port": ops_port},
            "cache": {"path": str(state / "token.cache")},
            "quota": {"ledger_path": str(state / "ledger.json")},
        }
    )


def _demo_banner(settings: Settings, idp_port: int) -> str:
    token_url = f"http://127.0.0.1:{settings.listen.port}/token"
    ops_url = f"http://127.0.0.1:{settings.ops.port}"

    return "\n".join(
        [
            "token-sidecar demo",
            f"  DEVELOPMENT IdP on 127.0.0.1:{idp_port}: NOT FOR PRODUCTION",
            "",
            "Try, in another terminal:",
            f"  curl --noproxy '*' -H 'Metadata: true' {token_url}",
            f"  {_invocation()} token --url {token_url}",
            f"  curl --noproxy '*' {ops_url}/readyz",
            f"  curl --noproxy '*' {ops_url}/metrics",
            "Ctrl-C stops it.",
            "",
        ]
    )
