"""
``python -m bench.launch --loop uvloop run --config FILE``: the sidecar's
command line, on the event loop named.

With ``--loop asyncio`` it is exactly ``python -m sidecar``; with
``--loop uvloop`` the only difference is the loop policy, set before the
command line runs.
"""

from __future__ import annotations

import argparse
import sys

from bench.loops import LOOPS, use_loop
from sidecar.cli import main as sidecar_main


def main() -> int:
    """
    Choose the loop, then hand the other arguments to the sidecar.
    """
    parser = argparse.ArgumentParser(prog="python -m bench.launch")
    parser.add_argument("--loop", choices=LOOPS, default="asyncio")
    args, rest = parser.parse_known_args()
    use_loop(args.loop)

    return sidecar_main(rest)


if __name__ == "__main__":
    sys.exit(main())
