"""The operators' view: the alerts proven by `promtool test rules`, the Grafana dashboard's
model, and every metric either of them queries checked against a real worker's /metrics or
the documented broker-exporter names (ops/prometheus/exporter-metrics.yaml).

promtool comes from Debian's prometheus package (`make promtool`); a missing promtool fails
these tests, it does not skip them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from functools import cache
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest
import yaml

from tests.brokers import redis_database
from tests.test_metrics import (
    FIRST_ATTEMPTS_ONLY,
    QUEUE_WAIT_COUNT,
    free_port,
    key,
    relay_mix,
    wait_counts,
)
from totango_emulator import GatewayEmulator
from worker.application import TotangoCelery

ROOT = Path(__file__).resolve().parent.parent
OPS = ROOT / "ops"
RULE = OPS / "base" / "prometheusrule.yaml"
PROMTOOL_TESTS = OPS / "prometheus" / "alerts.test.yaml"
EXPORTER_METRICS = OPS / "prometheus" / "exporter-metrics.yaml"
DASHBOARD = OPS / "grafana" / "totango-worker.json"

#: The worker's metric families (worker/metrics.py); histograms appear as _bucket etc.
WORKER_PREFIX = "totango_"
#: Labels Prometheus (the ServiceMonitors) puts on every series of a target.
TARGET_LABELS = {"job", "namespace", "pod", "instance", "app_kubernetes_io_component", "broker"}
#: Labels of bounded cardinality: the only ones a rate panel may keep (group or legend).
BOUNDED_LABELS = {
    "task",
    "reason",
    "status",
    "method",
    "le",
    "queue",
    "key",
    "vhost",
    "namespace",
    "app_kubernetes_io_component",
    "op",
    "gateway",
}
#: Grafana's own variables, usable in any query.
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__range"}
PANEL_TYPES = {"row", "timeseries", "stat"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

EnvFor = Callable[..., dict[str, str]]
StartWorker = Callable[..., AbstractContextManager[Popen[bytes]]]
AppFor = Callable[[dict[str, str]], TotangoCelery]


# --- helpers ------------------------------------------------------------------------------


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not on PATH: run `make promtool` (Debian's prometheus package)")
    return found


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def rule_groups() -> list[dict[str, Any]]:
    """The PrometheusRule's spec.groups: exactly what Prometheus loads from it."""
    (rule,) = [d for d in yaml.safe_load_all(RULE.read_text(encoding="utf-8")) if d]
    assert rule["kind"] == "PrometheusRule"
    groups: list[dict[str, Any]] = rule["spec"]["groups"]
    return groups


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in rule_groups() for r in g["rules"] if "alert" in r}


def promtool_dir(tmp: Path, groups: list[dict[str, Any]]) -> Path:
    """A directory with the rules (derived from the PrometheusRule, never copied by hand)
    as rules.yaml, next to a copy of the promtool test file that loads them."""
    (tmp / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}), encoding="utf-8")
    shutil.copy(PROMTOOL_TESTS, tmp / PROMTOOL_TESTS.name)
    return tmp


@cache
def dashboard() -> dict[str, Any]:
    model: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return model


def query_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in query_panels() for t in p["targets"]]


def variables() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard()["templating"]["list"]}


@cache
def exporter_metrics() -> dict[str, set[str]]:
    """Each documented exporter metric and its labels."""
    data = yaml.safe_load(EXPORTER_METRICS.read_text(encoding="utf-8"))
    names: dict[str, set[str]] = {}
    for source in data["sources"].values():
        assert source["what"].strip()
        for name, labels in source["metrics"].items():
            assert name not in names, f"{name} listed twice"
            names[name] = set(labels)
    return names


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
_KEYWORDS |= {"and", "or", "unless", "offset"}


def _strip(expr: str) -> str:
    """The expression without strings, label matchers, ranges and Grafana variables."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', " ", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    return re.sub(r"\$\{?\w+\}?", " ", text)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords and label names
    of by/on/... clauses left out)."""
    text = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", _strip(expr)
    )
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        if match.group(2) is None and match.group(1) not in _KEYWORDS:
            names.add(match.group(1))
    return names


def grouping_labels(expr: str) -> set[str]:
    """Every label named in a by/on/without/... clause."""
    labels = set()
    for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", _strip(expr)):
        labels.update(word.strip() for word in clause.split(",") if word.strip())
    return labels


def matcher_labels(expr: str) -> set[str]:
    return {
        name
        for matchers in re.findall(r"\{([^}]*)\}", re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr))
        for name in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers)
    }


