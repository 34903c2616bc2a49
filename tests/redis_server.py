"""
A real ``redis-server`` on loopback for the fleet tests: started on a free
port with no persistence, stopped (or killed, or restarted on the same
port) at the test's command.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from tests.fakes import free_port
from tests.tools import STARTUP_DEADLINE_SECONDS, describe_process


class RedisServer:
    """
    One redis-server process bound to 127.0.0.1 on ``port``.
    """

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """
        The ``redis://`` URL of this server.
        """
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """
        Start the server and wait until it answers PING.
        """
        self.process = subprocess.Popen(
            [
                self.binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--protected-mode",
                "yes",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + STARTUP_DEADLINE_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.process.returncode}"
                )
            if self.command("PING") == "+PONG":
                return self
            # Polling a condition against a deadline, not timing a wait.
            time.sleep(0.02)

        raise RuntimeError(
            f"redis-server did not answer PING within "
            f"{STARTUP_DEADLINE_SECONDS:.0f} s ("
            f"{describe_process(self.process.pid)})"
        )

    def stop(self) -> None:
        """
        Stop the server, if it runs.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def command(self, *words: str) -> str | None:
        """
        Send one inline command; return the first reply line, or ``None``
        when nothing answers. For the harness only: the sidecar uses the
        redis package.
        """
        try:
            with socket.create_connection(
                ("127.0.0.1", self.port), timeout=2
            ) as connection:
                connection.sendall(" ".join(words).encode() + b"\r\n")
                reply = connection.recv(65536)
        except OSError:
            return None

        return reply.split(b"\r\n")[0].decode(errors="replace")

    def total_commands(self) -> int:
        """
        Commands the server has processed since it started or since
        `reset_stats` (INFO stats: total_commands_processed).
        """
        with socket.create_connection(
            ("127.0.0.1", self.port), timeout=2
        ) as connection:
            connection.sendall(b"INFO stats\r\n")
            reply = b""
            while (
                b"total_commands_processed:" not in reply
                or not reply.endswith(b"\r\n")
            ):
                chunk = connection.recv(65536)
                if not chunk:
                    break
                reply += chunk
        for line in reply.decode(errors="replace").splitlines():
            if line.startswith("total_commands_processed:"):
                return int(line.split(":")[1])

        raise RuntimeError("INFO stats gave no total_commands_processed")

    def reset_stats(self) -> None:
        """
        Zero the server's counters (CONFIG RESETSTAT).
        """
        assert self.command("CONFIG", "RESETSTAT") == "+OK"
