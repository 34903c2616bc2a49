"""
The HTTP surface of a running sidecar, on real loopback sockets: the
/token answers, the SSRF guard, the ops endpoints and shutdown.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from sidecar.access import AccessPolicy
from sidecar.config import Settings
from sidecar.daemon import Sidecar
from sidecar.server import TokenEndpoint
from tests.conftest import (
    CLIENT_SECRET,
    METADATA,
    AiohttpServer,
    ops_url_of,
    token_url_of,
)
from tests.fakes import FakeClock, FakeIdP, Reply, wait_until


@pytest.fixture
def unlimited() -> aiohttp.TCPConnector:
    return aiohttp.TCPConnector(limit=0)


async def test_500_concurrent_cold_start_requests_cost_one_fetch(
    fake_idp: FakeIdP,
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
) -> None:
    """
    500 callers at a cold start share one IdP request and one token.
    """
    fake_idp.hold()
    sidecar = await start_sidecar(make_settings())
    url = token_url_of(sidecar)

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0)
    ) as session:

        async def ask() -> tuple[int, str]:
            async with session.get(url, headers=METADATA) as response:
                body = await response.json()
                return response.status, body.get("access_token", "")

        calls = [asyncio.create_task(ask()) for _ in range(500)]
        await wait_until(lambda: fake_idp.count == 1)
        fake_idp.release()
        results = await asyncio.gather(*calls)

    assert fake_idp.count == 1
    assert {status for status, _ in results} == {200}
    assert len({token for _, token in results}) == 1


async def test_token_answer_shape(
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    /token answers JSON with the remaining lifetime, never cached.
    """
    sidecar = await start_sidecar(make_settings())

    async with http.get(token_url_of(sidecar), headers=METADATA) as response:
        body = await response.json()
        headers = response.headers

    assert response.status == 200
    assert set(body) == {
        "access_token",
        "token_type",
        "expires_in",
        "expires_at",
    }
    assert body["token_type"] == "Bearer"
    assert 3590 <= body["expires_in"] <= 3600
    assert headers["Cache-Control"] == "no-store"
    assert not [h for h in headers if h.lower().startswith("access-control")]


