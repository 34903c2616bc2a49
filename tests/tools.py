"""
External tools the tests use (curl, java, systemd-analyze, kubectl, ...):
found on PATH, else the test skips, except under CI, where it fails.
"""

from __future__ import annotations

import os
import shutil

import pytest


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
