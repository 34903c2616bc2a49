"""
Reading the settings: the TOML file, overridden by ``SIDECAR_*``
variables, validated table by table.

Every problem is reported as a `ConfigProblem` naming its key and what to
do, all at once, so an operator fixes a config in one round.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_settings import EnvSettingsSource, SettingsError

from sidecar.config import (
    CONFIG_PATH_VARIABLE,
    ENV_PREFIX,
    SECTIONS,
    FleetSettings,
    IdPSettings,
    ListenSettings,
    OpsSettings,
    QuotaSettings,
    SectionT,
    Settings,
)
from sidecar.configrules import check_redis, check_sections
from sidecar.errors import ConfigError, ConfigProblem

_TABLES = ", ".join(f"[{name}]" for name in SECTIONS)


def load_settings(path: Path | None = None) -> Settings:
    """
    Read the config file (if any) and the environment, and validate both.

    ``path`` defaults to ``$SIDECAR_CONFIG``; ``SIDECAR_*`` variables win
    over the file. Raises `ConfigError` with one problem per bad key.
    """
    return settings_from_dict(_file_and_environment(path))


def _file_and_environment(path: Path | None) -> dict[str, Any]:
    # The config file (``path``, else $SIDECAR_CONFIG, else none) with
    # the SIDECAR_* variables over it: the raw tables every loader reads.
    if path is None and os.environ.get(CONFIG_PATH_VARIABLE):
        path = Path(os.environ[CONFIG_PATH_VARIABLE])
    data = _read_toml(path) if path is not None else {}
    environment = _environment()

    return _merged(_without_replaced_secret(data, environment), environment)


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
    return _table(_file_and_environment(path), "listen", ListenSettings)


def load_ops_settings(path: Path | None = None) -> OpsSettings:
    """
    Read only the ``[ops]`` table, from the file and the environment.

    For ``token-sidecar health``, which a container runtime calls often
    and which needs neither the secret nor the IdP. Raises `ConfigError`.
    """
    return _table(_file_and_environment(path), "ops", OpsSettings)


def load_quota_view(path: Path | None = None) -> QuotaView:
    """
    Read what ``token-sidecar quota`` needs: ``[quota]``, ``[fleet]``
    and, in fleet mode, ``[idp]`` (which names the fleet's count), but
    not the secret, so an operator may read the count while the sidecar
    is stopped and its credential gone. Raises `ConfigError`.
    """
    raw = _file_and_environment(path)
    fleet = _table(raw, "fleet", FleetSettings)
    idp = None
    if fleet.backend == "redis":
        if problems := check_redis(fleet):
            raise ConfigError(problems)
        idp = _table(raw, "idp", IdPSettings)

    return QuotaView(_table(raw, "quota", QuotaSettings), fleet, idp)


@dataclass(frozen=True)
class QuotaView:
    """
    The settings ``token-sidecar quota`` reads.
    """

    quota: QuotaSettings
    fleet: FleetSettings
    #: Set in fleet mode only.
    idp: IdPSettings | None


def _table(
    tables: dict[str, Any], name: str, model: type[SectionT]
) -> SectionT:
    # One table validated alone: the commands that need only it need not
    # be able to read the rest (the secret above all).
    raw = tables.get(name, {})
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
        for problem in check_sections({**sections, **salvaged})
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
