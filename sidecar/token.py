"""
The token value object and the arithmetic of its expiry and refresh.

Pure: no I/O, and time always comes in as an argument.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Token:
    """
    An access token and the wall-clock window in which it is valid.

    ``issued_at`` is the time the request for it was *sent*, so that the
    lifetime counted from there errs on the short side.
    """

    access_token: str = field(repr=False)
    issued_at: float
    expires_at: float
    #: The SHA-256 of the token, in hex: how callers name a token without
    #: sending it. Computed once: every /token answer compares it.
    sha256: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha256(self.access_token.encode()).hexdigest()
        object.__setattr__(self, "sha256", digest)

    @property
    def lifetime_seconds(self) -> float:
        """
        The whole validity window, as granted by the IdP.
        """
        return self.expires_at - self.issued_at

    @property
    def fingerprint(self) -> str:
        """
        A short, non-reversible name for logs and ETags: the SHA-256
        prefix.
        """
        return self.sha256[:12]

    def remaining_seconds(self, now: float) -> float:
        """
        Seconds of validity left at ``now`` (negative once expired).
        """
        return self.expires_at - now


@dataclass(frozen=True, slots=True)
class RefreshPolicy:
    """
    When to refresh a token and how much life it must have to be served.

    A token is refreshed once ``refresh_at`` of its lifetime has passed,
    less up to ``jitter`` of the lifetime so that sidecars which started
    together drift apart. The defaults (0.9, 0.02) cost at most
    1 / 0.88 = 1.14 requests per lifetime.
    """

    refresh_at: float = 0.9
    jitter: float = 0.02
    min_ttl_seconds: float = 30.0

    def min_ttl_for(self, token: Token) -> float:
        """
        The least life a served token must have left.

        ``min_ttl_seconds``, scaled down for short tokens to half of what
        is left when the refresh starts, so a token living a few seconds
        is still served between refreshes.
        """
        return self.min_ttl_for_lifetime(token.lifetime_seconds)

    def min_ttl_for_lifetime(self, lifetime_seconds: float) -> float:
        """
        The least life a served token of this lifetime must have left.
        """
        left_at_refresh = lifetime_seconds * (1.0 - self.refresh_at)

        return min(self.min_ttl_seconds, left_at_refresh / 2.0)

    def is_servable(self, token: Token, now: float) -> bool:
        """
        Whether ``token`` has at least its minimum TTL left at ``now``.
        """
        return token.remaining_seconds(now) >= self.min_ttl_for(token)

    def refresh_due_at(self, token: Token, draw: float) -> float:
        """
        When to start refreshing ``token``, in epoch seconds.

        ``draw`` is a random number in [0, 1) that picks the jitter; the
        result always falls after issue and before the minimum TTL.
        """
        fraction = self.refresh_at - self.jitter * draw

        return token.issued_at + token.lifetime_seconds * fraction
