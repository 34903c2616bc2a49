"""
The rules that span keys (a secret for the auth method, ports that
differ, state files that do not overlap, ...), checked once each table
has validated on its own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from sidecar.config import (
    AccessSettings,
    CacheSettings,
    FleetSettings,
    IdPSettings,
    ListenSettings,
    OpsSettings,
    QuotaSettings,
    RefreshSettings,
    RetrySettings,
    SinkSettings,
    is_loopback_host,
    resolve_id,
)
from sidecar.errors import ConfigProblem
from sidecar.files import read_secret_file


def check_sections(sections: dict[str, Any]) -> list[ConfigProblem]:
    """
    The problems of every rule whose tables are in ``sections`` (the
    tables that validated, by name).
    """
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
    problems = check_redis(fleet)
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


def check_redis(fleet: FleetSettings) -> list[ConfigProblem]:
    """
    What connecting to Redis needs: a redis URL without a password, a
    readable password file. For the sidecar and for ``quota``.
    """
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