def used_metrics() -> dict[str, set[str]]:
    """Every metric the dashboard or an alert queries, and where."""
    where: dict[str, set[str]] = {}
    for name, rule in alerts().items():
        for metric in metric_names(rule["expr"]):
            where.setdefault(metric, set()).add(f"alert {name}")
    for panel in query_panels():
        for target in panel["targets"]:
            for metric in metric_names(target["expr"]):
                where.setdefault(metric, set()).add(f"panel {panel['title']!r}")
    return where


def all_documents(path: Path) -> Iterator[dict[str, Any]]:
    for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
        if doc:
            yield doc


# --- the PromQL helpers themselves ----------------------------------------------------


def test_metric_names_are_read_out_of_promql() -> None:
    """The name extraction that the checks below rely on finds the selected metrics of an
    expression, and not its functions, keywords, label names, strings or variables."""
    expr = (
        'histogram_quantile(0.99, sum by (le, method) (rate(a_bucket{x="y"}[5m]))) > 1e3 '
        'unless on (queue) count(b_total offset 5m) * $cap and absent(up{job="j"} == 1) '
        'or label_replace(c, "key", "totango.batch", "task", "t")'
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "up", "c"}
    assert grouping_labels(expr) == {"le", "method", "queue"}
    assert matcher_labels(expr) == {"x", "job"}


# --- alerts: promtool ---------------------------------------------------------------------


def test_promtool_checks_the_rules_and_passes_every_alert_test(tmp_path: Path) -> None:
    """promtool accepts the rules derived from the PrometheusRule (`check rules`), and every
    case of ops/prometheus/alerts.test.yaml passes (`test rules`): each alert fires on its
    firing series with the expected labels and annotations, and stays silent otherwise."""
    where = promtool_dir(tmp_path, rule_groups())
    checked = run_promtool("check", "rules", "rules.yaml", cwd=where)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in rule_groups())} rules found" in checked.stdout
    tested = run_promtool("test", "rules", PROMTOOL_TESTS.name, cwd=where)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    """Each alert of the PrometheusRule has at least one promtool case where it fires and
    one where it must stay silent (an evaluation that expects no alert), and the test file
    names no alert that does not exist."""
    tests = yaml.safe_load(PROMTOOL_TESTS.read_text(encoding="utf-8"))
    assert tests["rule_files"] == ["rules.yaml"]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    assert firing == set(alerts()), set(alerts()) ^ firing
    assert silent == set(alerts()), set(alerts()) ^ silent


@pytest.mark.parametrize(
    ("alert", "before", "after"),
    [
        ("TotangoRetryRateHigh", "> 0.2", "> 0.9"),
        ("TotangoQueueNotConsumedRabbitMQ", "unless on (vhost, queue)", "and on (vhost, queue)"),
        ("TotangoQueueNotConsumedRedis", '"key", "totango", ', '"key", "elsewhere", '),
        ("TotangoQueueNotConsumedRabbitMQ", "breaker_open)) == 1", "breaker_open)) == 2"),
        ("TotangoQueueNotConsumedRedis", "breaker_open)) == 1", "breaker_open)) == 2"),
        ("TotangoQueueNotConsumedRedis", "min by (namespace) (max", "max by (namespace) (max"),
    ],
)
def test_promtool_cases_fail_on_a_broken_rule(
    tmp_path: Path, alert: str, before: str, after: str
) -> None:
    """The cases are not vacuous: the same test file fails against rules in which one alert
    is broken (a threshold moved, the stall condition inverted, the list's workers mapped to
    another key, the open breaker never matched, one open breaker of two taken for all)."""
    groups = rule_groups()
    (rule,) = [r for g in groups for r in g["rules"] if r.get("alert") == alert]
    assert before in rule["expr"]
    rule["expr"] = rule["expr"].replace(before, after)
    tested = run_promtool("test", "rules", PROMTOOL_TESTS.name, cwd=promtool_dir(tmp_path, groups))
    assert tested.returncode != 0, tested.stdout
    assert alert in tested.stdout + tested.stderr


def test_alerts_have_a_severity_a_summary_and_a_runbook_line() -> None:
    """Each alert is warning or critical, has a summary and a description, and
    docs/monitoring.md has a runbook entry under its name."""
    docs = (ROOT / "docs" / "monitoring.md").read_text(encoding="utf-8")
    for name, rule in alerts().items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"].strip(), name
        assert rule["annotations"]["description"].strip(), name
        assert re.search(rf"^#+ .*`{name}`", docs, re.MULTILINE), f"{name}: no runbook heading"


# --- dashboard: the model -----------------------------------------------------------------


