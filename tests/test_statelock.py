"""
One sidecar per state file: a second sidecar given the same cache or
ledger refuses to start, naming the holder and the key to change, and
the lock goes with the process that held it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from sidecar.config import Settings
from sidecar.daemon import Sidecar
from sidecar.errors import StateInUseError, StateLockError
from sidecar.statelock import StateLock
from tests.conftest import METADATA, token_url_of
from tests.fakes import FakeIdP, wait_until
from tests.test_cli import (
    config_text,
    finish,
    run_cli_async,
    start_cli,
    write_config,
)
from tests.tools import STARTUP_DEADLINE_SECONDS

StartSidecar = Callable[..., Awaitable[Sidecar]]


async def test_a_second_sidecar_on_the_same_state_refuses_to_start(
    make_settings: Callable[..., Settings],
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
    fake_idp: FakeIdP,
) -> None:
    """
    Two sidecars with the default paths in one runtime directory: the
    second fails before it binds or asks the IdP, naming the file, the
    first one's pid and the key; the first serves on undisturbed.
    """
    first = await start_sidecar(make_settings())
    await wait_until(lambda: fake_idp.count == 1)
    second = Sidecar(make_settings())

    with pytest.raises(StateInUseError) as refused:
        await second.start()

    message = str(refused.value)
    assert f"another sidecar (pid {os.getpid()})" in message
    assert "token.cache" in message
    assert "cache.path" in message
    assert second.token_address is None
    async with http.get(token_url_of(first), headers=METADATA) as answer:
        assert answer.status == 200
    assert fake_idp.count == 1


async def test_the_lock_goes_with_its_sidecar(
    make_settings: Callable[..., Settings],
    start_sidecar: StartSidecar,
) -> None:
    """
    Once the first sidecar stops, another may start on the same state.
    """
    first = await start_sidecar(make_settings())
    await first.stop()

    second = await start_sidecar(make_settings())

    assert second.is_alive()


async def test_own_paths_let_two_sidecars_share_a_directory(
    make_settings: Callable[..., Settings],
    start_sidecar: StartSidecar,
    tmp_path: Path,
) -> None:
    """
    Two sidecars given their own cache and ledger files start side by
    side in one directory.
    """
    sidecars = [
        await start_sidecar(
            make_settings(
                cache={"path": str(tmp_path / f"{name}.cache")},
                quota={"ledger_path": str(tmp_path / f"{name}.json")},
            )
        )
        for name in ("orders", "billing")
    ]

    assert all(sidecar.is_alive() for sidecar in sidecars)


async def test_run_exits_1_while_another_holds_the_state(
    token_url: str,
    make_settings: Callable[..., Settings],
    start_sidecar: StartSidecar,
    tmp_path: Path,
) -> None:
    """
    'token-sidecar run' and 'run --once' on a running sidecar's state
    exit 1 with one line saying what to change.
    """
    await start_sidecar(make_settings())
    path = write_config(tmp_path, config_text(token_url, 0))

    served = await run_cli_async("run", "--config", str(path), cwd=tmp_path)
    once = await run_cli_async(
        "run", "--once", "--config", str(path), cwd=tmp_path
    )

    assert served.returncode == 1
    assert "error: another sidecar" in served.stderr
    assert "give each sidecar its own" in served.stderr
    assert "server.stopped" not in served.stderr
    assert once.returncode == 1
    assert "another sidecar" in once.stderr


async def wait_for_start(process: asyncio.subprocess.Process) -> None:
    """
    Read the sidecar's log until server.started, which it logs once its
    locks are held; fail if it ends first or takes too long.
    """
    assert process.stderr is not None
    async with asyncio.timeout(STARTUP_DEADLINE_SECONDS):
        while True:
            line = await process.stderr.readline()
            assert line, "the sidecar ended before it started"
            if b"server.started" in line:
                return


async def test_kill_9_frees_the_state(token_url: str, tmp_path: Path) -> None:
    """
    A sidecar killed with SIGKILL leaves its lock files behind but not
    its locks: the next one starts.
    """
    path = write_config(tmp_path, config_text(token_url, 0))
    victim = await start_cli("run", "--config", str(path), cwd=tmp_path)
    await wait_for_start(victim)
    victim.send_signal(signal.SIGKILL)
    await finish(victim, STARTUP_DEADLINE_SECONDS)

    survivor = await start_cli("run", "--config", str(path), cwd=tmp_path)
    await wait_for_start(survivor)
    survivor.send_signal(signal.SIGTERM)
    result = await finish(survivor, STARTUP_DEADLINE_SECONDS)

    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("planted", ["symlink", "fifo", "directory"])
def test_something_else_in_a_locks_place_is_refused(
    planted: str, tmp_path: Path
) -> None:
    """
    A symlink, FIFO or directory where a lock file goes, in a directory
    the sidecar may write: running unlocked could share the state, so
    the start is refused, naming the file and the fix; a symlink is not
    followed, and the first file's lock is not left held.
    """
    target = tmp_path / "elsewhere"
    lock_path = tmp_path / "ledger.json.lock"
    if planted == "symlink":
        lock_path.symlink_to(target)
    elif planted == "fifo":
        os.mkfifo(lock_path)
    else:
        lock_path.mkdir()
    cache = tmp_path / "token.cache"
    lock = StateLock(
        [
            ("cache.path", cache),
            ("quota.ledger_path", tmp_path / "ledger.json"),
        ]
    )

    with pytest.raises(StateLockError) as refused:
        lock.acquire()

    assert str(refused.value).startswith(f"cannot lock {lock_path}")
    assert "quota.ledger_path" in str(refused.value)
    assert not target.exists()
    again = StateLock([("cache.path", cache)])
    again.acquire()
    again.release()


async def test_an_unwritable_state_place_still_serves(
    make_settings: Callable[..., Settings],
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """
    State files where none can be written (their directory is a file:
    unwritable even for root) cost the warm restart, never the service:
    the locks are skipped with a warning and /token answers.
    """
    not_a_directory = tmp_path / "state"
    not_a_directory.write_text("")
    settings = make_settings(
        cache={"path": str(not_a_directory / "token.cache")},
        quota={"ledger_path": str(not_a_directory / "ledger.json")},
    )

    with capture_logs() as events:
        sidecar = await start_sidecar(settings)
        async with http.get(token_url_of(sidecar), headers=METADATA) as answer:
            status = answer.status

    assert status == 200
    unlocked = [e["key"] for e in events if e["event"] == "state.unlocked"]
    assert unlocked == ["cache.path", "quota.ledger_path"]


def test_locks_are_all_or_none(tmp_path: Path) -> None:
    """
    When the second file is taken, the first is not left locked.
    """
    cache, ledger = tmp_path / "token.cache", tmp_path / "ledger.json"
    holder = StateLock([("quota.ledger_path", ledger)])
    holder.acquire()
    both = StateLock([("cache.path", cache), ("quota.ledger_path", ledger)])

    with pytest.raises(StateInUseError):
        both.acquire()
    alone = StateLock([("cache.path", cache)])
    alone.acquire()

    alone.release()
    holder.release()


def test_another_process_sees_the_holder_pid(tmp_path: Path) -> None:
    """
    The lock holds across processes, and names the holder's pid.
    """
    ledger = tmp_path / "ledger.json"
    lock = StateLock([("quota.ledger_path", ledger)])
    lock.acquire()
    probe = (
        "import sys; from pathlib import Path\n"
        "from sidecar.errors import StateInUseError\n"
        "from sidecar.statelock import StateLock\n"
        "try:\n"
        "    StateLock([('quota.ledger_path', Path(sys.argv[1]))]).acquire()\n"
        "except StateInUseError as exc:\n"
        "    print(exc)\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", probe, str(ledger)],
        capture_output=True,
        text=True,
        timeout=STARTUP_DEADLINE_SECONDS,
        check=True,
    )
    lock.release()

    assert f"another sidecar (pid {os.getpid()})" in result.stdout
