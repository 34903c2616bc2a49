"""
Tests for sidecar.store: the encrypted warm-restart token cache file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sidecar.config import IdPSettings
from sidecar.errors import CredentialError
from sidecar.log import redact
from sidecar.store import (
    HKDF_INFO,
    HKDF_SALT,
    MAX_CACHE_FILE_BYTES,
    Binding,
    TokenStore,
)
from sidecar.token import Token
from tests.fakes import FakeClock

NOW = 1_800_000_000.0
SECRET = b"client-secret-value-4242"
ROTATED_SECRET = b"client-secret-value-4343"
TOKEN_VALUE = "eyJhbGciOi.cached-access-token.value-7781"

BINDING = Binding(
    token_url="https://auth.example.com/oauth/token",
    client_id="billing",
    audience="https://api.example.com",
    scope="orders.read orders.write",
    auth_method="client_secret_post",
)

# Hypothesis reuses one tmp_path across examples; each example writes
# the cache file afresh, so sharing it is harmless.
SHARED_TMP_PATH = settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def token_of(
    value: str = TOKEN_VALUE, lifetime_seconds: float = 3600.0
) -> Token:
    """
    A token issued at NOW that lives ``lifetime_seconds``.
    """
    return Token(
        access_token=value, issued_at=NOW, expires_at=NOW + lifetime_seconds
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "token.cache"


@pytest.fixture
def make_store(path: Path, clock: FakeClock) -> Callable[..., TokenStore]:
    """
    Stores on the test's cache path; keywords override binding and key.
    """

    def make(
        binding: Binding = BINDING,
        key_material: Callable[[], bytes] = lambda: SECRET,
    ) -> TokenStore:
        return TokenStore(path, binding, key_material, clock=clock)

    return make


@pytest.fixture
def store(make_store: Callable[..., TokenStore]) -> TokenStore:
    return make_store()


@pytest.fixture
def saved(store: TokenStore, path: Path) -> bytes:
    """
    The bytes of a cache file holding ``token_of()``.
    """
    store.save(token_of())

    return path.read_bytes()


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """
    Run with umask 0, so file modes come from the code, not the umask.
    """
    previous = os.umask(0)
    yield
    os.umask(previous)


def reported(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    The events above debug level.
    """
    return [e for e in events if e["log_level"] != "debug"]


def ignored_reason(store: TokenStore) -> str:
    """
    Load from ``store``, expecting None and one ``cache.ignored`` line.
    """
    with structlog.testing.capture_logs() as events:
        token = store.load()

    assert token is None
    [event] = reported(events)
    assert event["event"] == "cache.ignored"
    assert event["log_level"] in {"info", "warning"}

    return str(event["reason"])


def temporary_files(directory: Path) -> list[str]:
    """
    Names in ``directory`` other than the cache file itself.
    """
    if not directory.is_dir():
        return []

    return sorted(
        p.name for p in directory.iterdir() if p.name != "token.cache"
    )


def seal(
    plaintext: bytes, binding: Binding = BINDING, key_material: bytes = SECRET
) -> bytes:
    """
    A cache file built from the documented format, independently.
    """
    key = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=HKDF_SALT,
        info=HKDF_INFO + binding.fingerprint(),
    ).derive(key_material)
    nonce = os.urandom(12)
    header = b"TSKC" + bytes([1]) + nonce
    header += struct.pack(">I", len(plaintext) + 16)
    ciphertext = AESGCM(key).encrypt(
        nonce, plaintext, header + binding.fingerprint()
    )

    return header + ciphertext


