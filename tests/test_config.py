"""
Tests for the settings: their models (sidecar.config), loading and
overriding (sidecar.configload), and the rules that span keys
(sidecar.configrules).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from sidecar.config import Settings, is_loopback_host, redacted
from sidecar.configload import load_settings, settings_from_dict
from sidecar.errors import ConfigError, ConfigProblem

SECRET = "file-secret-9d8c7b6a5f4e"
TOKEN_URL = "https://idp.example.com/oauth/token"
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 -- a value under test, not bound

VALID_TOML = f"""
[idp]
token_url = "{TOKEN_URL}"
client_id = "billing"
client_secret = "{SECRET}"
"""

WriteConfig = Callable[[str], Path]


@pytest.fixture(autouse=True)
def _no_sidecar_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Drop SIDECAR_* variables, so only what a test sets can steer it.
    """
    for name in list(os.environ):
        if name.startswith("SIDECAR_"):
            monkeypatch.delenv(name)


@pytest.fixture
def write_config(tmp_path: Path) -> WriteConfig:
    """
    Write TOML text to a fresh file under tmp_path and return its path.
    """
    counter = iter(range(1_000))

    def write(text: str) -> Path:
        path = tmp_path / f"sidecar-{next(counter)}.toml"
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


def pem_of(key: Any, password: bytes | None = None) -> bytes:
    """
    The PKCS#8 PEM encoding of a private key, optionally encrypted.
    """
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )

    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        encryption,
    )


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """
    PEM files of several kinds of private key, written once per module.
    """
    directory = tmp_path_factory.mktemp("keys")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    contents = {
        "rsa": pem_of(rsa_key),
        "ec-p256": pem_of(ec.generate_private_key(ec.SECP256R1())),
        "ec-p384": pem_of(ec.generate_private_key(ec.SECP384R1())),
        "ed25519": pem_of(ed25519.Ed25519PrivateKey.generate()),
        "rsa-encrypted": pem_of(rsa_key, password=b"pass-phrase"),
        "not-pem": b"-----BEGIN PRIVATE KEY-----\nnot base64 !!\n",
    }
    paths = {}
    for name, content in contents.items():
        paths[name] = directory / f"{name}.pem"
        paths[name].write_bytes(content)

    return paths


def valid_data(**tables: dict[str, Any]) -> dict[str, Any]:
    """
    A valid settings dict; each keyword table's keys override the base.
    """
    data: dict[str, dict[str, Any]] = {
        "idp": {
            "token_url": TOKEN_URL,
            "client_id": "billing",
            "client_secret": SECRET,
        }
    }
    for table, values in tables.items():
        data.setdefault(table, {}).update(values)

    return {
        table: {k: v for k, v in values.items() if v is not None}
        for table, values in data.items()
    }


def problems_of(data: dict[str, Any]) -> list[ConfigProblem]:
    """
    Validate ``data``, expect ConfigError, and return its problems.
    """
    with pytest.raises(ConfigError) as info:
        settings_from_dict(data)

    return info.value.problems


def problems_with_variable(
    write_config: WriteConfig,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    value: str,
) -> list[ConfigProblem]:
    """
    The problems of a valid config file once variable ``name`` is set.
    """
    path = write_config(VALID_TOML)
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings(path)

    return info.value.problems


def only_problem(data: dict[str, Any]) -> ConfigProblem:
    """
    Validate ``data`` and return its single problem.
    """
    problems = problems_of(data)
    assert len(problems) == 1, problems

    return problems[0]


