"""Metrics: the only module that imports prometheus_client.

Counters and histograms of deliveries, retries, dead letters and gateway calls, created on
first use so that the worker can empty ``PROMETHEUS_MULTIPROC_DIR`` first (prefork pool).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.metrics_core import Metric

log = logging.getLogger("worker")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WAIT_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600)

# prometheus_client picks multiprocess mode at its import, when PROMETHEUS_MULTIPROC_DIR is in
# the environment (even empty: then the files land in the working directory). In that mode a
# metric, or a label child, opens <dir>/<type>_<pid>.db when it is created and reads back
# whatever an older file of that name holds. So metrics are created on first use, never at
# import: the worker empties the directory first (prepare_metrics, at worker_init), and a
# producer, a CLI command or Flower that imports this module creates no file at all.


@dataclass(frozen=True)
class Metrics:
    delivered: Counter
    retried: Counter
    dead_lettered: Counter
    latency: Histogram
    responses: Counter
    in_flight: Gauge
    queue_wait: Histogram
    unexpected_body: Counter
    duplicates_suppressed: Counter
    state_errors: Counter
    superseded: Counter
    attributes_superseded: Counter
    repairs: Counter
    breaker_open: Gauge
    deferred: Counter


def _create_metrics() -> Metrics:
    return Metrics(
        delivered=Counter("totango_events_delivered", "Events the gateway answered 200", ["task"]),
        retried=Counter(
            "totango_events_retried", "Attempts that will be retried", ["task", "reason"]
        ),
        dead_lettered=Counter(
            "totango_events_dead_lettered",
            "Events put on the dead-letter queue",
            ["task", "reason"],
        ),
        latency=Histogram(
            "totango_gateway_latency_seconds",
            "Gateway round trip",
            ["method"],
            buckets=LATENCY_BUCKETS,
        ),
        responses=Counter("totango_gateway_responses", "Gateway answers by status", ["status"]),
        # livesum: the sum over live processes; a dead child's value must not linger.
        in_flight=Gauge(
            "totango_gateway_in_flight", "Gateway calls in flight", multiprocess_mode="livesum"
        ),
        queue_wait=Histogram(
            "totango_queue_wait_seconds",
            "Time from enqueue to the start of the task",
            buckets=WAIT_BUCKETS,
        ),
        unexpected_body=Counter(
            "totango_gateway_unexpected_body",
            "Answers 200 whose body is not the GIF (a proxy's page?): delivered by the rule",
        ),
        duplicates_suppressed=Counter(
            "totango_events_duplicates_suppressed",
            "Copies of an event already delivered, acknowledged without a call",
            ["task"],
        ),
        state_errors=Counter(
            "totango_state_errors",
            "Events sent unchecked or left unrecorded: the state store could not be reached",
            ["op"],
        ),
        superseded=Counter(
            "totango_events_superseded",
            "Attribute updates with every attribute superseded by a newer value: acknowledged "
            "without a call",
            ["task"],
        ),
        attributes_superseded=Counter(
            "totango_attributes_superseded",
            "Attributes left out of a call because a newer value of them was already sent",
            ["task"],
        ),
        repairs=Counter(
            "totango_attribute_repairs",
            "Newer attribute values sent again: an older call was in flight when they were claimed",
        ),
        # max: every live process reads the same fleet-wide breaker; one open is open.
        breaker_open=Gauge(
            "totango_gateway_breaker_open",
            "1 while the fleet's breaker for this gateway is open (a gateway outage)",
            ["gateway"],
            multiprocess_mode="livemax",
        ),
        deferred=Counter(
            "totango_events_deferred",
            "Events put back on the queue unsent, their retry budget unspent: the breaker is open",
            ["task"],
        ),
    )


_metrics: Metrics | None = None
_metrics_lock = threading.Lock()


def metrics() -> Metrics:
    """This process's metrics, created (and registered) on the first call."""
    global _metrics  # noqa: PLW0603  one set per process, created on first use
    if _metrics is not None:
        return _metrics
    with _metrics_lock:
        if _metrics is None:
            path = multiprocess_dir()
            if path is not None:
                path.mkdir(parents=True, exist_ok=True)  # prometheus_client does not
            _metrics = _create_metrics()
        return _metrics


@contextmanager
def gateway_call() -> Iterator[None]:
    in_flight = metrics().in_flight
    in_flight.inc()
    try:
        yield
    finally:
        in_flight.dec()


#: Label children by (metric, label value), so the hot path skips prometheus_client's
#: per-call lookup under its lock. Only a few values exist (tasks, statuses, methods).
_children: dict[tuple[str, str], Any] = {}


def _child(name: str, value: str) -> Any:
    child = _children.get((name, value))
    if child is None:  # each of these metrics has one label: its value is the key
        child = _children[(name, value)] = getattr(metrics(), name).labels(value)
    return child


#: Counters by task that the dashboard shows, and the state store's operations: created at
#: 0 when the worker starts (``start_at_zero``), so that a panel or a ``rate()`` shows 0, not
#: "no data", until the first one happens.
_AT_ZERO_BY_TASK = (
    "delivered",
    "duplicates_suppressed",
    "superseded",
    "attributes_superseded",
    "deferred",
)
STATE_OPS = ("check", "record", "breaker")


