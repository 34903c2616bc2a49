"""
The sidecar's settings: a TOML file, overridden by ``SIDECAR_*`` variables.

Every problem is reported as a `ConfigProblem` naming its key and what to
do, all at once, so an operator fixes a config in one round.
"""

from __future__ import annotations

import grp
import ipaddress
import json
import os
import pwd
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import parse_qsl, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    SettingsConfigDict,
    SettingsError,
)

from sidecar.errors import ConfigError, ConfigProblem
from sidecar.files import read_secret_file

ENV_PREFIX = "SIDECAR_"
CONFIG_PATH_VARIABLE = "SIDECAR_CONFIG"

AuthMethod = Literal[
    "client_secret_post", "client_secret_basic", "private_key_jwt"
]
SigningAlgorithm = Literal["RS256", "RS384", "RS512", "PS256", "ES256"]


#: Users or groups, by id or name. Set from the environment it may be a
#: JSON array or, as operators tend to write it, a comma-separated list:
#: ``SIDECAR_ACCESS__ALLOW_UIDS=1000,ci-runner``.
Principals = Annotated[list[int | str], NoDecode]


def _split_principals(value: object) -> object:
    if isinstance(value, str):
        value = _parse_principals(value)
    # pydantic would take true for uid 1.
    if isinstance(value, list) and any(isinstance(v, bool) for v in value):
        raise ValueError(
            "true and false are not users or groups; give ids or names"
        )

    return value


def _parse_principals(text: str) -> object:
    text = text.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            raise ValueError(
                'is not a JSON array; write it as [1000, "ci-runner"] '
                "or as 1000,ci-runner"
            ) from None
    words = [word for word in re.split(r"[,\s]+", text) if word]

    return [
        int(word) if word.isascii() and word.isdigit() else word
        for word in words
    ]


class _Section(BaseModel):
    # Unknown keys are typos until proven otherwise.
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_path_is_unset(cls, data: object) -> object:
        # SIDECAR_IDP__CLIENT_SECRET_FILE= (empty) means "none", not the
        # current directory, which is what Path("") would make of it.
        if not isinstance(data, dict):
            return data
        optional_paths = {
            name
            for name, field in cls.model_fields.items()
            if field.annotation == Path | None
        }

        return {
            key: None if key in optional_paths and value == "" else value
            for key, value in data.items()
        }


_SectionT = TypeVar("_SectionT", bound=_Section)


class IdPSettings(_Section):
    """
    Where and how to ask for the token.
    """

    token_url: str | None = Field(
        None, description="Token endpoint; https unless on loopback."
    )
    auth_base_url: str | None = Field(
        None, description="Instead of token_url: base URL + /oauth/token."
    )
    client_id: str = Field(description="The OAuth client id.")
    client_secret: SecretStr | None = Field(
        None, description="The secret; better from the environment."
    )
    client_secret_file: Path | None = Field(
        None, description="File holding the secret; read at every fetch."
    )
    auth_method: AuthMethod = Field(
        "client_secret_post", description="How the client authenticates."
    )
    private_key_file: Path | None = Field(
        None, description="PEM private key for private_key_jwt."
    )
    private_key_id: str | None = Field(
        None, description="kid header of the client assertion."
    )
    private_key_alg: SigningAlgorithm | None = Field(
        None, description="Assertion algorithm; from the key when unset."
    )
    assertion_audience: str | None = Field(
        None, description="aud of the client assertion; token URL if unset."
    )
    audience: str | None = Field(
        None, description="Auth0-style audience of the token."
    )
    scope: str | None = Field(None, description="Space-separated scopes.")
    timeout_seconds: float = Field(
        10.0, gt=0, le=300, description="Deadline of one IdP request."
    )

    @property
    def resolved_token_url(self) -> str:
        """
        The token endpoint, from ``token_url`` or ``auth_base_url``.
        """
        if self.token_url:
            return self.token_url

        return (self.auth_base_url or "").rstrip("/") + "/oauth/token"


