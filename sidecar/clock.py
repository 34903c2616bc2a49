"""
Time as the sidecar sees it, behind a seam that tests can drive.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """
    Wall-clock time and sleeping.

    ``now`` is wall-clock time in epoch seconds: token expiry is a point
    on the wall clock, so after a suspend or a clock jump a token that
    has expired is seen as expired.
    """

    def now(self) -> float:
        """
        Return the current wall-clock time in epoch seconds.
        """

    async def sleep(self, seconds: float) -> None:
        """
        Wait for about ``seconds``.
        """


class SystemClock:
    """
    The real clock: ``time.time`` and ``asyncio.sleep``.
    """

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
