"""
The sidecar's settings: one model per table of the config file, with
each key's type, default and description.

`sidecar.configload` reads them from the file and the ``SIDECAR_*``
variables; `sidecar.configrules` checks the rules that span keys.
"""

from __future__ import annotations

import grp
import ipaddress
import json
import os
import pwd
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    SettingsConfigDict,
)

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


SectionT = TypeVar("SectionT", bound=_Section)


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