def test_dashboard_is_a_valid_grafana_model() -> None:
    """The dashboard JSON has a uid, title and schema version; panels of known types with
    unique ids on the 24-column grid without overlap; every query panel and target uses the
    `datasource` variable (a Prometheus data source); each target has a unique refId, an
    expression and a legend; every $variable a query uses is defined or Grafana's own."""
    model = dashboard()
    assert model["uid"] == "totango-worker"
    assert model["title"]
    assert isinstance(model["schemaVersion"], int)
    assert model["schemaVersion"] >= 36
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids)), ids
    cells: set[tuple[int, int]] = set()
    for panel in model["panels"]:
        assert panel["type"] in PANEL_TYPES, panel["type"]
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"}
        assert grid["x"] >= 0
        assert grid["w"] > 0
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
    defined = set(variables()) | GRAFANA_VARIABLES
    assert variables()["datasource"]["type"] == "datasource"
    assert variables()["datasource"]["query"] == "prometheus"
    for panel in query_panels():
        assert panel["title"]
        assert panel["description"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip()
            assert target["legendFormat"].strip()
            used = set(re.findall(r"\$\{?(\w+)\}?", target["expr"]))
            assert used <= defined, (panel["title"], used - defined)
            depth = 0
            for char in target["expr"]:
                depth += {"(": 1, ")": -1}.get(char, 0)
                assert depth >= 0, panel["title"]
            assert depth == 0, panel["title"]


def test_dashboard_has_the_namespace_and_broker_variables() -> None:
    """`namespace` comes from the workers' `up` series; `broker` offers rabbitmq and redis,
    exactly the `broker` label values that the overlays' broker ServiceMonitors set; the
    worker panels filter on the namespace, the broker panels on the broker."""
    found = variables()
    assert found["namespace"]["type"] == "query"
    assert 'up{job="totango-worker"}' in found["namespace"]["definition"]
    assert found["broker"]["type"] == "custom"
    offered = {o["value"] for o in found["broker"]["options"]}
    assert offered == set(found["broker"]["query"].split(",")) == {"rabbitmq", "redis"}
    relabelled = set()
    for path in (OPS / "overlays").rglob("*servicemonitor*.yaml"):
        for doc in all_documents(path):
            for endpoint in doc["spec"]["endpoints"]:
                for relabel in endpoint.get("relabelings", []):
                    if relabel["targetLabel"] == "broker":
                        relabelled.add(relabel["replacement"])
    assert relabelled == offered
    for expr in dashboard_exprs():
        names = metric_names(expr)
        if any(n.startswith(WORKER_PREFIX) for n in names):
            assert 'namespace="$namespace"' in expr, expr
        if names & set(exporter_metrics()) - {"up"}:
            assert 'broker="$broker"' in expr, expr


def test_dashboard_capacity_constants_match_the_deployments() -> None:
    """The hidden constants behind "calls in flight vs. capacity" equal what the
    Deployments set: TOTANGO_CONCURRENCY of the ConfigMap (single-event pods) and
    TOTANGO_BATCH_SENDERS of the batch Deployment."""
    (config,) = all_documents(OPS / "base" / "configmap.yaml")
    (batch,) = all_documents(OPS / "base" / "worker-batch-deployment.yaml")
    (container,) = batch["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    found = variables()
    assert found["worker_concurrency"]["query"] == config["data"]["TOTANGO_CONCURRENCY"]
    assert found["batch_senders"]["query"] == env["TOTANGO_BATCH_SENDERS"]
    for name in ("worker_concurrency", "batch_senders"):
        assert found[name]["type"] == "constant"
        assert any(f"${name}" in expr for expr in dashboard_exprs()), name


def test_rate_panels_keep_only_bounded_labels() -> None:
    """No rate or increase panel keeps a label of unbounded cardinality (pod, instance,
    channel, event or account ids): each rate sits under an aggregation `by` bounded labels
    only (no `without`), and legends name only those labels."""
    for panel in query_panels():
        for target in panel["targets"]:
            expr = target["expr"]
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target["legendFormat"]))
            kept = grouping_labels(expr)
            assert legend <= kept, (panel["title"], legend - kept)
            if not re.search(r"\b(?:rate|increase|irate)\(", expr):
                continue
            assert "without" not in _strip(expr), panel["title"]
            rates = len(re.findall(r"\b(?:rate|increase|irate)\(", expr))
            assert len(re.findall(r"\bby\s*\(", expr)) >= rates, panel["title"]
            assert kept <= BOUNDED_LABELS, (panel["title"], kept - BOUNDED_LABELS)