def start_at_zero(tasks: Iterable[str]) -> None:
    for task in tasks:
        for name in _AT_ZERO_BY_TASK:
            _child(name, task)
    for op in STATE_OPS:
        _child("state_errors", op)


def record_answer(status: str, method: str, elapsed: float) -> None:
    _child("responses", status).inc()
    _child("latency", method).observe(elapsed)


def record_delivered(task: str) -> None:
    _child("delivered", task).inc()


def record_retried(task: str, reason: str) -> None:
    metrics().retried.labels(task=task, reason=reason).inc()


def record_dead_lettered(task: str, reason: str) -> None:
    metrics().dead_lettered.labels(task=task, reason=reason).inc()


def record_unexpected_body() -> None:
    metrics().unexpected_body.inc()


def record_duplicate_suppressed(task: str) -> None:
    _child("duplicates_suppressed", task).inc()


def record_state_error(op: str, events: int) -> None:
    _child("state_errors", op).inc(events)


def record_superseded(task: str, attributes: int, *, whole: bool) -> None:
    """``attributes`` left out of one event's call; ``whole``: nothing was left to send."""
    _child("attributes_superseded", task).inc(attributes)
    if whole:
        _child("superseded", task).inc()


def record_repairs(count: int) -> None:
    metrics().repairs.inc(count)


def set_breaker_open(gateway: str, is_open: bool) -> None:
    _child("breaker_open", gateway).set(1 if is_open else 0)


def record_deferred(task: str) -> None:
    _child("deferred", task).inc()


def record_queue_wait(enqueued_at: Any) -> None:
    try:
        waited = time.time() - float(enqueued_at)
    except (TypeError, ValueError):
        return
    if waited >= 0:
        metrics().queue_wait.observe(waited)


#: One gauge, made on first use like the others, kept apart from ``Metrics``: it is set once,
#: at start-up, in the worker's main process (``signals.on_celeryd_init``).
_queue_guarantees: Gauge | None = None


def record_queue_guarantees(queue: str, design: str, missing: Iterable[str]) -> None:
    """``totango_queue_guarantee_missing{queue, design, guarantee}`` is 1 for each guarantee
    the queue lacks in the design it has on the broker (``contract.MISSING_GUARANTEES``)."""
    global _queue_guarantees  # noqa: PLW0603  one gauge per process, created on first use
    with _metrics_lock:
        if _queue_guarantees is None:
            path = multiprocess_dir()
            if path is not None:
                path.mkdir(parents=True, exist_ok=True)  # prometheus_client does not
            _queue_guarantees = Gauge(
                "totango_queue_guarantee_missing",
                "A guarantee the work queue lacks in its RabbitMQ design (1 = missing)",
                ["queue", "design", "guarantee"],
                multiprocess_mode="liveall",  # set in the main process only, while it lives
            )
    for guarantee in missing:
        _queue_guarantees.labels(queue=queue, design=design, guarantee=guarantee).set(1)


def multiprocess_dir() -> Path | None:
    """prometheus_client's multiprocess directory, or None in single-process mode.

    Read from the environment, not Settings: prometheus_client itself reads it there.
    """
    raw = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(raw) if raw else None


def prepare_metrics() -> None:
    """In the worker's main process at start, before the pool starts its children.

    The multiprocess directory must be emptied of the last run's files (prometheus_client's
    documented requirement): a pid is reused after a restart, a container's pids nearly
    always, and a process whose pid matches an old file would carry on from its counts.
    """
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ and multiprocess_dir() is None:
        log.warning(
            "PROMETHEUS_MULTIPROC_DIR is set but empty: prometheus_client still runs in "
            "multiprocess mode and writes its files to the working directory; unset it"
        )
    path = multiprocess_dir()
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        # Files of this pid are live if this process already made its metrics: keep them.
        own = f"_{os.getpid()}.db" if _metrics is not None else None
        for stale in path.glob("*.db"):
            if own is None or not stale.name.endswith(own):
                stale.unlink(missing_ok=True)
    metrics()  # the main process's gauge and histogram report 0 from the first scrape


def forget_process(pid: int) -> None:
    """Drop a finished process's live gauges (in_flight); its counters keep counting."""
    path = multiprocess_dir()
    if path is not None:
        prometheus_multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]


class _LiveProcessesCollector:
    """Every process's samples, after dropping the live gauges of processes that are gone.

    A pool child that exits cleanly drops its own (worker_process_shutdown); one killed by
    the kernel (OOM, SIGKILL) cannot, and its in_flight would stay up until a restart.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        merged = prometheus_multiprocess.MultiProcessCollector
        self._merged = merged(None, str(path))  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        for live in self._path.glob("gauge_live*_*.db"):
            pid = live.stem.rsplit("_", 1)[1]
            if pid.isdigit() and not _alive(int(pid)):
                forget_process(int(pid))
        collected: Iterable[Metric] = self._merged.collect()  # type: ignore[no-untyped-call]
        return collected


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def start_metrics_server(port: int) -> None:
    """Serve /metrics; in multiprocess mode (prefork) the sum over every process's files."""
    if port <= 0:
        return
    path = multiprocess_dir()
    if path is not None:
        registry = CollectorRegistry()
        registry.register(_LiveProcessesCollector(path))
        start_http_server(port, registry=registry)
    else:
        start_http_server(port)
    log.info("metrics on :%d/metrics", port)
