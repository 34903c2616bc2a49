"""
The ``token-sidecar`` command line: run, check-config, token, health,
config-reference, quota, demo.

Exit codes: 0 success, 1 runtime failure, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar import __version__
from sidecar.client import ClientError, check_health, fetch_token
from sidecar.config import (
    CONFIG_PATH_VARIABLE,
    FleetSettings,
    IdPSettings,
    Settings,
    redacted,
)
from sidecar.configload import (
    config_file_holds_secret,
    load_listen_settings,
    load_ops_settings,
    load_quota_view,
    load_settings,
)
from sidecar.errors import ConfigError, SidecarError

if TYPE_CHECKING:
    from sidecar.daemon import Sidecar
    from sidecar.ledger import MonthSpend

# The daemon's modules (aiohttp, structlog, cryptography, ...) are
# imported by the commands that use them: `health` and `token` run often,
# from container health checks and batch jobs, and must start fast.

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
    except BrokenPipeError:
        # The reader went away ('token-sidecar quota | head'): nothing
        # more to say, and Python must not fail flushing stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE

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
    _add_config_flag(run, strict=True)
    run.add_argument(
        "--once",
        action="store_true",
        help="make sure a valid token is cached (fetching at most one), "
        "then exit: for init containers and batch jobs",
    )
    run.set_defaults(command=_run)

    check = commands.add_parser(
        "check-config", help="validate the config and print it, redacted"
    )
    _add_config_flag(check, strict=True)
    check.set_defaults(command=_check_config)

    token = commands.add_parser(
        "token", help="print the token of a running sidecar"
    )
    target = token.add_mutually_exclusive_group()
    target.add_argument(
        "--url",
        help="the sidecar's /token URL, or its base URL (default: the "
        "config's [listen] socket or address, else "
        "http://127.0.0.1:8787/token)",
    )
    target.add_argument(
        "--socket", type=Path, help="the sidecar's Unix socket"
    )
    _add_config_flag(token)
    token.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=15.0,
        help="seconds to wait (default 15)",
    )
    token.set_defaults(command=_token)

    health = commands.add_parser(
        "health",
        help="exit 0 if a running sidecar is alive (or, with --ready, "
        "holds a valid token): for container health checks",
    )
    health.add_argument(
        "--ready",
        action="store_true",
        help="ask /readyz (a valid token is held) instead of /healthz",
    )
    health.add_argument(
        "--url",
        help="the ops base URL, or its /healthz or /readyz URL (default: "
        "the config's [ops] host and port)",
    )
    _add_config_flag(health)
    health.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=5.0,
        help="seconds to wait (default 5)",
    )
    health.set_defaults(command=_health)

    reference = commands.add_parser(
        "config-reference",
        help="print the reference of every config key, as Markdown",
    )
    reference.set_defaults(command=_config_reference)

    quota = commands.add_parser(
        "quota", help="print this month's token requests and a projection"
    )
    _add_config_flag(quota)
    quota.set_defaults(command=_quota)

    demo = commands.add_parser(
        "demo",
        help="run against a built-in development IdP (not for production)",
    )
    demo.add_argument(
        "--port",
        type=_port,
        default=8787,
        help="the loopback port of /token (default 8787)",
    )
    demo.add_argument(
        "--ops-port",
        type=_port,
        default=9464,
        help="the loopback port of /healthz, /readyz, /metrics (default 9464)",
    )
    demo.add_argument(
        "--token-lifetime",
        type=_whole_seconds,
        default=60,
        help="seconds each demo token lives (default 60, to see refreshes)",
    )
    demo.set_defaults(command=_demo)

    return parser


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _whole_seconds(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not 1 s or more")
    return int(text)


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1-65535)")
    return int(text)


def _add_config_flag(
    parser: argparse.ArgumentParser, strict: bool = False
) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help=f"TOML config file (default: ${CONFIG_PATH_VARIABLE})",
    )
    if strict:
        parser.add_argument(
            "--strict",
            action="store_true",
            help="refuse secrets (files, or the config) that every user "
            "may read, instead of warning",
        )


def _config_path_from_environment() -> Path | None:
    named = os.environ.get(CONFIG_PATH_VARIABLE)

    return Path(named) if named else None


def _run(args: argparse.Namespace) -> int:
    from sidecar.daemon import Sidecar
    from sidecar.hardening import harden_process
    from sidecar.log import configure_logging

    settings = load_settings(args.config)
    configure_logging(settings.log.level, settings.log.format)
    if not _secrets_lie_safely(
        settings, args.config, args.strict, _log_exposed
    ):
        return EXIT_CONFIG
    harden_process()
    if args.once:
        return _run_once(settings)

    return _serve(Sidecar(settings))


def _run_once(settings: Settings) -> int:
    from sidecar.daemon import run_once
    from sidecar.log import scrub

    try:
        token, how = asyncio.run(run_once(settings))
    except (SidecarError, OSError) as exc:
        print(f"error: no token: {scrub(str(exc))}", file=sys.stderr)
        return EXIT_FAILURE
    if settings.cache.resolved_path() is None:
        print(
            "warning: cache.path is off, so the token is not kept for the "
            "sidecar or the next run",
            file=sys.stderr,
        )
    remaining = int(token.expires_at - time.time())
    print(f"token {how}: valid for {remaining} s more", file=sys.stderr)

    return EXIT_OK


def _secrets_lie_safely(
    settings: Settings,
    config: Path | None,
    strict: bool,
    warn: Callable[[str, Path, str], None] | None = None,
) -> bool:
    """
    Warn about secrets any local user may read; with ``strict``, refuse.
    """
    from sidecar.hardening import (
        exposed_secret_files,
        shared_state_directories,
    )

    config = config or _config_path_from_environment()
    holds_secret = config is not None and config_file_holds_secret(config)
    exposed = [
        (what, path, "readable by every user on this host; chmod o-r it")
        for what, path in exposed_secret_files(settings, config, holds_secret)
    ] + [
        (
            what,
            path,
            "writable by other users, who could delete or replace the "
            "cache or the ledger (and so the budget); chmod go-w it",
        )
        for what, path in shared_state_directories(settings)
    ]
    for what, path, problem in exposed:
        if warn is not None and not strict:
            warn(what, path, problem)
            continue
        print(
            f"{'error' if strict else 'warning'}: {what} {str(path)!r} is "
            f"{problem}",
            file=sys.stderr,
        )

    return not (strict and exposed)


def _log_exposed(what: str, path: Path, problem: str) -> None:
    import structlog

    structlog.get_logger("sidecar.cli").warning(
        "config.file_exposed",
        what=what,
        path=str(path),
        problem=problem,
        hint="or run with --strict to refuse",
    )


def _serve(sidecar: Sidecar) -> int:
    from sidecar.daemon import run_until_signalled
    from sidecar.errors import StateLockError
    from sidecar.listener import ListenerError

    try:
        with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            runner.run(run_until_signalled(sidecar))
    except (ListenerError, StateLockError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(
            f"error: cannot listen ({exc.strerror or exc}); choose another "
            "listen.port / ops.port or stop what holds it",
            file=sys.stderr,
        )
        return EXIT_FAILURE

    return EXIT_OK


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """
    uvloop's event loop when the ``uvloop`` extra is installed, else
    asyncio's own (``None``: the runner's default).
    """
    try:
        import uvloop
    except ImportError:
        return None

    return uvloop.new_event_loop


def _check_config(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    print(_to_toml(redacted(settings)), end="")

    return (
        EXIT_OK
        if _secrets_lie_safely(settings, args.config, args.strict)
        else EXIT_CONFIG
    )


def _config_reference(args: argparse.Namespace) -> int:
    from sidecar.reference import render_reference

    print(render_reference(), end="")

    return EXIT_OK


def _quota(args: argparse.Namespace) -> int:
    from sidecar.clock import SystemClock
    from sidecar.ledger import LedgerUnreadableError, QuotaLedger
    from sidecar.log import configure_logging

    # stdout is the report; what goes wrong is said once, as "error:".
    configure_logging("error", "auto")
    view = load_quota_view(args.config)
    budget = view.quota.monthly_budget
    if view.idp is not None:
        fleet = asyncio.run(_read_fleet_spend(view.fleet, view.idp))
        if fleet is None:
            print(
                "error: Redis did not answer, so the fleet's spend is "
                "unknown; this host's own count follows",
                file=sys.stderr,
            )
        else:
            print("fleet (every sidecar sharing this credential):")
            print(_describe_spend(fleet, budget))
            print("this host:")
    path = view.quota.resolved_ledger_path()
    if path is None:
        print(
            "error: the ledger is kept in memory only (quota.ledger_path is "
            'empty, or "auto" found no runtime directory); set '
            "quota.ledger_path",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        ledger = QuotaLedger(path, SystemClock(), reader=True)
    except LedgerUnreadableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(_describe_spend(ledger.month_spend(), budget))

    return EXIT_OK


async def _read_fleet_spend(
    fleet: FleetSettings, idp: IdPSettings
) -> MonthSpend | None:
    from prometheus_client import CollectorRegistry

    from sidecar.clock import SystemClock
    from sidecar.fleet import FleetMetrics, connect
    from sidecar.fleetspend import SharedSpend
    from sidecar.seal import Binding

    client = connect(fleet)
    shared = SharedSpend(
        client,
        fleet,
        Binding.of(idp),
        SystemClock(),
        FleetMetrics(CollectorRegistry()),
    )
    try:
        return await shared.read()
    finally:
        await client.aclose()


def _describe_spend(spend: MonthSpend, budget: int | None) -> str:
    def counts(by: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(by.items())) or "-"

    lines = [
        f"{spend.month} (UTC): {spend.requests} token requests",
        f"  by reason:  {counts(spend.by_reason)}",
        f"  by outcome: {counts(spend.by_outcome)}",
        f"  projected to the month's end: {spend.projected:.0f}",
    ]
    if budget is not None:
        share = 100 * spend.requests / budget
        lines.append(f"  budget: {budget} ({share:.0f} % used)")

    return "\n".join(lines)


def _token(args: argparse.Namespace) -> int:
    socket_path, url = args.socket, args.url
    if url is not None and not url.startswith("http://"):
        print(f"error: {url!r} is not an http:// URL", file=sys.stderr)
        return EXIT_CONFIG
    if url is not None:
        url = token_url(url)
    if socket_path is None and url is None:
        socket_path, url = _target_from_config(args.config)
    try:
        token = fetch_token(
            url=url, socket_path=socket_path, timeout_seconds=args.timeout
        )
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(token)

    return EXIT_OK


def _health(args: argparse.Namespace) -> int:
    base = args.url
    if base is None:
        ops = load_ops_settings(args.config)
        if not ops.enabled:
            print(
                "error: [ops] enabled is false, so there is nothing to ask; "
                "enable it or give --url",
                file=sys.stderr,
            )
            return EXIT_CONFIG
        base = f"http://{_client_host(ops.host)}:{ops.port}"
    url = probe_url(base, ready=args.ready)
    try:
        status = check_health(url, args.timeout)
    except ClientError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(status)

    return EXIT_OK


def token_url(given: str) -> str:
    """
    The /token URL for what a user gave: a base URL (no path) gets
    ``/token``; any other path is the user's and is kept.
    """
    parts = urllib.parse.urlsplit(given)
    if parts.path.strip("/"):
        return given

    return urllib.parse.urlunsplit(parts._replace(path="/token"))


def probe_url(given: str, *, ready: bool) -> str:
    """
    The /healthz or /readyz URL for what a user gave: the ops base URL,
    or any URL of the ops port (naming /readyz means ready).
    """
    parts = urllib.parse.urlsplit(given)
    path = parts.path.rstrip("/")
    # Any of the ops port's own URLs names its base.
    for probe in ("/healthz", "/readyz", "/metrics"):
        if path.endswith(probe):
            path = path.removesuffix(probe)
            ready = ready or probe == "/readyz"
    path += "/readyz" if ready else "/healthz"

    return urllib.parse.urlunsplit(parts._replace(path=path))


def _client_host(bound: str) -> str:
    """
    The address a client on this host uses to reach a server bound to
    ``bound``: the loopback address for a wildcard bind.
    """
    if bound in ("0.0.0.0", ""):  # noqa: S104 -- a client, not a bind
        return "127.0.0.1"
    if bound == "::":
        return "[::1]"

    return f"[{bound}]" if ":" in bound else bound


def _target_from_config(path: Path | None) -> tuple[Path | None, str | None]:
    listen = load_listen_settings(path)
    if listen.unix_socket is not None and (
        not listen.tcp or listen.unix_socket.exists()
    ):
        return listen.unix_socket, None
    host = _client_host(listen.host)

    return None, f"http://{host}:{listen.port}/token"


def _demo(args: argparse.Namespace) -> int:
    from sidecar.demo import run_demo
    from sidecar.log import configure_logging

    configure_logging("info", "auto")

    return asyncio.run(run_demo(args.port, args.ops_port, args.token_lifetime))


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
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"

    return json.dumps(str(value))
