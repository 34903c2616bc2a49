"""
Tests for the container image: the Dockerfile is linted and held to its
promises, and, with no Docker engine needed, the image's build and run
steps are replayed in a fresh virtual environment as the image runs them.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from sidecar import __version__
from tests.conftest import METADATA
from tests.fakes import FakeIdP, free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
TOOLS = Path(sys.executable).parent
DEADLINE_SECONDS = 30.0
POLL_INTERVAL_SECONDS = 0.1
# The image's paths, and what stands in for them here.
IMAGE_VENV = "/opt/token-sidecar"
IMAGE_CONFIG_DIRECTORY = "/etc/token-sidecar"
IMAGE_RUNTIME_DIRECTORY = "/run/token-sidecar"


@dataclass(frozen=True)
class Instruction:
    """
    One Dockerfile instruction: its keyword and the rest of the line.
    """

    keyword: str
    arguments: str

    def exec_form(self) -> list[str]:
        """
        The arguments as a JSON array; fail if they are in shell form.
        """
        words = json.loads(self.arguments)
        assert isinstance(words, list), self

        return [str(word) for word in words]


def parse_dockerfile(text: str) -> list[list[Instruction]]:
    """
    Split a Dockerfile into build stages of instructions, joining
    continued lines and dropping comments.
    """
    stages: list[list[Instruction]] = [[]]
    logical = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        logical += line.rstrip().removesuffix("\\") + " "
        if line.rstrip().endswith("\\"):
            continue
        if logical.strip():
            keyword, _, arguments = logical.strip().partition(" ")
            if keyword.upper() == "FROM" and stages[-1]:
                stages.append([])
            stages[-1].append(Instruction(keyword.upper(), arguments.strip()))
        logical = ""

    return stages


def only(stage: list[Instruction], keyword: str) -> Instruction:
    """
    The one ``keyword`` instruction of ``stage``.
    """
    found = [i for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"{keyword}: {found}"

    return found[0]


def build_arguments(text: str) -> dict[str, str]:
    """
    The defaults of the global ARGs, before the first FROM.
    """
    defaults = {}
    for instruction in parse_dockerfile(text)[0]:
        if instruction.keyword == "FROM":
            break
        if instruction.keyword == "ARG":
            name, _, value = instruction.arguments.partition("=")
            defaults[name] = value

    return defaults


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    """
    Lint ``path`` with hadolint; warnings fail, as in CI.
    """
    return subprocess.run(
        [
            str(TOOLS / "hadolint"),
            "--no-color",
            "--failure-threshold",
            "warning",
            path,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class TestDockerfile:
    """
    The Dockerfile passes hadolint and keeps the promises the README makes.
    """

    def test_passes_hadolint(self) -> None:
        """
        hadolint finds nothing at warning level or above.
        """
        result = hadolint(DOCKERFILE)

        assert result.returncode == 0, result.stdout + result.stderr

    def test_hadolint_catches_a_broken_copy(self, tmp_path: Path) -> None:
        """
        A copy that ends as root and installs unpinned packages fails.
        """
        broken = tmp_path / "Dockerfile"
        broken.write_text(
            DOCKERFILE.read_text().replace("USER 10001:10001", "USER root")
            + "RUN apt-get update && apt-get install -y curl\n"
        )

        result = hadolint(broken)

        assert result.returncode != 0
        assert "DL3002" in result.stdout  # the last USER is root
        assert "DL3008" in result.stdout  # apt packages not pinned

    def test_base_image_is_pinned_to_a_patch_release(self) -> None:
        """
        Both stages start from the same slim Python image, pinned to x.y.z.
        """
        text = DOCKERFILE.read_text()
        base = build_arguments(text)["PYTHON_IMAGE"]
        stages = parse_dockerfile(text)[1:]

        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base)
        assert len(stages) == 2
        for stage in stages:
            assert stage[0].arguments.split()[0] == "${PYTHON_IMAGE}"

    def test_runs_as_a_numeric_non_root_user(self) -> None:
        """
        The final stage switches to a numeric uid:gid that is not root.
        """
        final = parse_dockerfile(DOCKERFILE.read_text())[-1]

        uid, _, gid = only(final, "USER").arguments.partition(":")

        assert uid.isdigit() and int(uid) != 0
        assert gid.isdigit() and int(gid) != 0

    def test_run_time_commands_need_no_shell(self) -> None:
        """
        ENTRYPOINT, CMD and HEALTHCHECK are JSON exec form, not shell form.
        """
        final = parse_dockerfile(DOCKERFILE.read_text())[-1]

        entrypoint = only(final, "ENTRYPOINT").exec_form()
        command = only(final, "CMD").exec_form()
        health = only(final, "HEALTHCHECK").arguments

        assert entrypoint == ["token-sidecar"]
        assert command == ["run"]
        health_command = health[health.index("CMD ") + 4 :]
        assert json.loads(health_command)[0] == "token-sidecar"

    def test_states_its_stop_signal_and_labels(self) -> None:
        """
        STOPSIGNAL is SIGTERM and the OCI labels carry this version.
        """
        final = parse_dockerfile(DOCKERFILE.read_text())[-1]
        labels = " ".join(i.arguments for i in final if i.keyword == "LABEL")
        version = only(final, "ARG").arguments

        assert only(final, "STOPSIGNAL").arguments == "SIGTERM"
        for name in ("title", "description", "version", "licenses"):
            assert f"org.opencontainers.image.{name}=" in labels
        assert version == f"VERSION={__version__}"

    def test_only_the_ops_port_is_exposed(self) -> None:
        """
        EXPOSE names the ops port alone: /token never leaves loopback.
        """
        final = parse_dockerfile(DOCKERFILE.read_text())[-1]

        assert only(final, "EXPOSE").arguments == "9464"

    def test_context_leaves_out_the_work_tree(self) -> None:
        """
        .dockerignore admits what the build copies and nothing else.
        """
        context = build_context_files()

        assert "pyproject.toml" in context
        assert "sidecar/cli.py" in context
        assert "deploy/image/config.toml" in context
        for kept_out in (".venv/", ".git/", "tests/", "Dockerfile"):
            assert not any(name.startswith(kept_out) for name in context)


def build_context_files() -> set[str]:
    """
    The project files that .dockerignore lets into the build context.

    Handles the forms our .dockerignore uses: patterns, ``**/`` prefixes
    and ``!`` exceptions, the last match winning, as Docker does.
    """
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    admitted = set()
    for name in tracked:
        keep = True
        for rule in rules:
            pattern = rule.removeprefix("!").rstrip("/")
            if _matches(name, pattern):
                keep = rule.startswith("!")
        if keep:
            admitted.add(name)

    return admitted


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("**/"):
        tail = pattern.removeprefix("**/")
        return any(
            fnmatch.fnmatch(part, tail) for part in name.split("/")
        ) or fnmatch.fnmatch(name, tail)
    parts = name.split("/")
    # A pattern naming a directory admits or excludes all beneath it.
    return any(
        fnmatch.fnmatch("/".join(parts[:i]), pattern)
        for i in range(1, len(parts) + 1)
    )


@dataclass(frozen=True)
class ReplayedImage:
    """
    The image's file system, replayed on this host: its venv, config and
    runtime directory, the user it runs as, and its environment.
    """

    root: Path
    venv: Path
    config_directory: Path
    runtime_directory: Path
    uid: int | None
    gid: int | None
    environment: dict[str, str]

    def command(self, words: list[str]) -> list[str]:
        """
        ``words`` as the image runs them: the first found on its PATH.
        """
        found = shutil.which(words[0], path=self.environment["PATH"])
        assert found is not None, words

        return [found, *words[1:]]

    def files(self) -> set[Path]:
        """
        Every file in the replayed image, outside the runtime directory.
        """
        return {
            path
            for path in self.root.rglob("*")
            if path.is_file() and self.runtime_directory not in path.parents
        }


@pytest.fixture(scope="module")
def image() -> Iterator[ReplayedImage]:
    """
    Replay the Dockerfile without an engine: copy the build context as
    .dockerignore admits it, run the build stage's RUN with the image's
    paths mapped into a scratch directory, and lay out the final stage.

    Runs as the image's user when this test runs as root. Uses the
    system Python (3.11, as in the image), which every user can execute.
    """
    text = DOCKERFILE.read_text()
    build, final = parse_dockerfile(text)[1:]
    # Another uid must reach the replay, so not under pytest's 0700 tmp.
    root = Path(tempfile.mkdtemp(prefix="token-sidecar-image-"))
    root.chmod(0o755)
    try:
        context = root / "context"
        for name in build_context_files():
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, context / name)
        venv = root / "venv"
        install = only(build, "RUN").arguments
        install = install.replace(IMAGE_VENV, str(venv))
        install = install.replace("python -m venv", "/usr/bin/python3 -m venv")
        subprocess.run(
            ["bash", "-euc", install],
            cwd=context,
            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
            capture_output=True,
            check=True,
            timeout=600,
        )
        yield _lay_out_final_stage(root, venv, final)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _lay_out_final_stage(
    root: Path, venv: Path, final: list[Instruction]
) -> ReplayedImage:
    config_directory = root / "etc"
    config_directory.mkdir()
    copy = [
        i for i in final if i.keyword == "COPY" and "--from" not in i.arguments
    ]
    for instruction in copy:
        source, target = instruction.arguments.split()
        assert target.startswith(IMAGE_CONFIG_DIRECTORY + "/")
        shutil.copy2(ROOT / source, config_directory / Path(target).name)
    runtime_directory = root / "run"
    runtime_directory.mkdir(mode=0o700)

    uid = gid = None
    if os.geteuid() == 0:
        user, _, group = only(final, "USER").arguments.partition(":")
        uid, gid = int(user), int(group)
        os.chown(runtime_directory, uid, gid)

    mapping = {
        IMAGE_VENV: str(venv),
        IMAGE_CONFIG_DIRECTORY: str(config_directory),
        IMAGE_RUNTIME_DIRECTORY: str(runtime_directory),
        "${PATH}": os.environ["PATH"],
    }
    environment = {"HOME": "/nonexistent", "LANG": "C.UTF-8"}
    for line in re.findall(
        r'(\w+)=("[^"]*"|\S+)', only(final, "ENV").arguments
    ):
        value = line[1].strip('"')
        for image_path, here in mapping.items():
            value = value.replace(image_path, here)
        environment[line[0]] = value

    return ReplayedImage(
        root,
        venv,
        config_directory,
        runtime_directory,
        uid,
        gid,
        environment,
    )


async def run_as_image(
    image: ReplayedImage,
    words: list[str],
    extra: dict[str, str],
) -> asyncio.subprocess.Process:
    """
    Start ``words`` as the image would: its user, environment and WORKDIR.
    """
    return await asyncio.create_subprocess_exec(
        *image.command(words),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=image.runtime_directory,
        env={**image.environment, **extra},
        user=image.uid,
        group=image.gid,
        extra_groups=[] if image.uid is not None else None,
    )


async def poll_healthy(
    image: ReplayedImage,
    health: list[str],
    extra: dict[str, str],
    sidecar: asyncio.subprocess.Process,
) -> None:
    """
    Run the HEALTHCHECK command until it exits 0, as the engine would.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_SECONDS
    while loop.time() < deadline:
        assert sidecar.returncode is None, "the sidecar exited"
        check = await run_as_image(image, health, extra)
        await check.communicate()
        if check.returncode == 0:
            return
        # Polling a condition against a deadline, not timing a wait.
        await asyncio.sleep(POLL_INTERVAL_SECONDS)

    raise AssertionError("the health check never passed")


