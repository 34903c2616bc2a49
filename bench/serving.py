"""
The child side of a bench server: serve an app on a free loopback port,
say which on stdout as one JSON line (`bench.procs` reads it), and run
until cancelled.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web


async def serve_until_cancelled(
    app: web.Application, backlog: int = 128
) -> None:
    """
    Serve ``app`` on 127.0.0.1 and a free port, printed as
    ``{"port": P}`` once it listens, until cancelled.
    """
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, backlog=backlog).start()
    print(json.dumps({"port": runner.addresses[0][1]}), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
