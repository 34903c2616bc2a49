"""
The processes a bench run starts: the scripted IdP, the sidecar, the
bare aiohttp server and nginx; and what can be read about them from
``/proc`` (resident memory, open descriptors, CPU time).

Each process can be pinned to a set of cores, so that server and load
do not share one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.idp import CLIENT_ID, CLIENT_SECRET, TOKEN_PATH

#: Where ``python -m bench.*`` and ``python -m sidecar`` resolve.
ROOT = Path(__file__).resolve().parent.parent

LOOPBACK = "127.0.0.1"

#: How long a child may take to say it serves.
START_DEADLINE_SECONDS = 20.0

#: Between two looks at a condition polled against a deadline.
POLL_SECONDS = 0.005

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Child:
    """
    A started process, with readings from ``/proc``.
    """

    process: asyncio.subprocess.Process
    name: str
    started_at: float = field(default_factory=time.monotonic)
    #: Removed at `stop`, unless the process had died by itself.
    directory: Path | None = None

    @property
    def pid(self) -> int:
        """
        The process id.
        """
        return self.process.pid

    def rss_bytes(self) -> int:
        """
        Resident memory now (VmRSS); 0 once the process is gone.
        """
        return _status_field(self.pid, "VmRSS") * 1024

    def open_fds(self) -> int:
        """
        Open file descriptors now.
        """
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return 0

    def cpu_seconds(self) -> float:
        """
        User and system CPU time used so far by the process and its
        children (nginx's worker), all threads.
        """
        pids = [self.pid]
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children")
            pids += [int(pid) for pid in children.read_text().split()]

        return sum(_cpu_seconds(pid) for pid in pids)

    async def stop(self) -> None:
        """
        SIGTERM, then SIGKILL if it does not exit within five seconds.
        """
        if self.process.returncode is not None:
            return  # died by itself: its directory stays, for its log
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), 5.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        if self.directory is not None:
            await asyncio.to_thread(
                shutil.rmtree, self.directory, ignore_errors=True
            )


def _cpu_seconds(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # utime and stime are fields 14 and 15; counting starts after the ")"
    # that ends the command name, which may itself hold spaces.
    fields = text.rsplit(")", 1)[1].split()

    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _status_field(pid: int, name: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])

    return 0


def pinned(command: list[str], cores: set[int] | None) -> list[str]:
    """
    ``command`` run on ``cores`` only (through taskset), if given.
    """
    if not cores:
        return command
    if shutil.which("taskset") is None:
        return command  # pinned after the start instead, by spawn()

    return ["taskset", "-c", ",".join(map(str, sorted(cores))), *command]


async def spawn(
    command: list[str],
    name: str,
    cores: set[int] | None = None,
    env: dict[str, str] | None = None,
    stdout: int | Any = asyncio.subprocess.PIPE,
    stderr: int | Any = asyncio.subprocess.DEVNULL,
    cwd: Path = ROOT,
) -> Child:
    """
    Start ``command`` in ``cwd`` (the repository root), pinned to
    ``cores``.
    """
    started_at = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *pinned(command, cores),
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
    )
    if cores and shutil.which("taskset") is None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(process.pid, cores)

    return Child(process, name, started_at)


async def read_port(child: Child) -> int:
    """
    The port a child announces as ``{"port": P}`` on its first line.
    """
    assert child.process.stdout is not None  # spawned with a pipe
    line = await asyncio.wait_for(
        child.process.stdout.readline(), START_DEADLINE_SECONDS
    )
    if not line:
        raise RuntimeError(f"{child.name} exited before it served")
    port: int = json.loads(line)["port"]

    return port


@dataclass
class IdP:
    """
    The scripted IdP (`bench.idp`) running in its own process.
    """

    child: Child
    port: int

    @property
    def token_url(self) -> str:
        """
        Its token endpoint.
        """
        return f"http://{LOOPBACK}:{self.port}{TOKEN_PATH}"

    async def stats(self, since: int = 0) -> dict[str, Any]:
        """
        The requests it has had (``count``) and their ``records``.
        """
        url = f"http://{LOOPBACK}:{self.port}/stats?since={since}"
        async with (
            aiohttp.ClientSession() as session,
            session.get(url) as response,
        ):
            data: dict[str, Any] = await response.json()

        return data

    async def count(self) -> int:
        """
        Token requests received so far.
        """
        stats = await self.stats(since=1 << 30)
        count: int = stats["count"]

        return count

    async def control(self, **orders: Any) -> None:
        """
        Hold or release answers, set the lifetime or the cycle.
        """
        url = f"http://{LOOPBACK}:{self.port}/control"
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json=orders) as response,
        ):
            response.raise_for_status()


async def start_idp(
    lifetime_seconds: float, cycle: str = "ok", cores: set[int] | None = None
) -> IdP:
    """
    Start the scripted IdP and wait until it serves.
    """
    child = await spawn(
        [
            sys.executable,
            "-m",
            "bench.idp",
            "--lifetime",
            str(lifetime_seconds),
            "--cycle",
            cycle,
        ],
        "idp",
        cores,
    )

    return IdP(child, await read_port(child))


@dataclass
class Sidecar:
    """
    A ``python -m sidecar run`` child, its ports and state directory.
    """

    child: Child
    token_port: int
    ops_port: int
    directory: Path
    loop: str

    @property
    def token_url(self) -> str:
        """
        Its ``/token`` URL.
        """
        return f"http://{LOOPBACK}:{self.token_port}/token"

    def ops_url(self, path: str) -> str:
        """
        A URL on its ops listener.
        """
        return f"http://{LOOPBACK}:{self.ops_port}{path}"

    async def wait_ready(self, session: aiohttp.ClientSession) -> float:
        """
        Poll ``/readyz`` until it answers 200; return the seconds from
        the process start to that answer.
        """
        deadline = time.monotonic() + START_DEADLINE_SECONDS
        while time.monotonic() < deadline:
            if self.child.process.returncode is not None:
                raise RuntimeError(
                    f"the sidecar exited ({self.child.process.returncode}); "
                    f"see {self.directory / 'sidecar.log'}"
                )
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(self.ops_url("/readyz")) as response:
                    if response.status == 200:
                        return time.monotonic() - self.child.started_at
            # Polling a condition against a deadline, not timing a wait.
            await asyncio.sleep(POLL_SECONDS)

        raise RuntimeError("the sidecar did not become ready in time")

    async def metric(
        self, session: aiohttp.ClientSession, name: str
    ) -> float | None:
        """
        The first sample of ``name`` (with its labels, if any, as they
        appear) on ``/metrics``.
        """
        async with session.get(self.ops_url("/metrics")) as response:
            text = await response.text()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])

        return None

    def log_events(self) -> list[dict[str, Any]]:
        """
        The sidecar's log lines, parsed.
        """
        events = []
        path = self.directory / "sidecar.log"
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))

        return events


def sidecar_config(
    token_url: str,
    token_port: int,
    ops_port: int,
    **tables: dict[str, Any],
) -> str:
    """
    A TOML config for the bench IdP; ``tables`` add or override keys.
    """
    config: dict[str, dict[str, Any]] = {
        "idp": {
            "token_url": token_url,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
        "listen": {"port": token_port},
        "ops": {"port": ops_port},
        "log": {"format": "json"},
    }
    for table, values in tables.items():
        config.setdefault(table, {}).update(values)
    lines = []
    for table, values in config.items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {json.dumps(v)}" for key, v in values.items())

    return "\n".join(lines) + "\n"


def free_port() -> int:
    """
    A loopback port nothing listens on now.
    """
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]

    return port


async def start_sidecar(
    idp: IdP,
    loop: str = "asyncio",
    cores: set[int] | None = None,
    tables: dict[str, dict[str, Any]] | None = None,
    root: Path = ROOT,
) -> Sidecar:
    """
    Start ``python -m sidecar run`` against ``idp``, with fresh state;
    ``tables`` add config keys (``{"listen": {"port": 0}}``); ``root``
    is the source tree whose ``sidecar`` runs (another checkout, to
    compare).

    With ``loop="uvloop"`` it runs through `bench.launch` under
    ``python -O``: the listener asserts that a transport is asyncio's
    own, which uvloop's are not, and every sidecar assert is a type
    hint for mypy, so ``-O`` changes nothing else (see
    docs/benchmarks.md).
    """
    directory, config, token_port, ops_port = _prepare_sidecar(
        idp.token_url, tables or {}
    )
    env = {"RUNTIME_DIRECTORY": str(directory / "run")}
    if root != ROOT:
        # Its own sidecar package (the working directory comes first on
        # the path), this tree's bench.launch.
        env["PYTHONPATH"] = str(ROOT)
    if loop == "asyncio":
        command = [sys.executable, "-m", "sidecar"]
    else:
        command = [sys.executable, "-O", "-m", "bench.launch", "--loop", loop]
        env.update(optimized_bytecode_cache())
    log_file = (directory / "sidecar.log").open("wb")
    with log_file:
        child = await spawn(
            [*command, "run", "--config", str(config)],
            f"sidecar-{loop}",
            cores,
            # Fresh state: no warm-restart token, no ledger holding back
            # the first request.
            env=env,
            stdout=log_file,
            stderr=log_file,
            cwd=root,
        )
    child.directory = directory

    return Sidecar(child, token_port, ops_port, directory, loop)


def optimized_bytecode_cache() -> dict[str, str]:
    """
    The environment for ``python -O`` children to keep their bytecode in
    a cache of their own under the temp directory.

    Where PYTHONDONTWRITEBYTECODE is set (as here), no ``.opt-1.pyc``
    is ever written, and every ``-O`` start compiles every module again,
    which doubles its start time and adds megabytes; `prime_bytecode`
    fills the cache once.
    """
    prefix = Path(tempfile.gettempdir()) / "token-sidecar-bench-pycache"

    return {"PYTHONPYCACHEPREFIX": str(prefix), "PYTHONDONTWRITEBYTECODE": ""}


async def prime_bytecode(loop: str) -> None:
    """
    Compile, once, what a ``-O`` sidecar on ``loop`` imports.
    """
    if loop == "asyncio":
        return
    child = await spawn(
        [
            sys.executable,
            "-O",
            "-c",
            f"import bench.launch, sidecar.daemon, sidecar.cli, {loop}",
        ],
        "prime",
        env=optimized_bytecode_cache(),
        stdout=asyncio.subprocess.DEVNULL,
    )
    await child.process.wait()


def _prepare_sidecar(
    token_url: str, tables: dict[str, dict[str, Any]]
) -> tuple[Path, Path, int, int]:
    # A private state directory with the config in it, and two ports.
    directory = Path(tempfile.mkdtemp(prefix="bench-sidecar-"))
    directory.chmod(0o700)
    token_port, ops_port = free_port(), free_port()
    config = directory / "sidecar.toml"
    config.write_text(
        sidecar_config(token_url, token_port, ops_port, **tables)
    )
    config.chmod(0o600)

    return directory, config, token_port, ops_port


@dataclass
class Server:
    """
    A ceiling server (bare aiohttp or nginx) and its port.
    """

    child: Child
    port: int
    directory: Path | None = None

    @property
    def token_url(self) -> str:
        """
        Its ``/token`` URL.
        """
        return f"http://{LOOPBACK}:{self.port}/token"


async def start_bare(
    body: bytes, loop: str = "asyncio", cores: set[int] | None = None
) -> Server:
    """
    Start the bare aiohttp server answering ``body``.
    """
    directory = Path(tempfile.mkdtemp(prefix="bench-bare-"))
    (directory / "body.json").write_bytes(body)
    child = await spawn(
        [
            sys.executable,
            "-m",
            "bench.bare",
            "--loop",
            loop,
            "--body",
            str(directory / "body.json"),
        ],
        f"bare-{loop}",
        cores,
    )
    child.directory = directory

    return Server(child, await read_port(child), directory)


NGINX_CONFIG = """\
worker_processes 1;
daemon off;
master_process on;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    server {{
        listen {host}:{port} backlog=1024;
        location = /token {{
            default_type application/json;
            alias {directory}/token.json;
        }}
    }}
}}
"""


async def start_nginx(body: bytes, cores: set[int] | None = None) -> Server:
    """
    Start nginx with one worker serving ``body`` as a static file.

    Raises `FileNotFoundError` when nginx is not installed.
    """
    nginx, directory, config, port = _prepare_nginx(body)
    child = await spawn(
        [nginx, "-c", str(config), "-p", str(directory)],
        "nginx",
        cores,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    child.directory = directory
    await wait_for_port(port, child)

    return Server(child, port, directory)


def _prepare_nginx(body: bytes) -> tuple[str, Path, Path, int]:
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if nginx is None:
        raise FileNotFoundError("nginx")
    directory = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
    # Its worker may run as another user: everything it reads is public.
    directory.chmod(0o755)
    (directory / "token.json").write_bytes(body)
    (directory / "token.json").chmod(0o644)
    port = free_port()
    config = directory / "nginx.conf"
    config.write_text(
        NGINX_CONFIG.format(directory=directory, host=LOOPBACK, port=port)
    )

    return nginx, directory, config, port


async def wait_for_port(port: int, child: Child) -> None:
    """
    Poll until something accepts connections on ``port``.
    """
    deadline = time.monotonic() + START_DEADLINE_SECONDS
    while time.monotonic() < deadline:
        if child.process.returncode is not None:
            raise RuntimeError(f"{child.name} exited before it served")
        try:
            _, writer = await asyncio.open_connection(LOOPBACK, port)
        except OSError:
            # Polling a condition against a deadline, not timing a wait.
            await asyncio.sleep(POLL_SECONDS)
            continue
        writer.close()
        return

    raise RuntimeError(f"{child.name} did not listen in time")


def server_and_load_cores() -> tuple[set[int] | None, set[int] | None]:
    """
    One core for the server and the others for the load, when this
    process may use two or more; else no pinning.
    """
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None, None

    return {cores[0]}, set(cores[1:])
