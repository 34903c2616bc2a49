"""
The ceiling for any aiohttp server: ``GET /token`` answered with a fixed
body by a bare handler, on the same aiohttp and event loop as the
sidecar.

``python -m bench.bare --body FILE [--loop uvloop]`` prints
``{"port": P}`` once it serves. Like the sidecar it runs an `AppRunner`
without an access log; unlike it, there is nothing else: no middleware,
no checks, no metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from aiohttp import web

from bench.loops import LOOPS, use_loop
from bench.serving import serve_until_cancelled


def build_app(body: bytes) -> web.Application:
    """
    An app whose ``GET /token`` returns ``body`` as JSON.
    """

    async def token(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/token", token, allow_head=False)

    return app


async def serve(body: bytes) -> None:
    """
    Serve until cancelled on a free loopback port, which is printed.
    """
    await serve_until_cancelled(build_app(body), backlog=1024)


def main() -> None:
    """
    Parse the flags and serve until killed.
    """
    parser = argparse.ArgumentParser(prog="python -m bench.bare")
    parser.add_argument("--body", type=Path, required=True)
    parser.add_argument("--loop", choices=LOOPS, default="asyncio")
    args = parser.parse_args()
    use_loop(args.loop)
    try:
        asyncio.run(serve(args.body.read_bytes()))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