class RefreshSettings(_Section):
    """
    When the token is renewed and how fresh a served token must be.
    """

    refresh_at: float = Field(
        0.9, gt=0, lt=1, description="Fraction of lifetime before renewal."
    )
    jitter: float = Field(
        0.02, ge=0, lt=0.5, description="Up to this fraction earlier."
    )
    min_ttl_seconds: float = Field(
        30.0, ge=0, description="Least life left on a served token."
    )
    idle_after: float = Field(
        0.0,
        ge=0,
        description="Seconds without a caller before proactive refreshes "
        "stop (0: never).",
    )
    invalidate_min_interval_seconds: float = Field(
        60.0, ge=0, description="Least time between two invalidations."
    )


class RetrySettings(_Section):
    """
    Back-off after failed token requests (exponential, full jitter).
    """

    backoff_initial_seconds: float = Field(
        1.0, gt=0, description="First back-off after an IdP outage."
    )
    backoff_max_seconds: float = Field(
        60.0, gt=0, description="Cap of the outage back-off."
    )
    rejected_backoff_initial_seconds: float = Field(
        60.0, gt=0, description="First back-off after a rejection."
    )
    rejected_backoff_max_seconds: float = Field(
        1800.0, gt=0, description="Cap of the rejection back-off."
    )
    max_retry_after_seconds: float = Field(
        3600.0, gt=0, description="Longest IdP Retry-After honoured."
    )


class ListenSettings(_Section):
    """
    The ``/token`` endpoint.
    """

    host: str = Field("127.0.0.1", description="Loopback unless remote.")
    port: int = Field(8787, ge=0, le=65535, description="TCP port.")
    allow_remote: bool = Field(
        False, description="Allow a non-loopback host (not advised)."
    )
    require_metadata_header: bool = Field(
        True, description="Require 'Metadata: true' on /token."
    )
    reject_forwarded: bool = Field(
        True, description="Refuse requests relayed by a proxy."
    )
    require_loopback_host: bool = Field(
        True, description="Refuse a Host header that is not loopback."
    )
    wait_for_token_seconds: float = Field(
        10.0, ge=0, le=120, description="How long /token waits for a fetch."
    )
    tcp: bool = Field(
        True, description="Serve on host:port (false: the socket only)."
    )
    unix_socket: Path | None = Field(
        None, description="Also serve on this Unix socket."
    )
    socket_mode: str = Field(
        "0660", pattern=r"^0?[0-7]{3}$", description="Octal socket mode."
    )
    socket_group: int | str | None = Field(
        None, description="Group (name or id) owning the socket."
    )
    max_connections: int = Field(
        4096, ge=1, description="Concurrent connections per listener."
    )
    request_head_timeout_seconds: float = Field(
        5.0, gt=0, le=300, description="Deadline to send a request head."
    )
    keepalive_timeout_seconds: float = Field(
        5.0, ge=0, le=3600, description="Idle keep-alive before closing."
    )
    max_header_bytes: int = Field(
        8190, ge=256, le=65536, description="Longest request or header line."
    )

    @property
    def socket_mode_bits(self) -> int:
        """
        ``socket_mode`` as a number.
        """
        return int(self.socket_mode, 8)


class OpsSettings(_Section):
    """
    ``/healthz``, ``/readyz`` and ``/metrics``; never ``/token``.
    """

    enabled: bool = Field(True, description="Serve the ops endpoints.")
    host: str = Field("127.0.0.1", description="May bind wider for probes.")
    port: int = Field(9464, ge=0, le=65535, description="TCP port.")


class AccessSettings(_Section):
    """
    Who may take the token, judged by the kernel's view of the caller.
    """

    allow_uids: Principals = Field(
        [], description="Users (ids or names) allowed to take the token."
    )
    allow_gids: Principals = Field(
        [], description="Groups (ids or names) whose members are allowed."
    )
    allow_same_uid: bool = Field(
        True, description="Allow callers running as the sidecar's user."
    )
    allow_all: bool = Field(
        False, description="Allow every local process (not advised)."
    )
    client_token_file: Path | None = Field(
        None, description="Callers with 'Bearer <file contents>' may pass."
    )

    _split = field_validator("allow_uids", "allow_gids", mode="before")(
        _split_principals
    )


class CacheSettings(_Section):
    """
    The encrypted warm-restart cache of the current token.
    """

    path: str = Field(
        "auto",
        description='Cache file; "auto": in the runtime directory; "": off.',
    )

    def resolved_path(self) -> Path | None:
        """
        The cache file, or ``None`` when caching is off or has no home.
        """
        return _resolve_state_path(self.path, "token.cache")


