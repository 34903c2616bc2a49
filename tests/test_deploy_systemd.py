"""
Tests for deploy/systemd: the unit, the node's config, the users file and
the Slurm script, each put through the tool that would reject it (and
shown to reject a broken copy), and the sidecar run as the unit runs it.

systemd is not PID 1 here, so the unit itself never starts; the sidecar
runs with the unit's arguments and the layout systemd would give it.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CLIENT_SECRET
from tests.fakes import FakeIdP
from tests.tools import STARTUP_DEADLINE_SECONDS, require_tool

DEPLOY = Path(__file__).parent.parent / "deploy" / "systemd"
UNIT = DEPLOY / "token-sidecar.service"
CONFIG = DEPLOY / "config.toml"
SYSUSERS = DEPLOY / "token-sidecar.sysusers"
TASK_PROLOG = DEPLOY / "slurm" / "task-prolog.sh"

#: Where the unit expects the console script; verify needs a real one.
INSTALLED_COMMAND = "/opt/token-sidecar/bin/token-sidecar"
COMMAND = Path(sys.executable).with_name("token-sidecar")

#: `systemd-analyze security` rates the unit 1.5 (systemd 252). Dropping
#: most single hardening lines lifts it to 1.6 or more; the rest (such as
#: LockPersonality=) change only ACCEPTED_EXPOSURES.
MAX_EXPOSURE = 1.5

#: The security checks the unit leaves open, and why.
ACCEPTED_EXPOSURES = {
    "PrivateNetwork=": "the IdP is on the network",
    "RestrictAddressFamilies=~AF_(INET|INET6)": "the IdP, the ops port",
    "RestrictAddressFamilies=~AF_UNIX": "the token socket",
    "RestrictAddressFamilies=~AF_NETLINK": "sock_diag, getaddrinfo",
    "IPAddressDeny=": "the IdP's addresses are the site's",
    "PrivateUsers=": "callers' uids and the group must map",
    "SystemCallFilter=~@privileged": "chown sets the socket's group",
    "SystemCallFilter=~@resources": "the sidecar sets its own limits",
    "ProcSubset=": "/proc/net/tcp, where sock_diag is refused",
    "RootDirectory=/RootImage=": "the venv lives in the host's /opt",
    "DeviceAllow=": "ProtectClock= itself allows reading the RTC",
}

#: Generous: these bound a hung child, they measure nothing.
COMMAND_TIMEOUT_SECONDS = 30.0

CURL = shutil.which("curl")

needs_command = pytest.mark.skipif(
    not COMMAND.exists(),
    reason=f"no token-sidecar console script beside {sys.executable}",
)


@pytest.fixture
def systemd_analyze() -> str:
    """
    The path of systemd-analyze.
    """
    return require_tool("systemd-analyze", "systemd")


@pytest.fixture
def systemd_sysusers() -> str:
    """
    The path of systemd-sysusers.
    """
    return require_tool("systemd-sysusers", "systemd")


@pytest.fixture
def shellcheck() -> str:
    """
    The path of shellcheck, which the test setup does not install.
    """
    return require_tool("shellcheck")


def unit_directives(text: str) -> dict[str, list[str]]:
    """
    The ``Key=value`` lines of a unit file, by key, in order; sections
    are not told apart (no key is used in two of ours).
    """
    directives: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        directives.setdefault(key.strip(), []).append(value.strip())

    return directives


def node_config() -> dict[str, Any]:
    """
    The node's config.toml, parsed.
    """
    return tomllib.loads(CONFIG.read_text(encoding="utf-8"))


def unit_for_analysis(directory: Path, text: str | None = None) -> Path:
    """
    A copy of the unit (or of ``text``) in ``directory`` whose ExecStart
    names the test's own console script: verify checks that it exists.
    """
    text = UNIT.read_text(encoding="utf-8") if text is None else text
    assert INSTALLED_COMMAND in text
    path = directory / UNIT.name
    path.write_text(text.replace(INSTALLED_COMMAND, str(COMMAND)))

    return path


def run_analyze(
    analyze: str, *args: str, cwd: Path
) -> subprocess.CompletedProcess[str]:
    """
    Run systemd-analyze with its diagnostics at their default level.
    """
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("SYSTEMD_")
    }

    return subprocess.run(
        [analyze, *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        cwd=cwd,
        env=environment,
        check=False,
    )


def verify_problems(analyze: str, unit: Path) -> list[str]:
    """
    What ``systemd-analyze verify`` says about ``unit``.

    It exits 0 for an unknown key or a value it cannot parse ("...,
    ignoring"), so every line naming the unit counts as a problem.
    """
    result = run_analyze(
        analyze,
        "verify",
        "--man=no",
        "--generators=no",
        str(unit),
        cwd=unit.parent,
    )
    problems = [
        line for line in result.stderr.splitlines() if unit.name in line
    ]
    if result.returncode != 0 and not problems:
        problems = [f"exit {result.returncode}: {result.stderr}"]

    return problems


def exposure_of(analyze: str, unit: Path) -> float:
    """
    The overall exposure ``systemd-analyze security --offline`` gives.
    """
    result = run_analyze(
        analyze, "security", "--offline=yes", str(unit), cwd=unit.parent
    )
    match = re.search(
        r"Overall exposure level for \S+: ([0-9.]+)", result.stdout
    )
    assert match, result.stdout + result.stderr

    return float(match[1])


def open_checks(analyze: str, unit: Path) -> set[str]:
    """
    The names of the checks ``systemd-analyze security`` finds open.
    """
    result = run_analyze(
        analyze,
        "security",
        "--offline=yes",
        "--json=short",
        str(unit),
        cwd=unit.parent,
    )
    checks = json.loads(result.stdout)

    return {check["name"] for check in checks if check["exposure"]}


def without(directive: str) -> str:
    """
    The unit's text without its one ``directive=`` line.
    """
    lines = UNIT.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith(f"{directive}=")]
    assert len(kept) == len(lines) - 1

    return "".join(kept)


@needs_command
class TestUnit:
    """
    The unit passes systemd-analyze, which rejects broken copies.
    """

    def test_verify_finds_no_problem(
        self, systemd_analyze: str, tmp_path: Path
    ) -> None:
        """
        systemd-analyze verify accepts the unit without a warning.
        """
        unit = unit_for_analysis(tmp_path)

        assert verify_problems(systemd_analyze, unit) == []

    @pytest.mark.parametrize(
        ("line", "broken", "reported"),
        [
            ("ProtectSystem=strict", "ProtectSytem=strict", "ProtectSytem"),
            ("ProtectSystem=strict", "ProtectSystem=strictly", "strictly"),
            (
                "SystemCallFilter=@system-service",
                "SystemCallFilter=@system",
                "@system",
            ),
            ("RestartSec=5s", "RestartSec=five", "five"),
            ("[Service]", "[Servce]", "Servce"),
        ],
        ids=[
            "misspelled-key",
            "bad-value",
            "unknown-syscall-group",
            "bad-timespan",
            "misspelled-section",
        ],
    )
    def test_verify_rejects_a_broken_copy(
        self,
        systemd_analyze: str,
        tmp_path: Path,
        line: str,
        broken: str,
        reported: str,
    ) -> None:
        """
        A misspelled directive or a bad value in the unit is reported.
        """
        text = UNIT.read_text(encoding="utf-8")
        assert f"\n{line}\n" in text
        unit = unit_for_analysis(
            tmp_path, text.replace(f"\n{line}\n", f"\n{broken}\n")
        )

        problems = verify_problems(systemd_analyze, unit)

        assert reported in "\n".join(problems)

    def test_exposure_is_at_most_the_measured_score(
        self, systemd_analyze: str, tmp_path: Path
    ) -> None:
        """
        systemd-analyze security rates the unit no worse than measured.
        """
        unit = unit_for_analysis(tmp_path)

        assert exposure_of(systemd_analyze, unit) <= MAX_EXPOSURE

    @pytest.mark.parametrize(
        "directive",
        ["NoNewPrivileges", "CapabilityBoundingSet", "PrivateTmp"],
    )
    def test_dropping_a_hardening_line_raises_the_exposure(
        self, systemd_analyze: str, tmp_path: Path, directive: str
    ) -> None:
        """
        A unit without one of its hardening lines scores above the limit.
        """
        unit = unit_for_analysis(tmp_path, without(directive))

        assert exposure_of(systemd_analyze, unit) > MAX_EXPOSURE

    def test_only_the_accepted_checks_are_open(
        self, systemd_analyze: str, tmp_path: Path
    ) -> None:
        """
        Every check systemd-analyze security finds open is one accepted.
        """
        unit = unit_for_analysis(tmp_path)

        assert open_checks(systemd_analyze, unit) == set(ACCEPTED_EXPOSURES)

    @pytest.mark.parametrize(
        "directive", ["LockPersonality", "MemoryDenyWriteExecute", "UMask"]
    )
    def test_dropping_a_line_the_score_misses_opens_a_check(
        self, systemd_analyze: str, tmp_path: Path, directive: str
    ) -> None:
        """
        A hardening line too light to move the score is still missed.
        """
        unit = unit_for_analysis(tmp_path, without(directive))

        opened = open_checks(systemd_analyze, unit) - set(ACCEPTED_EXPOSURES)

        assert opened == {f"{directive}="}


class TestLayout:
    """
    The unit, the config, the users file and the Slurm script agree.
    """

    def test_unit_runs_the_venv_strictly_with_the_node_config(self) -> None:
        """
        ExecStart runs the /opt venv with --strict and /etc's config.
        """
        unit = unit_directives(UNIT.read_text(encoding="utf-8"))

        assert unit["ExecStart"] == [
            f"{INSTALLED_COMMAND} run --strict "
            "--config /etc/token-sidecar/config.toml"
        ]
        assert unit["Restart"] == ["on-failure"]
        assert unit["RestartPreventExitStatus"] == ["2"]

    def test_secret_comes_from_the_credential_systemd_hands_over(
        self,
    ) -> None:
        """
        idp.client_secret_file names the file LoadCredential= creates.
        """
        unit = unit_directives(UNIT.read_text(encoding="utf-8"))
        name, _, source = unit["LoadCredential"][0].partition(":")

        assert source == "/etc/token-sidecar/client_secret"
        assert node_config()["idp"]["client_secret_file"] == (
            f"/run/credentials/{UNIT.name}/{name}"
        )

    def test_state_lies_in_the_directories_systemd_makes(self) -> None:
        """
        Socket and token file are in the runtime directory, which the
        group may enter and a restart keeps; the ledger outlives reboots.
        """
        unit = unit_directives(UNIT.read_text(encoding="utf-8"))
        config = node_config()
        runtime = Path("/run") / unit["RuntimeDirectory"][0]
        state = Path("/var/lib") / unit["StateDirectory"][0]

        assert Path(config["listen"]["unix_socket"]).parent == runtime
        assert Path(config["sink"]["path"]).parent == runtime
        assert config["cache"]["path"] == "auto"
        assert Path(config["quota"]["ledger_path"]).parent == state
        assert unit["RuntimeDirectoryMode"] == ["0750"]
        assert unit["RuntimeDirectoryPreserve"] == ["restart"]
        assert unit["StateDirectoryMode"] == ["0700"]

    def test_one_group_gates_socket_token_file_and_access(self) -> None:
        """
        The unit's group owns the socket and the token file, and only its
        members are allowed, on the socket alone.
        """
        unit = unit_directives(UNIT.read_text(encoding="utf-8"))
        config = node_config()
        group = unit["Group"][0]

        assert config["listen"]["tcp"] is False
        assert config["listen"]["socket_group"] == group
        assert config["listen"]["socket_mode"] == "0660"
        assert config["access"]["allow_gids"] == [group]
        assert config["sink"]["group"] == group
        assert config["sink"]["mode"] == "0640"

    def test_users_file_creates_the_unit_user_and_group(self) -> None:
        """
        The sysusers file creates the unit's User= and Group=.
        """
        unit = unit_directives(UNIT.read_text(encoding="utf-8"))
        entries = [
            line.split()[:2]
            for line in SYSUSERS.read_text(encoding="utf-8").splitlines()
            if line and not line.startswith("#")
        ]

        assert ["u", unit["User"][0]] in entries
        assert ["g", unit["Group"][0]] in entries

    def test_task_prolog_defaults_name_the_configured_paths(self) -> None:
        """
        The Slurm script's default paths are the config's.
        """
        script = TASK_PROLOG.read_text(encoding="utf-8")
        config = node_config()

        assert f":-{config['sink']['path']}}}" in script
        assert f":-{config['listen']['unix_socket']}}}" in script


def child_environment(**extra: str) -> dict[str, str]:
    """
    This process's environment without SIDECAR_* variables, plus
    ``extra``.
    """
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("SIDECAR_")
    }

    return {**environment, **extra}


def run_command(
    *args: str, env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    """
    Run the console script to completion, capturing its output.
    """
    return subprocess.run(
        [str(COMMAND), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        cwd=cwd,
        env=env,
        check=False,
    )


def secret_file(directory: Path) -> Path:
    """
    A client secret as LoadCredential= leaves it: 0400 in a 0500
    directory.
    """
    credentials = directory / "credentials"
    credentials.mkdir()
    path = credentials / "client_secret"
    path.write_text(CLIENT_SECRET)
    path.chmod(0o400)
    credentials.chmod(0o500)

    return path


def group_overrides(group: int | str) -> dict[str, str]:
    """
    The variables that swap the node's group (not on this host) for
    ``group``, wherever the config names it.
    """
    return {
        "SIDECAR_LISTEN__SOCKET_GROUP": str(group),
        "SIDECAR_ACCESS__ALLOW_GIDS": json.dumps([str(group)]),
        "SIDECAR_SINK__GROUP": str(group),
    }


@needs_command
class TestConfig:
    """
    The real check-config accepts the node's config, and rejects a typo.
    """

    def test_check_config_strict_accepts_it(self, tmp_path: Path) -> None:
        """
        check-config --strict passes with only the secret and the group
        swapped for this host's.
        """
        environment = child_environment(
            SIDECAR_IDP__CLIENT_SECRET_FILE=str(secret_file(tmp_path)),
            **group_overrides(os.getgid()),
        )

        result = run_command(
            "check-config",
            "--strict",
            "--config",
            str(CONFIG),
            env=environment,
            cwd=tmp_path,
        )

        assert result.returncode == 0, result.stderr
        assert "tcp = false" in result.stdout
        assert CLIENT_SECRET not in result.stdout

    def test_check_config_rejects_an_unknown_key(self, tmp_path: Path) -> None:
        """
        A copy with a misspelled key exits 2, naming the key.
        """
        broken = tmp_path / "config.toml"
        text = CONFIG.read_text(encoding="utf-8")
        assert "\nunix_socket = " in text
        broken.write_text(text.replace("\nunix_socket = ", "\nunix_sockt = "))
        environment = child_environment(
            SIDECAR_IDP__CLIENT_SECRET_FILE=str(secret_file(tmp_path)),
            **group_overrides(os.getgid()),
        )

        result = run_command(
            "check-config",
            "--strict",
            "--config",
            str(broken),
            env=environment,
            cwd=tmp_path,
        )

        assert result.returncode == 2
        assert "config error: listen.unix_sockt: unknown key" in result.stderr


class TestSysusers:
    """
    systemd-sysusers creates the user and the group from the users file.
    """

    def run_sysusers(
        self, sysusers: str, root: Path, config: Path
    ) -> subprocess.CompletedProcess[str]:
        """
        Apply ``config`` to an empty system tree at ``root``.
        """
        (root / "etc").mkdir(parents=True)

        return subprocess.run(
            [sysusers, f"--root={root}", str(config)],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
            check=False,
        )

    def test_creates_the_user_and_the_group(
        self, systemd_sysusers: str, tmp_path: Path
    ) -> None:
        """
        The tree gets the token-sidecar user and the tokenusers group.
        """
        root = tmp_path / "root"

        result = self.run_sysusers(systemd_sysusers, root, SYSUSERS)

        assert result.returncode == 0, result.stderr
        passwd = (root / "etc" / "passwd").read_text()
        group = (root / "etc" / "group").read_text()
        assert re.search(r"^token-sidecar:x:\d+:\d+:", passwd, re.M)
        assert ":/usr/sbin/nologin\n" in passwd
        assert re.search(r"^tokenusers:x:\d+:", group, re.M)

    def test_rejects_a_broken_line(
        self, systemd_sysusers: str, tmp_path: Path
    ) -> None:
        """
        A line with a bad id is refused.
        """
        broken = tmp_path / "broken.conf"
        broken.write_text(
            SYSUSERS.read_text().replace("g tokenusers -", "g tokenusers x")
        )

        result = self.run_sysusers(systemd_sysusers, tmp_path / "root", broken)

        assert result.returncode != 0
        assert "broken.conf" in result.stderr


def run_task_prolog(
    script: Path, **environment: str
) -> subprocess.CompletedProcess[str]:
    """
    Run the TaskProlog with ``environment`` added, as Slurm would.
    """
    base = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("TOKEN_SIDECAR_", "BEARER_TOKEN"))
    }

    return subprocess.run(
        ["/bin/sh", str(script)],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        env={**base, **environment},
        check=False,
    )


class TestTaskProlog:
    """
    The Slurm TaskProlog is sound POSIX sh and exports what it finds.
    """

    def test_sh_parses_it(self) -> None:
        """
        sh -n finds no syntax error in the script.
        """
        result = subprocess.run(
            ["/bin/sh", "-n", str(TASK_PROLOG)],
            capture_output=True,
            text=True,
            check=False,
        )

        assert result.returncode == 0, result.stderr

    def test_sh_rejects_a_broken_copy(self, tmp_path: Path) -> None:
        """
        sh -n fails on a copy missing a closing fi.
        """
        broken = tmp_path / "task-prolog.sh"
        text = TASK_PROLOG.read_text()
        broken.write_text(text.replace("\nfi\n", "\n", 1))

        result = subprocess.run(
            ["/bin/sh", "-n", str(broken)],
            capture_output=True,
            text=True,
            check=False,
        )

        assert result.returncode != 0

    def test_shellcheck_is_clean(self, shellcheck: str) -> None:
        """
        shellcheck, as POSIX sh, reports nothing.
        """
        result = subprocess.run(
            [shellcheck, "--shell=sh", str(TASK_PROLOG)],
            capture_output=True,
            text=True,
            check=False,
        )

        assert result.returncode == 0, result.stdout

    def test_shellcheck_rejects_a_bashism(
        self, shellcheck: str, tmp_path: Path
    ) -> None:
        """
        shellcheck flags a bash-only test in a copy.
        """
        broken = tmp_path / "task-prolog.sh"
        broken.write_text(
            TASK_PROLOG.read_text().replace(
                '[ -S "$socket" ]', '[[ -S "$socket" ]]'
            )
        )

        result = subprocess.run(
            [shellcheck, "--shell=sh", str(broken)],
            capture_output=True,
            text=True,
            check=False,
        )

        assert result.returncode != 0

    def test_exports_the_token_file_and_socket(self, tmp_path: Path) -> None:
        """
        With the token file and the socket there, both are exported.
        """
        token_file = tmp_path / "bearer_token"
        token_file.write_text("tok\n")
        socket_path = tmp_path / "token.sock"
        listener = bind_listening_socket(socket_path)

        with listener:
            result = run_task_prolog(
                TASK_PROLOG,
                TOKEN_SIDECAR_TOKEN_FILE=str(token_file),
                TOKEN_SIDECAR_SOCKET=str(socket_path),
            )

        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [
            f"export BEARER_TOKEN_FILE={token_file}",
            f"export TOKEN_SIDECAR_SOCKET={socket_path}",
        ]

    def test_exports_nothing_when_there_is_no_sidecar(
        self, tmp_path: Path
    ) -> None:
        """
        Without the token file and the socket it prints nothing, exit 0.
        """
        result = run_task_prolog(
            TASK_PROLOG,
            TOKEN_SIDECAR_TOKEN_FILE=str(tmp_path / "none"),
            TOKEN_SIDECAR_SOCKET=str(tmp_path / "none.sock"),
        )

        assert result.returncode == 0
        assert result.stdout == ""

    def test_keeps_the_jobs_own_token_file(self, tmp_path: Path) -> None:
        """
        A BEARER_TOKEN_FILE the job set already is left alone.
        """
        token_file = tmp_path / "bearer_token"
        token_file.write_text("tok\n")

        result = run_task_prolog(
            TASK_PROLOG,
            TOKEN_SIDECAR_TOKEN_FILE=str(token_file),
            TOKEN_SIDECAR_SOCKET=str(tmp_path / "none.sock"),
            BEARER_TOKEN_FILE="/home/someone/token",
        )

        assert result.returncode == 0
        assert result.stdout == ""


def bind_listening_socket(path: Path) -> socket.socket:
    """
    A Unix socket listening at ``path``, for scripts that look for one.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()

    return listener


def unused_gid() -> int:
    """
    A group id no group of this host has.
    """
    taken = {group.gr_gid for group in grp.getgrall()}

    return next(gid for gid in range(42_420, 60_000) if gid not in taken)


@dataclass
class NodeLayout:
    """
    What systemd would lay out for the unit, in a temporary directory.
    """

    base: Path
    runtime: Path
    state: Path
    secret: Path
    gid: int
    logs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        """
        The socket the sidecar serves on.
        """
        return self.runtime / "token.sock"

    @property
    def token_file(self) -> Path:
        """
        The token file for batch jobs.
        """
        return self.runtime / "bearer_token"

    def environment(self, token_url: str) -> dict[str, str]:
        """
        The unit's environment and the overrides that move the node's
        paths, group and IdP into the temporary layout.
        """
        return child_environment(
            RUNTIME_DIRECTORY=str(self.runtime),
            SIDECAR_IDP__TOKEN_URL=token_url,
            SIDECAR_IDP__CLIENT_SECRET_FILE=str(self.secret),
            SIDECAR_LISTEN__UNIX_SOCKET=str(self.socket),
            SIDECAR_SINK__PATH=str(self.token_file),
            SIDECAR_QUOTA__LEDGER_PATH=str(self.state / "ledger.json"),
            SIDECAR_OPS__PORT="0",
            **group_overrides(self.gid),
        )


@pytest.fixture
def node_layout() -> Iterator[NodeLayout]:
    """
    The unit's directories: runtime 0750 and state 0700, the secret as
    a credential. As root, the group is one no user has, and the base
    is open to other users, so that they can be tried as callers.
    """
    is_root = os.geteuid() == 0
    gid = unused_gid() if is_root else os.getgid()
    with tempfile.TemporaryDirectory(prefix="token-sidecar-") as name:
        base = Path(name)
        base.chmod(0o711)
        runtime = base / "run"
        runtime.mkdir(mode=0o750)
        os.chown(runtime, -1, gid)
        state = base / "state"
        state.mkdir(mode=0o700)
        yield NodeLayout(base, runtime, state, secret_file(base), gid)


async def start_as_the_unit(
    layout: NodeLayout, token_url: str
) -> asyncio.subprocess.Process:
    """
    Start ``run --strict --config config.toml`` as ExecStart does; return
    once it logs server.started, its events kept in ``layout.logs``.
    """
    process = await asyncio.create_subprocess_exec(
        str(COMMAND),
        "run",
        "--strict",
        "--config",
        str(CONFIG),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=layout.base,
        env=layout.environment(token_url),
    )
    try:
        await asyncio.wait_for(
            read_events_until(process, "server.started", layout.logs),
            STARTUP_DEADLINE_SECONDS,
        )
    except BaseException:
        process.kill()
        await process.communicate()
        raise

    return process


async def read_events_until(
    process: asyncio.subprocess.Process,
    event: str,
    logs: list[dict[str, Any]],
) -> None:
    """
    Read JSON log lines from ``process`` into ``logs`` until ``event``.
    """
    assert process.stderr is not None
    while line := await process.stderr.readline():
        logs.append(json.loads(line))
        if logs[-1]["event"] == event:
            return

    raise AssertionError(f"exited before {event}: {logs}")


async def stop(process: asyncio.subprocess.Process) -> str:
    """
    SIGTERM ``process`` as systemctl stop does; its remaining stderr.
    """
    process.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(
        process.communicate(), COMMAND_TIMEOUT_SECONDS
    )
    assert process.returncode == 0, stderr.decode()

    return stderr.decode()


async def run_async(
    *args: str, env: dict[str, str], cwd: Path
) -> tuple[int, str, str]:
    """
    Run a command while this event loop (the fake IdP) keeps serving.
    """
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env=env,
    )
    stdout, stderr = await asyncio.wait_for(
        process.communicate(), COMMAND_TIMEOUT_SECONDS
    )
    assert process.returncode is not None

    return process.returncode, stdout.decode(), stderr.decode()


