"""
The sidecar's exceptions, split by what the caller can do about them.

::

    SidecarError
    ├── ConfigError            the configuration is unusable: fix it
    ├── IdPError               a token request did not produce a token
    │   ├── IdPUnavailableError    network, timeout, 5xx, 429: retry later
    │   ├── IdPRejectedError       400/401/403, redirects: fix credentials
    │   └── IdPResponseError       a 2xx whose body is not a usable token
    ├── CredentialError        the secret or key file cannot be used
    ├── NoTokenError           nothing valid to hand out right now (503)
    └── StateLockError         this sidecar's state files cannot be locked
        └── StateInUseError        another sidecar holds them

No message or attribute ever holds a secret or a token value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class SidecarError(Exception):
    """
    Root of every error the sidecar raises on purpose.
    """


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """
    One bad configuration key: where it is and what to do about it.
    """

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class ConfigError(SidecarError):
    """
    The configuration cannot be used; ``problems`` lists each bad key.
    """

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(str(p) for p in self.problems))


class IdPError(SidecarError):
    """
    A token request to the IdP failed.

    ``status`` is the HTTP status (``None`` when no answer arrived) and
    ``oauth_error`` the OAuth error code from the body, when there was one.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        oauth_error: str | None = None,
        retry_after_seconds: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.oauth_error = oauth_error
        self.retry_after_seconds = retry_after_seconds


class IdPUnavailableError(IdPError):
    """
    The IdP could not be reached or asked us to come back later.

    Back off and retry; keep serving any token that is still valid.
    ``retry_after_seconds`` carries the IdP's ``Retry-After``, if any.
    """


class IdPRejectedError(IdPError):
    """
    The IdP refused the request itself (bad credentials, scope, URL).

    Retrying soon will not help; the operator has to fix the config.
    """


class IdPResponseError(IdPError):
    """
    The IdP answered 2xx but the body is not a usable token response.
    """


class CredentialError(SidecarError):
    """
    The sidecar cannot read or use its own secret or private key.

    Nothing was sent to the IdP. Often passing (a rewrite caught half-way,
    too many open files), so it is retried like an outage.
    """


class NoTokenError(SidecarError):
    """
    No valid token can be handed out now.

    ``retry_after_seconds`` says when asking again may succeed.
    """

    def __init__(self, message: str, *, retry_after_seconds: int) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class StateLockError(SidecarError):
    """
    A state file (the cache or the ledger) could be written but not
    locked, so another sidecar might share it: fix what is in the way.
    """


class StateInUseError(StateLockError):
    """
    Another process holds the lock on one of this sidecar's state files:
    give each sidecar its own, or stop the other.
    """
