"""
A minimal HTTP/1.1 client: one keep-alive connection, one request at a
time, on a bare asyncio protocol.

For the load generator and the thousands of concurrent clients: aiohttp's
client costs several times more per request than the sidecar does to
answer, so with it the bench would measure the client.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

#: The request head every bench client sends for the token.
METADATA = {"Metadata": "true"}


@dataclass(frozen=True, slots=True)
class Answer:
    """
    One response: status, headers (names in lower case), body, and when
    it had fully arrived (epoch seconds).
    """

    status: int
    headers: dict[str, str]
    body: bytes
    received_at: float


def request_head(
    host: str,
    port: int,
    target: str = "/token",
    headers: dict[str, str] | None = None,
) -> bytes:
    """
    A ``GET`` request for ``target`` with the Metadata header.
    """
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}:{port}"]
    lines.extend(
        f"{k}: {v}" for k, v in {**METADATA, **(headers or {})}.items()
    )

    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_answer(buffer: bytes | bytearray) -> tuple[Answer, int] | None:
    """
    The first complete response in ``buffer`` and its length in bytes,
    or ``None`` while it is incomplete. Bodies must be framed by
    Content-Length (as every server here frames them).
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    total = end + 4 + length
    if len(buffer) < total:
        return None
    body = bytes(buffer[end + 4 : total])

    return Answer(status, headers, body, time.time()), total


class Connection(asyncio.Protocol):
    """
    One keep-alive connection; `ask` sends a request and waits for its
    answer.
    """

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[Answer] | None = None
        self.closed = False

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        """
        Connect to ``host``:``port``.
        """
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(cls, host, port)

        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        parsed = parse_answer(self._buffer)
        if parsed is None:
            return
        answer, length = parsed
        del self._buffer[:length]
        if answer.headers.get("connection", "").lower() == "close":
            self.close()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(
                ConnectionError("the server closed the connection")
            )

    def send(self, head: bytes) -> asyncio.Future[Answer]:
        """
        Send ``head``; the future holds the answer.
        """
        if self.closed or self._transport is None:
            raise ConnectionError("the connection is closed")
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(head)

        return self._waiter

    async def ask(self, head: bytes) -> Answer:
        """
        Send ``head`` and wait for the answer.
        """
        return await self.send(head)

    def close(self) -> None:
        """
        Close the connection.
        """
        self.closed = True
        if self._transport is not None:
            self._transport.close()