def test_the_dashboard_has_the_panels_operators_need() -> None:
    """The panels the operators asked for query what they say: delivered by task, retries by
    reason, dead letters by reason, latency p50/p99 from the histogram, in flight against
    capacity, queue depth of the three queues on each broker, queue wait, pods up, and
    effectively once: the breaker by gateway, deferred, duplicates suppressed and superseded
    events by task, and state store errors by operation."""
    wanted = {
        "totango_events_delivered_total": "task",
        "totango_events_retried_total": "reason",
        "totango_events_dead_lettered_total": "reason",
        "totango_gateway_latency_seconds_bucket": "le",
        "totango_gateway_in_flight": "app_kubernetes_io_component",
        "totango_queue_wait_seconds_bucket": "le",
        "rabbitmq_detailed_queue_messages": "queue",
        "redis_key_size": "key",
        "up": "app_kubernetes_io_component",
        "totango_gateway_breaker_open": "gateway",
        "totango_events_deferred_total": "task",
        "totango_events_duplicates_suppressed_total": "task",
        "totango_events_superseded_total": "task",
        "totango_state_errors_total": "op",
    }
    for metric, label in wanted.items():
        exprs = [e for e in dashboard_exprs() if metric in metric_names(e)]
        assert exprs, metric
        assert any(label in grouping_labels(e) for e in exprs), (metric, label)
    latency = [e for e in dashboard_exprs() if "totango_gateway_latency_seconds_bucket" in e]
    assert {q for e in latency for q in re.findall(r"histogram_quantile\(([\d.]+)", e)} == {
        "0.5",
        "0.99",
    }
    depth = [e for e in dashboard_exprs() if metric_names(e) & {"redis_key_size"}]
    depth += [e for e in dashboard_exprs() if "rabbitmq_detailed_queue_messages" in metric_names(e)]
    for expr in depth:
        assert "totango|totango[.]batch|totango[.]dead_letter" in expr, expr


# --- metric names: real worker and documented exporters -----------------------------------


def test_exporter_metrics_are_all_used_and_none_is_the_workers() -> None:
    """Every name in ops/prometheus/exporter-metrics.yaml is queried by a panel or an alert
    (the list does not rot), none is a worker metric, and every label a query matches on or
    groups by is one the worker, an exporter's listed labels or the scrape target gives."""
    used = used_metrics()
    listed = exporter_metrics()
    assert set(listed) <= set(used), set(listed) - set(used)
    assert not any(name.startswith(WORKER_PREFIX) for name in listed)
    known = TARGET_LABELS | {"task", "reason", "status", "method", "le", "gateway", "op"}
    known |= {label for labels in listed.values() for label in labels}
    for expr in [*dashboard_exprs(), *(r["expr"] for r in alerts().values())]:
        named = grouping_labels(expr) | matcher_labels(expr)
        assert named <= known, (expr, named - known)


@pytest.mark.parametrize("broker_url", ["rabbitmq"], indirect=True)
def test_every_queried_metric_is_exported_by_a_worker_or_documented(
    env_for: EnvFor,
    start_worker: StartWorker,
    app_for: AppFor,
    gateway: GatewayEmulator,
    tmp_path: Path,
) -> None:
    """A real worker relays deliveries, a retried event and a dead-lettered one through the
    gateway emulator, with the outage breaker on (its store a Redis database of the
    test's own); its /metrics then shows every worker metric the dashboard and the
    alerts query, with the labels they group by; every other name queried is in
    ops/prometheus/exporter-metrics.yaml."""
    port = free_port()
    with redis_database() as store:
        env = env_for(
            TOTANGO_POOL="threads",
            TOTANGO_METRICS_PORT=str(port),
            TOTANGO_STATE_URL=store,
            TOTANGO_BREAKER="true",
        )
        samples = _relayed_samples(env, start_worker, app_for, gateway, tmp_path)
    _check_queried_metrics(samples)


def _relayed_samples(
    env: dict[str, str],
    start_worker: StartWorker,
    app_for: AppFor,
    gateway: GatewayEmulator,
    tmp_path: Path,
) -> Any:
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = tmp_path / "worker.log"
    with start_worker(env):
        expected = relay_mix(app_for(env), gateway, plain=2, retried=1, invalid=1)
        expected[key(QUEUE_WAIT_COUNT)] = 4.0 if FIRST_ATTEMPTS_ONLY else 5.0
        return wait_counts(int(env["TOTANGO_METRICS_PORT"]), expected, log)


def _check_queried_metrics(samples: Any) -> None:
    exported: dict[str, set[str]] = {}
    for name, labels in samples:
        exported.setdefault(name, set()).update(label for label, _ in labels)
    used = used_metrics()
    unknown = {
        name: sorted(where)
        for name, where in used.items()
        if name not in exported and name not in exporter_metrics()
    }
    assert not unknown, unknown
    worker_used = {name for name in used if name.startswith(WORKER_PREFIX)}
    assert worker_used <= set(exported)
    assert len(worker_used) >= 7
    worker_labels = {label for name in worker_used for label in exported[name]}
    assert {"task", "reason", "status", "method", "le"} <= worker_labels
