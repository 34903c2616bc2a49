"""
Who may take the token: the kernel's word on the caller, checked against
an allowlist, or a shared client token for callers the kernel cannot name.
"""

from __future__ import annotations

import functools
import hmac
import os
import pwd
from dataclasses import dataclass

from sidecar.config import AccessSettings, resolve_id
from sidecar.files import WatchedFile
from sidecar.peer import Peer

#: Label for hand-outs to callers outside the allowlist (by client token),
#: which keeps the uid label set bounded by the config.
OTHER_UID_LABEL = "other"


@dataclass(frozen=True, slots=True)
class Refusal:
    """
    Why a caller may not have the token: an error code and what to do.
    """

    error: str
    description: str


class AccessPolicy:
    """
    Decides, per request, whether the caller may take the token.

    A caller passes when any rule admits it: ``allow_all``; its uid is
    the sidecar's own (``allow_same_uid``) or listed; its group (primary,
    or any the user belongs to) is listed; or it presents the client
    token. A caller the kernel could not name passes only by token.
    """

    def __init__(
        self, settings: AccessSettings, own_uid: int | None = None
    ) -> None:
        self._allow_all = settings.allow_all
        self._own_uid = os.getuid() if own_uid is None else own_uid
        self._uids = {resolve_id(u, "user") for u in settings.allow_uids}
        if settings.allow_same_uid:
            self._uids.add(self._own_uid)
        self._gids = {resolve_id(g, "group") for g in settings.allow_gids}
        self._client_token = (
            WatchedFile(settings.client_token_file)
            if settings.client_token_file
            else None
        )

    def refusal(
        self, peer: Peer | None, authorization: str | None
    ) -> Refusal | None:
        """
        ``None`` when the caller may have the token, else why not.
        """
        if self._allow_all or self._presents_client_token(authorization):
            return None
        if peer is None:
            return Refusal(
                "unknown_caller",
                "the kernel could not say which user is calling; call "
                "from this host (or use the client token)",
            )
        if peer.uid in self._uids or self._in_allowed_group(peer):
            return None

        return Refusal(
            "caller_not_allowed",
            f"user {peer.uid} may not take the token; the operator can "
            "add it to access.allow_uids or a group to access.allow_gids",
        )

    def uid_label(self, peer: Peer | None) -> str:
        """
        A metric label for the caller: its uid if configured, else
        ``other``.
        """
        if peer is not None and peer.uid in self._uids:
            return str(peer.uid)

        return OTHER_UID_LABEL

    def _presents_client_token(self, authorization: str | None) -> bool:
        if self._client_token is None or not authorization:
            return False
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return False
        try:
            expected = self._client_token.read().strip()
        except (OSError, ValueError):
            return False

        return bool(expected) and hmac.compare_digest(
            presented.strip().encode(), expected
        )

    def _in_allowed_group(self, peer: Peer) -> bool:
        if not self._gids:
            return False
        if peer.gid is not None and peer.gid in self._gids:
            return True
        if not self._gids.isdisjoint(peer.groups):
            return True

        return not self._gids.isdisjoint(_groups_of(peer.uid))


# Limitation: a user's group list is read once per uid for the life of
# the process; a membership change is seen after a restart.
@functools.lru_cache(maxsize=1024)
def _groups_of(uid: int) -> frozenset[int]:
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return frozenset()

    return frozenset(os.getgrouplist(user.pw_name, user.pw_gid))
