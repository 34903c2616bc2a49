"""
Event loops the bench can run things on: asyncio's own, and uvloop when
it is installed (the ``uvloop`` extra).
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable

LOOPS = ("asyncio", "uvloop")


def available_loops() -> list[str]:
    """
    The loops installed here, asyncio first.
    """
    return [name for name in LOOPS if is_available(name)]


def is_available(name: str) -> bool:
    """
    Whether the loop called ``name`` can be used here.
    """
    if name == "asyncio":
        return True

    return importlib.util.find_spec(name) is not None


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """
    A function making a new loop of the kind ``name``.
    """
    if name == "uvloop":
        import uvloop  # optional: imported only when asked for

        return uvloop.new_event_loop

    return asyncio.new_event_loop


def use_loop(name: str) -> None:
    """
    Make ``asyncio.run`` (in this process) create loops of kind ``name``.

    What a ``run`` command would do to choose uvloop; the sidecar's own
    command line does not yet (see docs/benchmarks.md).
    """
    if name == "uvloop":
        import uvloop  # optional: imported only when asked for

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
