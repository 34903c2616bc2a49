"""
A tiny development IdP for ``token-sidecar demo`` and nothing else.

NOT FOR PRODUCTION: it issues random opaque tokens to one client whose
secret it is told, on loopback only, keeps no state beyond a counter, and
implements only ``client_secret_post`` and ``client_secret_basic``.
"""

from __future__ import annotations

import base64
import hmac
import secrets
from collections.abc import Mapping
from urllib.parse import unquote

from aiohttp import web

REQUEST_COUNT_KEY = web.AppKey("request_count", list[int])


def build_dev_idp(
    client_id: str, client_secret: str, lifetime_seconds: int
) -> web.Application:
    """
    An app answering ``POST /oauth/token`` for one client.
    """

    async def issue(request: web.Request) -> web.Response:
        request.app[REQUEST_COUNT_KEY][0] += 1
        form = await request.post()
        given_id, given_secret = _credentials(request, form)
        if form.get("grant_type") != "client_credentials":
            return _error(400, "unsupported_grant_type")
        if not (
            hmac.compare_digest(given_id, client_id)
            and hmac.compare_digest(given_secret, client_secret)
        ):
            return _error(401, "invalid_client")
        body = {
            "access_token": "dev." + secrets.token_urlsafe(32),
            "token_type": "Bearer",
            "expires_in": lifetime_seconds,
        }

        return web.json_response(body, headers={"Cache-Control": "no-store"})

    app = web.Application()
    app[REQUEST_COUNT_KEY] = [0]
    app.router.add_post("/oauth/token", issue)

    return app


def _credentials(
    request: web.Request, form: Mapping[str, object]
) -> tuple[str, str]:
    header = request.headers.get("Authorization", "")
    if header.startswith("Basic "):
        try:
            pair = base64.b64decode(header[6:]).decode()
        except ValueError:
            return "", ""
        given_id, _, given_secret = pair.partition(":")
        return unquote(given_id), unquote(given_secret)
    return str(form.get("client_id", "")), str(form.get("client_secret", ""))


def _error(status: int, code: str) -> web.Response:
    return web.json_response({"error": code}, status=status)