@pytest.fixture
async def unit_process(
    node_layout: NodeLayout, token_url: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """
    The sidecar started as the unit starts it, killed after the test if
    the test left it running.
    """
    process = await start_as_the_unit(node_layout, token_url)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()


@needs_command
class TestRunAsTheUnit:
    """
    The sidecar, run with the unit's arguments in the unit's layout,
    serves the token to callers on the socket and to batch jobs.
    """

    async def test_token_command_gets_the_token_over_the_socket(
        self,
        node_layout: NodeLayout,
        unit_process: asyncio.subprocess.Process,
        fake_idp: FakeIdP,
    ) -> None:
        """
        'token --socket' and 'token --config' print the IdP's token,
        fetched with the credential's secret.
        """
        environment = child_environment(
            SIDECAR_LISTEN__UNIX_SOCKET=str(node_layout.socket)
        )

        by_socket = await run_async(
            str(COMMAND),
            "token",
            "--socket",
            str(node_layout.socket),
            env=environment,
            cwd=node_layout.base,
        )
        # The user's way: only [listen] is read, never the secret.
        by_config = await run_async(
            str(COMMAND),
            "token",
            "--config",
            str(CONFIG),
            env=environment,
            cwd=node_layout.base,
        )
        stderr = await stop(unit_process)

        assert by_socket == (0, f"{fake_idp.issued[0]}\n", "")
        assert by_config == (0, f"{fake_idp.issued[0]}\n", "")
        assert fake_idp.count == 1
        assert fake_idp.requests[0].form["client_id"] == "hpc-cluster"
        assert fake_idp.requests[0].form["client_secret"] == CLIENT_SECRET
        logs = json.dumps(node_layout.logs) + stderr
        assert CLIENT_SECRET not in logs
        assert fake_idp.issued[0] not in logs

    async def test_files_have_the_modes_the_layout_needs(
        self,
        node_layout: NodeLayout,
        unit_process: asyncio.subprocess.Process,
        fake_idp: FakeIdP,
    ) -> None:
        """
        Socket 0660 and token file 0640 belong to the group; the cache
        lands in $RUNTIME_DIRECTORY, the ledger in the state directory.
        """
        await run_async(
            str(COMMAND),
            "token",
            "--socket",
            str(node_layout.socket),
            env=child_environment(),
            cwd=node_layout.base,
        )
        socket_status = node_layout.socket.stat()
        await stop(unit_process)

        token_status = node_layout.token_file.stat()
        assert stat.S_IMODE(socket_status.st_mode) == 0o660
        assert socket_status.st_gid == node_layout.gid
        assert stat.S_IMODE(token_status.st_mode) == 0o640
        assert token_status.st_gid == node_layout.gid
        assert node_layout.token_file.read_text() == (
            f"{fake_idp.issued[0]}\n"
        )
        cache = node_layout.runtime / "token.cache"
        assert stat.S_IMODE(cache.stat().st_mode) == 0o600
        assert (node_layout.state / "ledger.json").exists()

    async def test_a_restart_reuses_the_cached_token(
        self,
        node_layout: NodeLayout,
        unit_process: asyncio.subprocess.Process,
        fake_idp: FakeIdP,
        token_url: str,
    ) -> None:
        """
        With the runtime directory kept (RuntimeDirectoryPreserve=
        restart), a restarted sidecar serves the same token, unasked.
        """
        await run_async(
            str(COMMAND),
            "token",
            "--socket",
            str(node_layout.socket),
            env=child_environment(),
            cwd=node_layout.base,
        )
        await stop(unit_process)

        restarted = await start_as_the_unit(node_layout, token_url)
        try:
            result = await run_async(
                str(COMMAND),
                "token",
                "--socket",
                str(node_layout.socket),
                env=child_environment(),
                cwd=node_layout.base,
            )
        finally:
            await stop(restarted)

        assert result == (0, f"{fake_idp.issued[0]}\n", "")
        assert fake_idp.count == 1

    @pytest.mark.skipif(
        os.geteuid() != 0, reason="needs root to call as another user"
    )
    @pytest.mark.skipif(CURL is None, reason="curl is not installed")
    async def test_only_members_of_the_group_get_the_token(
        self,
        node_layout: NodeLayout,
        unit_process: asyncio.subprocess.Process,
        fake_idp: FakeIdP,
    ) -> None:
        """
        Another user gets the token with curl on the socket while in
        the group, and is kept out without it.
        """
        assert CURL is not None
        curl = [
            CURL,
            "--silent",
            "--show-error",
            "--fail",
            "--unix-socket",
            str(node_layout.socket),
            "-H",
            "Metadata: true",
            "-H",
            "Accept: text/plain",
            "http://localhost/token",
        ]

        member = await run_as_nobody(curl, [node_layout.gid])
        outsider = await run_as_nobody(curl, [])
        await stop(unit_process)

        assert member == (0, fake_idp.issued[0], "")
        # curl's exit 7: it could not connect (the directory is 0750).
        assert outsider[:2] == (7, "")


async def run_as_nobody(
    command: list[str], groups: list[int]
) -> tuple[int, str, str]:
    """
    Run ``command`` as the user nobody with supplementary ``groups``.
    """
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd="/",
        user="nobody",
        group="nogroup" if _has_group("nogroup") else "nobody",
        extra_groups=groups,
    )
    stdout, stderr = await asyncio.wait_for(
        process.communicate(), COMMAND_TIMEOUT_SECONDS
    )
    assert process.returncode is not None

    return process.returncode, stdout.decode(), stderr.decode()


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False

    return True
