"""
Token files: atomic replacement, owner and mode, symlinks, the WLCG
location, failures that only log, the [sink] settings, and the sidecar
keeping the files current.
"""

from __future__ import annotations

import os
import pwd
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from sidecar.config import Settings
from sidecar.configload import settings_from_dict
from sidecar.daemon import run_once
from sidecar.errors import ConfigError
from sidecar.sink import (
    WLCG_FALLBACK_DIRECTORY,
    FileSink,
    build_sinks,
    wlcg_token_path,
)
from sidecar.token import Token
from tests.conftest import METADATA, token_url_of
from tests.fakes import FakeClock, FakeIdP, wait_until

NOBODY = 65534


def token_of(value: str) -> Token:
    """
    A token with the given value, valid for an hour.
    """
    return Token(value, issued_at=1_800_000_000.0, expires_at=1_800_003_600.0)


def settings_with(**sink: Any) -> Settings:
    """
    Valid settings with the given ``[sink]`` keys.
    """
    return settings_from_dict(
        {
            "idp": {
                "token_url": "https://auth.example.com/oauth/token",
                "client_id": "billing",
                "client_secret": "s3cr3t",
            },
            "sink": sink,
        }
    )


def read_text(path: Path) -> str:
    """
    The file's contents, as text.
    """
    return path.read_text(encoding="ascii")


