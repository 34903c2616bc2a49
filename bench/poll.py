"""
Clients that poll ``/token`` for a while, and the judgement of what they
were served against the IdP's own record of every token it issued.

An answer *certainly* carried an expired token when the request was
sent after the token's true expiry (the IdP's issue time plus lifetime):
the sidecar cannot have answered before it was asked. An answer that
merely *arrived* after expiry, though sent before, is counted apart: a
slow client, not necessarily a wrong sidecar.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench.client import Connection, request_head

LOOPBACK = "127.0.0.1"


@dataclass
class TokenSeen:
    """
    What the clients saw of one token.
    """

    answers: int = 0
    last_sent_at: float = 0.0
    last_received_at: float = 0.0
    claimed_expires_at: int = 0


@dataclass
class Tally:
    """
    Every answer the pollers got, by status, and each token served.
    """

    by_status: Counter[int] = field(default_factory=Counter)
    tokens: dict[str, TokenSeen] = field(default_factory=dict)
    unusable: int = 0
    connection_errors: int = 0

    @property
    def answers(self) -> int:
        """
        All answers received.
        """
        return sum(self.by_status.values())

    def note(
        self, status: int, body: bytes, sent_at: float, at: float
    ) -> None:
        """
        Count one answer; for a 200, remember its token.
        """
        self.by_status[status] += 1
        if status != 200:
            return
        try:
            data = json.loads(body)
            token = data["access_token"]
            claimed = int(data["expires_at"])
        except (ValueError, KeyError, TypeError):
            self.unusable += 1
            return
        if not isinstance(token, str) or not token:
            self.unusable += 1
            return
        seen = self.tokens.setdefault(token, TokenSeen())
        seen.answers += 1
        seen.last_sent_at = max(seen.last_sent_at, sent_at)
        seen.last_received_at = max(seen.last_received_at, at)
        seen.claimed_expires_at = claimed


@dataclass
class Verdict:
    """
    The answers judged against the IdP's record.
    """

    expired_served: int
    expired_on_arrival: int
    unknown_tokens: int
    overclaimed: int
    least_life_left_seconds: float | None

    @property
    def violations(self) -> list[str]:
        """
        What went wrong, in words; empty when nothing did.
        """
        problems = []
        if self.expired_served:
            problems.append(
                f"{self.expired_served} answers carried a token already "
                "expired when they were asked for"
            )
        if self.unknown_tokens:
            problems.append(
                f"{self.unknown_tokens} tokens served were never issued "
                "in a good IdP answer"
            )
        if self.overclaimed:
            problems.append(
                f"{self.overclaimed} tokens were served with an "
                "expires_at later than the IdP's"
            )

        return problems


def judge(tally: Tally, records: list[dict[str, Any]]) -> Verdict:
    """
    Check every token the clients were served against ``records``.
    """
    truth = {
        r["access_token"]: r["expires_at"]
        for r in records
        if r.get("access_token") and r.get("expires_at")
    }
    expired_served = expired_on_arrival = unknown = overclaimed = 0
    least: float | None = None
    for token, seen in tally.tokens.items():
        expires_at = truth.get(token)
        if expires_at is None:
            unknown += seen.answers
            continue
        if seen.last_sent_at >= expires_at:
            expired_served += 1
        elif seen.last_received_at >= expires_at:
            expired_on_arrival += 1
        # expires_at in the answer is whole seconds, rounded down.
        if seen.claimed_expires_at > expires_at:
            overclaimed += 1
        left = expires_at - seen.last_received_at
        least = left if least is None else min(least, left)

    return Verdict(
        expired_served, expired_on_arrival, unknown, overclaimed, least
    )


async def poll(
    port: int,
    clients: int,
    stop: asyncio.Event,
    tally: Tally,
    pause_seconds: float = 0.002,
) -> None:
    """
    Run ``clients`` keep-alive pollers against ``port`` until ``stop``.

    Each asks, waits for the answer, pauses ``pause_seconds`` (a pace,
    so the pollers do not take all the CPU) and asks again; a lost
    connection is counted and opened anew.
    """
    head = request_head(LOOPBACK, port)

    async def one() -> None:
        connection: Connection | None = None
        while not stop.is_set():
            try:
                if connection is None or connection.closed:
                    connection = await Connection.open(LOOPBACK, port)
                sent_at = time.time()
                answer = await connection.ask(head)
            except (ConnectionError, OSError):
                tally.connection_errors += 1
                connection = None
                await asyncio.sleep(pause_seconds)
                continue
            tally.note(answer.status, answer.body, sent_at, answer.received_at)
            await asyncio.sleep(pause_seconds)
        if connection is not None:
            connection.close()

    await asyncio.gather(*(one() for _ in range(clients)))