async def test_text_plain_gets_the_bare_token(
    fake_idp: FakeIdP,
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    Accept: text/plain gets the token alone, for shell scripts.
    """
    sidecar = await start_sidecar(make_settings())

    async with http.get(
        token_url_of(sidecar), headers={**METADATA, "Accept": "text/plain"}
    ) as response:
        text = await response.text()

    assert response.status == 200
    assert response.content_type == "text/plain"
    assert text == fake_idp.issued[0]


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({}, "metadata_header_required"),
        ({"Metadata": "false"}, "metadata_header_required"),
        ({**METADATA, "X-Forwarded-For": "10.1.2.3"}, "forwarded_request"),
        ({**METADATA, "Forwarded": "for=10.1.2.3"}, "forwarded_request"),
        ({**METADATA, "Via": "1.1 proxy"}, "forwarded_request"),
        ({**METADATA, "X-Real-IP": "10.1.2.3"}, "forwarded_request"),
        ({**METADATA, "X_Forwarded_For": "10.1.2.3"}, "forwarded_request"),
        ({**METADATA, "Host": "evil.example"}, "bad_host"),
        ({**METADATA, "Host": "169.254.169.254"}, "bad_host"),
        ({**METADATA, "Host": "localhost.evil.example"}, "bad_host"),
        ({**METADATA, "Host": "[::1]evil.example"}, "bad_host"),
        ({**METADATA, "Host": "localhost:x@evil.example"}, "bad_host"),
        ({**METADATA, "Host": "localhost."}, "bad_host"),
    ],
    ids=[
        "no-metadata",
        "metadata-false",
        "x-forwarded-for",
        "forwarded",
        "via",
        "x-real-ip",
        "x_forwarded_for",
        "foreign-host",
        "metadata-ip-host",
        "lookalike-host",
        "bracket-trailer",
        "userinfo-trick",
        "trailing-dot",
    ],
)
async def test_guard_refuses_forged_requests(
    headers: dict[str, str],
    error: str,
    fake_idp: FakeIdP,
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    Requests a browser or an SSRF would send get a JSON 403 saying why.
    """
    sidecar = await start_sidecar(make_settings())

    async with http.get(token_url_of(sidecar), headers=headers) as response:
        body = await response.json()

    assert response.status == 403
    assert body["error"] == error
    assert body["error_description"]
    assert "access_token" not in body


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:1", "127.0.0.2:80", "[::1]:8787"]
)
async def test_guard_accepts_loopback_host_names(
    host: str,
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    Any loopback Host header passes the guard.
    """
    sidecar = await start_sidecar(make_settings())

    async with http.get(
        token_url_of(sidecar), headers={**METADATA, "Host": host}
    ) as response:
        pass

    assert response.status == 200


async def test_guard_can_be_turned_off(
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    With the three checks off, a bare request gets the token.
    """
    listen = {
        "require_metadata_header": False,
        "reject_forwarded": False,
        "require_loopback_host": False,
    }
    sidecar = await start_sidecar(make_settings(listen=listen))

    async with http.get(
        token_url_of(sidecar),
        headers={"X-Forwarded-For": "10.0.0.1", "Host": "example.org"},
    ) as response:
        pass

    assert response.status == 200


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nope", 404),
        ("POST", "/token", 405),
        ("OPTIONS", "/token", 405),
        ("DELETE", "/token", 405),
    ],
)
async def test_unknown_paths_and_methods_get_json_errors(
    method: str,
    path: str,
    status: int,
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    Unknown paths and methods get short JSON errors and no CORS headers.
    """
    sidecar = await start_sidecar(make_settings())
    url = token_url_of(sidecar).replace("/token", path)

    async with http.request(method, url, headers=METADATA) as response:
        body = await response.json()

    assert response.status == status
    assert "error" in body
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_idp_down_from_start_gives_503_with_retry_after(
    fake_idp: FakeIdP,
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    With no token to give, /token answers 503, JSON and Retry-After.
    """
    fake_idp.then(
        *[
            Reply(
                status=502,
                body=b"<html>bad gateway</html>",
                content_type="text/html",
            )
        ]
        * 1000
    )
    sidecar = await start_sidecar(
        make_settings(listen={"port": 0, "wait_for_token_seconds": 0.5})
    )

    async with http.get(token_url_of(sidecar), headers=METADATA) as response:
        body = await response.json()

    assert response.status == 503
    assert body["error"] == "temporarily_unavailable"
    assert int(response.headers["Retry-After"]) >= 1


async def test_outage_expiry_and_recovery(
    fake_idp: FakeIdP,
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    An IdP outage is invisible while the token lives, gives 503 after
    it expires, and heals by itself when the IdP returns.
    """
    clock = FakeClock()
    fake_idp.default_lifetime_seconds = 100
    sidecar = await start_sidecar(make_settings(), clock=clock)
    url = token_url_of(sidecar)
    await wait_until(lambda: clock.sleepers == 1)
    first = fake_idp.issued[0]

    async def ask() -> tuple[int, dict[str, Any]]:
        async with http.get(url, headers=METADATA) as response:
            return response.status, await response.json()

    fake_idp.then(*[Reply(status=503, body=b"")] * 10_000)
    clock.advance(92)
    during = await ask()
    clock.advance(10)
    after_expiry = await ask()
    fake_idp.script.clear()
    while fake_idp.issued == [first]:
        clock.advance(1)
        await asyncio.sleep(0.001)
    healed = await ask()

    assert during[0] == 200
    assert during[1]["access_token"] == first
    assert after_expiry[0] == 503
    assert healed[0] == 200
    assert healed[1]["access_token"] == fake_idp.issued[-1] != first


async def test_disconnecting_client_does_not_poison_the_fetch(
    fake_idp: FakeIdP,
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    A caller that times out while the first fetch is held does not
    cancel it; the next caller gets its token.
    """
    fake_idp.hold()
    sidecar = await start_sidecar(make_settings())
    url = token_url_of(sidecar)
    timeout = aiohttp.ClientTimeout(total=0.2)

    with pytest.raises(asyncio.TimeoutError):
        async with http.get(url, headers=METADATA, timeout=timeout):
            pass
    fake_idp.release()
    async with http.get(url, headers=METADATA) as response:
        body = await response.json()

    assert response.status == 200
    assert body["access_token"] == fake_idp.issued[0]
    assert fake_idp.count == 1


async def test_ops_endpoints(
    fake_idp: FakeIdP,
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    /healthz is up regardless of the IdP, /readyz follows the token, and
    /metrics exposes the documented series.
    """
    fake_idp.hold()
    sidecar = await start_sidecar(make_settings())

    async with http.get(ops_url_of(sidecar, "/healthz")) as health:
        pass
    async with http.get(ops_url_of(sidecar, "/readyz")) as not_ready:
        pass
    fake_idp.release()
    await wait_until(lambda: sidecar.cache.servable() is not None)
    async with http.get(ops_url_of(sidecar, "/readyz")) as ready:
        pass
    async with http.get(token_url_of(sidecar), headers=METADATA):
        pass
    async with http.get(ops_url_of(sidecar, "/metrics")) as metrics:
        text = await metrics.text()
    async with http.get(ops_url_of(sidecar, "/token")) as no_token:
        pass

    assert health.status == 200
    assert not_ready.status == 503
    assert ready.status == 200
    assert no_token.status == 404
    for name in (
        'sidecar_idp_requests_total{outcome="success"} 1.0',
        "sidecar_idp_request_duration_seconds_bucket",
        "sidecar_token_expiry_timestamp_seconds",
        "sidecar_idp_consecutive_failures 0.0",
        'sidecar_token_responses_total{status="200"} 1.0',
        'sidecar_build_info{version="',
    ):
        assert name in text


async def test_stop_releases_waiting_callers(
    fake_idp: FakeIdP,
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    Callers waiting for a first token get a 503 when the sidecar stops,
    and the stop completes.
    """
    fake_idp.hold()
    sidecar = await start_sidecar(
        make_settings(listen={"port": 0, "wait_for_token_seconds": 60})
    )

    async def ask() -> int:
        async with http.get(token_url_of(sidecar), headers=METADATA) as r:
            return r.status

    waiting = asyncio.create_task(ask())
    await wait_until(lambda: sidecar.cache.waiters == 1)
    await sidecar.stop()
    fake_idp.release()

    assert await waiting == 503


async def test_no_secret_or_token_in_logs(
    fake_idp: FakeIdP,
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    Across fetches, failures and hand-outs, no log event carries the
    client secret or a token.
    """
    fake_idp.then(
        Reply(status=401, body={"error": "invalid_client"}),
    )
    with capture_logs() as logs:
        sidecar = await start_sidecar(
            make_settings(
                log={"level": "debug"},
                retry={
                    "rejected_backoff_initial_seconds": 0.01,
                    "rejected_backoff_max_seconds": 0.01,
                },
            )
        )
        async with http.get(
            token_url_of(sidecar), headers=METADATA
        ) as response:
            await response.read()
        await sidecar.stop()

    dumped = json.dumps(logs, default=str)
    assert response.status == 200
    assert CLIENT_SECRET not in dumped
    for token in fake_idp.issued:
        assert token not in dumped
    assert any(e["event"] == "server.started" for e in logs)


async def test_absolute_form_target_is_refused(
    make_settings: Callable[..., Settings], start_sidecar: Any
) -> None:
    """
    A request naming a full URL as its target, as sent to a proxy, is
    refused even with a loopback Host.
    """
    sidecar = await start_sidecar(make_settings())
    host, port = sidecar.token_address
    reader, writer = await asyncio.open_connection(host, port)

    writer.write(
        b"GET http://evil.example/token HTTP/1.1\r\n"
        b"Host: 127.0.0.1\r\nMetadata: true\r\nConnection: close\r\n\r\n"
    )
    answer = await reader.read()
    writer.close()

    assert answer.startswith(b"HTTP/1.1 403")
    assert b"absolute_target" in answer
    assert b"access_token" not in answer


async def test_request_with_body_is_refused(
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    /token takes no body: a GET carrying one gets a JSON 413.
    """
    sidecar = await start_sidecar(make_settings())

    async with http.get(
        token_url_of(sidecar), headers=METADATA, data=b"x" * 10
    ) as response:
        body = await response.json()

    assert response.status == 413
    assert body["error"] == "request_body_not_allowed"


async def test_min_ttl_refreshes_once_for_all_callers(
    fake_idp: FakeIdP,
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    Callers asking for more life than the token has left share one
    refresh, and get a token with that life.
    """
    clock = FakeClock()
    sidecar = await start_sidecar(make_settings(), clock=clock)
    url = token_url_of(sidecar)
    await wait_until(lambda: fake_idp.count == 1)
    clock.advance(2000)

    async def ask(query: str) -> dict[str, Any]:
        async with http.get(url + query, headers=METADATA) as response:
            assert response.status == 200
            return dict(await response.json())

    plain = await ask("")
    fitting = await asyncio.gather(*(ask("?min_ttl=1800") for _ in range(20)))

    assert plain["expires_in"] == 1600
    assert fake_idp.count == 2
    assert {b["access_token"] for b in fitting} == {fake_idp.issued[1]}
    assert all(b["expires_in"] >= 1800 for b in fitting)


async def test_min_ttl_beyond_half_a_lifetime_is_capped(
    fake_idp: FakeIdP,
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    Asking for more than half a lifetime costs at most one request per
    half lifetime, however often it is asked.
    """
    clock = FakeClock()
    sidecar = await start_sidecar(make_settings(), clock=clock)
    url = token_url_of(sidecar) + "?min_ttl=999999"
    await wait_until(lambda: fake_idp.count == 1)

    for _ in range(10):
        async with http.get(url, headers=METADATA) as response:
            assert response.status == 200
    clock.advance(1801)
    for _ in range(10):
        async with http.get(url, headers=METADATA) as response:
            assert response.status == 200

    assert fake_idp.count == 2


@pytest.mark.parametrize(
    "query", ["?min_ttl=-1", "?min_ttl=abc", "?wait=301", "?wait=nan"]
)
async def test_bad_query_parameters_get_400(
    query: str,
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    Out-of-range or non-numeric min_ttl and wait are refused with 400.
    """
    sidecar = await start_sidecar(make_settings())

    async with http.get(
        token_url_of(sidecar) + query, headers=METADATA
    ) as response:
        body = await response.json()

    assert response.status == 400
    assert body["error"] == "invalid_request"


async def test_etag_and_long_poll(
    fake_idp: FakeIdP,
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    Every answer has an ETag; If-None-Match gets 304; a long-poll after
    the current ETag times out with 304, and returns at once with the
    new token when it changes.
    """
    sidecar = await start_sidecar(make_settings())
    url = token_url_of(sidecar)

    async with http.get(url, headers=METADATA) as first:
        etag = first.headers["ETag"]
    async with http.get(
        url, headers={**METADATA, "If-None-Match": etag}
    ) as unchanged:
        pass
    async with http.get(
        url + f"?wait=0.2&after={etag.strip(chr(34))}", headers=METADATA
    ) as timed_out:
        pass
    poll = asyncio.create_task(
        http.get(
            url + f"?wait=30&after={etag.strip(chr(34))}", headers=METADATA
        )
    )
    await wait_until(lambda: poll.done() or sidecar.cache.token is not None)
    current = sidecar.cache.token
    assert current is not None
    invalidated = await http.post(
        url + "/invalidate",
        headers=METADATA,
        json={"token_sha256": current.sha256},
    )
    changed = await poll
    body = await changed.json()

    assert unchanged.status == 304
    assert timed_out.status == 304
    assert invalidated.status == 202
    assert changed.status == 200
    assert changed.headers["ETag"] != etag
    assert body["access_token"] == fake_idp.issued[1]


async def test_invalidate_is_shared_rate_limited_and_checked(
    fake_idp: FakeIdP,
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    Many callers reporting the same rejected token cost one request; a
    hash of another token is ignored; a second invalidation soon after
    is refused with 429.
    """
    fake_idp.hold()
    sidecar = await start_sidecar(make_settings())
    url = token_url_of(sidecar) + "/invalidate"
    fake_idp.release()
    await wait_until(lambda: sidecar.cache.token is not None)
    current = sidecar.cache.token
    assert current is not None

    async def report(sha: str) -> tuple[int, str]:
        async with http.post(
            url, headers=METADATA, json={"token_sha256": sha}
        ) as response:
            body = await response.json()
            return response.status, body.get("status") or body["error"]

    fake_idp.hold()
    reports = await asyncio.gather(
        *(report(current.sha256) for _ in range(10))
    )
    fake_idp.release()
    await wait_until(lambda: sidecar.cache.token != current)
    stale = await report(current.sha256)
    other = await report("0" * 64)
    renewed = sidecar.cache.token
    assert renewed is not None
    too_soon = await report(renewed.sha256)

    assert sorted(reports) == [(202, "already_refreshing")] * 9 + [
        (202, "refreshing")
    ]
    assert fake_idp.count == 2
    assert stale == (200, "not_current")
    assert other == (200, "not_current")
    assert too_soon == (429, "rate_limited")


@pytest.mark.parametrize(
    "data",
    [
        b"x",
        b"[" * 1000,
        b'{"token_sha256": 5}',
        b"[]",
        '{"token_sha256": "é"}'.encode(),
        b'{"token_sha256": "abc"}',
        b'{"token_sha256": "' + b"a" * 64 + b'"}',
    ],
    ids=[
        "not-json",
        "deeply-nested",
        "not-text",
        "no-hash",
        "non-ascii",
        "short",
        "unknown-charset",
    ],
)
async def test_invalidate_needs_a_json_hash(
    data: bytes,
    request: pytest.FixtureRequest,
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    An invalidation without {"token_sha256": "<64 hex digits>"} is a
    400, counted, even when its JSON nests too deep for the parser or
    names a charset Python does not know.
    """
    sidecar = await start_sidecar(make_settings())
    content_type = "application/json"
    if request.node.callspec.id == "unknown-charset":
        content_type += "; charset=no-such-charset"

    async with http.post(
        token_url_of(sidecar) + "/invalidate",
        headers={**METADATA, "Content-Type": content_type},
        data=data,
    ) as response:
        body = await response.json()

    assert response.status == 400
    assert "token_sha256" in body["error_description"]
    assert sidecar.metrics.registry.get_sample_value(
        "sidecar_token_responses_total", {"status": "400"}
    )


@pytest.mark.parametrize(
    "header",
    ['"{tag}"', 'W/"{tag}"', '"other", "{tag}"', "*"],
    ids=["exact", "weak", "list", "any"],
)
async def test_if_none_match_forms(
    header: str,
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    If-None-Match matches weakly, in lists and as "*", as HTTP says.
    """
    sidecar = await start_sidecar(make_settings())
    url = token_url_of(sidecar)
    async with http.get(url, headers=METADATA) as first:
        tag = first.headers["ETag"].strip('"')

    async with http.get(
        url, headers={**METADATA, "If-None-Match": header.format(tag=tag)}
    ) as response:
        pass

    assert response.status == 304


async def test_answers_are_rendered_once_and_count_down(
    fake_idp: FakeIdP,
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    The same token's answers are the bytes json.dumps gives, with the
    same ETag, while expires_in follows the clock.
    """
    clock = FakeClock()
    sidecar = await start_sidecar(make_settings(), clock=clock)
    url = token_url_of(sidecar)

    async with http.get(url, headers=METADATA) as first:
        first_body = await first.read()
    clock.advance(10)
    async with http.get(url, headers=METADATA) as second:
        second_body = await second.read()

    before, after = json.loads(first_body), json.loads(second_body)
    assert first.headers["ETag"] == second.headers["ETag"]
    assert first.headers["Content-Type"] == "application/json; charset=utf-8"
    assert after["access_token"] == fake_idp.issued[0]
    assert before["expires_in"] - after["expires_in"] == 10
    assert before["expires_at"] == after["expires_at"]
    assert second_body == json.dumps(after).encode()


async def test_hand_outs_are_logged_once_per_caller_then_summed_up(
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    A caller's first hand-out of a token is logged at info and the
    repeats at debug; at shutdown one event sums them up.
    """
    with capture_logs() as logs:
        sidecar = await start_sidecar(make_settings())
        for _ in range(3):
            async with http.get(
                token_url_of(sidecar), headers=METADATA
            ) as response:
                await response.read()
        await sidecar.stop()

    handed = [e for e in logs if e["event"] == "token.handed_out"]
    [summary] = [e for e in logs if e["event"] == "token.hand_outs_counted"]
    assert [e["log_level"] for e in handed] == ["info", "debug", "debug"]
    assert summary["hand_outs"] == 3
    assert summary["callers"] == 1
    assert summary["token_fingerprint"] == handed[0]["token_fingerprint"]


async def test_callers_waiting_for_a_token_are_a_metric(
    fake_idp: FakeIdP,
    make_settings: Callable[..., Settings],
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    """
    sidecar_token_waiters counts the callers waiting for a token
    request to end, and falls back to 0 when it has.
    """
    fake_idp.hold()
    sidecar = await start_sidecar(make_settings())

    async def ask() -> int:
        async with http.get(token_url_of(sidecar), headers=METADATA) as r:
            return r.status

    async def waiters() -> str:
        async with http.get(ops_url_of(sidecar, "/metrics")) as response:
            text = await response.text()
        return next(
            line
            for line in text.splitlines()
            if line.startswith("sidecar_token_waiters ")
        )

    calls = [asyncio.create_task(ask()) for _ in range(3)]
    await wait_until(lambda: sidecar.cache.waiters == 3)
    while_waiting = await waiters()
    fake_idp.release()
    statuses = await asyncio.gather(*calls)

    assert while_waiting == "sidecar_token_waiters 3.0"
    assert statuses == [200, 200, 200]
    assert await waiters() == "sidecar_token_waiters 0.0"


async def test_an_unexpected_failure_is_a_counted_json_500(
    make_settings: Callable[..., Settings],
    aiohttp_server: AiohttpServer,
    http: aiohttp.ClientSession,
) -> None:
    """
    A handler behind the endpoint's front that fails unexpectedly answers
    a JSON 500 that is counted, and its traceback is logged once per
    interval, not once per request.
    """
    settings = make_settings()
    sidecar = Sidecar(settings, clock=FakeClock())
    endpoint = TokenEndpoint(
        sidecar.build_refresher(http),
        sidecar.cache,
        sidecar.clock,
        sidecar.metrics,
        settings.listen,
        AccessPolicy(settings.access),
    )

    async def broken(request: web.Request, peer: object) -> web.Response:
        raise RuntimeError("a bug")

    app = web.Application()
    app.router.add_get("/token", endpoint.front(broken))
    server = await aiohttp_server(app, host="127.0.0.1")
    statuses = []
    with capture_logs() as events:
        for _ in range(5):
            async with http.get(
                server.make_url("/token"), headers=METADATA
            ) as response:
                statuses.append(response.status)
                body = await response.json()

    assert statuses == [500] * 5
    assert body["error"] == "internal_error"
    assert (
        sidecar.metrics.registry.get_sample_value(
            "sidecar_token_responses_total", {"status": "500"}
        )
        == 5
    )
    logged = [e for e in events if e["event"] == "token.internal_error"]
    assert len(logged) == 1