class TestFileSink:
    def test_writes_the_bare_token_and_a_newline(self, tmp_path: Path) -> None:
        """
        The file holds the token followed by one newline, and nothing else.
        """
        path = tmp_path / "token"

        FileSink(path, 0o600, None, None).write(token_of("tok-abc"))

        assert path.read_bytes() == b"tok-abc\n"
        assert os.listdir(tmp_path) == ["token"]

    def test_readers_only_ever_see_a_whole_token(self, tmp_path: Path) -> None:
        """
        A reader racing 500 replacements always reads one whole token,
        never an empty or partial file.
        """
        path = tmp_path / "token"
        sink = FileSink(path, 0o600, None, None)
        tokens = [f"tok-{i}-" + "x" * (i % 97) for i in range(500)]
        whole = {token + "\n" for token in tokens}
        sink.write(token_of(tokens[0]))
        seen: list[str] = []
        errors: list[OSError] = []
        stop = threading.Event()

        def read_until_stopped() -> None:
            while not stop.is_set():
                try:
                    seen.append(read_text(path))
                except OSError as exc:
                    errors.append(exc)

        reader = threading.Thread(target=read_until_stopped)
        reader.start()
        try:
            for token in tokens:
                sink.write(token_of(token))
        finally:
            stop.set()
            reader.join()

        assert errors == []
        assert len(seen) > 10
        assert set(seen) <= whole
        assert read_text(path) == tokens[-1] + "\n"
        assert os.listdir(tmp_path) == ["token"]

    @pytest.mark.parametrize("mode", [0o600, 0o640, 0o444], ids=oct)
    def test_mode_and_group_are_honoured(
        self, tmp_path: Path, mode: int
    ) -> None:
        """
        The file gets exactly the configured mode and group, whatever the
        umask.
        """
        path = tmp_path / "token"

        FileSink(path, mode, None, NOBODY).write(token_of("tok-abc"))

        status = path.stat()
        assert stat.S_IMODE(status.st_mode) == mode
        assert status.st_gid == NOBODY
        assert status.st_uid == os.getuid()

    def test_an_earlier_file_with_another_owner_and_mode_is_replaced(
        self, tmp_path: Path
    ) -> None:
        """
        A file left with a wide mode and a foreign owner is replaced by
        one with the configured owner and mode, not rewritten in place.
        """
        path = tmp_path / "token"
        path.write_text("old\n")
        path.chmod(0o666)
        os.chown(path, NOBODY, NOBODY)
        earlier = path.stat().st_ino

        FileSink(path, 0o600, None, None).write(token_of("tok-abc"))

        status = path.stat()
        assert status.st_ino != earlier
        assert stat.S_IMODE(status.st_mode) == 0o600
        assert (status.st_uid, status.st_gid) == (os.getuid(), os.getgid())

    @pytest.mark.parametrize(
        "target_exists", [True, False], ids=["to-file", "dangling"]
    )
    def test_a_symlink_at_the_path_is_replaced_not_followed(
        self, tmp_path: Path, target_exists: bool
    ) -> None:
        """
        A symlink at the path becomes a regular file; its target is neither
        written nor created.
        """
        target = tmp_path / "precious"
        if target_exists:
            target.write_text("keep me\n")
        path = tmp_path / "token"
        path.symlink_to(target)

        FileSink(path, 0o600, None, None).write(token_of("tok-abc"))

        assert not path.is_symlink()
        assert read_text(path) == "tok-abc\n"
        if target_exists:
            assert read_text(target) == "keep me\n"
        else:
            assert not target.exists()

    def test_a_foreign_file_in_a_sticky_directory_is_replaced(
        self, tmp_path: Path
    ) -> None:
        """
        In a sticky, world-writable directory like /tmp, a file another
        user planted at the path is replaced (the sidecar runs as root
        here), and ends up owned by the configured user.
        """
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o1777)
        path = shared / f"bt_u{NOBODY}"
        path.write_text("planted\n")
        os.chown(path, 1000, 1000)

        FileSink(path, 0o600, NOBODY, None).write(token_of("tok-abc"))

        status = path.stat()
        assert read_text(path) == "tok-abc\n"
        assert status.st_uid == NOBODY
        assert stat.S_IMODE(status.st_mode) == 0o600
        assert os.listdir(shared) == [path.name]

    def test_a_directory_planted_at_the_path_fails_the_write(
        self, tmp_path: Path
    ) -> None:
        """
        A directory at the path cannot be renamed over (the Limitation in
        wlcg_token_path): the write fails with a warning, and leaves no
        temp file.
        """
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o1777)
        path = shared / f"bt_u{NOBODY}"
        path.mkdir()

        with capture_logs() as events:
            FileSink(path, 0o600, NOBODY, None).write(token_of("tok-abc"))

        assert [e["event"] for e in events] == ["sink.write_failed"]
        assert events[0]["error_type"] == "IsADirectoryError"
        assert os.listdir(shared) == [path.name]

    def test_a_failed_write_logs_and_does_not_raise(
        self, tmp_path: Path
    ) -> None:
        """
        A write whose parent is a regular file logs one sink.write_failed
        warning, with the path and error type, and raises nothing.
        """
        parent = tmp_path / "file"
        parent.write_text("")
        path = parent / "token"

        with capture_logs() as events:
            FileSink(path, 0o600, None, None).write(token_of("tok-abc"))

        assert events == [
            {
                "event": "sink.write_failed",
                "log_level": "warning",
                "path": str(path),
                "error_type": "NotADirectoryError",
                "error": "Not a directory",
            }
        ]

    def test_an_unusable_path_logs_and_does_not_raise(
        self, tmp_path: Path
    ) -> None:
        """
        A path the OS refuses outright (a NUL byte) is a warning too.
        """
        path = tmp_path / "to\0ken"

        with capture_logs() as events:
            FileSink(path, 0o600, None, None).write(token_of("tok-abc"))

        assert [e["error_type"] for e in events] == ["ValueError"]
        assert os.listdir(tmp_path) == []

    def test_the_token_never_appears_in_the_logs(self, tmp_path: Path) -> None:
        """
        Neither a successful write, a failed one nor a removal logs the
        token itself.
        """
        token = token_of("tok-never-logged-3141")
        good = FileSink(tmp_path / "token", 0o600, None, None)
        bad = FileSink(tmp_path / "missing" / "token", 0o600, None, None)

        with capture_logs() as events:
            good.write(token)
            bad.write(token)
            good.remove()

        assert [e["event"] for e in events] == [
            "sink.written",
            "sink.write_failed",
        ]
        assert events[0]["token_fingerprint"] == token.fingerprint
        assert token.access_token not in repr(events)

    def test_remove_deletes_the_file_and_tolerates_its_absence(
        self, tmp_path: Path
    ) -> None:
        """
        remove deletes the file, and removing it again is not an error.
        """
        path = tmp_path / "token"
        sink = FileSink(path, 0o600, None, None)
        sink.write(token_of("tok-abc"))

        with capture_logs() as events:
            sink.remove()
            sink.remove()

        assert not path.exists()
        assert events == []

    def test_remove_deletes_a_symlink_not_its_target(
        self, tmp_path: Path
    ) -> None:
        """
        A symlink at the path is removed; its target stays.
        """
        target = tmp_path / "precious"
        target.write_text("keep me\n")
        path = tmp_path / "token"
        path.symlink_to(target)

        FileSink(path, 0o600, None, None).remove()

        assert not path.is_symlink()
        assert read_text(target) == "keep me\n"

    def test_a_failed_remove_logs_and_does_not_raise(
        self, tmp_path: Path
    ) -> None:
        """
        A path that cannot be removed (a directory) gives one
        sink.remove_failed warning.
        """
        path = tmp_path / "token"
        path.mkdir()

        with capture_logs() as events:
            FileSink(path, 0o600, None, None).remove()

        assert [e["event"] for e in events] == ["sink.remove_failed"]
        assert events[0]["path"] == str(path)
        assert path.is_dir()