class QuotaSettings(_Section):
    """
    The monthly token-request budget and its ledger.
    """

    monthly_budget: int | None = Field(
        None, ge=1, description="Token requests per calendar month (UTC)."
    )
    warn_fraction: float = Field(
        0.8, gt=0, le=1, description="Warn from this share of the budget."
    )
    hard_stop: bool = Field(
        False, description="At the budget, mint no more tokens at all."
    )
    min_request_interval_seconds: float = Field(
        10.0, ge=0, description="Least gap before a restart's first request."
    )
    ledger_path: str = Field(
        "auto",
        description='Ledger file; "auto": in the runtime directory; "": '
        "memory only.",
    )

    def resolved_ledger_path(self) -> Path | None:
        """
        The ledger file, or ``None`` to keep the ledger in memory.
        """
        return _resolve_state_path(self.ledger_path, "ledger.json")


class FleetSettings(_Section):
    """
    Fleet mode: sidecars on many hosts share one token through Redis.
    """

    backend: Literal["none", "redis"] = Field(
        "none", description='"redis" shares the token; "none": this host only.'
    )
    redis_url: str = Field(
        "",
        description="redis://, rediss:// (TLS) or unix:// URL of the Redis; "
        "no password in it.",
    )
    redis_username: str | None = Field(
        None, description="Redis ACL user; unset: the default user."
    )
    redis_password_file: Path | None = Field(
        None, description="File holding the Redis password; read at connect."
    )
    tls_ca_file: Path | None = Field(
        None, description="CA bundle for rediss://; unset: the system's."
    )
    key_prefix: str = Field(
        "token-sidecar:",
        max_length=64,
        description="Prefix of every Redis key, to share a Redis safely.",
    )
    connect_timeout_seconds: float = Field(
        2.0, gt=0, le=60, description="Deadline to connect to Redis."
    )
    operation_timeout_seconds: float = Field(
        1.0, gt=0, le=60, description="Deadline of one Redis command."
    )
    lease_seconds: float = Field(
        30.0,
        gt=0,
        le=600,
        description="Life of the refresh lock; more than idp.timeout_seconds.",
    )


def runtime_directory() -> Path | None:
    """
    Where the sidecar keeps its state: systemd's ``$RUNTIME_DIRECTORY``,
    else ``$XDG_RUNTIME_DIR/token-sidecar``, else ``/run/token-sidecar``
    for root; ``None`` when none applies.
    """
    if named := os.environ.get("RUNTIME_DIRECTORY"):
        return Path(named.split(":")[0])
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "token-sidecar"
    if os.getuid() == 0:
        return Path("/run/token-sidecar")

    return None


def _resolve_state_path(value: str, name: str) -> Path | None:
    if value == "":
        return None
    if value != "auto":
        return Path(value)
    directory = runtime_directory()

    return directory / name if directory is not None else None


class SinkSettings(_Section):
    """
    Files the current token is written to, for tools that read one.
    """

    path: str = Field(
        "", description='Write the bare token here at every refresh; "": off.'
    )
    mode: str = Field(
        "0600", pattern=r"^0?[0-7]{3}$", description="Octal file mode."
    )
    group: int | str = Field(
        "", description='Group (name or id) owning the file; "": our own.'
    )
    wlcg_uid: int | str = Field(
        "",
        description="Also write the WLCG bearer-token file of this user "
        '(id or name); "": off.',
    )

    @property
    def mode_bits(self) -> int:
        """
        ``mode`` as a number.
        """
        return int(self.mode, 8)


class LogSettings(_Section):
    """
    Log level and format.
    """

    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Least severe level written."
    )
    format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: console on a terminal, else JSON."
    )


