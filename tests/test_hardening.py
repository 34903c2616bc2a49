"""
Process hardening, and the warnings about secrets every user can read.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sidecar.config import Settings
from sidecar.configload import settings_from_dict
from sidecar.hardening import exposed_secret_files, shared_state_directories
from tests.test_cli import run_cli, write_config

# PR_GET_DUMPABLE is prctl option 3; it answers 1 (dumpable) or 0.
HARDENED_PROBE = """
import ctypes, resource
from sidecar.hardening import harden_process
libc = ctypes.CDLL(None)
before = libc.prctl(3, 0, 0, 0, 0)
harden_process()
print(before, libc.prctl(3, 0, 0, 0, 0))
print(resource.getrlimit(resource.RLIMIT_CORE))
"""


def _settings(secret_file: Path) -> Settings:
    return settings_from_dict(
        {
            "idp": {
                "token_url": "https://idp.example/oauth/token",
                "client_id": "billing",
                "client_secret_file": str(secret_file),
            }
        }
    )


def test_world_readable_secret_file_is_reported(tmp_path: Path) -> None:
    """
    A secret file every user may read is reported; a private one is not.
    """
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t-value-123\n")
    secret.chmod(0o644)
    settings = _settings(secret)

    exposed = exposed_secret_files(settings, None, False)
    secret.chmod(0o600)
    private = exposed_secret_files(settings, None, False)

    assert exposed == [("idp.client_secret_file", secret)]
    assert private == []


def test_config_file_counts_only_when_it_holds_the_secret(
    tmp_path: Path,
) -> None:
    """
    A readable config file matters only if the secret is written in it.
    """
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t-value-123\n")
    secret.chmod(0o600)
    config = tmp_path / "sidecar.toml"
    config.write_text("[idp]\n")
    config.chmod(0o644)
    settings = _settings(secret)

    holding = exposed_secret_files(settings, config, True)
    not_holding = exposed_secret_files(settings, config, False)

    assert holding == [("the config file", config)]
    assert not_holding == []


def test_strict_refuses_a_world_readable_config_secret(tmp_path: Path) -> None:
    """
    check-config warns about a world-readable config holding the secret,
    and refuses it with --strict, never printing the secret.
    """
    path = write_config(
        tmp_path,
        '[idp]\ntoken_url = "https://idp.example/oauth/token"\n'
        'client_id = "billing"\nclient_secret = "inline-s3cr3t-42"\n',
    )
    path.chmod(0o644)

    relaxed = run_cli("check-config", "--config", str(path), cwd=tmp_path)
    strict = run_cli(
        "check-config", "--config", str(path), "--strict", cwd=tmp_path
    )

    assert relaxed.returncode == 0
    assert "warning: the config file" in relaxed.stderr
    assert strict.returncode == 2
    assert "error: the config file" in strict.stderr
    for result in (relaxed, strict):
        assert "inline-s3cr3t-42" not in result.stdout + result.stderr


def test_hardened_process_dumps_no_core_and_is_not_dumpable() -> None:
    """
    After hardening, the process is no longer dumpable and its core size
    limit is zero.
    """
    result = subprocess.run(
        [sys.executable, "-c", HARDENED_PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=True,
    )

    dumpable, limit = result.stdout.splitlines()
    assert dumpable == "1 0"
    assert limit == "(0, 0)"


def test_state_directory_writable_by_others_is_reported(
    tmp_path: Path,
) -> None:
    """
    A cache directory others may write is reported (they could delete
    the ledger and reset the budget); a sticky one such as /tmp is not.
    """
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)

    def settings_in(directory: Path) -> Settings:
        return settings_from_dict(
            {
                "idp": {
                    "token_url": "https://idp.example/oauth/token",
                    "client_id": "billing",
                    "client_secret": "s3cr3t-value-123",
                },
                "cache": {"path": str(directory / "token.cache")},
                "quota": {"ledger_path": ""},
            }
        )

    assert shared_state_directories(settings_in(shared)) == [
        ("the directory of cache.path", shared)
    ]
    assert shared_state_directories(settings_in(sticky)) == []