class TestBuildSinks:
    def test_nothing_is_written_by_default(self) -> None:
        """
        With [sink] untouched there are no sinks.
        """
        assert build_sinks(settings_with()) == []

    def test_path_mode_and_group_are_taken(self, tmp_path: Path) -> None:
        """
        sink.path gives a file with the configured mode and group, owned
        by the sidecar's user.
        """
        path = tmp_path / "token"

        sinks = build_sinks(
            settings_with(path=str(path), mode="640", group="nogroup")
        )

        assert sinks == [FileSink(path, 0o640, None, NOBODY)]

    def test_wlcg_file_goes_to_the_runtime_directory(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """
        With XDG_RUNTIME_DIR set, the WLCG file is bt_u<uid> there, owned
        by that uid with mode 0600.
        """
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))

        sinks = build_sinks(settings_with(wlcg_uid=NOBODY))
        sinks[0].write(token_of("tok-abc"))

        path = tmp_path / f"bt_u{NOBODY}"
        status = path.stat()
        assert sinks == [FileSink(path, 0o600, NOBODY, None)]
        assert read_text(path) == "tok-abc\n"
        assert status.st_uid == NOBODY
        assert stat.S_IMODE(status.st_mode) == 0o600

    def test_wlcg_file_falls_back_to_tmp(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """
        Without XDG_RUNTIME_DIR (or with it empty), the WLCG file is
        /tmp/bt_u<uid>.
        """
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        unset = wlcg_token_path(NOBODY)
        monkeypatch.setenv("XDG_RUNTIME_DIR", "")
        empty = wlcg_token_path(NOBODY)

        assert unset == empty == WLCG_FALLBACK_DIRECTORY / f"bt_u{NOBODY}"
        assert str(WLCG_FALLBACK_DIRECTORY) == "/tmp"  # noqa: S108 -- compared

    def test_wlcg_user_may_be_named(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """
        wlcg_uid takes a user name, and the file is named by its uid.
        """
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
        uid = pwd.getpwnam("nobody").pw_uid

        sinks = build_sinks(settings_with(wlcg_uid="nobody"))

        assert sinks == [FileSink(tmp_path / f"bt_u{uid}", 0o600, uid, None)]

    def test_both_files_may_be_asked_for(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """
        sink.path and sink.wlcg_uid together give two files; group and
        mode apply to the first only.
        """
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))

        sinks = build_sinks(
            settings_with(
                path=str(tmp_path / "token"),
                mode="0644",
                group=NOBODY,
                wlcg_uid=str(NOBODY),
            )
        )

        assert sinks == [
            FileSink(tmp_path / "token", 0o644, None, NOBODY),
            FileSink(tmp_path / f"bt_u{NOBODY}", 0o600, NOBODY, None),
        ]


class TestSinkSettings:
    @pytest.mark.parametrize("mode", ["0600", "640", "0444"])
    def test_octal_modes_are_accepted(self, mode: str) -> None:
        """
        Three or four octal digits make a mode.
        """
        assert settings_with(path="/x", mode=mode).sink.mode_bits == int(
            mode, 8
        )

    @pytest.mark.parametrize("mode", ["600x", "0800", "rw-------", "10600"])
    def test_other_modes_are_refused(self, mode: str) -> None:
        """
        A mode that is not octal is refused, naming the key.
        """
        with pytest.raises(ConfigError) as caught:
            settings_with(path="/x", mode=mode)

        assert [p.key for p in caught.value.problems] == ["sink.mode"]

    @pytest.mark.parametrize(
        ("sink", "key"),
        [
            ({"path": "/x", "group": "no-such-group-4242"}, "sink.group"),
            ({"wlcg_uid": "no-such-user-4242"}, "sink.wlcg_uid"),
            ({"wlcg_uid": -1}, "sink.wlcg_uid"),
            ({"path": "/x", "group": -1}, "sink.group"),
            ({"group": "nogroup"}, "sink.group"),
        ],
        ids=[
            "unknown-group",
            "unknown-user",
            "negative-uid",
            "negative-gid",
            "group-without-path",
        ],
    )
    def test_owners_that_do_not_resolve_are_refused(
        self, sink: dict[str, Any], key: str
    ) -> None:
        """
        A group or user that does not resolve, a negative id, and a group
        with no file to own are each one problem naming the key.
        """
        with pytest.raises(ConfigError) as caught:
            settings_with(**sink)

        assert [p.key for p in caught.value.problems] == [key]

    def test_unknown_keys_are_refused(self) -> None:
        """
        A typo in [sink] is an error, like in every table.
        """
        with pytest.raises(ConfigError) as caught:
            settings_with(pth="/x")

        assert [p.key for p in caught.value.problems] == ["sink.pth"]


class TestSidecarWithSinks:
    async def test_file_holds_the_current_token_across_a_refresh(
        self,
        tmp_path: Path,
        fake_idp: FakeIdP,
        make_settings: Callable[..., Settings],
        start_sidecar: Any,
        http: aiohttp.ClientSession,
    ) -> None:
        """
        The file holds the token as soon as /token serves it, and the new
        one once a refresh has published it.
        """
        path = tmp_path / "token"
        clock = FakeClock()
        sidecar = await start_sidecar(
            make_settings(sink={"path": str(path)}), clock=clock
        )
        url = token_url_of(sidecar)

        async with http.get(url, headers=METADATA) as response:
            first = (await response.json())["access_token"]
        first_on_disk = read_text(path)
        clock.advance(3600 * 0.95)
        await wait_until(lambda: sidecar.cache.token.access_token != first)
        second = sidecar.cache.token.access_token

        assert first_on_disk == first + "\n"
        assert read_text(path) == second + "\n"
        assert fake_idp.issued == [first, second]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

    async def test_a_restored_token_is_written_and_stop_keeps_the_file(
        self,
        tmp_path: Path,
        fake_idp: FakeIdP,
        make_settings: Callable[..., Settings],
        start_sidecar: Any,
    ) -> None:
        """
        Stopping leaves the file; a restart that restores the cached token
        writes it again without asking the IdP.
        """
        path = tmp_path / "token"
        settings = make_settings(sink={"path": str(path)})
        clock = FakeClock()
        first = await start_sidecar(settings, clock=clock)
        await wait_until(lambda: first.cache.token is not None)
        await first.stop()
        kept = read_text(path)
        path.unlink()

        second = await start_sidecar(settings, clock=clock)
        await wait_until(lambda: second.cache.token is not None)

        assert kept == fake_idp.issued[0] + "\n"
        assert read_text(path) == fake_idp.issued[0] + "\n"
        assert fake_idp.count == 1

    async def test_run_once_writes_the_file(
        self,
        tmp_path: Path,
        fake_idp: FakeIdP,
        make_settings: Callable[..., Settings],
    ) -> None:
        """
        run --once leaves the token in the file for the job that follows.
        """
        path = tmp_path / "token"

        token, how = await run_once(make_settings(sink={"path": str(path)}))

        assert how == "fetched"
        assert read_text(path) == token.access_token + "\n"
        assert fake_idp.issued == [token.access_token]

    async def test_a_failing_sink_does_not_stop_serving(
        self,
        tmp_path: Path,
        fake_idp: FakeIdP,
        make_settings: Callable[..., Settings],
        start_sidecar: Any,
        http: aiohttp.ClientSession,
    ) -> None:
        """
        A file that cannot be written costs a warning, not the token, and
        the token stays out of the logs.
        """
        path = tmp_path / "missing" / "token"

        with capture_logs() as events:
            sidecar = await start_sidecar(
                make_settings(sink={"path": str(path)})
            )
            async with http.get(
                token_url_of(sidecar), headers=METADATA
            ) as response:
                status = response.status
                token = (await response.json())["access_token"]

        failures = [e for e in events if e["event"] == "sink.write_failed"]
        assert status == 200
        assert [e["path"] for e in failures] == [str(path)]
        assert token not in repr(events)
