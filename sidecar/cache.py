"""
The current token, and a place to wait for the next fetch's outcome.

Only the refresher fetches; everyone else reads the cache or waits on it.
That is what keeps IdP requests to one in flight however many callers
ask at once.
"""

from __future__ import annotations

import asyncio

from sidecar.clock import Clock
from sidecar.errors import SidecarError
from sidecar.token import RefreshPolicy, Token


class CacheClosedError(SidecarError):
    """
    The sidecar is stopping; no further token will be published.
    """


class TokenCache:
    """
    Holds the newest token and wakes callers when a fetch ends.

    Waiters share one future per fetch and hold it through
    `asyncio.shield`, so a caller that gives up or disconnects cannot
    cancel or spoil the outcome the others are waiting for. ``waiters``
    counts the callers waiting now.
    """

    def __init__(self, policy: RefreshPolicy, clock: Clock) -> None:
        self.policy = policy
        self._clock = clock
        self._token: Token | None = None
        self._next_outcome: asyncio.Future[Token] | None = None
        self._closed = False
        self.waiters = 0
        # Set, and replaced, whenever a new token is published.
        self._changed = asyncio.Event()

    @property
    def token(self) -> Token | None:
        """
        The newest token, whether or not it is still servable.
        """
        return self._token

    def servable(self) -> Token | None:
        """
        The token if it has at least its minimum TTL left, else ``None``.
        """
        token = self._token
        if token is None or not self.policy.is_servable(
            token, self._clock.now()
        ):
            return None

        return token

    def publish(self, token: Token) -> None:
        """
        Store a freshly fetched token and hand it to everyone waiting.
        """
        self._token = token
        future = self._take_next_outcome()
        if future is not None:
            future.set_result(token)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_for_change(
        self, fingerprint: str, timeout_seconds: float
    ) -> Token | None:
        """
        Wait until a token other than ``fingerprint`` is published.

        Returns the new token, or ``None`` after ``timeout_seconds`` (or
        at once when the sidecar stops).
        """
        if self._token is not None and self._token.fingerprint != fingerprint:
            return self._token
        changed = self._changed
        # asyncio.timeout, not wait_for: on Python 3.11, wait_for can
        # swallow a cancellation that lands as the wait ends.
        try:
            async with asyncio.timeout(timeout_seconds):
                await changed.wait()
        except TimeoutError:
            return None

        return self._token

    def publish_failure(self, error: BaseException) -> None:
        """
        Tell everyone waiting that the fetch they waited for failed.

        The current token, if any, stays: it may still be valid.
        """
        future = self._take_next_outcome()
        if future is not None:
            future.set_exception(error)
            # Mark it retrieved: with no waiter left, asyncio would log
            # the error as never retrieved.
            future.exception()

    async def wait_for_outcome(self, timeout_seconds: float) -> Token:
        """
        Wait for the next fetch to end and return its token.

        Raises the fetch's error, `TimeoutError` after
        ``timeout_seconds``, or `CacheClosedError` when stopping.
        """
        if self._closed:
            raise CacheClosedError("the sidecar is stopping")
        if self._next_outcome is None:
            loop = asyncio.get_running_loop()
            self._next_outcome = loop.create_future()

        self.waiters += 1
        try:
            async with asyncio.timeout(timeout_seconds):
                return await asyncio.shield(self._next_outcome)
        finally:
            self.waiters -= 1

    def close(self) -> None:
        """
        Fail every waiter at once; used when the sidecar stops.
        """
        self._closed = True
        self.publish_failure(CacheClosedError("the sidecar is stopping"))
        self._changed.set()

    def _take_next_outcome(self) -> asyncio.Future[Token] | None:
        future, self._next_outcome = self._next_outcome, None
        if future is None or future.done():
            return None

        return future
