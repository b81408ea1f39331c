"""Logging, metrics and Sentry: the only module that imports sentry_sdk and prometheus_client.

Retries are logged and counted but never alerted; each dead letter is alerted exactly once,
fingerprinted by task and reason so one outage makes one Sentry issue with a count.
"""

from __future__ import annotations

import logging
import os
import re
import sys
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

from worker.envelope import Envelope
from worker.settings import Settings

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


# The names tasks.py uses; resolved on first access by the module __getattr__ below.
DELIVERED: Counter
RETRIED: Counter
DEAD_LETTERED: Counter
LATENCY: Histogram
RESPONSES: Counter
IN_FLIGHT: Gauge
QUEUE_WAIT: Histogram


_LAZY_NAMES = frozenset(
    {"DELIVERED", "RETRIED", "DEAD_LETTERED", "LATENCY", "RESPONSES", "IN_FLIGHT", "QUEUE_WAIT"}
)


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        return getattr(metrics(), name.lower())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: An email address, also percent-encoded (``%40``) as it is inside a gateway URL.
_EMAIL_RE = re.compile(r"[\w.+%-]+(?:@|%40)[\w-]+(?:\.[\w-]+)+", re.IGNORECASE)


def configure_logging(level: str) -> None:
    """One stream handler on the root logger; Celery is told not to hijack it."""
    root = logging.getLogger()
    if not any(getattr(h, "_totango", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
        )
        handler._totango = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)


def mask(text: str | None, send_pii: bool) -> str:
    """Hide email addresses unless the operator opted in to personal data."""
    if text is None:
        return "-"
    return text if send_pii else _EMAIL_RE.sub("[email]", text)


@contextmanager
def gateway_call() -> Iterator[None]:
    in_flight = metrics().in_flight
    in_flight.inc()
    try:
        yield
    finally:
        in_flight.dec()


def record_answer(status: str, method: str, elapsed: float) -> None:
    m = metrics()
    m.responses.labels(status=status).inc()
    m.latency.labels(method=method).observe(elapsed)


def record_queue_wait(enqueued_at: Any) -> None:
    try:
        waited = time.time() - float(enqueued_at)
    except (TypeError, ValueError):
        return
    if waited >= 0:
        metrics().queue_wait.observe(waited)


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


# --- Sentry -----------------------------------------------------------------------------

_SCRUBBED = "[scrubbed]"
_sentry_send_pii = False


def init_sentry(settings: Settings) -> bool:
    """Start sentry-sdk when a DSN is set; with none it stays cleanly off."""
    global _sentry_send_pii  # noqa: PLW0603  set once at start-up, read by before_send
    if not settings.sentry_dsn:
        return False
    import sentry_sdk  # noqa: PLC0415
    from sentry_sdk.integrations.celery import CeleryIntegration  # noqa: PLC0415
    from sentry_sdk.integrations.logging import LoggingIntegration  # noqa: PLC0415

    _sentry_send_pii = settings.sentry_send_pii
    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        environment=settings.sentry_environment,
        release=settings.sentry_release,
        # send_default_pii is left unset: off is its default, and sentry-sdk 2.75 deprecates
        # passing it (a DeprecationWarning at start). Personal data is handled by before_send.
        before_send=before_send,  # type: ignore[arg-type]
        before_breadcrumb=before_breadcrumb,
        integrations=[
            CeleryIntegration(monitor_beat_tasks=False),
            # Logs become breadcrumbs only: the one event per dead letter is sent explicitly.
            LoggingIntegration(level=logging.INFO, event_level=None),
        ],
        default_integrations=True,
    )
    return True


def alert_dead_letter(envelope: Envelope, settings: Settings) -> None:
    """Exactly one Sentry event per dead letter, at level error."""
    import sentry_sdk  # noqa: PLC0415

    if not sentry_sdk.get_client().is_active():
        return
    task = envelope.task or "unknown"
    kwargs = envelope.kwargs or {}
    with sentry_sdk.new_scope() as scope:
        scope.fingerprint = ["totango-dead-letter", task, envelope.reason]
        scope.set_tag("task", task)
        scope.set_tag("reason", envelope.reason)
        scope.set_tag("status", envelope.last_status or "none")
        scope.set_tag("region", settings.region)
        scope.set_tag("service_id", kwargs.get("service_id") or settings.service_id or "none")
        scope.set_tag("event_id", envelope.event_id or "none")
        scope.set_context(
            "dead_letter",
            {
                "event_id": envelope.event_id,
                "attempts": envelope.attempts,
                "first_attempt_at": envelope.first_attempt_at,
                "last_attempt_at": envelope.last_attempt_at,
                "last_excerpt": envelope.last_excerpt,
                "envelope_id": envelope.id,
                "kwargs": kwargs,
            },
        )
        sentry_sdk.capture_message(
            f"Dead letter: {task} {envelope.reason}", level="error", scope=scope
        )


def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any] | None:
    """Drop what would double an alert, and scrub personal data unless opted in."""
    del hint
    for exc in (event.get("exception") or {}).get("values") or []:
        mechanism = exc.get("mechanism") or {}
        # A failing task is dead-lettered, and the dead letter alerts once; the Celery
        # integration's own event for the same failure would be a second alert.
        if mechanism.get("type") == "celery":
            return None
    return event if _sentry_send_pii else scrub(event)


def before_breadcrumb(crumb: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any] | None:
    del hint
    return crumb if _sentry_send_pii else scrub(crumb)


_PII_KEYS = {
    "user_id",
    "sdr_u",
    "attributes",
    "account_attributes",
    "user_attributes",
    "account_name",
    "kwargs",
    "args",
    "raw_body",
    # sentry-sdk's http breadcrumbs: a gateway call's query string is the event itself.
    "http.query",
    "http.fragment",
}


def scrub(value: Any) -> Any:
    """Replace user ids, attribute values and any email address, however deeply nested."""
    if isinstance(value, dict):
        return {k: (_SCRUBBED if k in _PII_KEYS else scrub(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    if isinstance(value, str):
        return _EMAIL_RE.sub(_SCRUBBED, value)
    return value
