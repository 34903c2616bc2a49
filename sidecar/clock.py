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
    The real clock: wall-clock time that never steps back, and
    ``asyncio.sleep``.

    A forward step of the wall clock (or a suspend) is taken as is. A
    backward step is not: time then runs on from the last reading by the
    monotonic clock, so a token cannot seem to live longer than it does.
    """

    def __init__(self) -> None:
        self._wall_anchor = time.time()
        self._monotonic_anchor = time.monotonic()

    def now(self) -> float:
        wall = time.time()
        monotonic = time.monotonic()
        projected = self._wall_anchor + (monotonic - self._monotonic_anchor)
        if wall >= projected:
            self._wall_anchor, self._monotonic_anchor = wall, monotonic
            return wall

        return projected

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
