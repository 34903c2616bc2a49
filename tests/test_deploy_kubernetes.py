"""
Tests for deploy/kubernetes: each kustomization renders (where kubectl or
kustomize is installed), every document passes the Kubernetes API schemas
strictly, and the pod keeps the security properties no schema can express.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.tools import check_config_strict

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
OVERLAY = KUBERNETES / "overlays" / "example"
VALIDATOR = Path(sys.executable).parent / "kubernetes-validate"

#: Native sidecars (init containers with restartPolicy Always) are on by
#: default from 1.29 and generally available from 1.33.
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")
#: Custom resources, for which kubernetes-validate has no schema.
SCHEMALESS_KINDS = frozenset({"ServiceMonitor"})

SIDECAR = "token-sidecar"
OPS_PORT = 9464
TOKEN_PORT = 8787
#: VmRSS measured with a token held and idle, and with 4,000 connections
#: open (near the listen.max_connections cap); see deployment.yaml.
MEASURED_IDLE_RSS_BYTES = 62 * 2**20
MEASURED_PEAK_RSS_BYTES = 124 * 2**20

#: The securityContext every container has, its own or inherited.
REQUIRED_CONTEXT = {
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}

#: Generous: bounds a hung tool, measures nothing.
COMMAND_TIMEOUT_SECONDS = 60.0

Document = dict[str, Any]


def kustomize_command() -> list[str] | None:
    """
    The command that renders a kustomization directory, or None.
    """
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]

    return None


def run_kustomize(directory: Path) -> subprocess.CompletedProcess[str]:
    """
    Render ``directory``; skip the calling test when no renderer exists.
    """
    command = kustomize_command()
    if command is None:
        pytest.skip(
            "neither kubectl nor kustomize is installed; the plain files "
            "are still validated"
        )

    return subprocess.run(
        [*command, str(directory)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )


def render(directory: Path) -> list[Document]:
    """
    The documents ``directory``'s kustomization renders to.
    """
    result = run_kustomize(directory)
    assert result.returncode == 0, result.stderr

    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def validate(paths: Sequence[Path]) -> list[str]:
    """
    Validate YAML files with kubernetes-validate in strict mode.

    Returns its complaints, empty when every document passes. A kind it
    has no schema for is only a warning to it (exit 0), so such warnings
    count here, except for the known custom resources.
    """
    versions = [arg for v in KUBERNETES_VERSIONS for arg in ("-k", v)]
    result = subprocess.run(
        [str(VALIDATOR), "--strict", "--quiet", *versions, *map(str, paths)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )
    problems = [
        line
        for line in result.stdout.splitlines()
        if line.startswith(("ERROR", "FATAL"))
        or (line.startswith("WARN") and not _names_schemaless_kind(line))
    ]
    if result.returncode != 0 and not problems:
        problems.append(f"exit {result.returncode}: {result.stderr.strip()}")

    return problems


def _names_schemaless_kind(warning: str) -> bool:
    return any(f" kind {kind} " in warning for kind in SCHEMALESS_KINDS)


def write_documents(path: Path, documents: Sequence[Document]) -> Path:
    """
    Write ``documents`` to ``path`` as one multi-document YAML file.
    """
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))

    return path


def kustomization_files() -> list[Path]:
    """
    Every kustomization.yaml under deploy/kubernetes.
    """
    return sorted(KUBERNETES.rglob("kustomization.yaml"))


def load_yaml(path: Path) -> Any:
    """
    The single YAML document in ``path``.
    """
    return yaml.safe_load(path.read_text())


def plain_resources() -> list[Path]:
    """
    The files listed under ``resources:`` of every kustomization.

    Directories listed there are kustomizations of their own, whose files
    are collected when their turn comes.
    """
    files = []
    for kustomization in kustomization_files():
        for entry in load_yaml(kustomization).get("resources", []):
            path = (kustomization.parent / entry).resolve()
            if path.is_file():
                files.append(path)

    return files


def component_documents(name: str) -> list[Document]:
    """
    The documents a component lists under ``resources:``, as written.
    """
    directory = KUBERNETES / "components" / name
    spec = load_yaml(directory / "kustomization.yaml")

    return [load_yaml(directory / entry) for entry in spec["resources"]]


def kind_of(documents: Sequence[Document], kind: str) -> list[Document]:
    """
    The documents of one kind.
    """
    return [doc for doc in documents if doc["kind"] == kind]


def only(documents: Sequence[Document], kind: str) -> Document:
    """
    The one document of ``kind``; fails unless there is exactly one.
    """
    matching = kind_of(documents, kind)
    assert len(matching) == 1, f"{len(matching)} documents of kind {kind}"

    return matching[0]


@dataclass(frozen=True)
class Example:
    """
    The example Deployment as it would be applied, with the sidecar config
    it mounts.
    """

    deployment: Document
    config_text: str

    @property
    def pod(self) -> Document:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def config(self) -> dict[str, Any]:
        return tomllib.loads(self.config_text)


def plain_example() -> Example:
    """
    The base Deployment and config.toml, as written.
    """
    return Example(
        load_yaml(BASE / "deployment.yaml"),
        (BASE / "config.toml").read_text(),
    )


def rendered_example(directory: Path) -> Example:
    """
    The Deployment and its ConfigMap's config.toml as kustomize renders
    ``directory``.
    """
    documents = render(directory)
    deployment = only(documents, "Deployment")
    config_maps = {
        doc["metadata"]["name"]: doc for doc in kind_of(documents, "ConfigMap")
    }
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    (name,) = [v["configMap"]["name"] for v in volumes if "configMap" in v]

    return Example(deployment, config_maps[name]["data"]["config.toml"])


EXAMPLES: dict[str, Callable[[], Example]] = {
    "plain-base": plain_example,
    "rendered-base": lambda: rendered_example(BASE),
    "rendered-overlay": lambda: rendered_example(OVERLAY),
}


@pytest.fixture(params=sorted(EXAMPLES))
def example(request: pytest.FixtureRequest) -> Example:
    """
    Each form of the example: plain always, rendered with kustomize.
    """
    return EXAMPLES[request.param]()


def all_containers(pod: Document) -> list[Document]:
    """
    The pod's init containers, then its containers.
    """
    return [*pod.get("initContainers", []), *pod["containers"]]


def sidecar_of(pod: Document) -> Document:
    """
    The token-sidecar init container.
    """
    (sidecar,) = [
        c for c in pod.get("initContainers", []) if c["name"] == SIDECAR
    ]

    return sidecar


def app_of(pod: Document) -> Document:
    """
    The example app, the one regular container.
    """
    (app,) = pod["containers"]

    return app


def effective_context(pod: Document, container: Document) -> Document:
    """
    The container's securityContext over the pod's, for the keys both
    have.
    """
    shared = ("runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile")
    pod_context = pod.get("securityContext", {})
    context = dict(container.get("securityContext", {}))
    for key in shared:
        if key not in context and key in pod_context:
            context[key] = pod_context[key]

    return context


def security_problems(deployment: Document) -> list[str]:
    """
    What in the pod runs with more rights than it needs.
    """
    pod = deployment["spec"]["template"]["spec"]
    problems = []
    if pod.get("automountServiceAccountToken") is not False:
        problems.append("pod: automountServiceAccountToken is not false")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            problems.append(f"pod: {key} is set")
    for container in all_containers(pod):
        name = container["name"]
        context = effective_context(pod, container)
        problems += [
            f"{name}: securityContext.{key} is not {wanted}"
            for key, wanted in REQUIRED_CONTEXT.items()
            if context.get(key) != wanted
        ]
        problems += [
            f"{name}: securityContext.{key} is not a non-root id"
            for key in ("runAsUser", "runAsGroup")
            if not _is_id(context.get(key))
        ]
        if context.get("privileged"):
            problems.append(f"{name}: privileged")

    return problems


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def probe_port(container: Document, probe: Document) -> int:
    """
    The TCP port an httpGet probe targets, its name resolved.
    """
    port = probe["httpGet"]["port"]
    if isinstance(port, int):
        return port
    (number,) = [
        p["containerPort"] for p in container["ports"] if p["name"] == port
    ]

    return int(number)


def sidecar_problems(deployment: Document) -> list[str]:
    """
    What keeps token-sidecar from being a native sidecar that holds the
    app back until a token is ready and is probed on its ops port.
    """
    pod = deployment["spec"]["template"]["spec"]
    names = [c["name"] for c in pod.get("initContainers", [])]
    if SIDECAR not in names:
        return [f"no init container named {SIDECAR}"]
    sidecar = sidecar_of(pod)
    problems = []
    if sidecar.get("restartPolicy") != "Always":
        problems.append("the sidecar's restartPolicy is not Always")
    if SIDECAR in [c["name"] for c in pod["containers"]]:
        problems.append("the sidecar is also a regular container")
    expected = {
        "startupProbe": "/readyz",
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
    }
    for kind, path in expected.items():
        probe = sidecar.get(kind)
        if probe is None or "httpGet" not in probe:
            problems.append(f"no httpGet {kind}")
            continue
        if probe["httpGet"].get("path") != path:
            problems.append(f"{kind} does not ask {path}")
        if probe_port(sidecar, probe) != OPS_PORT:
            problems.append(f"{kind} is not on the ops port {OPS_PORT}")

    return problems


def quantity(value: str | int | float) -> float:
    """
    A Kubernetes resource quantity as a number (cores or bytes).
    """
    text = str(value)
    suffixes = {
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "k": 10**3,
        "M": 10**6,
        "G": 10**9,
        "m": 10**-3,
    }
    for suffix, factor in suffixes.items():
        if text.endswith(suffix):
            return float(text.removesuffix(suffix)) * factor

    return float(text)


def resource_problems(deployment: Document) -> list[str]:
    """
    Which containers lack a CPU or memory request or limit, ask for more
    than their limit, or give the sidecar less memory than measured.
    """
    pod = deployment["spec"]["template"]["spec"]
    problems = []
    for container in all_containers(pod):
        name = container["name"]
        resources = container.get("resources", {})
        requests = resources.get("requests", {})
        limits = resources.get("limits", {})
        for resource in ("cpu", "memory"):
            if resource not in requests or resource not in limits:
                problems.append(f"{name}: {resource} request or limit unset")
            elif quantity(requests[resource]) > quantity(limits[resource]):
                problems.append(f"{name}: {resource} request over its limit")
    if SIDECAR not in [c["name"] for c in pod.get("initContainers", [])]:
        return problems
    limits = sidecar_of(pod).get("resources", {}).get("limits", {})
    requests = sidecar_of(pod).get("resources", {}).get("requests", {})
    if quantity(limits.get("memory", 0)) < MEASURED_PEAK_RSS_BYTES:
        problems.append(f"{SIDECAR}: memory limit under the measured peak")
    if quantity(requests.get("memory", 0)) < MEASURED_IDLE_RSS_BYTES:
        problems.append(f"{SIDECAR}: memory request under the idle RSS")

    return problems


def all_problems(deployment: Document) -> list[str]:
    """
    Every problem the three checks find.
    """
    return [
        *security_problems(deployment),
        *sidecar_problems(deployment),
        *resource_problems(deployment),
    ]


def test_kustomizations_name_existing_files() -> None:
    """
    Every path a kustomization names exists, so the plain files are all
    validated even where no kustomize is installed.
    """
    missing = []
    for kustomization in kustomization_files():
        spec = load_yaml(kustomization)
        names = [
            *spec.get("resources", []),
            *spec.get("components", []),
            *(p["path"] for p in spec.get("patches", []) if "path" in p),
            *(
                f.split("=")[-1]
                for generator in spec.get("configMapGenerator", [])
                for f in generator.get("files", [])
            ),
        ]
        missing += [
            f"{kustomization.relative_to(ROOT)}: {name}"
            for name in names
            if not (kustomization.parent / name).exists()
        ]

    assert missing == []


def test_plain_resources_pass_the_schemas() -> None:
    """
    Every file listed under resources: validates strictly, kustomize or
    not.
    """
    files = plain_resources()

    problems = validate(files)

    assert problems == []
    kinds = {load_yaml(path)["kind"] for path in files}
    assert kinds == {
        "Deployment",
        "NetworkPolicy",
        "Service",
        "ServiceMonitor",
    }


@pytest.mark.parametrize(
    "directory", [BASE, OVERLAY], ids=["base", "overlay-example"]
)
def test_rendering_passes_the_schemas(directory: Path, tmp_path: Path) -> None:
    """
    What kustomize renders validates strictly against the API schemas.
    """
    documents = render(directory)

    problems = validate([write_documents(tmp_path / "out.yaml", documents)])

    assert problems == []
    assert {"ConfigMap", "Deployment"} <= {doc["kind"] for doc in documents}


def test_overlay_patches_the_base() -> None:
    """
    The example overlay moves everything to its namespace and sets the
    image, the IdP, the resources and the NetworkPolicy by patches.
    """
    base = rendered_example(BASE)
    documents = render(OVERLAY)
    overlay = rendered_example(OVERLAY)
    sidecar = sidecar_of(overlay.pod)
    env = {e["name"]: e["value"] for e in sidecar.get("env", [])}
    policy = only(documents, "NetworkPolicy")
    cidrs = [
        peer["ipBlock"]["cidr"]
        for rule in policy["spec"]["egress"]
        for peer in rule["to"]
        if "ipBlock" in peer
    ]

    assert {doc["metadata"].get("namespace") for doc in documents} == {
        "orders"
    }
    assert (
        sidecar["image"] == "registry.example.com/platform/token-sidecar:0.1.0"
    )
    assert sidecar_of(base.pod)["image"] == "token-sidecar:0.1.0"
    assert env["SIDECAR_IDP__TOKEN_URL"].startswith("https://")
    assert "SIDECAR_IDP__CLIENT_ID" in env
    assert sidecar["resources"] != sidecar_of(base.pod)["resources"]
    assert cidrs and "192.0.2.0/24" not in cidrs


def overlay_with(tmp_path: Path, *components: str) -> Path:
    """
    A copy of the example overlay using ``components``, as a user who
    uncomments them would have it.
    """
    copy_dir = tmp_path / "overlay"
    shutil.copytree(OVERLAY, copy_dir)
    spec = load_yaml(copy_dir / "kustomization.yaml")
    spec["resources"] = [os.path.relpath(BASE, copy_dir)]
    spec["components"] = [
        os.path.relpath(KUBERNETES / "components" / name, copy_dir)
        for name in components
    ]
    (copy_dir / "kustomization.yaml").write_text(yaml.safe_dump(spec))

    return copy_dir


def test_prometheus_operator_component_renders_in_the_overlay(
    tmp_path: Path,
) -> None:
    """
    The overlay with the Prometheus Operator component uncommented renders,
    validates, and keeps the Service and ServiceMonitor in its namespace.
    """
    documents = render(
        overlay_with(tmp_path, "network-policy", "prometheus-operator")
    )
    problems = validate([write_documents(tmp_path / "out.yaml", documents)])

    assert problems == []
    monitor = only(documents, "ServiceMonitor")
    service = only(documents, "Service")
    assert monitor["metadata"]["namespace"] == "orders"
    assert service["metadata"]["namespace"] == "orders"


def test_fleet_component_configures_redis_in_the_overlay(
    tmp_path: Path,
) -> None:
    """
    The overlay with the fleet component renders and validates; the
    sidecar gets the [fleet] keys beside the overlay's own variables, its
    Redis password file lies in a Secret mounted as a directory, and
    check-config --strict accepts the result.
    """
    documents = render(overlay_with(tmp_path, "network-policy", "fleet"))
    problems = validate([write_documents(tmp_path / "out.yaml", documents)])
    deployment = only(documents, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    sidecar = sidecar_of(pod)
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    mounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    password_file = Path(env["SIDECAR_FLEET__REDIS_PASSWORD_FILE"])
    mount = mounts[str(password_file.parent)]
    (config_map,) = kind_of(documents, "ConfigMap")
    config = tmp_path / "config.toml"
    config.write_text(config_map["data"]["config.toml"])
    stand_in_password = tmp_path / "redis_password"
    stand_in_password.write_text("redis-pass")
    stand_in_password.chmod(0o600)
    overrides = {
        **{k: v for k, v in env.items() if k.startswith("SIDECAR_")},
        "SIDECAR_FLEET__REDIS_PASSWORD_FILE": str(stand_in_password),
    }

    result = check_config_strict(config, tmp_path, overrides)

    assert problems == []
    assert env["SIDECAR_FLEET__BACKEND"] == "redis"
    assert "SIDECAR_IDP__CLIENT_ID" in env
    assert mount["readOnly"] is True
    assert "subPath" not in mount
    assert volumes[mount["name"]]["secret"]["defaultMode"] == 0o440
    assert result.returncode == 0, result.stderr
    effective = tomllib.loads(result.stdout)
    assert effective["fleet"]["backend"] == "redis"
    assert effective["fleet"]["redis_username"] == "token-sidecar"


def test_service_monitor_scrapes_the_ops_port() -> None:
    """
    The ServiceMonitor (which no schema here covers) selects the Service,
    whose ops port leads to the sidecar's /metrics.
    """
    documents = component_documents("prometheus-operator")
    service = only(documents, "Service")
    monitor = only(documents, "ServiceMonitor")
    pod_labels = plain_example().deployment["spec"]["template"]["metadata"]
    (endpoint,) = monitor["spec"]["endpoints"]
    (port,) = service["spec"]["ports"]
    sidecar = sidecar_of(plain_example().pod)

    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod_labels["labels"].items()
    assert endpoint["port"] == port["name"]
    assert endpoint["path"] == "/metrics"
    assert port["port"] == OPS_PORT
    assert probe_port(sidecar, {"httpGet": {"port": port["targetPort"]}}) == (
        OPS_PORT
    )


def test_network_policy_opens_only_ops_dns_and_https() -> None:
    """
    The NetworkPolicy lets in only the monitoring namespace on the ops
    port, and out only DNS and 443.
    """
    policy = only(component_documents("network-policy"), "NetworkPolicy")[
        "spec"
    ]
    pod_labels = plain_example().deployment["spec"]["template"]["metadata"]
    (ingress,) = policy["ingress"]
    (source,) = ingress["from"]
    egress_ports = {
        (p["protocol"], p["port"])
        for rule in policy["egress"]
        for p in rule["ports"]
    }

    assert policy["podSelector"]["matchLabels"].items() <= (
        pod_labels["labels"].items()
    )
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    assert source["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    assert ingress["ports"] == [{"protocol": "TCP", "port": OPS_PORT}]
    assert egress_ports == {("UDP", 53), ("TCP", 53), ("TCP", 443)}


def test_containers_are_locked_down(example: Example) -> None:
    """
    Every container runs as a fixed non-root uid with a read-only root,
    no capabilities, no privilege escalation and the runtime's seccomp
    profile, and the pod gets no service account token.
    """
    assert security_problems(example.deployment) == []


def test_sidecar_is_a_native_sidecar(example: Example) -> None:
    """
    The sidecar is an init container with restartPolicy Always, started,
    readied on /readyz and kept alive on /healthz of the ops port.
    """
    assert sidecar_problems(example.deployment) == []


def test_resources_are_bounded(example: Example) -> None:
    """
    Every container has CPU and memory requests and limits, and the
    sidecar's memory covers what was measured.
    """
    assert resource_problems(example.deployment) == []


def test_config_matches_the_pod(example: Example) -> None:
    """
    The sidecar's config fits its pod: /token on loopback, ops on the
    probed port of every address, the secret file inside the Secret's
    directory mount, and the app's uid allowed.
    """
    config = example.config
    sidecar = sidecar_of(example.pod)
    app_context = effective_context(example.pod, app_of(example.pod))
    sidecar_context = effective_context(example.pod, sidecar)
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in example.pod["volumes"]}
    (secret_name,) = [n for n, v in volumes.items() if "secret" in v]
    secret_file = Path(config["idp"]["client_secret_file"])
    annotations = example.deployment["spec"]["template"]["metadata"][
        "annotations"
    ]

    assert config["listen"]["host"] == "127.0.0.1"
    assert config["listen"]["port"] == TOKEN_PORT
    assert ipaddress.ip_address(config["ops"]["host"]).is_unspecified
    assert config["ops"]["port"] == OPS_PORT
    assert secret_file.parent == Path(mounts[secret_name]["mountPath"])
    assert "subPath" not in mounts[secret_name]
    assert volumes[secret_name]["secret"]["defaultMode"] == 0o440
    assert app_context["runAsUser"] in config["access"]["allow_uids"]
    assert app_context["runAsUser"] != sidecar_context["runAsUser"]
    assert annotations["prometheus.io/port"] == str(OPS_PORT)
    assert annotations["prometheus.io/scrape"] == "true"


def test_state_lives_in_a_memory_volume(example: Example) -> None:
    """
    The runtime directory, where cache and ledger go, is a memory-backed
    emptyDir mounted only into the sidecar.
    """
    volumes = {v["name"]: v for v in example.pod["volumes"]}
    (mount,) = [
        m
        for m in sidecar_of(example.pod)["volumeMounts"]
        if m["mountPath"] == "/run/token-sidecar"
    ]
    app_mounts = app_of(example.pod).get("volumeMounts", [])

    assert volumes[mount["name"]]["emptyDir"]["medium"] == "Memory"
    assert mount["name"] not in [m["name"] for m in app_mounts]


def test_config_passes_check_config(example: Example, tmp_path: Path) -> None:
    """
    token-sidecar check-config --strict accepts the config with the
    sidecar container's environment, and the overrides take effect.
    """
    config_path = tmp_path / "config.toml"
    config_path.write_text(example.config_text)
    overrides = {
        e["name"]: e["value"]
        for e in sidecar_of(example.pod).get("env", [])
        if e["name"].startswith("SIDECAR_")
    }

    result = check_config_strict(config_path, tmp_path, overrides)

    assert result.returncode == 0, result.stderr
    effective = tomllib.loads(result.stdout)
    for name, value in overrides.items():
        table, key = name.removeprefix("SIDECAR_").lower().split("__")
        assert effective[table][key] == value


def test_validator_rejects_a_misspelled_field(tmp_path: Path) -> None:
    """
    Strict validation fails a Deployment with a misspelled field.
    """
    text = (BASE / "deployment.yaml").read_text()
    broken = tmp_path / "deployment.yaml"
    broken.write_text(
        text.replace("readOnlyRootFilesystem", "readOnlyRootFileSystem")
    )

    problems = validate([broken])

    assert any("readOnlyRootFileSystem" in problem for problem in problems), (
        problems
    )


def test_validator_rejects_a_missing_required_field(tmp_path: Path) -> None:
    """
    Validation fails a Deployment without its required selector.
    """
    deployment = load_yaml(BASE / "deployment.yaml")
    del deployment["spec"]["selector"]
    broken = write_documents(tmp_path / "deployment.yaml", [deployment])

    problems = validate([broken])

    assert any("selector" in problem for problem in problems), problems


def test_validator_rejects_an_unknown_kind(tmp_path: Path) -> None:
    """
    A misspelled kind, which kubernetes-validate passes with a warning,
    counts as a failure.
    """
    deployment = load_yaml(BASE / "deployment.yaml")
    deployment["kind"] = "Deploymnet"
    broken = write_documents(tmp_path / "deployment.yaml", [deployment])

    problems = validate([broken])

    assert any("Deploymnet" in problem for problem in problems), problems


def test_kustomize_rejects_a_broken_kustomization(tmp_path: Path) -> None:
    """
    kustomize fails a kustomization with a misspelled key.
    """
    text = (BASE / "kustomization.yaml").read_text()
    broken = tmp_path / "base"
    shutil.copytree(BASE, broken)
    (broken / "kustomization.yaml").write_text(
        text.replace("resources:", "resource:")
    )

    result = run_kustomize(broken)

    assert result.returncode != 0
    assert "resource" in result.stderr


def _container(name: str) -> Callable[[Document], Document]:
    def pick(deployment: Document) -> Document:
        pod = deployment["spec"]["template"]["spec"]
        (found,) = [c for c in all_containers(pod) if c["name"] == name]
        return found

    return pick


def _set(
    pick: Callable[[Document], Document], path: str, value: object
) -> Callable[[Document], None]:
    def loosen(deployment: Document) -> None:
        target = pick(deployment)
        *parents, last = path.split(".")
        for key in parents:
            target = target.setdefault(key, {})
        target[last] = value

    return loosen


def _pod(deployment: Document) -> Document:
    return deployment["spec"]["template"]["spec"]


def _sidecar_as_app_container(deployment: Document) -> None:
    pod = _pod(deployment)
    pod["containers"].append(pod.pop("initContainers")[0])


def _sidecar_without_memory_limit(deployment: Document) -> None:
    del sidecar_of(_pod(deployment))["resources"]["limits"]["memory"]


_APP = _container("app")
_SIDECAR = _container(SIDECAR)

LOOSENINGS: dict[str, Callable[[Document], None]] = {
    "service-account-token": _set(_pod, "automountServiceAccountToken", True),
    "host-network": _set(_pod, "hostNetwork", True),
    "root-app": _set(_APP, "securityContext.runAsUser", 0),
    "non-root-unenforced": _set(_APP, "securityContext.runAsNonRoot", False),
    "writable-root": _set(
        _SIDECAR, "securityContext.readOnlyRootFilesystem", False
    ),
    "privilege-escalation": _set(
        _APP, "securityContext.allowPrivilegeEscalation", True
    ),
    "privileged": _set(_SIDECAR, "securityContext.privileged", True),
    "capability-kept": _set(
        _SIDECAR, "securityContext.capabilities.drop", ["NET_RAW"]
    ),
    "capability-added": _set(
        _APP, "securityContext.capabilities.add", ["NET_ADMIN"]
    ),
    "unconfined-seccomp": _set(
        _SIDECAR, "securityContext.seccompProfile.type", "Unconfined"
    ),
    "sidecar-exits": _set(_SIDECAR, "restartPolicy", "OnFailure"),
    "sidecar-as-app-container": _sidecar_as_app_container,
    "readiness-on-healthz": _set(
        _SIDECAR, "readinessProbe.httpGet.path", "/healthz"
    ),
    "liveness-on-token-port": _set(
        _SIDECAR, "livenessProbe.httpGet.port", TOKEN_PORT
    ),
    "no-startup-probe": _set(_SIDECAR, "startupProbe", None),
    "no-cpu-limit": _set(_APP, "resources.limits", {"memory": "32Mi"}),
    "request-over-limit": _set(_APP, "resources.requests.memory", "1Gi"),
    "sidecar-memory-unset": _sidecar_without_memory_limit,
    "sidecar-memory-too-low": _set(
        _SIDECAR, "resources.limits.memory", "64Mi"
    ),
}


@pytest.mark.parametrize("loosening", sorted(LOOSENINGS))
def test_checks_catch_a_loosened_pod(loosening: str) -> None:
    """
    Each loosened setting in an otherwise sound pod is reported.
    """
    deployment = plain_example().deployment
    assert all_problems(deployment) == []
    broken = copy.deepcopy(deployment)
    LOOSENINGS[loosening](broken)

    problems = all_problems(broken)

    assert problems != []
