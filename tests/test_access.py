"""
Who may take the token, proven with real client processes running under
other users: the sidecar names each caller by the kernel (SO_PEERCRED on
the Unix socket, /proc/net/tcp on loopback TCP), checks it against
``[access]``, and handles its socket file with care.

The clients are separate processes started with another uid and gid, so
only root can run most of these tests; they are skipped otherwise.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from sidecar.config import Settings
from sidecar.daemon import Sidecar
from sidecar.listener import (
    ListenerError,
    bind_unix,
    file_identity,
    remove_unix_socket,
)
from tests.conftest import METADATA, ops_url_of, token_url_of
from tests.fakes import FakeIdP

#: User A, allowed by uid in most tests: nobody, with its group nogroup.
NOBODY = 65534
#: User B, allowed by nothing: a numeric uid with no passwd entry.
STRANGER = 65533

needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="runs clients as other users (setuid and setgid in the "
    "child), which only root may do",
)

#: One HTTP request to /token with the stdlib only, from a process that
#: may run as any user. It prints the status, the JSON ``error`` and
#: whether a token came back; never the token itself.
CLIENT = textwrap.dedent(
    """
    import http.client
    import json
    import os
    import socket
    import sys


    class UnixConnection(http.client.HTTPConnection):
        def __init__(self, socket_path):
            super().__init__("localhost", timeout=10)
            self.socket_path = socket_path

        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(self.timeout)
            self.sock.connect(self.socket_path)


    kind, _, where = sys.argv[1].partition(":")
    if kind == "unix":
        connection = UnixConnection(where)
    else:
        host, _, port = where.rpartition(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {"Metadata": "true", "Host": "localhost"}
    if "CLIENT_AUTHORIZATION" in os.environ:
        headers["Authorization"] = os.environ["CLIENT_AUTHORIZATION"]
    connection.request("GET", "/token", headers=headers)
    response = connection.getresponse()
    body = json.loads(response.read())
    print(
        json.dumps(
            {
                "status": response.status,
                "error": body.get("error"),
                "has_token": "access_token" in body,
            }
        )
    )
    """
)


@dataclass(frozen=True, slots=True)
class Answer:
    """
    What a client process saw, and which process it was.
    """

    status: int
    error: str | None
    has_token: bool
    pid: int


async def run_client(
    python: str,
    target: str,
    uid: int | None = None,
    gid: int | None = None,
    extra_groups: tuple[int, ...] = (),
    authorization: str | None = None,
) -> Answer:
    """
    Run the client once with ``python`` as ``uid``:``gid`` (default: as
    this process) against ``target`` (``unix:<path>`` or
    ``tcp:<host>:<port>``).
    """
    env = {"PATH": os.defpath}
    if authorization is not None:
        env["CLIENT_AUTHORIZATION"] = authorization
    identity: dict[str, Any] = {}
    if uid is not None:
        identity = {
            "user": uid,
            "group": uid if gid is None else gid,
            # Without this the child keeps root's supplementary groups.
            "extra_groups": list(extra_groups),
        }

    process = await asyncio.create_subprocess_exec(
        python,
        "-I",
        "-c",
        CLIENT,
        target,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",
        env=env,
        **identity,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)

    assert process.returncode == 0, stderr.decode(errors="replace")
    return Answer(pid=process.pid, **json.loads(stdout))


Ask = Callable[..., Awaitable[Answer]]


def usable_by_others(python: str) -> bool:
    """
    Whether ``python`` starts when run as nobody.
    """
    try:
        subprocess.run(
            [python, "-I", "-c", ""],
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            cwd="/",
            env={"PATH": os.defpath},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return False

    return True


@pytest.fixture(scope="session")
def client_python() -> str:
    """
    An interpreter that other users may run, for the client processes.

    The test's own may not do: a virtualenv's python often links into a
    directory only its owner may enter (such as /root). The client needs
    the standard library only, so any Python 3 will do.
    """
    if os.geteuid() != 0:
        pytest.skip(
            "runs clients as other users (setuid and setgid in the "
            "child), which only root may do"
        )
    candidates = [sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]
    for python in candidates:
        if usable_by_others(python):
            return python

    pytest.skip(f"none of {candidates} can be run by uid {NOBODY}")


@pytest.fixture
def ask(client_python: str) -> Ask:
    """
    `run_client` with an interpreter other users may run.
    """
    return functools.partial(run_client, client_python)


def target_of(sidecar: Sidecar) -> str:
    """
    Where the client should call: the Unix socket if any, else TCP.
    """
    if sidecar.token_socket is not None:
        return f"unix:{sidecar.token_socket}"
    assert sidecar.token_address is not None
    host, port = sidecar.token_address

    return f"tcp:{host}:{port}"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """
    A directory every user may enter, for the socket; pytest's tmp_path
    sits under a directory only its owner can enter.
    """
    with tempfile.TemporaryDirectory(prefix="sidecar-access-") as name:
        path = Path(name)
        path.chmod(0o755)
        yield path


Serve = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
def serve(
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    shared_dir: Path,
) -> Serve:
    """
    Start a sidecar on the Unix socket (mode 0666, so the policy and not
    the file mode decides) or on loopback TCP only, with the given
    ``[access]`` keys and ``allow_same_uid = false``.
    """

    async def serve(transport: str, **access: Any) -> Sidecar:
        if transport == "unix":
            listen = {
                "tcp": False,
                "unix_socket": str(shared_dir / "token.sock"),
                "socket_mode": "0666",
            }
        else:
            listen = {"tcp": True}
        settings = make_settings(
            listen=listen, access={"allow_same_uid": False, **access}
        )

        sidecar: Sidecar = await start_sidecar(settings)
        return sidecar

    return serve


TRANSPORTS = pytest.mark.parametrize(
    "transport", ["unix", "tcp"], ids=["unix-socket", "tcp-loopback"]
)


# -- by uid ------------------------------------------------------------------


@TRANSPORTS
@pytest.mark.parametrize(
    ("uid", "status", "error"),
    [
        (NOBODY, 200, None),
        (STRANGER, 403, "caller_not_allowed"),
        (None, 403, "caller_not_allowed"),
    ],
    ids=["allowed-uid", "other-uid", "sidecar-own-uid"],
)
async def test_only_allowed_uids_take_the_token(
    transport: str,
    uid: int | None,
    status: int,
    error: str | None,
    ask: Ask,
    serve: Serve,
) -> None:
    """
    With ``allow_uids = [65534]`` and ``allow_same_uid = false``, only a
    process running as 65534 gets the token; another user, and root (the
    sidecar's own user), get a 403 saying they are not allowed.
    """
    sidecar = await serve(transport, allow_uids=[NOBODY])

    answer = await ask(target_of(sidecar), uid=uid)

    assert (answer.status, answer.error) == (status, error)
    assert answer.has_token is (status == 200)


# -- by group ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("transport", "uid", "gid", "extra_groups", "status"),
    [
        ("unix", STRANGER, NOBODY, (), 200),
        ("unix", STRANGER, STRANGER, (), 403),
        ("tcp", STRANGER, NOBODY, (), 403),
        ("tcp", NOBODY, STRANGER, (), 200),
        ("unix", STRANGER, STRANGER, (NOBODY,), 200),
    ],
    ids=[
        "unix-primary-gid",
        "unix-other-gid",
        "tcp-uid-without-passwd-entry",
        "tcp-membership-from-group-database",
        "unix-supplementary-gid",
    ],
)
async def test_allowed_gids(
    transport: str,
    uid: int,
    gid: int,
    extra_groups: tuple[int, ...],
    status: int,
    ask: Ask,
    serve: Serve,
) -> None:
    """
    ``allow_gids = [65534]`` admits by the caller's primary gid where the
    kernel reports it (SO_PEERCRED on the Unix socket), else by the
    groups the passwd and group databases give the uid.

    Over TCP the kernel reports the uid alone, so 65533 running with gid
    65534 is refused: 65533 has no passwd entry, hence no groups; while
    nobody (65534, primary group 65534 in passwd) is admitted whatever
    gid it runs with. On the Unix socket the calling process's
    supplementary groups count too (SO_PEERGROUPS).
    """
    sidecar = await serve(transport, allow_gids=[NOBODY])

    answer = await ask(
        target_of(sidecar), uid=uid, gid=gid, extra_groups=extra_groups
    )

    assert answer.status == status
    assert answer.has_token is (status == 200)
    if status == 403:
        assert answer.error == "caller_not_allowed"


# -- by client token ---------------------------------------------------------


@TRANSPORTS
async def test_client_token_admits_a_user_the_uids_do_not(
    transport: str, ask: Ask, serve: Serve, tmp_path: Path
) -> None:
    """
    A caller outside the allowlist passes with ``Authorization: Bearer``
    and the client token file's contents; a wrong token, or none, does
    not.
    """
    client_token = "ct-" + os.urandom(16).hex()
    token_file = tmp_path / "client_token"
    token_file.write_text(client_token + "\n")
    sidecar = await serve(
        transport, allow_uids=[NOBODY], client_token_file=str(token_file)
    )
    target = target_of(sidecar)

    right = await ask(target, STRANGER, authorization=f"Bearer {client_token}")
    wrong = await ask(target, STRANGER, authorization="Bearer ct-wrong")
    basic = await ask(target, STRANGER, authorization=f"Basic {client_token}")
    none = await ask(target, STRANGER)

    assert (right.status, right.has_token) == (200, True)
    for refused in (wrong, basic, none):
        assert (refused.status, refused.error) == (403, "caller_not_allowed")
        assert not refused.has_token


async def test_client_token_rewritten_in_place_is_used_without_restart(
    ask: Ask, serve: Serve, tmp_path: Path
) -> None:
    """
    Rewriting the client token file takes effect at the next request:
    the old token stops working and the new one works.
    """
    old, new = ("ct-" + os.urandom(16).hex() for _ in range(2))
    token_file = tmp_path / "client_token"
    token_file.write_text(old)
    sidecar = await serve("tcp", client_token_file=str(token_file))
    target = target_of(sidecar)
    before = await ask(target, STRANGER, authorization=f"Bearer {old}")

    token_file.write_text(new)
    old_after = await ask(target, STRANGER, authorization=f"Bearer {old}")
    new_after = await ask(target, STRANGER, authorization=f"Bearer {new}")

    assert before.status == 200
    assert old_after.status == 403
    assert new_after.status == 200


def publish(volume: Path, version: str, files: dict[str, str]) -> None:
    """
    Publish ``files`` in ``volume`` as Kubernetes updates a secret
    volume: a new timestamped directory, then an atomic swap of the
    ``..data`` symlink; each name links through ``..data``.
    """
    (volume / version).mkdir()
    for name, content in files.items():
        (volume / version / name).write_text(content)
    staged = volume / "..data_tmp"
    staged.symlink_to(version)
    os.replace(staged, volume / "..data")
    for name in files:
        if not (volume / name).is_symlink():
            (volume / name).symlink_to(Path("..data") / name)


async def test_client_token_symlink_swap_is_used_without_restart(
    ask: Ask, serve: Serve, tmp_path: Path
) -> None:
    """
    A Kubernetes-style update of the client token (``..data`` swapped to
    a new directory) takes effect at the next request.
    """
    old, new = ("ct-" + os.urandom(16).hex() for _ in range(2))
    volume = tmp_path / "client-token"
    volume.mkdir()
    publish(volume, "..2026_12_04_10_00_00.1", {"token": old})
    sidecar = await serve("tcp", client_token_file=str(volume / "token"))
    target = target_of(sidecar)
    before = await ask(target, STRANGER, authorization=f"Bearer {old}")

    publish(volume, "..2026_12_04_11_00_00.2", {"token": new})
    old_after = await ask(target, STRANGER, authorization=f"Bearer {old}")
    new_after = await ask(target, STRANGER, authorization=f"Bearer {new}")

    assert before.status == 200
    assert old_after.status == 403
    assert new_after.status == 200


# -- metrics and logs --------------------------------------------------------


def sample(text: str, name: str, **labels: str) -> float | None:
    """
    The value of one sample in Prometheus text, or None if absent.
    """
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)

    return None


async def test_metrics_count_hand_outs_by_uid_and_refusals_by_reason(
    ask: Ask, serve: Serve, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """
    Hand-outs are counted by the caller's uid when it is configured, and
    under ``other`` when a client token admitted it; refusals by reason.
    """
    token_file = tmp_path / "client_token"
    token_file.write_text("ct-metrics-0123456789")
    sidecar = await serve(
        "unix", allow_uids=[NOBODY], client_token_file=str(token_file)
    )
    target = target_of(sidecar)

    statuses = [
        (await ask(target, NOBODY)).status,
        (await ask(target, NOBODY)).status,
        (await ask(target, STRANGER)).status,
        (await ask(target)).status,
        (
            await ask(
                target, STRANGER, authorization="Bearer ct-metrics-0123456789"
            )
        ).status,
    ]
    async with http.get(ops_url_of(sidecar, "/metrics")) as response:
        text = await response.text()

    handouts = "sidecar_token_handouts_total"
    refusals = "sidecar_token_refusals_total"
    assert statuses == [200, 200, 403, 403, 200]
    assert sample(text, handouts, uid=str(NOBODY)) == 2
    assert sample(text, handouts, uid="other") == 1
    assert sample(text, handouts, uid=str(STRANGER)) is None
    assert sample(text, refusals, reason="caller_not_allowed") == 2


@TRANSPORTS
async def test_refusal_and_hand_out_logs_name_the_caller(
    transport: str,
    ask: Ask,
    serve: Serve,
    fake_idp: FakeIdP,
    tmp_path: Path,
) -> None:
    """
    ``token.handed_out`` and ``token.request_refused`` carry the caller's
    uid, and its pid where the kernel gives it (the Unix socket; on TCP
    the pid is not resolved); no event carries the token or the client
    token a caller presented.
    """
    client_token = "ct-" + os.urandom(16).hex()
    token_file = tmp_path / "client_token"
    token_file.write_text(client_token)
    sidecar = await serve(
        transport, allow_uids=[NOBODY], client_token_file=str(token_file)
    )
    target = target_of(sidecar)

    with capture_logs() as logs:
        allowed = await ask(target, NOBODY)
        refused = await ask(target, STRANGER)
        by_token = await ask(
            target, STRANGER, authorization=f"Bearer {client_token}"
        )

    handed = [e for e in logs if e["event"] == "token.handed_out"]
    refusals = [e for e in logs if e["event"] == "token.request_refused"]
    on_unix = transport == "unix"
    assert (allowed.status, refused.status, by_token.status) == (
        200,
        403,
        200,
    )
    assert [(e["uid"], e["pid"]) for e in handed] == [
        (NOBODY, allowed.pid if on_unix else None),
        (STRANGER, by_token.pid if on_unix else None),
    ]
    assert [(e["uid"], e["pid"], e["reason"]) for e in refusals] == [
        (STRANGER, refused.pid if on_unix else None, "caller_not_allowed")
    ]
    assert fake_idp.issued
    dumped = json.dumps(logs, default=str)
    for secret in [*fake_idp.issued, client_token]:
        assert secret not in dumped


async def get_token_here(sidecar: Sidecar) -> tuple[int, dict[str, Any]]:
    """
    Ask for the token from this process, over the sidecar's listener.
    """
    connector: aiohttp.BaseConnector
    if sidecar.token_socket is not None:
        connector = aiohttp.UnixConnector(path=str(sidecar.token_socket))
        url = "http://localhost/token"
    else:
        connector = aiohttp.TCPConnector()
        url = token_url_of(sidecar)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(url, headers=METADATA) as response,
    ):
        return response.status, await response.json()


@TRANSPORTS
async def test_the_sidecars_own_user_is_refused_in_process(
    transport: str, serve: Serve
) -> None:
    """
    With ``allow_same_uid = false`` even the process running the sidecar
    is refused, over either listener.
    """
    sidecar = await serve(transport, allow_uids=[NOBODY])

    status, body = await get_token_here(sidecar)

    assert (status, body["error"]) == (403, "caller_not_allowed")
    assert "access_token" not in body


# -- the socket file ---------------------------------------------------------


def unix_settings(
    make_settings: Callable[..., Settings], path: Path, **listen: Any
) -> Settings:
    """
    Settings for a sidecar on the Unix socket at ``path`` only.
    """
    return make_settings(
        listen={"tcp": False, "unix_socket": str(path), **listen}
    )


async def get_over_unix(path: Path) -> int:
    """
    The status of one /token request over the Unix socket at ``path``.
    """
    connector = aiohttp.UnixConnector(path=str(path))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get("http://localhost/token", headers=METADATA) as response,
    ):
        return response.status


async def test_stale_socket_file_is_replaced(
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    tmp_path: Path,
) -> None:
    """
    A socket file left by a dead process (bound, closed, never unlinked)
    is replaced at start, and the sidecar serves on it.
    """
    path = tmp_path / "token.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()

    with capture_logs() as logs:
        await start_sidecar(unix_settings(make_settings, path))
    status = await get_over_unix(path)

    assert status == 200
    assert stat.S_ISSOCK(path.lstat().st_mode)
    assert {"event": "listener.stale_socket_removed", "path": str(path)} in [
        {k: e.get(k) for k in ("event", "path")} for e in logs
    ]


async def test_regular_file_at_socket_path_fails_start_and_is_kept(
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    tmp_path: Path,
) -> None:
    """
    A regular file where the socket should go stops the start with an
    error naming it, and the file is left as it was.
    """
    path = tmp_path / "token.sock"
    path.write_text("not a socket\n")

    with pytest.raises(ListenerError) as failure:
        await start_sidecar(unix_settings(make_settings, path))

    assert repr(str(path)) in str(failure.value)
    assert "not a socket" in str(failure.value)
    assert path.read_text() == "not a socket\n"


async def test_live_socket_at_path_fails_start_and_keeps_serving(
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    tmp_path: Path,
) -> None:
    """
    When another process listens on the path, start fails saying so, and
    the other listener's socket file stays in place, still answering.
    """
    path = tmp_path / "token.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen()
    inode = path.stat().st_ino

    try:
        with pytest.raises(ListenerError) as failure:
            await start_sidecar(unix_settings(make_settings, path))
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with probe:
            probe.connect(str(path))
    finally:
        live.close()

    assert "another process is serving" in str(failure.value)
    assert repr(str(path)) in str(failure.value)
    assert path.lstat().st_ino == inode


#: Starts a sidecar on argv[1]'s Unix socket and prints how start ended.
START_ONCE = textwrap.dedent(
    """
    import asyncio
    import sys

    from sidecar.configload import settings_from_dict
    from sidecar.daemon import Sidecar


    async def main():
        settings = settings_from_dict(
            {
                "idp": {
                    "token_url": "http://127.0.0.1:9/token",
                    "client_id": "billing",
                    "client_secret": "unused",
                },
                "listen": {"tcp": False, "unix_socket": sys.argv[1]},
                "ops": {"enabled": False},
            }
        )
        sidecar = Sidecar(settings)
        try:
            await sidecar.start()
        except Exception as exc:
            print(type(exc).__name__, exc)
        else:
            await sidecar.stop()
            print("started")


    asyncio.run(main())
    """
)


def test_busy_live_socket_fails_start_instead_of_hanging(
    tmp_path: Path,
) -> None:
    """
    A live listener whose accept queue is full (a wedged sidecar) still
    makes start fail promptly, rather than hang the new one.
    """
    path = tmp_path / "token.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(0)
    # With a backlog of 0 one pending connection fills the queue.
    pending = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    pending.connect(str(path))

    try:
        # run() kills the child (ours) if it is still blocked.
        result = subprocess.run(
            [sys.executable, "-c", START_ONCE, str(path)],
            cwd=Path(__file__).resolve().parent.parent,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except subprocess.TimeoutExpired:
        result = None
    finally:
        pending.close()
        live.close()

    assert result is not None, "start() was still blocked after 5 s"
    # The last line is the script's; the sidecar logs before it.
    outcome = result.stdout.rstrip().rpartition("\n")[2]
    if not outcome.startswith("ListenerError another process is serving"):
        pytest.fail(f"unexpected end of start: {outcome}{result.stderr}")


@pytest.mark.parametrize("mode", ["0600", "0660", "0666"])
async def test_socket_file_has_the_configured_mode(
    mode: str,
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    tmp_path: Path,
) -> None:
    """
    The socket file gets exactly ``listen.socket_mode``.
    """
    path = tmp_path / "token.sock"

    await start_sidecar(unix_settings(make_settings, path, socket_mode=mode))

    assert stat.S_IMODE(path.lstat().st_mode) == int(mode, 8)


@needs_root
async def test_socket_file_has_the_configured_group(
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    tmp_path: Path,
) -> None:
    """
    The socket file belongs to ``listen.socket_group``.
    """
    path = tmp_path / "token.sock"

    await start_sidecar(
        unix_settings(make_settings, path, socket_group=NOBODY)
    )

    assert path.lstat().st_gid == NOBODY


async def test_stop_removes_the_socket_file_and_completes(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """
    stop() removes the socket file and stops the refresher.
    """
    path = tmp_path / "token.sock"
    sidecar = Sidecar(unix_settings(make_settings, path))
    await sidecar.start()
    existed = stat.S_ISSOCK(path.lstat().st_mode)

    await sidecar.stop()

    assert existed
    assert not path.exists()
    assert not path.is_symlink()
    assert not sidecar.is_alive()


def test_removing_a_socket_spares_a_newer_one_at_its_path(
    tmp_path: Path,
) -> None:
    """
    remove_unix_socket leaves the path alone once another socket has
    replaced the one it was given ("if it is still ours").
    """
    path = tmp_path / "token.sock"
    ours = bind_unix(path, 0o600, None)
    ours_identity = file_identity(path)
    path.unlink()
    newer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    newer.bind(str(path))
    newer_inode = path.lstat().st_ino

    try:
        remove_unix_socket(path, ours_identity)
        survived = path.exists() and path.lstat().st_ino == newer_inode
    finally:
        ours.close()
        newer.close()

    assert survived