class TestLoadSettings:
    """
    load_settings reads a TOML file and lets SIDECAR_* variables win.
    """

    def test_reads_the_file(self, write_config: WriteConfig) -> None:
        """
        The file's values are loaded and the rest take their defaults.
        """
        path = write_config(VALID_TOML)

        settings = load_settings(path)

        assert settings.idp.client_id == "billing"
        assert settings.idp.resolved_token_url == TOKEN_URL
        assert settings.idp.client_secret is not None
        assert settings.idp.client_secret.get_secret_value() == SECRET
        assert settings.listen.host == "127.0.0.1"
        assert settings.refresh.refresh_at == 0.9

    def test_a_file_that_is_not_utf8_is_a_config_error(
        self, tmp_path: Path
    ) -> None:
        """
        Bytes that are not UTF-8 are reported on the file, not as a crash.
        """
        path = tmp_path / "binary.toml"
        path.write_bytes(b"\xff\xfe[idp]\n")

        with pytest.raises(ConfigError) as info:
            load_settings(path)

        [problem] = info.value.problems
        assert problem.key == str(path)
        assert problem.message.startswith("is not UTF-8 text (byte 0)")

    def test_environment_overrides_the_file(
        self, write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """
        A SIDECAR_IDP__CLIENT_ID variable beats the file; the rest stays.
        """
        path = write_config(VALID_TOML)
        monkeypatch.setenv("SIDECAR_IDP__CLIENT_ID", "orders")
        monkeypatch.setenv("SIDECAR_LISTEN__PORT", "9999")

        settings = load_settings(path)

        assert settings.idp.client_id == "orders"
        assert settings.idp.resolved_token_url == TOKEN_URL
        assert settings.listen.port == 9999

    def test_a_secret_in_the_environment_replaces_the_files_secret_file(
        self,
        write_config: WriteConfig,
        monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path,
    ) -> None:
        """
        A config naming a secret file (as the image's does) and
        SIDECAR_IDP__CLIENT_SECRET: the variable is the secret, not a
        conflict.
        """
        path = write_config(
            f"""
            [idp]
            token_url = "{TOKEN_URL}"
            client_id = "billing"
            client_secret_file = "{tmp_path / "absent"}"
            """
        )
        monkeypatch.setenv("SIDECAR_IDP__CLIENT_SECRET", "env-secret-123")

        settings = load_settings(path)

        assert settings.idp.client_secret_file is None
        assert settings.idp.client_secret is not None
        assert settings.idp.client_secret.get_secret_value() == (
            "env-secret-123"
        )

    def test_an_empty_path_variable_means_none(
        self, write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """
        SIDECAR_IDP__CLIENT_SECRET_FILE= (empty) unsets the key; it does
        not name the current directory.
        """
        path = write_config(VALID_TOML)
        monkeypatch.setenv("SIDECAR_IDP__CLIENT_SECRET_FILE", "")

        settings = load_settings(path)

        assert settings.idp.client_secret_file is None
        assert settings.idp.client_secret is not None

    def test_a_secret_file_in_the_environment_replaces_the_files_secret(
        self,
        write_config: WriteConfig,
        monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path,
    ) -> None:
        """
        And the other way round: SIDECAR_IDP__CLIENT_SECRET_FILE replaces
        a secret written in the file.
        """
        secret_file = tmp_path / "client_secret"
        secret_file.write_text("file-secret-456\n")
        secret_file.chmod(0o600)
        path = write_config(VALID_TOML)
        monkeypatch.setenv("SIDECAR_IDP__CLIENT_SECRET_FILE", str(secret_file))

        settings = load_settings(path)

        assert settings.idp.client_secret is None
        assert settings.idp.client_secret_file == secret_file

    def test_environment_supplies_the_secret(
        self, write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """
        The secret may come from the environment alone.
        """
        path = write_config(
            f"""
            [idp]
            token_url = "{TOKEN_URL}"
            client_id = "billing"
            """
        )
        monkeypatch.setenv("SIDECAR_IDP__CLIENT_SECRET", "env-secret-123")

        settings = load_settings(path)

        assert settings.idp.client_secret is not None
        assert settings.idp.client_secret.get_secret_value() == (
            "env-secret-123"
        )

    def test_sidecar_config_names_the_file(
        self, write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """
        Without a path argument, $SIDECAR_CONFIG names the file.
        """
        path = write_config(VALID_TOML.replace("billing", "from-variable"))
        monkeypatch.setenv("SIDECAR_CONFIG", str(path))

        settings = load_settings()

        assert settings.idp.client_id == "from-variable"

    def test_path_argument_beats_sidecar_config(
        self,
        write_config: WriteConfig,
        monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path,
    ) -> None:
        """
        An explicit path is used even when $SIDECAR_CONFIG names another.
        """
        path = write_config(VALID_TOML)
        monkeypatch.setenv("SIDECAR_CONFIG", str(tmp_path / "absent.toml"))

        settings = load_settings(path)

        assert settings.idp.client_id == "billing"

    def test_environment_alone_is_enough(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """
        With no file at all, SIDECAR_* variables configure the sidecar.
        """
        monkeypatch.setenv("SIDECAR_IDP__TOKEN_URL", TOKEN_URL)
        monkeypatch.setenv("SIDECAR_IDP__CLIENT_ID", "billing")
        monkeypatch.setenv("SIDECAR_IDP__CLIENT_SECRET", SECRET)

        settings = load_settings()

        assert settings.idp.client_id == "billing"

    def test_missing_file_is_named(self, tmp_path: Path) -> None:
        """
        A config file that does not exist is a problem keyed by its path.
        """
        path = tmp_path / "absent.toml"

        with pytest.raises(ConfigError) as info:
            load_settings(path)

        [problem] = info.value.problems
        assert problem.key == str(path)
        assert "cannot read the config file" in problem.message
        assert "No such file" in problem.message
        assert "--config" in problem.message

    def test_invalid_toml_gives_file_and_line(
        self, write_config: WriteConfig
    ) -> None:
        """
        A TOML syntax error names the file and the line it is on.
        """
        path = write_config(
            """
            [idp]
            client_id = "billing"
            token_url = https://idp.example.com/oauth/token
            """
        )

        with pytest.raises(ConfigError) as info:
            load_settings(path)

        [problem] = info.value.problems
        assert problem.key == str(path)
        assert "not valid TOML" in problem.message
        assert "line 4" in problem.message

    def test_missing_client_id_is_named(
        self, write_config: WriteConfig
    ) -> None:
        """
        A missing client_id is reported as idp.client_id, with its variable.
        """
        path = write_config(
            f"""
            [idp]
            token_url = "{TOKEN_URL}"
            client_secret = "{SECRET}"
            """
        )

        with pytest.raises(ConfigError) as info:
            load_settings(path)

        [problem] = info.value.problems
        assert problem.key == "idp.client_id"
        assert "required" in problem.message
        assert "SIDECAR_IDP__CLIENT_ID" in problem.message

    def test_typo_in_the_file_is_named(
        self, write_config: WriteConfig
    ) -> None:
        """
        A misspelt key is reported by its name, beside the key it hides.
        """
        path = write_config(
            f"""
            [idp]
            token_url = "{TOKEN_URL}"
            clientid = "billing"
            client_secret = "{SECRET}"
            """
        )

        with pytest.raises(ConfigError) as info:
            load_settings(path)

        problems = {p.key: p.message for p in info.value.problems}
        assert set(problems) == {"idp.client_id", "idp.clientid"}
        assert "unknown key" in problems["idp.clientid"]
        # A typo in the file names no variable the user never set.
        assert "SIDECAR_" not in problems["idp.clientid"]

    def test_unknown_table_is_named(self, write_config: WriteConfig) -> None:
        """
        A table the sidecar does not know is reported by its name.
        """
        path = write_config(VALID_TOML + "\n[refesh]\nrefresh_at = 0.8\n")

        with pytest.raises(ConfigError) as info:
            load_settings(path)

        [problem] = info.value.problems
        assert problem.key == "refesh"
        assert "unknown" in problem.message

    def test_typo_in_the_environment_is_named(
        self, write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """
        A misspelt nested variable is reported like a misspelt file key.
        """
        [problem] = problems_with_variable(
            write_config, monkeypatch, "SIDECAR_IDP__CLIENTID", "orders"
        )

        assert problem.key == "idp.clientid"
        assert "unset SIDECAR_IDP__CLIENTID" in problem.message

    def test_table_variable_that_is_not_json_is_a_config_error(
        self, write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """
        A whole-table variable that is not JSON is reported by its table.
        """
        problems = problems_with_variable(
            write_config, monkeypatch, "SIDECAR_IDP", "oops"
        )

        assert [p.key for p in problems] == ["idp"]

    def test_bad_value_in_the_environment_names_the_variable(
        self, write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """
        A value of the wrong type is reported with the variable to fix.
        """
        [problem] = problems_with_variable(
            write_config, monkeypatch, "SIDECAR_LISTEN__PORT", "eighty"
        )

        assert problem.key == "listen.port"
        assert "SIDECAR_LISTEN__PORT" in problem.message

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("0,1", [0, 1]),
            (" 0, 1 ", [0, 1]),
            ("0 1", [0, 1]),
            ("0", [0]),
            ("[0, 1]", [0, 1]),
            ("root", ["root"]),
            ("", []),
        ],
    )
    def test_a_user_list_from_the_environment_may_be_comma_separated(
        self,
        write_config: WriteConfig,
        monkeypatch: pytest.MonkeyPatch,
        value: str,
        expected: list[int | str],
    ) -> None:
        """
        SIDECAR_ACCESS__ALLOW_UIDS takes "0,1" as operators write it, or a
        JSON array; numbers are ids, words are names.
        """
        path = write_config(VALID_TOML)
        monkeypatch.setenv("SIDECAR_ACCESS__ALLOW_UIDS", value)

        settings = load_settings(path)

        assert settings.access.allow_uids == expected

    @pytest.mark.parametrize("value", ["[true]", "[1000, false]"])
    def test_booleans_are_not_users(
        self,
        write_config: WriteConfig,
        monkeypatch: pytest.MonkeyPatch,
        value: str,
    ) -> None:
        """
        true is not uid 1: a list holding a boolean is refused.
        """
        [problem] = problems_with_variable(
            write_config, monkeypatch, "SIDECAR_ACCESS__ALLOW_UIDS", value
        )

        assert problem.key == "access.allow_uids"
        assert problem.message.startswith("true and false are not users")

    def test_a_broken_json_list_names_both_forms(
        self, write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """
        A variable that starts as a JSON array but is not one is reported
        on its key, with both accepted forms.
        """
        [problem] = problems_with_variable(
            write_config, monkeypatch, "SIDECAR_ACCESS__ALLOW_GIDS", "[0,"
        )

        assert problem.key == "access.allow_gids"
        assert problem.message.startswith("is not a JSON array; write it as")
        assert "SIDECAR_ACCESS__ALLOW_GIDS" in problem.message


class TestClientId:
    """
    client_id is required and must hold more than whitespace.
    """

    @pytest.mark.parametrize("value", ["", "   "])
    def test_blank_client_id_is_refused(self, value: str) -> None:
        """
        An empty or blank client_id is refused by name.
        """
        data = valid_data(idp={"client_id": value})

        problem = only_problem(data)

        assert problem.key == "idp.client_id"
        assert "empty" in problem.message


class TestTokenUrl:
    """
    Exactly one of token_url and auth_base_url, https off loopback.
    """

    @pytest.mark.parametrize(
        "idp",
        [
            pytest.param(
                {"auth_base_url": "https://tenant.example.com"}, id="both"
            ),
            pytest.param({"token_url": None}, id="neither"),
        ],
    )
    def test_exactly_one_url(self, idp: dict[str, Any]) -> None:
        """
        Setting both URLs, or neither, is one problem on idp.token_url.
        """
        data = valid_data(idp=idp)

        problem = only_problem(data)

        assert problem.key == "idp.token_url"
        assert "exactly one" in problem.message

    @pytest.mark.parametrize(
        ("base", "expected"),
        [
            pytest.param(
                "https://tenant.example.com",
                "https://tenant.example.com/oauth/token",
                id="host",
            ),
            pytest.param(
                "https://tenant.example.com/",
                "https://tenant.example.com/oauth/token",
                id="trailing-slash",
            ),
            pytest.param(
                "https://example.com/auth/",
                "https://example.com/auth/oauth/token",
                id="path-prefix",
            ),
        ],
    )
    def test_auth_base_url_resolves_to_oauth_token(
        self, base: str, expected: str
    ) -> None:
        """
        auth_base_url gets /oauth/token appended, without a double slash.
        """
        data = valid_data(idp={"token_url": None, "auth_base_url": base})

        settings = settings_from_dict(data)

        assert settings.idp.resolved_token_url == expected

    @pytest.mark.parametrize(
        "url",
        [
            "http://127.0.0.1:8080/oauth/token",
            "http://127.8.9.10/oauth/token",
            "http://[::1]:8080/oauth/token",
            "http://localhost:8080/oauth/token",
            "http://LOCALHOST/oauth/token",
            "https://idp.example.com/oauth/token",
            "https://10.0.0.1/oauth/token",
        ],
    )
    def test_http_on_loopback_and_https_anywhere_are_allowed(
        self, url: str
    ) -> None:
        """
        Plain http is fine on loopback; https is fine everywhere.
        """
        data = valid_data(idp={"token_url": url})

        settings = settings_from_dict(data)

        assert settings.idp.resolved_token_url == url

    @pytest.mark.parametrize(
        "url",
        [
            "http://idp.example.com/oauth/token",
            "http://10.0.0.1/oauth/token",
            "http://0.0.0.0/oauth/token",
            "http://127.0.0.1.nip.io/oauth/token",
            "http://[::2]/oauth/token",
        ],
    )
    def test_http_off_loopback_is_refused(self, url: str) -> None:
        """
        Plain http to anything but loopback is refused: https is required.
        """
        data = valid_data(idp={"token_url": url})

        problem = only_problem(data)

        assert problem.key == "idp.token_url"
        assert "must use https" in problem.message

    def test_http_auth_base_url_off_loopback_is_refused(self) -> None:
        """
        The https rule applies to the URL resolved from auth_base_url too.
        """
        data = valid_data(
            idp={"token_url": None, "auth_base_url": "http://example.com"}
        )

        problem = only_problem(data)

        assert "must use https" in problem.message

    @pytest.mark.parametrize(
        "url",
        [
            "https://billing:hunter2-pw@idp.example.com/oauth/token",
            "https://billing@idp.example.com/oauth/token",
            "http://billing:hunter2-pw@127.0.0.1/oauth/token",
        ],
    )
    def test_credentials_in_the_url_are_refused(self, url: str) -> None:
        """
        A URL carrying a user or password is refused without quoting it.
        """
        data = valid_data(idp={"token_url": url})

        problem = only_problem(data)

        assert problem.key == "idp.token_url"
        assert "must not carry credentials" in problem.message
        assert "hunter2" not in problem.message

    @pytest.mark.parametrize(
        "url",
        [
            "ftp://idp.example.com/oauth/token",
            "idp.example.com/oauth/token",
            "https:///oauth/token",
        ],
    )
    def test_non_http_urls_are_refused(self, url: str) -> None:
        """
        Anything but an http(s) URL with a host is refused.
        """
        data = valid_data(idp={"token_url": url})

        problem = only_problem(data)

        assert "not an http(s) URL" in problem.message


class TestClientSecret:
    """
    Secret-based methods need exactly one readable, non-empty secret.
    """

    @pytest.mark.parametrize(
        "method", ["client_secret_post", "client_secret_basic"]
    )
    def test_missing_secret_is_refused(self, method: str) -> None:
        """
        With neither secret nor secret file, the problem names both ways.
        """
        data = valid_data(idp={"client_secret": None, "auth_method": method})

        problem = only_problem(data)

        assert problem.key == "idp.client_secret_file"
        assert method in problem.message
        assert "SIDECAR_IDP__CLIENT_SECRET" in problem.message

    def test_empty_secret_is_refused(self) -> None:
        """
        An empty client_secret is refused by name.
        """
        data = valid_data(idp={"client_secret": ""})

        problem = only_problem(data)

        assert problem.key == "idp.client_secret"
        assert "empty" in problem.message

    def test_secret_and_secret_file_are_refused(self, tmp_path: Path) -> None:
        """
        Setting both the secret and a secret file is refused.
        """
        secret_file = tmp_path / "secret"
        secret_file.write_text(SECRET)
        data = valid_data(idp={"client_secret_file": str(secret_file)})

        problem = only_problem(data)

        assert problem.key == "idp.client_secret_file"
        assert "only one" in problem.message

    def test_readable_secret_file_is_accepted(self, tmp_path: Path) -> None:
        """
        A non-empty secret file replaces the inline secret.
        """
        secret_file = tmp_path / "secret"
        secret_file.write_text(SECRET + "\n")
        data = valid_data(
            idp={"client_secret": None, "client_secret_file": str(secret_file)}
        )

        settings = settings_from_dict(data)

        assert settings.idp.client_secret_file == secret_file

    @pytest.mark.parametrize(
        ("name", "content", "reason"),
        [
            pytest.param("absent", None, "No such file", id="missing"),
            pytest.param(
                "directory", None, "is not a regular file", id="directory"
            ),
            pytest.param("empty", "", "is empty", id="empty"),
            pytest.param("blank", " \n\t\n", "is empty", id="blank"),
        ],
    )
    def test_unusable_secret_file_is_refused(
        self, tmp_path: Path, name: str, content: str | None, reason: str
    ) -> None:
        """
        A secret file that cannot be read, or holds nothing, is refused.
        """
        path = tmp_path / name
        if name == "directory":
            path.mkdir()
        elif content is not None:
            path.write_text(content)
        data = valid_data(
            idp={"client_secret": None, "client_secret_file": str(path)}
        )

        problem = only_problem(data)

        assert problem.key == "idp.client_secret_file"
        assert reason in problem.message
        assert str(path) in problem.message


class TestPrivateKey:
    """
    private_key_jwt needs a readable PEM key that can sign the algorithm.
    """

    def jwt_data(self, **idp: Any) -> dict[str, Any]:
        """
        Valid data switched to private_key_jwt, without a secret.
        """
        return valid_data(
            idp={
                "client_secret": None,
                "auth_method": "private_key_jwt",
                **idp,
            }
        )

    @pytest.mark.parametrize(
        ("kind", "alg"),
        [
            pytest.param("rsa", None, id="rsa-default"),
            pytest.param("rsa", "PS256", id="rsa-ps256"),
            pytest.param("ec-p256", None, id="ec-default"),
            pytest.param("ec-p256", "ES256", id="ec-es256"),
        ],
    )
    def test_usable_key_is_accepted(
        self, key_files: dict[str, Path], kind: str, alg: str | None
    ) -> None:
        """
        An unencrypted RSA or P-256 key with a fitting algorithm is fine.
        """
        data = self.jwt_data(
            private_key_file=str(key_files[kind]), private_key_alg=alg
        )

        settings = settings_from_dict(data)

        assert settings.idp.private_key_file == key_files[kind]

    def test_missing_key_is_refused(self) -> None:
        """
        private_key_jwt without a key file is refused by name.
        """
        data = self.jwt_data()

        problem = only_problem(data)

        assert problem.key == "idp.private_key_file"
        assert "needs a PEM key file" in problem.message

    def test_unreadable_key_is_refused(self, tmp_path: Path) -> None:
        """
        A key file that does not exist is refused with its path.
        """
        path = tmp_path / "absent.pem"
        data = self.jwt_data(private_key_file=str(path))

        problem = only_problem(data)

        assert problem.key == "idp.private_key_file"
        assert "cannot read" in problem.message

    @pytest.mark.parametrize(
        ("kind", "alg", "reason"),
        [
            pytest.param(
                "not-pem", None, "not an unencrypted PEM", id="bad-pem"
            ),
            pytest.param(
                "rsa-encrypted",
                None,
                "not an unencrypted PEM",
                id="encrypted",
            ),
            pytest.param(
                "rsa", "ES256", "an RSA key cannot sign ES256", id="rsa-es256"
            ),
            pytest.param(
                "ec-p256",
                "RS256",
                "a P-256 key cannot sign RS256",
                id="ec-rs256",
            ),
            pytest.param("ec-p384", None, "P-256 curve", id="ec-p384"),
            pytest.param(
                "ed25519", None, "only RSA and EC P-256", id="ed25519"
            ),
        ],
    )
    def test_unusable_key_is_refused(
        self,
        key_files: dict[str, Path],
        kind: str,
        alg: str | None,
        reason: str,
    ) -> None:
        """
        A key that cannot sign, or sign the chosen algorithm, is refused.
        """
        data = self.jwt_data(
            private_key_file=str(key_files[kind]), private_key_alg=alg
        )

        problem = only_problem(data)

        assert problem.key == "idp.private_key_file"
        assert reason in problem.message

    def test_unknown_algorithm_is_refused(
        self, key_files: dict[str, Path]
    ) -> None:
        """
        An algorithm outside the supported set is refused by pydantic.
        """
        data = self.jwt_data(
            private_key_file=str(key_files["rsa"]), private_key_alg="HS256"
        )

        problem = only_problem(data)

        assert problem.key == "idp.private_key_alg"


class TestListenAndOps:
    """
    /token stays on loopback unless asked, and the ports do not clash.
    """

    @pytest.mark.parametrize(
        "host", [ALL_INTERFACES, "::", "10.1.2.3", "example"]
    )
    def test_remote_listen_host_needs_allow_remote(self, host: str) -> None:
        """
        A non-loopback listen host is refused unless allow_remote is set.
        """
        data = valid_data(listen={"host": host})

        problem = only_problem(data)

        assert problem.key == "listen.host"
        assert "allow_remote" in problem.message

    def test_allow_remote_permits_a_remote_host(self) -> None:
        """
        With allow_remote the sidecar may listen on every interface.
        """
        data = valid_data(
            listen={"host": ALL_INTERFACES, "allow_remote": True}
        )

        settings = settings_from_dict(data)

        assert settings.listen.host == ALL_INTERFACES

    @pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
    def test_loopback_listen_hosts_are_accepted(self, host: str) -> None:
        """
        Loopback listen hosts need no opt-in.
        """
        data = valid_data(listen={"host": host})

        settings = settings_from_dict(data)

        assert settings.listen.host == host

    def test_ops_port_equal_to_listen_port_is_refused(self) -> None:
        """
        The ops listener may not take the token listener's port.
        """
        data = valid_data(listen={"port": 8080}, ops={"port": 8080})

        problem = only_problem(data)

        assert problem.key == "ops.port"
        assert "listen.port" in problem.message

    @pytest.mark.parametrize(
        "ops",
        [
            pytest.param({"port": 8080, "enabled": False}, id="ops-disabled"),
            pytest.param({"port": 8080, "host": "127.0.0.2"}, id="other-host"),
            pytest.param({"port": 8081}, id="other-port"),
        ],
    )
    def test_ports_that_do_not_clash_are_accepted(
        self, ops: dict[str, Any]
    ) -> None:
        """
        The same port is fine when ops is off or binds another address.
        """
        data = valid_data(listen={"port": 8080}, ops=ops)

        settings = settings_from_dict(data)

        assert settings.listen.port == 8080

    def test_both_ports_zero_are_accepted(self) -> None:
        """
        Port 0 on both listeners means two ephemeral ports, not a clash.
        """
        data = valid_data(listen={"port": 0}, ops={"port": 0})

        settings = settings_from_dict(data)

        assert (settings.listen.port, settings.ops.port) == (0, 0)

    @pytest.mark.parametrize("port", [-1, 65536])
    def test_port_out_of_range_is_refused(self, port: int) -> None:
        """
        Ports outside 0..65535 are refused by key.
        """
        data = valid_data(listen={"port": port})

        problem = only_problem(data)

        assert problem.key == "listen.port"


class TestRefreshAndRetry:
    """
    Refresh fractions lie in (0, 1); back-off starts below its cap.
    """

    @pytest.mark.parametrize("value", [0, 1, -0.5, 1.5])
    def test_refresh_at_outside_zero_one_is_refused(
        self, value: float
    ) -> None:
        """
        refresh_at must lie strictly between 0 and 1.
        """
        data = valid_data(refresh={"refresh_at": value})

        problem = only_problem(data)

        assert problem.key == "refresh.refresh_at"
        assert "SIDECAR_REFRESH__REFRESH_AT" in problem.message

    def test_refresh_at_inside_zero_one_is_accepted(self) -> None:
        """
        A refresh_at inside (0, 1) is taken as given.
        """
        data = valid_data(refresh={"refresh_at": 0.75})

        settings = settings_from_dict(data)

        assert settings.refresh.refresh_at == 0.75

    @pytest.mark.parametrize(
        ("refresh_at", "jitter"),
        [
            pytest.param(0.2, 0.3, id="larger"),
            pytest.param(0.3, 0.3, id="equal"),
        ],
    )
    def test_jitter_reaching_refresh_at_is_refused(
        self, refresh_at: float, jitter: float
    ) -> None:
        """
        Jitter as large as refresh_at would schedule refreshes in the past.
        """
        data = valid_data(refresh={"refresh_at": refresh_at, "jitter": jitter})

        problems = problems_of(data)

        assert [p.key for p in problems] == ["refresh.jitter"]

    def test_jitter_below_refresh_at_is_accepted(self) -> None:
        """
        Jitter just below refresh_at keeps every refresh after issue.
        """
        data = valid_data(refresh={"refresh_at": 0.3, "jitter": 0.29})

        settings = settings_from_dict(data)

        assert settings.refresh.jitter == 0.29

    @pytest.mark.parametrize(
        ("retry", "key"),
        [
            pytest.param(
                {"backoff_initial_seconds": 90, "backoff_max_seconds": 60},
                "retry.backoff_initial_seconds",
                id="outage",
            ),
            pytest.param(
                {
                    "rejected_backoff_initial_seconds": 600,
                    "rejected_backoff_max_seconds": 300,
                },
                "retry.rejected_backoff_initial_seconds",
                id="rejected",
            ),
        ],
    )
    def test_initial_backoff_above_its_cap_is_refused(
        self, retry: dict[str, float], key: str
    ) -> None:
        """
        An initial back-off larger than its maximum is refused by key.
        """
        data = valid_data(retry=retry)

        problem = only_problem(data)

        assert problem.key == key
        assert "must not exceed" in problem.message

    @pytest.mark.parametrize(
        "key",
        [
            "backoff_initial_seconds",
            "backoff_max_seconds",
            "rejected_backoff_initial_seconds",
            "rejected_backoff_max_seconds",
            "max_retry_after_seconds",
        ],
    )
    def test_non_positive_backoff_is_refused(self, key: str) -> None:
        """
        Every back-off setting must be positive.
        """
        data = valid_data(retry={key: 0})

        problem = only_problem(data)

        assert problem.key == f"retry.{key}"

    def test_initial_backoff_equal_to_its_cap_is_accepted(self) -> None:
        """
        An initial back-off equal to its cap means a constant back-off.
        """
        data = valid_data(
            retry={"backoff_initial_seconds": 5, "backoff_max_seconds": 5}
        )

        settings = settings_from_dict(data)

        assert settings.retry.backoff_initial_seconds == 5


class TestFleetRedisUrl:
    """
    The Redis URL never carries a password: it would be in logs.
    """

    @pytest.mark.parametrize(
        "url",
        [
            "redis://:hunter2-pass@127.0.0.1:6379/0",
            "redis://user:hunter2-pass@127.0.0.1:6379/0",
            "redis://127.0.0.1:6379/0?password=hunter2-pass",
            "rediss://127.0.0.1:6380/0?db=0&PASSWORD=hunter2-pass",
            "unix:///run/redis.sock?password=hunter2-pass",
        ],
    )
    def test_a_password_in_the_url_is_refused_unquoted(self, url: str) -> None:
        """
        In the user part or as redis-py's ?password=, it is refused, and
        the message points to redis_password_file without quoting it.
        """
        problem = only_problem(
            valid_data(fleet={"backend": "redis", "redis_url": url})
        )

        assert problem.key == "fleet.redis_url"
        assert "fleet.redis_password_file" in problem.message
        assert "hunter2" not in problem.message

    def test_other_query_parameters_pass(self) -> None:
        """
        Parameters other than a password are the user's business.
        """
        settings = settings_from_dict(
            valid_data(
                fleet={
                    "backend": "redis",
                    "redis_url": "redis://127.0.0.1:6379/0?username=fleet",
                }
            )
        )

        assert settings.fleet.redis_url.endswith("?username=fleet")


class TestManyProblems:
    """
    Every problem of a config is reported at once.
    """

    def test_field_problems_are_all_reported(self) -> None:
        """
        Missing, unknown and mistyped keys are all listed together.
        """
        data = {
            "idp": {"token_url": TOKEN_URL, "clientid": "billing"},
            "listen": {"port": "eighty"},
            "loggin": {"level": "debug"},
        }

        problems = problems_of(data)

        keys = {p.key for p in problems}
        assert keys == {
            "idp.client_id",
            "idp.clientid",
            "idp.client_secret_file",
            "listen.port",
            "loggin",
        }

    @pytest.mark.parametrize(
        ("tables", "key"),
        [
            (
                {"listen": {"port": "abc"}, "ops": {"port": 8787}},
                "listen.port",
            ),
            (
                {
                    "idp": {
                        "auth_method": "private_key_jvt",
                        "private_key_file": "/nonexistent/key.pem",
                    }
                },
                "idp.auth_method",
            ),
        ],
        ids=["bad-port", "misspelt-auth-method"],
    )
    def test_a_bad_value_causes_no_made_up_problems(
        self, tables: dict[str, dict[str, Any]], key: str
    ) -> None:
        """
        A value that does not validate is reported alone: its default is
        not put in its place for the rules spanning keys to trip over.
        """
        problems = problems_of(valid_data(**tables))

        assert [p.key for p in problems] == [key]

    def test_a_missing_key_does_not_hide_the_rules_spanning_keys(
        self,
    ) -> None:
        """
        An empty config lists the client id, the token URL and the secret
        in one round, not one per attempt.
        """
        problems = problems_of({})

        keys = [p.key for p in problems]
        assert keys == [
            "idp.client_id",
            "idp.token_url",
            "idp.client_secret_file",
        ]

    def test_checked_problems_are_all_reported(self) -> None:
        """
        Problems found after field validation are listed together too.
        """
        data = valid_data(
            idp={"token_url": "http://idp.example.com/token"},
            listen={"host": ALL_INTERFACES, "port": 8080},
            ops={"host": ALL_INTERFACES, "port": 8080},
            retry={"backoff_initial_seconds": 90, "backoff_max_seconds": 60},
        )

        problems = problems_of(data)

        keys = [p.key for p in problems]
        assert keys == [
            "idp.token_url",
            "listen.host",
            "ops.port",
            "retry.backoff_initial_seconds",
        ]

    def test_field_and_checked_problems_are_reported_together(self) -> None:
        """
        A mistyped field does not hide a problem spanning other keys.
        """
        data = valid_data(
            idp={"token_url": "http://idp.example.com/token"},
            listen={"port": "eighty"},
        )

        problems = problems_of(data)

        keys = {p.key for p in problems}
        assert keys == {"idp.token_url", "listen.port"}

    def test_value_that_is_not_a_table_is_refused(self) -> None:
        """
        A table given as a plain value is refused by its name.
        """
        data = valid_data()
        data["listen"] = 8080

        problem = only_problem(data)

        assert problem.key == "listen"
        assert "table" in problem.message

    def test_config_error_message_joins_the_problems(self) -> None:
        """
        str(ConfigError) lists each problem as 'key: message'.
        """
        data = valid_data(idp={"client_secret": ""}, listen={"host": "::"})

        with pytest.raises(ConfigError) as info:
            settings_from_dict(data)

        text = str(info.value)
        assert "idp.client_secret: must not be empty" in text
        assert "; listen.host: " in text


class TestRedacted:
    """
    redacted() gives the effective settings as data, secrets masked.
    """

    def test_client_secret_is_masked(self) -> None:
        """
        The secret is replaced by asterisks; other fields stay readable.
        """
        settings = settings_from_dict(valid_data())

        data = redacted(settings)

        assert data["idp"]["client_secret"] == "**********"
        assert data["idp"]["client_id"] == "billing"
        assert data["listen"]["port"] == 8787
        assert SECRET not in repr(data)

    def test_settings_repr_hides_the_secret(self) -> None:
        """
        The settings object itself never shows the secret either.
        """
        settings = settings_from_dict(valid_data())

        shown = repr(settings) + str(settings)

        assert SECRET not in shown

    def test_absent_secret_stays_absent(self, tmp_path: Path) -> None:
        """
        With a secret file, client_secret is None, not a mask.
        """
        secret_file = tmp_path / "secret"
        secret_file.write_text(SECRET)
        data = valid_data(
            idp={"client_secret": None, "client_secret_file": str(secret_file)}
        )

        shown = redacted(settings_from_dict(data))

        assert shown["idp"]["client_secret"] is None
        assert shown["idp"]["client_secret_file"] == str(secret_file)


class TestSettingsFromDict:
    """
    settings_from_dict validates data alone, ignoring the environment.
    """

    def test_validates_like_load_settings(self) -> None:
        """
        The same problems come back as from a file.
        """
        data = {"idp": {"token_url": TOKEN_URL}}

        problems = problems_of(data)

        assert [p.key for p in problems] == [
            "idp.client_id",
            "idp.client_secret_file",
        ]

    def test_returns_settings(self) -> None:
        """
        Valid data becomes a Settings object.
        """
        settings = settings_from_dict(valid_data())

        assert isinstance(settings, Settings)

    def test_ignores_sidecar_variables(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """
        SIDECAR_* variables do not change settings built from a dict.
        """
        monkeypatch.setenv("SIDECAR_IDP__CLIENT_ID", "from-environment")
        monkeypatch.setenv("SIDECAR_LISTEN__PORT", "9999")

        settings = settings_from_dict(valid_data())

        assert settings.idp.client_id == "billing"
        assert settings.listen.port == 8787


class TestIsLoopbackHost:
    """
    is_loopback_host knows names and addresses, bracketed or not.
    """

    @pytest.mark.parametrize(
        ("host", "expected"),
        [
            ("127.0.0.1", True),
            ("127.255.0.9", True),
            ("::1", True),
            ("[::1]", True),
            ("localhost", True),
            ("LocalHost", True),
            (ALL_INTERFACES, False),
            ("::", False),
            ("10.0.0.1", False),
            ("example.com", False),
            ("localhost.example.com", False),
            ("", False),
        ],
    )
    def test_classifies_hosts(self, host: str, expected: bool) -> None:
        """
        Loopback addresses and names are told from everything else.
        """
        result = is_loopback_host(host)

        assert result is expected


def test_one_file_for_two_purposes_is_refused(tmp_path: Path) -> None:
    """
    The cache, the ledger and the sink may not share a file: each write
    would wipe the other's data.
    """
    same = str(tmp_path / "state")
    data = {
        "idp": {
            "token_url": "https://idp.example/oauth/token",
            "client_id": "billing",
            "client_secret": "s3cr3t-value-123",
        },
        "cache": {"path": same},
        "quota": {"ledger_path": same},
        "sink": {"path": same},
    }

    with pytest.raises(ConfigError) as caught:
        settings_from_dict(data)

    assert [p.key for p in caught.value.problems] == [
        "quota.ledger_path",
        "sink.path",
    ]


def test_one_file_spelt_two_ways_is_still_one_file(tmp_path: Path) -> None:
    """
    A path through '..' or a symlinked directory names the same file:
    refused like the same spelling (a running sidecar would otherwise
    find its own lock taken).
    """
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "alias").symlink_to(state)
    data = valid_data(
        cache={"path": str(state / "token.cache")},
        quota={"ledger_path": str(state / ".." / "state" / "token.cache")},
        sink={"path": str(tmp_path / "alias" / "token.cache")},
    )

    problems = problems_of(data)

    assert [p.key for p in problems] == ["quota.ledger_path", "sink.path"]