def write_private(path: Path, contents: bytes) -> None:
    """
    Write ``contents`` to ``path`` as a 0600 file, creating the folder.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_bytes(contents)
    path.chmod(0o600)


class TestBinding:
    """
    Binding names what a token belongs to, unambiguously.
    """

    def test_of_reads_the_idp_settings(self) -> None:
        """
        Binding.of takes the resolved token URL and the identity fields.
        """
        idp = IdPSettings(
            auth_base_url="https://auth.example.com/",
            client_id="billing",
            audience="https://api.example.com",
            scope="orders.read",
            auth_method="client_secret_basic",
        )

        binding = Binding.of(idp)

        assert binding == Binding(
            token_url="https://auth.example.com/oauth/token",
            client_id="billing",
            audience="https://api.example.com",
            scope="orders.read",
            auth_method="client_secret_basic",
        )

    def test_fingerprint_is_a_sha256_digest(self) -> None:
        """
        The fingerprint is 32 bytes and the same for equal bindings.
        """
        same = dataclasses.replace(BINDING)

        assert len(BINDING.fingerprint()) == 32
        assert BINDING.fingerprint() == same.fingerprint()

    @pytest.mark.parametrize(
        ("left", "right"),
        [
            pytest.param(
                {"audience": None}, {"audience": ""}, id="none-vs-empty"
            ),
            pytest.param(
                {"client_id": "ab", "audience": "c"},
                {"client_id": "a", "audience": "bc"},
                id="text-shifted-between-fields",
            ),
            pytest.param(
                {"audience": "x", "scope": None},
                {"audience": None, "scope": "x"},
                id="value-moved-to-next-field",
            ),
        ],
    )
    def test_fingerprint_has_no_ambiguity(
        self, left: dict[str, Any], right: dict[str, Any]
    ) -> None:
        """
        Bindings that a naive concatenation would confuse differ.
        """
        one = dataclasses.replace(BINDING, **left)
        other = dataclasses.replace(BINDING, **right)

        assert one.fingerprint() != other.fingerprint()

    @given(
        st.lists(st.one_of(st.none(), st.text()), min_size=3, max_size=3),
        st.lists(st.one_of(st.none(), st.text()), min_size=3, max_size=3),
    )
    @example([None, "a", None], [None, None, "a"])
    @example(["ab", "", None], ["a", "b", None])
    def test_different_bindings_have_different_fingerprints(
        self, left: list[str | None], right: list[str | None]
    ) -> None:
        """
        The fingerprint tells apart any two bindings with unequal fields.
        """
        one = dataclasses.replace(
            BINDING, client_id=left[0] or "", audience=left[1], scope=left[2]
        )
        other = dataclasses.replace(
            BINDING,
            client_id=right[0] or "",
            audience=right[1],
            scope=right[2],
        )

        assert (one == other) == (one.fingerprint() == other.fingerprint())


class TestSaveAndLoad:
    """
    A saved token comes back, and the file is private.
    """

    def test_round_trip(self, store: TokenStore) -> None:
        """
        A saved token loads back equal, with one cache.loaded line.
        """
        store.save(token_of())
        with structlog.testing.capture_logs() as events:
            loaded = store.load()

        assert loaded == token_of()
        [event] = reported(events)
        assert event["event"] == "cache.loaded"
        assert event["expires_in_seconds"] == 3600.0

    def test_a_new_store_loads_what_another_saved(
        self, make_store: Callable[..., TokenStore]
    ) -> None:
        """
        A restarted sidecar (a new store, same binding and key) loads.
        """
        make_store().save(token_of())

        assert make_store().load() == token_of()

    def test_missing_file_gives_none_quietly(self, store: TokenStore) -> None:
        """
        With no file, load returns None and logs nothing above debug.
        """
        with structlog.testing.capture_logs() as events:
            loaded = store.load()

        assert loaded is None
        assert reported(events) == []

    def test_every_save_uses_a_new_nonce(
        self, store: TokenStore, path: Path
    ) -> None:
        """
        Saving the same token twice writes different bytes.
        """
        store.save(token_of())
        first = path.read_bytes()
        store.save(token_of())
        second = path.read_bytes()

        assert first != second
        assert first[5:17] != second[5:17]
        assert store.load() == token_of()

    def test_save_replaces_the_earlier_token(self, store: TokenStore) -> None:
        """
        The newest saved token is the one that loads.
        """
        store.save(token_of("first-token-value-0001"))
        store.save(token_of("second-token-value-0002"))

        assert store.load() == token_of("second-token-value-0002")

    @pytest.mark.usefixtures("umask_zero")
    def test_file_is_0600_and_new_directory_0700(
        self, store: TokenStore, path: Path
    ) -> None:
        """
        The file is owner-only and a missing directory is made 0700.
        """
        store.save(token_of())

        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700

    def test_file_does_not_hold_the_token_in_clear(self, saved: bytes) -> None:
        """
        Neither the token nor its parts can be read from the file.
        """
        assert TOKEN_VALUE.encode() not in saved
        assert b"cached-access-token" not in saved
        assert b"access_token" not in saved

    def test_file_follows_the_documented_format(self, saved: bytes) -> None:
        """
        Magic, version, nonce and a length that counts the rest.
        """
        assert saved[:4] == b"TSKC"
        assert saved[4] == 1
        assert struct.unpack(">I", saved[17:21])[0] == len(saved) - 21

    def test_a_file_sealed_independently_loads(
        self, store: TokenStore, path: Path
    ) -> None:
        """
        A file built from the docstring's format description loads.
        """
        plaintext = json.dumps(
            {
                "version": 1,
                "access_token": TOKEN_VALUE,
                "issued_at": NOW,
                "expires_at": NOW + 60,
            }
        ).encode()
        write_private(path, seal(plaintext))

        assert store.load() == token_of(lifetime_seconds=60)

    def test_no_temporary_files_are_left(
        self, store: TokenStore, path: Path
    ) -> None:
        """
        After saves, the directory holds the cache file alone.
        """
        for number in range(3):
            store.save(token_of(f"token-value-{number:08}"))

        assert temporary_files(path.parent) == []

    @given(
        value=st.text(min_size=1, max_size=2000),
        issued_at=st.floats(min_value=0, max_value=NOW),
        lifetime_seconds=st.floats(min_value=1e-3, max_value=1e9),
    )
    @example(value="x", issued_at=NOW, lifetime_seconds=1e-3)
    @example(value='"\\\u2028\x00', issued_at=0.0, lifetime_seconds=1e9)
    @SHARED_TMP_PATH
    def test_any_unexpired_token_survives_a_round_trip(
        self,
        tmp_path: Path,
        value: str,
        issued_at: float,
        lifetime_seconds: float,
    ) -> None:
        """
        Any token text and window comes back exactly.
        """
        token = Token(value, issued_at, NOW + lifetime_seconds)
        store = TokenStore(
            tmp_path / "token.cache",
            BINDING,
            lambda: SECRET,
            clock=FakeClock(NOW),
        )

        store.save(token)

        assert store.load() == token


class TestBindingAndKey:
    """
    A token is only loaded with the binding and key it was saved with.
    """

    @pytest.mark.parametrize(
        "change",
        [
            pytest.param(
                {"token_url": "https://other.example.com/oauth/token"},
                id="token_url",
            ),
            pytest.param({"client_id": "shipping"}, id="client_id"),
            pytest.param({"audience": "https://other.example"}, id="audience"),
            pytest.param({"audience": None}, id="audience-removed"),
            pytest.param({"scope": "orders.read"}, id="scope"),
            pytest.param({"scope": None}, id="scope-removed"),
            pytest.param({"auth_method": "client_secret_basic"}, id="method"),
        ],
    )
    def test_changed_binding_gives_none(
        self,
        make_store: Callable[..., TokenStore],
        change: dict[str, Any],
    ) -> None:
        """
        Changing any bound field makes the saved token unusable.
        """
        make_store().save(token_of())
        changed = make_store(binding=dataclasses.replace(BINDING, **change))

        assert ignored_reason(changed) == "stale_binding_or_key"

    def test_rotated_secret_gives_none(
        self, make_store: Callable[..., TokenStore]
    ) -> None:
        """
        A token saved under the old secret does not load under the new.
        """
        make_store().save(token_of())
        rotated = make_store(key_material=lambda: ROTATED_SECRET)

        assert ignored_reason(rotated) == "stale_binding_or_key"

    def test_key_material_is_read_at_every_call(
        self, make_store: Callable[..., TokenStore]
    ) -> None:
        """
        The key callable is asked at each save and load, not once.
        """
        secrets = [SECRET, SECRET, ROTATED_SECRET]
        store = make_store(key_material=lambda: secrets.pop(0))

        store.save(token_of())
        assert store.load() == token_of()

        assert ignored_reason(store) == "stale_binding_or_key"
        assert secrets == []

    def test_unreadable_key_on_load_gives_none(
        self, make_store: Callable[..., TokenStore]
    ) -> None:
        """
        A CredentialError from the key callable makes load return None.
        """

        def broken() -> bytes:
            raise CredentialError("cannot read idp.client_secret_file")

        make_store().save(token_of())

        assert ignored_reason(make_store(key_material=broken)) == (
            "key_unavailable"
        )

    def test_unreadable_key_on_save_skips_it(
        self, make_store: Callable[..., TokenStore], path: Path
    ) -> None:
        """
        A CredentialError at save writes nothing, logs, and never raises.
        """

        def broken() -> bytes:
            raise CredentialError("cannot read idp.client_secret_file")

        with structlog.testing.capture_logs() as events:
            make_store(key_material=broken).save(token_of())

        assert not path.parent.exists()
        [event] = reported(events)
        assert event["event"] == "cache.save_failed"
        assert event["error_type"] == "CredentialError"

    def test_empty_key_material_is_refused(
        self, make_store: Callable[..., TokenStore], path: Path
    ) -> None:
        """
        An empty secret neither saves nor loads: its key is public.
        """
        empty = make_store(key_material=lambda: b"")
        with structlog.testing.capture_logs() as events:
            empty.save(token_of())

        assert not path.exists()
        assert [e["event"] for e in reported(events)] == ["cache.save_failed"]

        make_store().save(token_of())
        assert ignored_reason(empty) == "key_unavailable"


class TestDamagedFiles:
    """
    Whatever is at the path, load returns a token or None, never raises.
    """

    def test_every_flipped_byte_gives_none(
        self, store: TokenStore, path: Path, saved: bytes
    ) -> None:
        """
        Any one changed byte of a real file makes it unusable.
        """
        for index in range(len(saved)):
            damaged = bytearray(saved)
            damaged[index] ^= 0x01
            path.write_bytes(bytes(damaged))

            assert ignored_reason(store) in {
                "corrupt",
                "unsupported_version",
                "stale_binding_or_key",
            }

    def test_every_truncation_gives_none(
        self, store: TokenStore, path: Path, saved: bytes
    ) -> None:
        """
        Every proper prefix of a real file, empty included, is corrupt.
        """
        for length in range(len(saved)):
            path.write_bytes(saved[:length])

            assert ignored_reason(store) == "corrupt"

    def test_appended_bytes_give_none(
        self, store: TokenStore, path: Path, saved: bytes
    ) -> None:
        """
        A real file with bytes after its end is corrupt.
        """
        path.write_bytes(saved + b"\x00")

        assert ignored_reason(store) == "corrupt"

    def test_other_version_gives_none(
        self, store: TokenStore, path: Path, saved: bytes
    ) -> None:
        """
        An envelope of another version is not read.
        """
        path.write_bytes(saved[:4] + bytes([2]) + saved[5:])

        assert ignored_reason(store) == "unsupported_version"

    @given(contents=st.binary(max_size=512))
    @example(contents=b"")
    @example(contents=b"TSKC")
    @example(
        contents=b"TSKC\x01" + bytes(12) + b"\x00\x00\x00\x10" + bytes(16)
    )
    @SHARED_TMP_PATH
    def test_arbitrary_bytes_never_raise(
        self, tmp_path: Path, contents: bytes
    ) -> None:
        """
        Any file content gives None and one cache.ignored line.
        """
        path = tmp_path / "token.cache"
        write_private(path, contents)
        store = TokenStore(path, BINDING, lambda: SECRET, clock=FakeClock(NOW))

        assert ignored_reason(store) in {
            "corrupt",
            "unsupported_version",
            "stale_binding_or_key",
        }

    @given(
        contents=st.binary(max_size=512),
        prefix=st.sampled_from([b"TSKC\x01", b"TSKC\x02", b"TSKC"]),
    )
    @SHARED_TMP_PATH
    def test_bytes_after_a_valid_magic_never_raise(
        self, tmp_path: Path, prefix: bytes, contents: bytes
    ) -> None:
        """
        Content past a real magic and version gives None, never raises.
        """
        path = tmp_path / "token.cache"
        write_private(path, prefix + contents)
        store = TokenStore(path, BINDING, lambda: SECRET, clock=FakeClock(NOW))

        assert ignored_reason(store) in {
            "corrupt",
            "unsupported_version",
            "stale_binding_or_key",
        }

    @pytest.mark.parametrize(
        "plaintext",
        [
            pytest.param(b"not json", id="not-json"),
            pytest.param(b"\xff\xfe", id="not-utf8"),
            pytest.param(b"[1, 2]", id="a-list"),
            pytest.param(b"[" * 60_000, id="nested-too-deep"),
            pytest.param(b"{}", id="empty-object"),
            pytest.param(
                b'{"access_token": "tok-abcdefgh", "issued_at": 1,'
                b' "expires_at": 9e9}',
                id="no-version",
            ),
            pytest.param(
                b'{"version": 2, "access_token": "tok-abcdefgh",'
                b' "issued_at": 1, "expires_at": 9e9}',
                id="other-version",
            ),
            pytest.param(
                b'{"version": 1, "issued_at": 1, "expires_at": 9e9}',
                id="no-token",
            ),
            pytest.param(
                b'{"version": 1, "access_token": "", "issued_at": 1,'
                b' "expires_at": 9e9}',
                id="empty-token",
            ),
            pytest.param(
                b'{"version": 1, "access_token": 42, "issued_at": 1,'
                b' "expires_at": 9e9}',
                id="token-not-text",
            ),
            pytest.param(
                b'{"version": 1, "access_token": "tok-abcdefgh",'
                b' "expires_at": 9e9}',
                id="no-issued-at",
            ),
            pytest.param(
                b'{"version": 1, "access_token": "tok-abcdefgh",'
                b' "issued_at": 1, "expires_at": "soon"}',
                id="expires-at-text",
            ),
            pytest.param(
                b'{"version": 1, "access_token": "tok-abcdefgh",'
                b' "issued_at": 1, "expires_at": true}',
                id="expires-at-bool",
            ),
            pytest.param(
                b'{"version": 1, "access_token": "tok-abcdefgh",'
                b' "issued_at": 1, "expires_at": NaN}',
                id="expires-at-nan",
            ),
            pytest.param(
                b'{"version": 1, "access_token": "tok-abcdefgh",'
                b' "issued_at": 1, "expires_at": 1e999}',
                id="expires-at-infinite",
            ),
            pytest.param(
                b'{"version": 1, "access_token": "tok-abcdefgh",'
                b' "issued_at": 1, "expires_at": 1' + b"0" * 400 + b"}",
                id="expires-at-huge-int",
            ),
        ],
    )
    def test_malformed_plaintext_gives_none(
        self, store: TokenStore, path: Path, plaintext: bytes
    ) -> None:
        """
        A file that decrypts to anything but a token is malformed.
        """
        write_private(path, seal(plaintext))

        assert ignored_reason(store) == "malformed"

    def test_oversized_file_gives_none(
        self, store: TokenStore, path: Path
    ) -> None:
        """
        A file larger than the limit is not read.
        """
        write_private(path, b"TSKC" + bytes(MAX_CACHE_FILE_BYTES))

        assert ignored_reason(store) == "too_large"


class TestWhatIsAtThePath:
    """
    Only a private regular file of this user is ever read.
    """

    def test_directory_gives_none(self, store: TokenStore, path: Path) -> None:
        """
        A directory at the path is not a cache file.
        """
        path.mkdir(parents=True)

        assert ignored_reason(store) == "not_regular_file"

    def test_fifo_gives_none_without_blocking(
        self, store: TokenStore, path: Path
    ) -> None:
        """
        A FIFO at the path is refused without waiting for a writer.
        """
        path.parent.mkdir()
        os.mkfifo(path, 0o600)

        assert ignored_reason(store) == "not_regular_file"

    def test_symlink_to_a_valid_file_gives_none(
        self, store: TokenStore, path: Path, saved: bytes
    ) -> None:
        """
        A symlink is refused even when it points at a valid cache file.
        """
        target = path.parent / "elsewhere.cache"
        write_private(target, saved)
        path.unlink()
        path.symlink_to(target)

        assert ignored_reason(store) == "symlink"

    @pytest.mark.parametrize(
        "mode",
        [0o640, 0o620, 0o610, 0o604, 0o602, 0o601, 0o644, 0o666],
        ids=oct,
    )
    def test_file_open_to_others_gives_none(
        self, store: TokenStore, path: Path, saved: bytes, mode: int
    ) -> None:
        """
        Any group or other permission bit makes the file untrusted.
        """
        path.chmod(mode)

        assert ignored_reason(store) == "too_open"

    @pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
    def test_file_of_another_user_gives_none(
        self, store: TokenStore, path: Path, saved: bytes
    ) -> None:
        """
        A valid file owned by another uid is refused.
        """
        os.chown(path, 65534, -1)

        assert ignored_reason(store) == "foreign_owner"

    def test_unopenable_path_gives_none(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        """
        A path under a regular file cannot be opened, and gives None.
        """
        (tmp_path / "file").write_bytes(b"")
        store = TokenStore(
            tmp_path / "file" / "token.cache",
            BINDING,
            lambda: SECRET,
            clock=clock,
        )

        assert ignored_reason(store) == "unreadable"


class TestExpiry:
    """
    An expired token is never returned; one with any life left is.
    """

    def test_expired_token_gives_none(
        self, store: TokenStore, clock: FakeClock
    ) -> None:
        """
        At its expiry time, the cached token is no longer loaded.
        """
        store.save(token_of(lifetime_seconds=60))
        clock.advance(60)

        assert ignored_reason(store) == "expired"

    def test_token_about_to_expire_is_returned(
        self, store: TokenStore, clock: FakeClock
    ) -> None:
        """
        Whether little life is enough is the caller's call, not the store's.
        """
        store.save(token_of(lifetime_seconds=60))
        clock.advance(59.5)

        assert store.load() == token_of(lifetime_seconds=60)


class TestSaveFailures:
    """
    A failed save logs one warning, raises nothing and leaves no litter.
    """

    def test_parent_is_a_file(self, tmp_path: Path, clock: FakeClock) -> None:
        """
        Saving below a regular file logs cache.save_failed.
        """
        (tmp_path / "file").write_bytes(b"")
        store = TokenStore(
            tmp_path / "file" / "state" / "token.cache",
            BINDING,
            lambda: SECRET,
            clock=clock,
        )

        with structlog.testing.capture_logs() as events:
            store.save(token_of())

        [event] = reported(events)
        assert event["event"] == "cache.save_failed"
        assert event["log_level"] == "warning"
        assert event["error_type"] == "NotADirectoryError"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]

    def test_save_replaces_a_symlink_not_its_target(
        self, store: TokenStore, path: Path
    ) -> None:
        """
        A symlink at the path is replaced; the file it names is untouched.
        """
        target = path.parent / "elsewhere"
        write_private(target, b"someone else's file")
        path.symlink_to(target)

        store.save(token_of())

        assert not path.is_symlink()
        assert target.read_bytes() == b"someone else's file"
        assert store.load() == token_of()

    def test_directory_at_the_path_leaves_no_temporary_file(
        self, store: TokenStore, path: Path
    ) -> None:
        """
        When the rename fails, the temporary file is removed.
        """
        path.mkdir(parents=True)

        with structlog.testing.capture_logs() as events:
            store.save(token_of())

        [event] = reported(events)
        assert event["event"] == "cache.save_failed"
        assert event["error_type"] == "IsADirectoryError"
        assert temporary_files(path.parent) == []
        assert path.is_dir()

    def test_failed_save_keeps_the_earlier_file(
        self, make_store: Callable[..., TokenStore], path: Path
    ) -> None:
        """
        A save that cannot derive a key leaves the earlier token usable.
        """
        make_store().save(token_of())
        make_store(key_material=lambda: b"").save(token_of("newer-token-01"))

        assert make_store().load() == token_of()


class TestClear:
    """
    clear() removes the file and never raises.
    """

    def test_clear_removes_the_file(
        self, store: TokenStore, path: Path, saved: bytes
    ) -> None:
        """
        After clear, there is no file and load returns None quietly.
        """
        store.clear()

        assert not path.exists()
        with structlog.testing.capture_logs() as events:
            assert store.load() is None
        assert reported(events) == []

    def test_clear_without_a_file(self, store: TokenStore) -> None:
        """
        Clearing a missing file is not an error.
        """
        with structlog.testing.capture_logs() as events:
            store.clear()

        assert reported(events) == []

    def test_clear_failure_is_logged(
        self, store: TokenStore, path: Path
    ) -> None:
        """
        A path that cannot be unlinked logs cache.clear_failed.
        """
        path.mkdir(parents=True)

        with structlog.testing.capture_logs() as events:
            store.clear()

        [event] = reported(events)
        assert event["event"] == "cache.clear_failed"
        assert path.is_dir()


class TestSecrecy:
    """
    The token value never reaches a log line.
    """

    def test_token_never_appears_in_logs(
        self,
        make_store: Callable[..., TokenStore],
        path: Path,
        clock: FakeClock,
    ) -> None:
        """
        No event of any save, load or failure carries the token value.
        """
        store = make_store()
        with structlog.testing.capture_logs() as events:
            store.save(token_of())
            store.load()
            make_store(key_material=lambda: ROTATED_SECRET).load()
            path.chmod(0o644)
            store.load()
            path.chmod(0o600)
            path.write_bytes(path.read_bytes()[:-1])
            store.load()
            store.save(token_of())
            clock.advance(7200)
            store.load()
            store.clear()

        assert len(events) >= 6
        assert TOKEN_VALUE not in repr(events)
        assert "cached-access-token" not in repr(events)

    def test_loaded_token_is_registered_for_redaction(
        self, store: TokenStore
    ) -> None:
        """
        After a load, the token is scrubbed wherever it turns up in a log.
        """
        value = "loaded-only-token-5b1c9e"
        store.save(token_of(value))
        store.load()

        event = redact(None, "info", {"event": "x", "detail": f"a {value} b"})

        assert event["detail"] == "a [redacted] b"
