"""
Tests for sidecar.response: what an IdP body must hold to become a Token.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import jwt
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sidecar.errors import IdPResponseError
from sidecar.response import (
    DEFAULT_LIFETIME_SECONDS,
    MAX_LIFETIME_SECONDS,
    MAX_TOKEN_LENGTH,
    MIN_LIFETIME_SECONDS,
    parse_oauth_error,
    parse_token_response,
)

REQUESTED_AT = 1_800_000_000.0
JSON = "application/json"
# 32 bytes: PyJWT warns about shorter HMAC keys.
HMAC_KEY = "k" * 32
CANARY = "CANARY-7f3a9c-do-not-log"
ACCESS_TOKEN = "tok-abc.DEF_123"
BEARER = "Bearer"

_MISSING = object()


def body_of(
    access_token: object = ACCESS_TOKEN,
    token_type: object = BEARER,
    expires_in: object = 3600,
) -> bytes:
    """
    A token response body; fields passed as _MISSING are left out.
    """
    fields = {
        "access_token": access_token,
        "token_type": token_type,
        "expires_in": expires_in,
    }
    data = {k: v for k, v in fields.items() if v is not _MISSING}

    return json.dumps(data).encode()


def hs256(claims: dict[str, object]) -> str:
    """
    An HS256 JWT holding ``claims``.
    """
    return jwt.encode(claims, HMAC_KEY, algorithm="HS256")


def unsigned(claims: dict[str, object]) -> str:
    """
    An unsigned (alg none) JWT holding ``claims``.
    """
    return jwt.encode(claims, None, algorithm="none")


def rejection(body: bytes, content_type: str = JSON) -> str:
    """
    Parse ``body``, expect IdPResponseError, and return its message.
    """
    with pytest.raises(IdPResponseError) as info:
        parse_token_response(body, content_type, REQUESTED_AT)

    return str(info.value)


class TestAccessToken:
    """
    access_token must be a non-empty string that fits in a header.
    """

    @pytest.mark.parametrize(
        "value",
        [
            pytest.param(_MISSING, id="missing"),
            pytest.param("", id="empty"),
            pytest.param(None, id="null"),
            pytest.param(12345678, id="number"),
            pytest.param(["tok"], id="list"),
            pytest.param({"value": "tok"}, id="object"),
            pytest.param(True, id="boolean"),
        ],
    )
    def test_absent_or_not_a_string_is_rejected(self, value: object) -> None:
        """
        A missing, empty or non-string access_token is refused by name.
        """
        body = body_of(access_token=value)

        message = rejection(body)

        assert "access_token" in message

    @pytest.mark.parametrize(
        "value",
        [
            pytest.param(CANARY + " more", id="space"),
            pytest.param(CANARY + "\nSet-Cookie: x=1", id="newline"),
            pytest.param(CANARY + "\r", id="carriage-return"),
            pytest.param(CANARY + "\t", id="tab"),
            pytest.param(CANARY + "\x00", id="nul"),
            pytest.param(CANARY + "\x7f", id="del"),
            pytest.param(CANARY + "é", id="latin-1"),
            pytest.param(CANARY + "\u2028", id="line-separator"),
            pytest.param(CANARY + "🔑", id="emoji"),
        ],
    )
    def test_characters_unfit_for_a_header_are_rejected(
        self, value: str
    ) -> None:
        """
        Spaces, control and non-ASCII characters are refused unquoted.
        """
        body = body_of(access_token=value)

        message = rejection(body)

        assert "cannot go into an HTTP header" in message
        assert CANARY not in message

    def test_too_long_is_rejected(self) -> None:
        """
        A token longer than MAX_TOKEN_LENGTH is refused, naming the limit.
        """
        value = CANARY + "x" * (MAX_TOKEN_LENGTH + 1 - len(CANARY))
        body = body_of(access_token=value)

        message = rejection(body)

        assert str(MAX_TOKEN_LENGTH) in message
        assert str(MAX_TOKEN_LENGTH + 1) in message
        assert CANARY not in message

    def test_longest_allowed_is_accepted(self) -> None:
        """
        A token of exactly MAX_TOKEN_LENGTH visible characters is served.
        """
        value = "x" * MAX_TOKEN_LENGTH
        body = body_of(access_token=value)

        parsed = parse_token_response(body, JSON, REQUESTED_AT)

        assert parsed.token.access_token == value

    def test_every_visible_ascii_character_is_accepted(self) -> None:
        """
        Each printable ASCII character from '!' to '~' may appear.
        """
        value = "".join(chr(code) for code in range(0x21, 0x7F))
        body = body_of(access_token=value)

        parsed = parse_token_response(body, JSON, REQUESTED_AT)

        assert parsed.token.access_token == value


class TestTokenType:
    """
    Only Bearer tokens are served; a missing type is assumed Bearer.
    """

    @pytest.mark.parametrize("value", ["Bearer", "bearer", "BEARER", "bEaReR"])
    def test_bearer_in_any_case_is_accepted(self, value: str) -> None:
        """
        token_type Bearer is matched case-insensitively, without warning.
        """
        body = body_of(token_type=value)

        parsed = parse_token_response(body, JSON, REQUESTED_AT)

        assert parsed.warnings == ()
        assert parsed.token.access_token == ACCESS_TOKEN

    @pytest.mark.parametrize(
        "value",
        [pytest.param(_MISSING, id="missing"), pytest.param(None, id="null")],
    )
    def test_missing_is_served_as_bearer_with_a_warning(
        self, value: object
    ) -> None:
        """
        Without token_type the token is served, and a warning says why.
        """
        body = body_of(token_type=value)

        parsed = parse_token_response(body, JSON, REQUESTED_AT)

        assert parsed.token.access_token == ACCESS_TOKEN
        assert len(parsed.warnings) == 1
        assert "token_type" in parsed.warnings[0]
        assert "Bearer" in parsed.warnings[0]

    @pytest.mark.parametrize(
        ("value", "shown"),
        [
            pytest.param("DPoP", "'DPoP'", id="dpop"),
            pytest.param("mac", "'mac'", id="mac"),
            pytest.param("N_A", "'N_A'", id="n_a"),
            pytest.param("Bearer ", "'Bearer '", id="trailing-space"),
            pytest.param("", "''", id="empty"),
            pytest.param(1, "'?'", id="number"),
            pytest.param(["Bearer"], "'?'", id="list"),
        ],
    )
    def test_other_types_are_rejected(self, value: object, shown: str) -> None:
        """
        Any token_type but Bearer is refused, naming the type it saw.
        """
        body = body_of(token_type=value)

        message = rejection(body)

        assert f"token_type {shown}" in message
        assert "only Bearer" in message


class TestExpiresIn:
    """
    expires_in is a positive, finite number of seconds, at most a year.
    """

    @pytest.mark.parametrize(
        ("value", "seconds"),
        [
            pytest.param(3600, 3600.0, id="int"),
            pytest.param(3599.5, 3599.5, id="float"),
            pytest.param("3600", 3600.0, id="numeric-string"),
            pytest.param("90.25", 90.25, id="decimal-string"),
            pytest.param(" 60 ", 60.0, id="padded-string"),
            pytest.param(1, 1.0, id="one-second"),
            pytest.param(
                MAX_LIFETIME_SECONDS, float(MAX_LIFETIME_SECONDS), id="max"
            ),
        ],
    )
    def test_numbers_set_the_expiry(
        self, value: object, seconds: float
    ) -> None:
        """
        A numeric expires_in counts from the time the request was sent.
        """
        body = body_of(expires_in=value)

        token = parse_token_response(body, JSON, REQUESTED_AT).token

        assert token.issued_at == REQUESTED_AT
        assert token.expires_at == REQUESTED_AT + seconds

    @pytest.mark.parametrize(
        ("raw", "reason"),
        [
            pytest.param(b"NaN", "not finite", id="nan"),
            pytest.param(b'"NaN"', "not a number", id="nan-string"),
            pytest.param(b"Infinity", "not finite", id="infinity"),
            pytest.param(b"-Infinity", "not finite", id="minus-infinity"),
            pytest.param(b'"inf"', "not a number", id="inf-string"),
            pytest.param(b"1e400", "not finite", id="overflowing-float"),
            pytest.param(b"true", "not a number", id="true"),
            pytest.param(b"false", "not a number", id="false"),
            pytest.param(b"0", "already expired", id="zero"),
            pytest.param(b"0.0", "already expired", id="zero-float"),
            pytest.param(b"-1", "already expired", id="negative"),
            pytest.param(b'"-30"', "already expired", id="negative-string"),
            pytest.param(
                str(MAX_LIFETIME_SECONDS + 1).encode(),
                "more than a year",
                id="over-a-year",
            ),
            pytest.param(b"3600000000", "more than a year", id="millis"),
            pytest.param(b'"soon"', "not a number", id="word"),
            pytest.param(b'""', "not a number", id="empty-string"),
            pytest.param(b'"3600s"', "not a number", id="with-unit"),
            pytest.param(b'"0x10"', "not a number", id="hex-string"),
            pytest.param(b"[3600]", "not a number", id="list"),
            pytest.param(b'{"seconds": 3600}', "not a number", id="object"),
        ],
    )
    def test_unusable_values_are_rejected(
        self, raw: bytes, reason: str
    ) -> None:
        """
        Non-finite, non-positive, absurd or non-numeric lifetimes fail.
        """
        body = b'{"access_token": "tok", "expires_in": ' + raw + b"}"

        message = rejection(body)

        assert reason in message
        assert "expires_in" in message

    @given(
        seconds=st.one_of(
            st.integers(min_value=1, max_value=MAX_LIFETIME_SECONDS),
            st.floats(
                min_value=MIN_LIFETIME_SECONDS,
                max_value=MAX_LIFETIME_SECONDS,
            ),
        ),
        as_string=st.booleans(),
        requested_at=st.floats(min_value=0.0, max_value=4e9),
    )
    @example(seconds=MAX_LIFETIME_SECONDS, as_string=False, requested_at=0.0)
    @example(
        seconds=MIN_LIFETIME_SECONDS, as_string=True, requested_at=REQUESTED_AT
    )
    def test_any_valid_lifetime_counts_from_the_request(
        self, seconds: float, as_string: bool, requested_at: float
    ) -> None:
        """
        Every positive expires_in up to a year gives requested_at + it.
        """
        value = repr(seconds) if as_string else seconds
        body = body_of(expires_in=value)

        token = parse_token_response(body, JSON, requested_at).token

        assert token.issued_at == requested_at
        assert token.expires_at == requested_at + float(seconds)


class TestLifetimeFromJwt:
    """
    Without expires_in, a JWT's exp is used; failing that, a default.
    """

    @pytest.mark.parametrize(
        "encode", [hs256, unsigned], ids=["hs256", "none"]
    )
    def test_jwt_exp_sets_the_expiry(
        self, encode: Callable[[dict[str, object]], str]
    ) -> None:
        """
        A JWT access token's exp claim becomes the expiry, without warning.
        """
        access_token = encode({"sub": "billing", "exp": REQUESTED_AT + 900})
        body = body_of(access_token=access_token, expires_in=_MISSING)

        parsed = parse_token_response(body, JSON, REQUESTED_AT)

        assert parsed.token.expires_at == REQUESTED_AT + 900
        assert parsed.warnings == ()

    def test_expires_in_wins_over_jwt_exp(self) -> None:
        """
        When both are present, expires_in sets the lifetime.
        """
        access_token = hs256({"exp": REQUESTED_AT + 900})
        body = body_of(access_token=access_token, expires_in=60)

        token = parse_token_response(body, JSON, REQUESTED_AT).token

        assert token.expires_at == REQUESTED_AT + 60

    def test_earlier_jwt_exp_cuts_expires_in_short(self) -> None:
        """
        A JWT exp before requested_at + expires_in sets the expiry.
        """
        access_token = hs256({"exp": REQUESTED_AT + 59})
        body = body_of(access_token=access_token, expires_in=60)

        parsed = parse_token_response(body, JSON, REQUESTED_AT)

        assert parsed.token.expires_at == REQUESTED_AT + 59
        assert parsed.warnings == ()

    def test_past_jwt_exp_beside_expires_in_warns_about_clocks(
        self,
    ) -> None:
        """
        A JWT exp already past yields to expires_in, with a clock warning.
        """
        access_token = hs256({"exp": REQUESTED_AT - 120})
        body = body_of(access_token=access_token, expires_in=60)

        parsed = parse_token_response(body, JSON, REQUESTED_AT)

        assert parsed.token.expires_at == REQUESTED_AT + 60
        assert len(parsed.warnings) == 1
        assert "clock" in parsed.warnings[0]
        assert access_token not in parsed.warnings[0]

    def test_expired_jwt_is_rejected(self) -> None:
        """
        A JWT whose exp has passed is refused, hinting at the clock.
        """
        access_token = hs256({"exp": REQUESTED_AT - 10})
        body = body_of(access_token=access_token, expires_in=_MISSING)

        message = rejection(body)

        assert "exp" in message
        assert "already expired" in message
        assert "clock" in message
        assert access_token not in message

    def test_jwt_expiring_at_the_request_is_rejected(self) -> None:
        """
        A JWT with exp equal to the request time has no life left.
        """
        access_token = hs256({"exp": int(REQUESTED_AT)})
        body = body_of(access_token=access_token, expires_in=_MISSING)

        message = rejection(body)

        assert "already expired" in message

    def test_jwt_exp_beyond_a_year_is_rejected(self) -> None:
        """
        A JWT exp more than a year ahead is refused like expires_in.
        """
        exp = REQUESTED_AT + MAX_LIFETIME_SECONDS + 1
        access_token = hs256({"exp": exp})
        body = body_of(access_token=access_token, expires_in=_MISSING)

        message = rejection(body)

        assert "more than a year" in message

    @pytest.mark.parametrize(
        "access_token",
        [
            pytest.param("opaque-token-value", id="opaque"),
            pytest.param(hs256({"sub": "billing"}), id="jwt-without-exp"),
            pytest.param(hs256({"exp": "tomorrow"}), id="jwt-word-exp"),
            pytest.param("aaa.bbb.ccc", id="three-dotted-parts"),
        ],
    )
    def test_no_lifetime_at_all_gives_the_default(
        self, access_token: str
    ) -> None:
        """
        Without expires_in or a JWT exp, the default applies with a warning.
        """
        body = body_of(access_token=access_token, expires_in=_MISSING)

        parsed = parse_token_response(body, JSON, REQUESTED_AT)

        expected = REQUESTED_AT + DEFAULT_LIFETIME_SECONDS
        assert parsed.token.expires_at == expected
        assert len(parsed.warnings) == 1
        assert "expires_in" in parsed.warnings[0]
        assert str(DEFAULT_LIFETIME_SECONDS) in parsed.warnings[0]


class TestBodyShape:
    """
    Bodies that are not a JSON object fail with a message that helps.
    """

    @pytest.mark.parametrize(
        ("body", "content_type"),
        [
            pytest.param(
                b"<!DOCTYPE html><html><body><form>Please sign in"
                b"</form></body></html>",
                "text/html; charset=utf-8",
                id="html-login-page",
            ),
            pytest.param(
                b"Service temporarily unavailable", "text/plain", id="text"
            ),
            pytest.param(b"\xff\xfe\x00garbage", JSON, id="invalid-utf8"),
            pytest.param(b'{"access_token": "tok"', JSON, id="truncated"),
        ],
    )
    def test_not_json_is_rejected(
        self, body: bytes, content_type: str
    ) -> None:
        """
        A non-JSON body is refused, naming its type and size, not its text.
        """
        message = rejection(body, content_type)

        assert "not JSON" in message
        assert content_type in message
        assert f"{len(body)} bytes" in message
        assert "token_url" in message
        assert "sign in" not in message
        assert "unavailable" not in message

    def test_missing_content_type_is_named(self) -> None:
        """
        A non-JSON body with no content type says so.
        """
        message = rejection(b"oops", "")

        assert "no content type" in message

    @pytest.mark.parametrize(
        "body",
        [
            pytest.param(b"", id="empty"),
            pytest.param(b"  \r\n\t ", id="whitespace"),
        ],
    )
    def test_empty_body_is_rejected(self, body: bytes) -> None:
        """
        An empty or blank body is refused as empty.
        """
        message = rejection(body)

        assert "empty body" in message

    @pytest.mark.parametrize(
        ("body", "kind"),
        [
            pytest.param(b'[{"access_token": "tok"}]', "list", id="array"),
            pytest.param(b'"tok"', "str", id="string"),
            pytest.param(b"42", "int", id="number"),
            pytest.param(b"null", "NoneType", id="null"),
        ],
    )
    def test_json_that_is_not_an_object_is_rejected(
        self, body: bytes, kind: str
    ) -> None:
        """
        JSON arrays and scalars are refused, naming what arrived.
        """
        message = rejection(body)

        assert f"JSON {kind}, not an object" in message

    def test_oauth_error_on_success_is_rejected(self) -> None:
        """
        An OAuth error inside a 2xx is refused with its code and text.
        """
        body = json.dumps(
            {
                "error": "invalid_scope",
                "error_description": "scope orders.write is not allowed",
            }
        ).encode()

        with pytest.raises(IdPResponseError) as info:
            parse_token_response(body, JSON, REQUESTED_AT)

        assert info.value.oauth_error == "invalid_scope"
        assert "'invalid_scope'" in str(info.value)
        assert "scope orders.write is not allowed" in str(info.value)

    def test_oauth_error_beside_a_token_does_not_quote_the_token(
        self,
    ) -> None:
        """
        An error next to an access_token is refused without the token.
        """
        body = json.dumps(
            {"access_token": CANARY, "error": "server_error"}
        ).encode()

        message = rejection(body)

        assert "'server_error'" in message
        assert CANARY not in message

    @pytest.mark.parametrize(
        "body",
        [
            pytest.param(f"<html>{CANARY}</html>".encode(), id="html"),
            pytest.param(CANARY.encode(), id="text"),
            pytest.param(json.dumps([CANARY]).encode(), id="array"),
            pytest.param(json.dumps(CANARY).encode(), id="string"),
            pytest.param(body_of(access_token=CANARY + " x"), id="space"),
            pytest.param(body_of(expires_in=CANARY), id="word-lifetime"),
            pytest.param(body_of(expires_in=[CANARY]), id="list-lifetime"),
            pytest.param(body_of(access_token=[CANARY]), id="list-token"),
            pytest.param(
                body_of(access_token=CANARY, expires_in=-1), id="expired"
            ),
            pytest.param(
                body_of(access_token=CANARY, expires_in=10**9),
                id="too-long-lived",
            ),
        ],
    )
    def test_messages_never_quote_the_body(self, body: bytes) -> None:
        """
        No rejection message repeats the token or the body's text.
        """
        message = rejection(body, "text/html")

        assert CANARY not in message


class TestUntrustedInput:
    """
    Nothing an IdP sends makes the parser raise anything unexpected.
    """

    @given(body=st.binary(max_size=512))
    @example(body=b"")
    @example(body=b"{}")
    @example(body=b"[]")
    @example(body=b"\xef\xbb\xbf{}")
    @example(body=b'{"access_token": "t", "expires_in": NaN}')
    @example(body=b'{"access_token": "t", "expires_in": 1e999}')
    @example(body=b'{"access_token": "t", "expires_in": -0.0}')
    @example(body='{"access_token": "tök"}'.encode("utf-16"))
    def test_arbitrary_bytes_raise_only_idp_response_error(
        self, body: bytes
    ) -> None:
        """
        Whatever bytes arrive, the parser returns a token or says why not.
        """
        try:
            parsed = parse_token_response(body, JSON, REQUESTED_AT)
        except IdPResponseError:
            return

        assert parsed.token.expires_at > REQUESTED_AT

    @given(
        expires_in=st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats()
            | st.text(max_size=20),
            lambda children: (
                st.lists(children, max_size=3)
                | st.dictionaries(st.text(max_size=5), children, max_size=3)
            ),
            max_leaves=6,
        )
    )
    @example(expires_in=10**400)
    def test_any_json_lifetime_raises_only_idp_response_error(
        self, expires_in: object
    ) -> None:
        """
        Whatever JSON value expires_in holds, only IdPResponseError escapes.
        """
        body = body_of(expires_in=expires_in)

        try:
            parsed = parse_token_response(body, JSON, REQUESTED_AT)
        except IdPResponseError:
            return

        assert math.isfinite(parsed.token.expires_at)

    def test_huge_jwt_exp_raises_idp_response_error(self) -> None:
        """
        A JWT exp too large for a float is refused as a bad lifetime.
        """
        access_token = hs256({"exp": 10**400})
        body = body_of(access_token=access_token, expires_in=_MISSING)

        message = rejection(body)

        assert "exp" in message

    def test_deeply_nested_json_raises_idp_response_error(self) -> None:
        """
        A body nested deeper than the parser can follow is refused.
        """
        depth = 100_000
        body = b"[" * depth + b"]" * depth

        message = rejection(body)

        assert "not JSON" in message


class TestParseOAuthError:
    """
    parse_oauth_error pulls error and error_description out for logs.
    """

    def test_error_and_description_are_returned(self) -> None:
        """
        Both fields come back as given when they are plain strings.
        """
        body = json.dumps(
            {"error": "invalid_client", "error_description": "bad secret"}
        ).encode()

        result = parse_oauth_error(body)

        assert result == ("invalid_client", "bad secret")

    def test_missing_description_is_none(self) -> None:
        """
        An error without a description gives None for the description.
        """
        body = json.dumps({"error": "invalid_grant"}).encode()

        result = parse_oauth_error(body)

        assert result == ("invalid_grant", None)

    @pytest.mark.parametrize(
        "body",
        [
            pytest.param(b"", id="empty"),
            pytest.param(b"<html>503</html>", id="html"),
            pytest.param(b"\xff\xfe", id="invalid-utf8"),
            pytest.param(b'["invalid_client"]', id="array"),
            pytest.param(b'"invalid_client"', id="string"),
            pytest.param(b"{}", id="empty-object"),
        ],
    )
    def test_not_an_error_object_gives_nones(self, body: bytes) -> None:
        """
        Bodies that are not an OAuth error object give (None, None).
        """
        result = parse_oauth_error(body)

        assert result == (None, None)

    def test_deeply_nested_json_gives_nones(self) -> None:
        """
        JSON nested too deep to parse is no OAuth error, not a crash.
        """
        body = b"[" * 100_000 + b"]" * 100_000

        result = parse_oauth_error(body)

        assert result == (None, None)

    def test_non_string_fields_are_dropped(self) -> None:
        """
        Non-string error fields are returned as None, not converted.
        """
        body = json.dumps({"error": 401, "error_description": ["x"]})

        result = parse_oauth_error(body.encode())

        assert result == (None, None)

    def test_control_characters_are_replaced(self) -> None:
        """
        Newlines and other unprintable characters become question marks.
        """
        body = json.dumps(
            {"error": "bad\nline", "error_description": "a\x1b[31mb\tc"}
        ).encode()

        result = parse_oauth_error(body)

        assert result == ("bad?line", "a?[31mb?c")

    def test_long_texts_are_cut(self) -> None:
        """
        Each text is cut to 200 characters.
        """
        body = json.dumps(
            {"error": "e" * 500, "error_description": "d" * 500}
        ).encode()

        error, description = parse_oauth_error(body)

        assert error == "e" * 200
        assert description == "d" * 200


@pytest.mark.parametrize(
    "expires_in", [0.05, 0.999, "0.5"], ids=["50ms", "just-under", "string"]
)
def test_lifetimes_under_a_second_are_refused(expires_in: object) -> None:
    """
    A token living under a second is refused: keeping it fresh would mean
    asking the IdP several times a second.
    """
    body = json.dumps(
        {
            "access_token": "t0k",
            "token_type": "Bearer",
            "expires_in": expires_in,
        }
    ).encode()

    with pytest.raises(IdPResponseError, match="cannot be kept fresh"):
        parse_token_response(body, "application/json", REQUESTED_AT)