async def test_image_serves_from_its_own_entrypoint(
    image: ReplayedImage, fake_idp: FakeIdP, token_url: str
) -> None:
    """
    ENTRYPOINT plus CMD start a sidecar that passes the HEALTHCHECK, hands
    its own user the token, refuses another user, stops on STOPSIGNAL
    with exit 0, and writes nothing outside its runtime directory.
    """
    final = parse_dockerfile(DOCKERFILE.read_text())[-1]
    health_line = only(final, "HEALTHCHECK").arguments
    health = json.loads(health_line[health_line.index("CMD ") + 4 :])
    secret = image.root / "client_secret"
    secret.write_text("s3cr3t-client-value-4242")
    secret.chmod(0o400)
    if image.uid is not None:
        os.chown(secret, image.uid, image.gid or 0)
    token_port, ops_port = free_port(), free_port()
    extra = {
        "SIDECAR_IDP__TOKEN_URL": token_url,
        "SIDECAR_IDP__CLIENT_ID": "billing",
        "SIDECAR_IDP__CLIENT_SECRET_FILE": str(secret),
        "SIDECAR_LISTEN__PORT": str(token_port),
        "SIDECAR_OPS__PORT": str(ops_port),
    }
    before = image.files()
    words = (
        only(final, "ENTRYPOINT").exec_form() + only(final, "CMD").exec_form()
    )

    sidecar = await run_as_image(image, words, extra)
    try:
        await poll_healthy(image, health, extra, sidecar)
        ready = await run_as_image(image, [*health, "--ready"], extra)
        await ready.communicate()
        token = await run_as_image(image, ["token-sidecar", "token"], extra)
        token_out, _ = await token.communicate()
        async with aiohttp.ClientSession() as session:
            other_user = await session.get(
                f"http://127.0.0.1:{token_port}/token", headers=METADATA
            )
    finally:
        sidecar.terminate()  # STOPSIGNAL is SIGTERM, checked above
        _, stderr = await asyncio.wait_for(
            sidecar.communicate(), DEADLINE_SECONDS
        )

    assert sidecar.returncode == 0, stderr.decode()
    assert ready.returncode == 0
    assert token.returncode == 0
    assert token_out.decode().strip() == fake_idp.issued[0]
    if image.uid is not None:
        assert other_user.status == 403
    assert fake_idp.count == 1
    assert image.files() == before
    assert any(image.runtime_directory.iterdir())
    for line in stderr.decode().splitlines():
        assert json.loads(line)["event"]
        assert fake_idp.issued[0] not in line
        assert "s3cr3t" not in line


def test_image_config_is_valid(image: ReplayedImage, tmp_path: Path) -> None:
    """
    The config baked into the image passes check-config --strict once the
    IdP is named in the environment, as the README tells users to do.
    """
    secret = tmp_path / "client_secret"
    secret.write_text("not-a-real-secret")
    secret.chmod(0o600)
    extra = {
        "SIDECAR_IDP__TOKEN_URL": "https://auth.example.com/oauth/token",
        "SIDECAR_IDP__CLIENT_ID": "my-service",
        "SIDECAR_IDP__CLIENT_SECRET_FILE": str(secret),
    }

    result = subprocess.run(
        image.command(["token-sidecar", "check-config", "--strict"]),
        env={**image.environment, **extra},
        cwd=image.root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert 'host = "0.0.0.0"' in result.stdout
