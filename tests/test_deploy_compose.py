"""
Tests for deploy/compose: compose.yaml passes the Compose Specification's
schema, and keeps the client on the sidecar's loopback with a locked-down
sidecar and a file secret.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.tools import check_config_strict

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "deploy" / "compose"
COMPOSE_FILE = COMPOSE / "compose.yaml"
CONFIG_FILE = COMPOSE / "config.toml"
VALIDATOR = Path(sys.executable).parent / "check-jsonschema"

SIDECAR = "token-sidecar"
CLIENT = "client"
RUNTIME_DIRECTORY = "/run/token-sidecar"

#: Generous: bounds a hung tool, measures nothing.
COMMAND_TIMEOUT_SECONDS = 60.0

Document = dict[str, Any]


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    """
    Check ``path`` against the Compose Specification's JSON schema.
    """
    return subprocess.run(
        [
            *(str(VALIDATOR), "--builtin-schema", "vendor.compose-spec"),
            str(path),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )


@pytest.fixture
def compose() -> Document:
    """
    compose.yaml, parsed.
    """
    document: Document = yaml.safe_load(COMPOSE_FILE.read_text())

    return document


@pytest.fixture
def config() -> Document:
    """
    The sidecar's config.toml, parsed.
    """
    return tomllib.loads(CONFIG_FILE.read_text())


def container_path(service: Document, host_path: Path) -> str:
    """
    Where ``service`` mounts ``host_path`` (a short-syntax bind).
    """
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if (COMPOSE / source).resolve() == host_path.resolve():
            return str(target)

    raise AssertionError(f"{host_path.name} is not mounted")


def test_compose_file_passes_the_schema() -> None:
    """
    compose.yaml validates against the Compose Specification.
    """
    result = validate(COMPOSE_FILE)

    assert result.returncode == 0, result.stdout + result.stderr


def test_validator_rejects_a_misspelled_field(tmp_path: Path) -> None:
    """
    The schema check fails a service with a misspelled attribute.
    """
    broken = tmp_path / "compose.yaml"
    broken.write_text(
        COMPOSE_FILE.read_text().replace("read_only:", "readonly:")
    )

    result = validate(broken)

    assert result.returncode != 0
    assert "readonly" in result.stdout


def test_validator_rejects_an_invalid_value(tmp_path: Path) -> None:
    """
    The schema check fails a depends_on condition compose does not know.
    """
    broken = tmp_path / "compose.yaml"
    broken.write_text(
        COMPOSE_FILE.read_text().replace("service_healthy", "service_ready")
    )

    result = validate(broken)

    assert result.returncode != 0
    assert "service_ready" in result.stdout


def test_client_shares_the_sidecars_loopback(compose: Document) -> None:
    """
    The client joins the sidecar's network namespace, starts once the
    sidecar is healthy, and nothing publishes the /token port.
    """
    client = compose["services"][CLIENT]
    published = [
        str(port)
        for service in compose["services"].values()
        for port in service.get("ports", [])
    ]

    assert client["network_mode"] == f"service:{SIDECAR}"
    assert client["depends_on"][SIDECAR]["condition"] == "service_healthy"
    assert not any("8787" in port for port in published)


@pytest.mark.parametrize("name", [SIDECAR, CLIENT])
def test_services_are_locked_down(compose: Document, name: str) -> None:
    """
    Each service runs as a fixed non-root uid with a read-only root, no
    capabilities and no privilege gain.
    """
    service = compose["services"][name]
    uid, gid = (int(part) for part in service["user"].split(":"))

    assert service["read_only"] is True
    assert service["cap_drop"] == ["ALL"]
    assert "cap_add" not in service
    assert "no-new-privileges:true" in service["security_opt"]
    assert not service.get("privileged", False)
    assert uid > 0
    assert gid > 0


def test_sidecar_state_and_health(compose: Document) -> None:
    """
    The sidecar keeps its state on a tmpfs it owns, and its health check
    is token-sidecar health.
    """
    sidecar = compose["services"][SIDECAR]
    uid, gid = sidecar["user"].split(":")
    (tmpfs,) = [
        t for t in sidecar["tmpfs"] if t.split(":")[0] == RUNTIME_DIRECTORY
    ]
    options = dict(
        option.split("=") for option in tmpfs.split(":", 1)[1].split(",")
    )

    assert options["uid"] == uid
    assert options["gid"] == gid
    assert options["mode"] == "0700"
    assert sidecar["healthcheck"]["test"][:3] == ["CMD", SIDECAR, "health"]


def test_secret_comes_from_a_file(compose: Document, config: Document) -> None:
    """
    The client secret is a file-based compose secret, mounted where the
    config's client_secret_file points, and kept out of git.
    """
    (entry,) = compose["services"][SIDECAR]["secrets"]
    secret = compose["secrets"][entry["source"]]
    ignored = (COMPOSE / ".gitignore").read_text().splitlines()

    assert set(secret) == {"file"}
    assert config["idp"]["client_secret_file"] == (
        f"/run/secrets/{entry['target']}"
    )
    assert f"/{Path(secret['file']).name}" in ignored
    assert "secrets" not in compose["services"][CLIENT]


def test_config_fits_the_services(compose: Document, config: Document) -> None:
    """
    The sidecar reads config.toml from the image's SIDECAR_CONFIG path,
    serves /token on loopback and lets the client's uid take it.
    """
    sidecar = compose["services"][SIDECAR]
    client_uid = int(compose["services"][CLIENT]["user"].split(":")[0])
    sidecar_uid = int(sidecar["user"].split(":")[0])

    assert container_path(sidecar, CONFIG_FILE) == (
        "/etc/token-sidecar/config.toml"
    )
    assert config["listen"]["host"] == "127.0.0.1"
    assert client_uid in config["access"]["allow_uids"]
    assert client_uid != sidecar_uid


def test_config_passes_check_config(tmp_path: Path) -> None:
    """
    token-sidecar check-config --strict accepts config.toml.
    """
    result = check_config_strict(CONFIG_FILE, tmp_path)

    assert result.returncode == 0, result.stderr
