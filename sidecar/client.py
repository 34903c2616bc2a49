"""
A small synchronous client for a running sidecar, as used by
``token-sidecar token`` (over a Unix socket or loopback TCP) and
``token-sidecar health`` (the ops port).
"""

from __future__ import annotations

import grp
import http.client
import json
import socket
from pathlib import Path
from urllib.parse import urlsplit

from sidecar.errors import SidecarError


class ClientError(SidecarError):
    """
    No token could be had from the sidecar; the message says why.
    """


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def fetch_token(
    *,
    url: str | None = None,
    socket_path: Path | None = None,
    timeout_seconds: float = 15.0,
) -> str:
    """
    Ask the sidecar at ``socket_path`` or ``url`` for the bare token.

    Raises `ClientError` with a message for the user.
    """
    connection: http.client.HTTPConnection
    if socket_path is not None:
        connection = _UnixConnection(socket_path, timeout_seconds)
        path, where = "/token", f"unix:{socket_path}"
    else:
        assert url is not None
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ClientError(f"{url!r} is not an http:// URL")
        # http.client goes straight to the host: no proxy from the
        # environment ever sees the token.
        connection = http.client.HTTPConnection(
            parts.hostname, parts.port or 80, timeout=timeout_seconds
        )
        path, where = parts.path or "/token", url

    try:
        connection.request(
            "GET", path, headers={"Metadata": "true", "Accept": "text/plain"}
        )
        response = connection.getresponse()
        body = response.read()
    except PermissionError as exc:
        raise ClientError(_describe_denied(where, socket_path, exc)) from None
    except (OSError, http.client.HTTPException) as exc:
        raise ClientError(
            f"no sidecar answered at {where} ({exc}); is 'token-sidecar "
            "run' running there?"
        ) from None
    finally:
        connection.close()

    if response.status != 200:
        raise ClientError(_describe_refusal(response, body))
    token = body.decode("ascii", "replace").strip()
    if not token:
        raise ClientError("the sidecar answered with no token")

    return token


def _describe_denied(
    where: str, socket_path: Path | None, exc: OSError
) -> str:
    # On a shared node this is the usual case: the user is not (yet) in
    # the socket's group, and a group added today needs a new login.
    if socket_path is None:
        return f"not allowed to connect to {where} ({exc.strerror})"
    try:
        group = grp.getgrgid(socket_path.stat().st_gid).gr_name
    except (OSError, KeyError):
        group = "the socket's group"

    return (
        f"you may not use the sidecar's socket {socket_path} "
        f"({exc.strerror}): ask to be added to {group}, then log in again"
    )


def _describe_refusal(response: http.client.HTTPResponse, body: bytes) -> str:
    try:
        data = json.loads(body)
        detail = str(data.get("error_description") or data.get("error"))
    except (ValueError, AttributeError, RecursionError):
        detail = response.reason
    retry = response.getheader("Retry-After")
    suffix = f" (retry after {retry} s)" if retry else ""

    return f"sidecar answered HTTP {response.status}: {detail}{suffix}"


def check_health(url: str, timeout_seconds: float = 5.0) -> str:
    """
    Ask the ops endpoint at ``url`` (``/healthz`` or ``/readyz``) how the
    sidecar is; return its status word when it answers 200.

    Raises `ClientError` with a message for the user otherwise.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ClientError(f"{url!r} is not an http:// URL")
    connection = http.client.HTTPConnection(
        parts.hostname, parts.port or 80, timeout=timeout_seconds
    )
    try:
        connection.request("GET", parts.path or "/healthz")
        response = connection.getresponse()
        body = response.read(4096)
    except (OSError, http.client.HTTPException) as exc:
        raise ClientError(
            f"no sidecar answered at {url} ({exc}); is 'token-sidecar run' "
            "running, with [ops] enabled on that port?"
        ) from None
    finally:
        connection.close()

    try:
        status = str(json.loads(body)["status"])
    except (ValueError, KeyError, TypeError, RecursionError):
        # The ops port always answers {"status": ...}: whatever answered
        # is something else, such as the /token port.
        raise ClientError(
            f"{url} answered HTTP {response.status} ({response.reason}) "
            "but is not a sidecar's ops port; give the [ops] port "
            "(9464 by default)"
        ) from None
    if response.status != 200:
        raise ClientError(f"{url} answered HTTP {response.status}: {status}")

    return status
