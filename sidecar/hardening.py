"""
Process hardening and checks of how the secrets lie on disk.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import stat
import sys
from pathlib import Path

import structlog

from sidecar.config import Settings
from sidecar.files import is_world_readable

log = structlog.get_logger("sidecar.hardening")

#: prctl(2) option: whether the process may dump core or be ptraced by
#: processes of the same user.
_PR_SET_DUMPABLE = 4


def harden_process() -> None:
    """
    Keep the secret and the token out of core dumps and debuggers, and
    lift the open-files limit to its maximum.

    Not dumpable also means processes of the same user cannot ptrace the
    sidecar or read its memory through /proc.
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            log.warning("hardening.not_dumpable_failed")

    # Every connection is a descriptor; the soft limit is often 1024
    # while the hard one is far higher.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def shared_state_directories(settings: Settings) -> list[tuple[str, Path]]:
    """
    The directories of the cache, the ledger and the sink that other
    users may write (and so delete or replace files in), as ``(what,
    directory)`` pairs. A sticky directory such as /tmp is not counted:
    others cannot remove our files there.
    """
    candidates: list[tuple[str, Path | None]] = [
        ("cache.path", settings.cache.resolved_path()),
        ("quota.ledger_path", settings.quota.resolved_ledger_path()),
        (
            "sink.path",
            Path(settings.sink.path) if settings.sink.path else None,
        ),
    ]
    shared = []
    for what, path in candidates:
        if path is None:
            continue
        with contextlib.suppress(OSError):
            mode = os.stat(path.parent).st_mode
            if mode & 0o022 and not mode & stat.S_ISVTX:
                shared.append((f"the directory of {what}", path.parent))

    return shared


def exposed_secret_files(
    settings: Settings, config_path: Path | None, config_has_secret: bool
) -> list[tuple[str, Path]]:
    """
    The files holding a secret that any user on the host may read, as
    ``(what, path)`` pairs.

    ``config_has_secret`` says whether the config file itself holds the
    client secret.
    """
    candidates: list[tuple[str, Path | None]] = [
        ("idp.client_secret_file", settings.idp.client_secret_file),
        ("idp.private_key_file", settings.idp.private_key_file),
        ("access.client_token_file", settings.access.client_token_file),
        ("the config file", config_path if config_has_secret else None),
    ]
    exposed = []
    for what, path in candidates:
        with contextlib.suppress(OSError):
            if path is not None and is_world_readable(path):
                exposed.append((what, path))

    return exposed