class Settings(BaseSettings):
    """
    The whole configuration.

    Build it with `load_settings` or `settings_from_dict`; its
    ``model_config`` tells pydantic-settings how the variables are named.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    idp: IdPSettings
    refresh: RefreshSettings = RefreshSettings()
    retry: RetrySettings = RetrySettings()
    listen: ListenSettings = ListenSettings()
    access: AccessSettings = AccessSettings()
    cache: CacheSettings = CacheSettings()
    quota: QuotaSettings = QuotaSettings()
    sink: SinkSettings = SinkSettings()
    ops: OpsSettings = OpsSettings()
    log: LogSettings = LogSettings()
    fleet: FleetSettings = FleetSettings()


#: The tables of the config file, each validated on its own so that a bad
#: key in one does not hide the problems of the others.
SECTIONS: dict[str, type[BaseModel]] = {
    "idp": IdPSettings,
    "refresh": RefreshSettings,
    "retry": RetrySettings,
    "listen": ListenSettings,
    "access": AccessSettings,
    "cache": CacheSettings,
    "quota": QuotaSettings,
    "sink": SinkSettings,
    "ops": OpsSettings,
    "log": LogSettings,
    "fleet": FleetSettings,
}
_TABLES = ", ".join(f"[{name}]" for name in SECTIONS)


def load_settings(path: Path | None = None) -> Settings:
    """
    Read the config file (if any) and the environment, and validate both.

    ``path`` defaults to ``$SIDECAR_CONFIG``; ``SIDECAR_*`` variables win
    over the file. Raises `ConfigError` with one problem per bad key.
    """
    if path is None and os.environ.get(CONFIG_PATH_VARIABLE):
        path = Path(os.environ[CONFIG_PATH_VARIABLE])
    data = _read_toml(path) if path is not None else {}
    environment = _environment()

    return settings_from_dict(
        _merged(_without_replaced_secret(data, environment), environment)
    )


#: Two ways to give the client secret; one given in the environment
#: replaces the file's, whichever way the file gave it.
_SECRET_KEYS = ("client_secret", "client_secret_file")


def _without_replaced_secret(
    data: dict[str, Any], environment: dict[str, Any]
) -> dict[str, Any]:
    # An image or a shared config may name a secret file, and a
    # deployment give the secret as a variable instead: the environment
    # wins over the file for the secret as a whole, not key by key.
    env_idp = environment.get("idp")
    file_idp = data.get("idp")
    if not isinstance(env_idp, dict) or not isinstance(file_idp, dict):
        return data
    # An empty variable only unsets its own key; it gives no secret.
    if not any(env_idp.get(key) for key in _SECRET_KEYS):
        return data
    kept = {k: v for k, v in file_idp.items() if k not in _SECRET_KEYS}

    return {**data, "idp": kept}


def load_listen_settings(path: Path | None = None) -> ListenSettings:
    """
    Read only the ``[listen]`` table, from the file and the environment.

    For clients of a running sidecar, such as ``token-sidecar token``: a
    user may ask for the token without being allowed to read the secret
    that a full validation would check. Raises `ConfigError`.
    """
    return _load_table("listen", ListenSettings, path)


def load_ops_settings(path: Path | None = None) -> OpsSettings:
    """
    Read only the ``[ops]`` table, from the file and the environment.

    For ``token-sidecar health``, which a container runtime calls often
    and which needs neither the secret nor the IdP. Raises `ConfigError`.
    """
    return _load_table("ops", OpsSettings, path)


def load_quota_view(path: Path | None = None) -> QuotaView:
    """
    Read what ``token-sidecar quota`` needs: ``[quota]``, ``[fleet]``
    and, in fleet mode, ``[idp]`` (which names the fleet's count), but
    not the secret, so an operator may read the count while the sidecar
    is stopped and its credential gone. Raises `ConfigError`.
    """
    fleet = _load_table("fleet", FleetSettings, path)
    idp = None
    if fleet.backend == "redis":
        if problems := _check_redis(fleet):
            raise ConfigError(problems)
        idp = _load_table("idp", IdPSettings, path)

    return QuotaView(_load_table("quota", QuotaSettings, path), fleet, idp)


@dataclass(frozen=True)
class QuotaView:
    """
    The settings ``token-sidecar quota`` reads.
    """

    quota: QuotaSettings
    fleet: FleetSettings
    #: Set in fleet mode only.
    idp: IdPSettings | None


def _load_table(
    name: str, model: type[_SectionT], path: Path | None
) -> _SectionT:
    if path is None and os.environ.get(CONFIG_PATH_VARIABLE):
        path = Path(os.environ[CONFIG_PATH_VARIABLE])
    data = _read_toml(path) if path is not None else {}
    raw = _merged(data, _environment()).get(name, {})
    if not isinstance(raw, dict):
        raise ConfigError([ConfigProblem(name, "must be a table")])
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_problems_from(exc, name)) from None


def config_file_holds_secret(path: Path) -> bool:
    """
    Whether the config file itself sets ``idp.client_secret``.
    """
    try:
        idp = _read_toml(path).get("idp", {})
    except ConfigError:
        return False

    return isinstance(idp, dict) and bool(idp.get("client_secret"))


def settings_from_dict(data: dict[str, Any]) -> Settings:
    """
    Validate settings given as data, ignoring the environment.

    Every table is checked, then every rule that spans keys, so that all
    problems are reported at once. Raises `ConfigError`.
    """
    problems = [
        ConfigProblem(name, "unknown table; the tables are " + _TABLES)
        for name in data
        if name not in SECTIONS
    ]
    sections: dict[str, Any] = {}
    # Tables that failed, rebuilt without their bad keys: the rules that
    # span keys still run on the rest, so one round reports everything.
    salvaged: dict[str, Any] = {}
    for name, model in SECTIONS.items():
        raw = data.get(name, {})
        if not isinstance(raw, dict):
            problems.append(ConfigProblem(name, "must be a table"))
            continue
        try:
            sections[name] = model.model_validate(raw)
        except ValidationError as exc:
            problems.extend(_problems_from(exc, name))
            if (rest := _salvage(model, raw, exc)) is not None:
                salvaged[name] = rest

    reported = {problem.key for problem in problems}
    problems.extend(
        problem
        for problem in _check_sections({**sections, **salvaged})
        if problem.key not in reported
    )
    if problems:
        raise ConfigError(problems)

    return Settings.model_construct(**sections)


def _salvage(
    model: type[BaseModel], raw: dict[str, Any], exc: ValidationError
) -> BaseModel | None:
    # The table without the keys that failed, a required text key filled
    # with a stand-in; None when even that does not validate. Only for
    # keys missing or unknown: a bad value replaced by its default would
    # let the rules spanning keys report problems the user does not have.
    errors = exc.errors()
    if any(e["type"] not in ("missing", "extra_forbidden") for e in errors):
        return None
    failed = {str(error["loc"][0]) for error in errors if error["loc"]}
    rest = {key: value for key, value in raw.items() if key not in failed}
    for name, field in model.model_fields.items():
        if name in failed and field.is_required():
            if field.annotation is not str:
                return None
            rest[name] = "(unset)"
    try:
        return model.model_validate(rest)
    except ValidationError:
        return None


def is_loopback_host(host: str) -> bool:
    """
    Whether ``host`` (a name or an address, maybe bracketed) is loopback.
    """
    host = host.strip("[]").lower()
    # Only the literal name: other names (even *.localhost) go through a
    # resolver that may ask the network.
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redacted(settings: Settings) -> dict[str, Any]:
    """
    The effective settings as plain data, every secret masked.
    """
    data: dict[str, Any] = settings.model_dump(mode="json")
    idp = data["idp"]
    if idp.get("client_secret") is not None:
        idp["client_secret"] = "**********"  # noqa: S105 -- the mask

    return data


def _environment() -> dict[str, Any]:
    try:
        return EnvSettingsSource(Settings)()
    except SettingsError as exc:
        # A whole table set as one variable must be JSON; name it.
        match = re.search(r'field "(\w+)"', str(exc))
        table = match[1] if match else "?"
        variable = ENV_PREFIX + table.upper()
        raise ConfigError(
            [
                ConfigProblem(
                    table,
                    f"{variable} is not valid JSON; set single keys as "
                    f"{variable}__<KEY> instead",
                )
            ]
        ) from None


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value

    return merged


def _check_sections(sections: dict[str, Any]) -> list[ConfigProblem]:
    # Each rule runs when the tables it reads validated.
    problems = []
    if "idp" in sections:
        problems.extend(_check_idp(sections["idp"]))
    if "listen" in sections and "ops" in sections:
        problems.extend(_check_listen(sections["listen"], sections["ops"]))
    if "access" in sections:
        problems.extend(_check_access(sections["access"]))
    if "retry" in sections:
        problems.extend(_check_retry(sections["retry"]))
    if "refresh" in sections:
        problems.extend(_check_refresh(sections["refresh"]))
    if {"cache", "quota", "sink"} <= sections.keys():
        problems.extend(
            _check_state_paths(
                sections["cache"], sections["quota"], sections["sink"]
            )
        )
    if "sink" in sections:
        problems.extend(_check_sink(sections["sink"]))
    if "fleet" in sections and "idp" in sections:
        problems.extend(_check_fleet(sections["fleet"], sections["idp"]))

    return problems


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [
                ConfigProblem(
                    str(path),
                    f"is not UTF-8 text (byte {exc.start}); save the "
                    "config file as UTF-8",
                )
            ]
        ) from None
    except OSError as exc:
        raise ConfigError(
            [
                ConfigProblem(
                    str(path),
                    f"cannot read the config file ({exc.strerror}); check "
                    f"the path given by --config or {CONFIG_PATH_VARIABLE}",
                )
            ]
        ) from None
    try:
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ConfigError(
            [ConfigProblem(str(path), f"not valid TOML: {exc}")]
        ) from None


def _problems_from(exc: ValidationError, table: str) -> list[ConfigProblem]:
    problems = []
    for error in exc.errors():
        key = ".".join([table, *(str(part) for part in error["loc"])])
        problems.append(ConfigProblem(key, _explain(error, key)))

    return problems


def _explain(error: Any, key: str) -> str:
    env_name = ENV_PREFIX + key.upper().replace(".", "__")
    if error["type"] == "missing":
        return (
            f"required; set it in the config file (--config or "
            f"{CONFIG_PATH_VARIABLE}) or as {env_name}"
        )
    if error["type"] == "extra_forbidden":
        # Name the variable only when one is set: a typo in the file
        # has nothing to do with the environment.
        where = f" (or unset {env_name})" if env_name in os.environ else ""
        return (
            "unknown key; check its spelling against config.example.toml"
            + where
        )
    message = str(error["msg"])
    if error["type"] == "value_error":
        # Our own validators' words, without pydantic's "Value error, ".
        message = str(error["ctx"]["error"])

    return f"{message}; fix it in the config file or in {env_name}"


def _check_idp(idp: IdPSettings) -> list[ConfigProblem]:
    problems = []
    if bool(idp.token_url) == bool(idp.auth_base_url):
        problems.append(
            ConfigProblem(
                "idp.token_url",
                "set exactly one of idp.token_url and idp.auth_base_url",
            )
        )
    else:
        key = "idp.token_url" if idp.token_url else "idp.auth_base_url"
        problems.extend(_check_url(key, idp.resolved_token_url))

    if not idp.client_id.strip():
        problems.append(ConfigProblem("idp.client_id", "must not be empty"))

    if idp.auth_method == "private_key_jwt":
        problems.extend(_check_private_key(idp))
    else:
        problems.extend(_check_secret(idp))
        if idp.private_key_file is not None:
            problems.append(
                ConfigProblem(
                    "idp.private_key_file",
                    f"is ignored with auth_method = {idp.auth_method!r}; "
                    "set auth_method = 'private_key_jwt' or remove it",
                )
            )

    return problems


def _check_url(key: str, url: str) -> list[ConfigProblem]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # The URL itself is not repeated: it might carry a password.
        return [
            ConfigProblem(
                key, "is not an http(s) URL with a host; use https://..."
            )
        ]
    if parts.username or parts.password:
        return [
            ConfigProblem(
                key, "must not carry credentials; use the secret keys"
            )
        ]
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        return [
            ConfigProblem(
                key,
                "must use https (plain http is allowed only for loopback "
                "test IdPs); the secret would cross the network in clear",
            )
        ]

    return []


def _check_secret(idp: IdPSettings) -> list[ConfigProblem]:
    key = "idp.client_secret_file"
    if idp.client_secret is not None and idp.client_secret_file is not None:
        return [
            ConfigProblem(
                key,
                "set only one of idp.client_secret (or "
                "SIDECAR_IDP__CLIENT_SECRET) and this key",
            )
        ]
    if idp.client_secret is not None:
        if not idp.client_secret.get_secret_value():
            return [ConfigProblem("idp.client_secret", "must not be empty")]
        return []
    if idp.client_secret_file is None:
        return [
            ConfigProblem(
                key,
                f"{idp.auth_method} needs a secret: set this key or "
                "SIDECAR_IDP__CLIENT_SECRET",
            )
        ]

    return _check_readable(key, idp.client_secret_file)


def _check_private_key(idp: IdPSettings) -> list[ConfigProblem]:
    # Imported here: the credential module pulls in cryptography, which
    # only private_key_jwt needs.
    from sidecar.credential import load_private_key

    key = "idp.private_key_file"
    if idp.private_key_file is None:
        return [ConfigProblem(key, "private_key_jwt needs a PEM key file")]
    problems = _check_readable(key, idp.private_key_file)
    if problems:
        return problems
    try:
        load_private_key(idp.private_key_file, idp.private_key_alg)
    except ValueError as exc:
        return [ConfigProblem(key, str(exc))]

    return []


def _query_keys(query: str) -> set[str]:
    # redis-py also reads a password from ?password= (by its exact name;
    # any case is refused here, to be safe).
    return {key.lower() for key, _ in parse_qsl(query, keep_blank_values=True)}


def _check_fleet(
    fleet: FleetSettings, idp: IdPSettings
) -> list[ConfigProblem]:
    if fleet.backend == "none":
        return []
    problems = _check_redis(fleet)
    if fleet.lease_seconds <= idp.timeout_seconds:
        problems.append(
            ConfigProblem(
                "fleet.lease_seconds",
                f"must be more than idp.timeout_seconds "
                f"({idp.timeout_seconds:g}), so a lock outlives the request "
                "it guards",
            )
        )

    return problems


def _check_redis(fleet: FleetSettings) -> list[ConfigProblem]:
    # What connecting to Redis needs: for the sidecar and for 'quota'.
    try:
        parts = urlsplit(fleet.redis_url)
        if parts.scheme != "unix":
            parts.port  # noqa: B018 -- raises for a port out of range
    except ValueError as exc:
        return [
            ConfigProblem(
                "fleet.redis_url",
                f"is not a valid URL ({exc}); e.g. "
                "rediss://redis.example:6380/0",
            )
        ]
    problems = []
    if parts.scheme not in ("redis", "rediss", "unix"):
        problems.append(
            ConfigProblem(
                "fleet.redis_url",
                "must be a redis://, rediss:// or unix:// URL, e.g. "
                "rediss://redis.example:6380/0",
            )
        )
    elif parts.password is not None or "password" in _query_keys(parts.query):
        problems.append(
            ConfigProblem(
                "fleet.redis_url",
                "must not carry a password (it would show in logs and "
                "process lists); put it in fleet.redis_password_file",
            )
        )
    if fleet.redis_password_file is not None:
        problems.extend(
            _check_readable(
                "fleet.redis_password_file", fleet.redis_password_file
            )
        )

    return problems


def _check_readable(key: str, path: Path) -> list[ConfigProblem]:
    try:
        content = read_secret_file(path)
    except OSError as exc:
        return [
            ConfigProblem(key, f"cannot read {str(path)!r} ({exc.strerror})")
        ]
    except ValueError as exc:
        return [ConfigProblem(key, str(exc))]
    if not content.strip():
        return [ConfigProblem(key, f"{str(path)!r} is empty")]

    return []


def _check_listen(
    listen: ListenSettings, ops: OpsSettings
) -> list[ConfigProblem]:
    problems = []
    if not listen.allow_remote and not is_loopback_host(listen.host):
        problems.append(
            ConfigProblem(
                "listen.host",
                f"{listen.host!r} is not a loopback address; the token "
                "would be open to the network. Use 127.0.0.1 or set "
                "listen.allow_remote = true if you really mean it",
            )
        )
    if not listen.tcp and listen.unix_socket is None:
        problems.append(
            ConfigProblem(
                "listen.tcp",
                "with tcp = false, set listen.unix_socket; there is "
                "nothing else to serve on",
            )
        )
    if listen.socket_group is not None:
        problems.extend(
            _check_names("listen.socket_group", [listen.socket_group], "group")
        )
    wildcard = {"0.0.0.0", "::", ""}  # noqa: S104 -- compared, not bound
    if (
        ops.enabled
        and ops.port == listen.port != 0
        and (ops.host == listen.host or {ops.host, listen.host} & wildcard)
    ):
        problems.append(
            ConfigProblem(
                "ops.port", "must differ from listen.port on the same host"
            )
        )

    return problems


def _check_retry(retry: RetrySettings) -> list[ConfigProblem]:
    problems = []
    pairs = [
        ("backoff_initial_seconds", "backoff_max_seconds"),
        ("rejected_backoff_initial_seconds", "rejected_backoff_max_seconds"),
    ]
    for initial, cap in pairs:
        if getattr(retry, initial) > getattr(retry, cap):
            problems.append(
                ConfigProblem(
                    f"retry.{initial}", f"must not exceed retry.{cap}"
                )
            )

    return problems


def _check_state_paths(
    cache: CacheSettings, quota: QuotaSettings, sink: SinkSettings
) -> list[ConfigProblem]:
    # One file for two purposes: each write would wipe the other's data
    # (a sink over the cache costs a request per restart; the cache over
    # the ledger turns the budget off).
    paths = {
        "cache.path": cache.resolved_path(),
        "quota.ledger_path": quota.resolved_ledger_path(),
        "sink.path": Path(sink.path) if sink.path else None,
    }
    seen: dict[Path, str] = {}
    problems = []
    for key, given in paths.items():
        if given is None:
            continue
        # Spelt two ways ("a/../a/x", a relative path, a symlinked
        # directory), one file is still one file.
        path = Path(os.path.realpath(given))
        if path in seen:
            problems.append(
                ConfigProblem(
                    key, f"is the same file as {seen[path]}; give each its own"
                )
            )
        seen.setdefault(path, key)

    return problems


def _check_refresh(refresh: RefreshSettings) -> list[ConfigProblem]:
    if refresh.jitter >= refresh.refresh_at:
        return [
            ConfigProblem(
                "refresh.jitter",
                "must be smaller than refresh.refresh_at, or the refresh "
                "could fall before the token was issued",
            )
        ]

    return []


def resolve_id(name: int | str, kind: Literal["user", "group"]) -> int:
    """
    The numeric id of a user or group given by id or name.

    Raises `KeyError` for an unknown name.
    """
    if isinstance(name, int):
        return name
    if name.isascii() and name.isdigit():
        return int(name)
    if kind == "user":
        return pwd.getpwnam(name).pw_uid

    return grp.getgrnam(name).gr_gid


def _check_access(access: AccessSettings) -> list[ConfigProblem]:
    problems = [
        *_check_names("access.allow_uids", access.allow_uids, "user"),
        *_check_names("access.allow_gids", access.allow_gids, "group"),
    ]
    if access.client_token_file is not None:
        problems.extend(
            _check_readable(
                "access.client_token_file", access.client_token_file
            )
        )

    return problems


def _check_sink(sink: SinkSettings) -> list[ConfigProblem]:
    problems = []
    owners: list[tuple[str, int | str, Literal["user", "group"]]] = [
        ("sink.group", sink.group, "group"),
        ("sink.wlcg_uid", sink.wlcg_uid, "user"),
    ]
    for key, name, kind in owners:
        if name == "":
            continue
        if isinstance(name, int) and name < 0:
            # chown takes -1 as "leave as is": never what was meant.
            problems.append(
                ConfigProblem(
                    key, f"{kind} id {name} is negative; use 0 or more"
                )
            )
        else:
            problems.extend(_check_names(key, [name], kind))
    if sink.group != "" and not sink.path:
        problems.append(
            ConfigProblem(
                "sink.group",
                "is ignored without sink.path; set sink.path or remove it",
            )
        )

    return problems


def _check_names(
    key: str, names: list[int | str], kind: Literal["user", "group"]
) -> list[ConfigProblem]:
    problems = []
    for name in names:
        try:
            resolve_id(name, kind)
        except KeyError:
            problems.append(
                ConfigProblem(
                    key,
                    f"no {kind} named {name!r} on this host; use a "
                    "numeric id or an existing name",
                )
            )

    return problems
