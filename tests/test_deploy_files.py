"""
Every file under deploy/ is checked: by kind here (TOML keys, YAML, shell,
Markdown links), and by the deployment's own test module for what only a
real tool can judge (kubernetes-validate, the compose schema,
systemd-analyze). A file of a kind nobody checks fails the build.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from sidecar.config import SECTIONS

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"

#: Kinds judged by a deployment's own test module, beyond the checks here.
CHECKED_ELSEWHERE = {
    ".service": "tests/test_deploy_systemd.py (systemd-analyze verify)",
    ".sysusers": "tests/test_deploy_systemd.py (systemd-sysusers)",
}
#: Files that configure tools, not deployments.
UNCHECKED_NAMES = {".gitignore"}


def deploy_files() -> list[Path]:
    """
    Every file under deploy/, sorted.
    """
    return sorted(path for path in DEPLOY.rglob("*") if path.is_file())


def relative(path: Path) -> str:
    """
    ``path`` relative to the project, for test ids and messages.
    """
    return str(path.relative_to(ROOT))


def unknown_keys(path: Path) -> list[str]:
    """
    The tables and keys of a config file that the settings model lacks.
    """
    data = tomllib.loads(path.read_text())
    unknown = []
    for table, values in data.items():
        model = SECTIONS.get(table)
        if model is None or not isinstance(values, dict):
            unknown.append(f"[{table}]")
            continue
        unknown += [
            f"{table}.{key}" for key in values if key not in model.model_fields
        ]

    return unknown


def broken_links(path: Path) -> list[str]:
    """
    The relative links of a Markdown file that name no existing file.
    """
    targets = re.findall(r"\]\(([^)\s]+)\)", path.read_text())

    return [
        target
        for target in targets
        if "://" not in target
        and not target.startswith("#")
        and not (path.parent / target.split("#")[0]).exists()
    ]


@pytest.mark.parametrize("path", deploy_files(), ids=relative)
def test_file_passes_the_check_of_its_kind(path: Path) -> None:
    """
    Each file parses and says only what the sidecar understands.
    """
    suffix = path.suffix

    if path.name in UNCHECKED_NAMES or suffix in CHECKED_ELSEWHERE:
        return
    if suffix == ".toml":
        assert unknown_keys(path) == []
    elif suffix in (".yaml", ".yml"):
        documents = list(yaml.safe_load_all(path.read_text()))
        assert documents and all(isinstance(d, dict) for d in documents)
    elif suffix == ".sh":
        result = subprocess.run(
            ["sh", "-n", path], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr
    elif suffix == ".md":
        assert broken_links(path) == []
    else:
        pytest.fail(
            f"{relative(path)}: no check covers {suffix or path.name!r} "
            "files; add one here or in the deployment's test module"
        )


def test_a_misspelled_key_is_found(tmp_path: Path) -> None:
    """
    The TOML check names a key the model does not have.
    """
    config = tmp_path / "config.toml"
    config.write_text("[listen]\nhots = '127.0.0.1'\n[fleeet]\n")

    assert unknown_keys(config) == ["listen.hots", "[fleeet]"]


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    """
    The Markdown check names a relative link to a missing file.
    """
    guide = tmp_path / "README.md"
    guide.write_text("[unit](unit.service) and [site](https://x.test/)\n")

    assert broken_links(guide) == ["unit.service"]


def test_every_kind_in_deploy_is_known() -> None:
    """
    deploy/ holds only kinds that some check covers.
    """
    known = {".toml", ".yaml", ".yml", ".sh", ".md", *CHECKED_ELSEWHERE}

    strays = [
        relative(path)
        for path in deploy_files()
        if path.suffix not in known and path.name not in UNCHECKED_NAMES
    ]

    assert strays == []
