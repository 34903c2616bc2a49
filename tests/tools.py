"""
External tools the tests use (curl, java, systemd-analyze, kubectl, ...):
found on PATH, else the test skips, except under CI, where it fails; and
the deadline and diagnosis for the processes the tests start.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# How long a process the tests start (the sidecar, the IdP, redis-server)
# may take to become ready. Starts take about half a second; the deadline
# only decides when a start counts as hung. It is generous because CI
# machines are shared: one IdP start there once stayed silent for 20 s.
STARTUP_DEADLINE_SECONDS = 60.0


def describe_process(pid: int) -> str:
    """
    One line on a process that missed its deadline: its state and CPU
    time, and the machine's load, so a failure tells a hung process (CPU
    spent, or state D) from a starved one (little CPU, high load).
    """
    parts = []
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        parts.append(f"pid {pid} is gone")
    else:
        # Fields after the parenthesised command name: state is the
        # first, utime and stime the 12th and 13th (proc(5)).
        fields = stat.rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = (int(fields[11]) + int(fields[12])) / ticks
        parts.append(f"pid {pid} state {fields[0]}, {cpu:.2f} s CPU")
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        load = ["?"]
    parts.append(f"load average {' '.join(load)} on {os.cpu_count()} CPUs")
    return "; ".join(parts)


def require_tool(name: str, package: str | None = None) -> str:
    """
    The path of ``name`` on PATH.

    When it is missing the test is skipped on a developer's machine, but
    fails when ``CI`` is set: there ``scripts/system-packages.sh`` should
    have installed it, and a skip would hide a check that never ran.
    """
    found = shutil.which(name)
    if found is not None:
        return found
    message = (
        f"{name} is not installed (Debian package {package or name!r}); "
        "scripts/system-packages.sh installs the tools the tests need"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def check_config_strict(
    config: Path, directory: Path, overrides: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """
    Run ``check-config --strict`` on a deployment's ``config`` as it would
    run there: a private secret file and runtime directory in
    ``directory``, ``overrides`` in the environment, and no ``SIDECAR_*``
    variable of this shell.
    """
    secret = directory / "client_secret"
    secret.write_text("s3cr3t")
    secret.chmod(0o600)
    env = {
        **{
            k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")
        },
        **(overrides or {}),
        "SIDECAR_IDP__CLIENT_SECRET_FILE": str(secret),
        "RUNTIME_DIRECTORY": str(directory),
    }

    command = ("check-config", "--strict", "--config", str(config))

    return subprocess.run(
        [sys.executable, "-m", "sidecar", *command],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
