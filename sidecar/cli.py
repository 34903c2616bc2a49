"""
The ``token-sidecar`` command line: run, check-config, token, demo.

Exit codes: 0 success, 1 runtime failure, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar import __version__
from sidecar.config import (
    CONFIG_PATH_VARIABLE,
    Settings,
    load_listen_settings,
    load_settings,
    redacted,
    settings_from_dict,
)
from sidecar.daemon import Sidecar, run_until_signalled
from sidecar.devidp import build_dev_idp
from sidecar.errors import ConfigError
from sidecar.log import configure_logging

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> int:
    """
    Parse ``argv`` and run the chosen command; return the exit code.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.command(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK

    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="token-sidecar",
        description=(
            "Fetch one OAuth2 client-credentials token, keep it fresh and "
            "serve it on loopback."
        ),
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the sidecar in the foreground")
    _add_config_flag(run)
    run.set_defaults(command=_run)

    check = commands.add_parser(
        "check-config", help="validate the config and print it, redacted"
    )
    _add_config_flag(check)
    check.set_defaults(command=_check_config)

    token = commands.add_parser(
        "token", help="print the token of a running sidecar"
    )
    token.add_argument(
        "--url",
        help="the sidecar's /token URL (default: the [listen] address "
        "of the config, else http://127.0.0.1:8787/token)",
    )
    _add_config_flag(token)
    token.add_argument(
        "--timeout", type=float, default=15.0, help="seconds to wait"
    )
    token.set_defaults(command=_token)

    demo = commands.add_parser(
        "demo",
        help="run against a built-in development IdP (not for production)",
    )
    demo.add_argument("--port", type=int, default=8787)
    demo.add_argument("--ops-port", type=int, default=9464)
    demo.add_argument(
        "--token-lifetime",
        type=int,
        default=60,
        help="seconds each demo token lives (default 60, to see refreshes)",
    )
    demo.set_defaults(command=_demo)

    return parser


def _add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help=f"TOML config file (default: ${CONFIG_PATH_VARIABLE})",
    )


def _run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    configure_logging(settings.log.level, settings.log.format)

    return _serve(Sidecar(settings))


def _serve(sidecar: Sidecar) -> int:
    try:
        asyncio.run(run_until_signalled(sidecar))
    except OSError as exc:
        print(
            f"error: cannot listen ({exc.strerror or exc}); choose another "
            "listen.port / ops.port or stop what holds it",
            file=sys.stderr,
        )
        return EXIT_FAILURE

    return EXIT_OK


def _check_config(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    print(_to_toml(redacted(settings)), end="")

    return EXIT_OK


def _token(args: argparse.Namespace) -> int:
    url = args.url or _url_from_config(args.config)
    if not url.startswith(("http://", "https://")):
        print(f"error: {url!r} is not an http URL", file=sys.stderr)
        return EXIT_CONFIG
    request = urllib.request.Request(  # noqa: S310 -- http(s) checked above
        url, headers={"Metadata": "true", "Accept": "text/plain"}
    )
    # No proxies: the token must not travel through one from the env.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=args.timeout) as response:
            token = response.read().decode().strip()
    except urllib.error.HTTPError as exc:
        print(f"error: {_describe_http_error(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(
            f"error: no sidecar answered at {url} ({reason}); is "
            "'token-sidecar run' running there?",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if not token:
        print("error: the sidecar answered with no token", file=sys.stderr)
        return EXIT_FAILURE
    print(token)

    return EXIT_OK


def _describe_http_error(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
        detail = str(body.get("error_description") or body.get("error"))
    except (ValueError, AttributeError):
        detail = exc.reason
    retry = exc.headers.get("Retry-After")
    suffix = f" (retry after {retry} s)" if retry else ""

    return f"sidecar answered HTTP {exc.code}: {detail}{suffix}"


def _url_from_config(path: Path | None) -> str:
    listen = load_listen_settings(path)
    host = listen.host
    if host in ("0.0.0.0", "::"):  # noqa: S104 -- a client, not a bind
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"

    return f"http://{host}:{listen.port}/token"


def _demo(args: argparse.Namespace) -> int:
    configure_logging("info", "auto")

    return asyncio.run(_run_demo(args))


async def _run_demo(args: argparse.Namespace) -> int:
    client_secret = secrets.token_urlsafe(24)
    idp_runner = web.AppRunner(
        build_dev_idp("demo-client", client_secret, args.token_lifetime),
        access_log=None,
    )
    await idp_runner.setup()
    await web.TCPSite(idp_runner, "127.0.0.1", 0).start()
    idp_port = int(idp_runner.addresses[0][1])
    try:
        settings = _demo_settings(args, idp_port, client_secret)
        print(_demo_banner(settings, idp_port), flush=True)
        sidecar = Sidecar(settings)
        try:
            await run_until_signalled(sidecar)
        except OSError as exc:
            print(
                f"error: cannot listen ({exc.strerror or exc}); try "
                "'token-sidecar demo --port 18787 --ops-port 19464'",
                file=sys.stderr,
            )
            return EXIT_FAILURE
    finally:
        await idp_runner.cleanup()

    return EXIT_OK


def _demo_settings(
    args: argparse.Namespace, idp_port: int, client_secret: str
) -> Settings:
    return settings_from_dict(
        {
            "idp": {
                "token_url": f"http://127.0.0.1:{idp_port}/oauth/token",
                "client_id": "demo-client",
                "client_secret": client_secret,
            },
            "listen": {"port": args.port},
            "ops": {"port": args.ops_port},
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
            f"  curl -H 'Metadata: true' {token_url}",
            f"  token-sidecar token --url {token_url}",
            f"  curl {ops_url}/readyz",
            f"  curl {ops_url}/metrics",
            "Ctrl-C stops it.",
            "",
        ]
    )


def _to_toml(data: dict[str, Any]) -> str:
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")

    return "\n".join(lines)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)

    return json.dumps(str(value))
