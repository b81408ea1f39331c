"""Logging, metrics and Sentry: the only module that imports sentry_sdk and prometheus_client.

Retries are logged and counted but never alerted; each dead letter is alerted exactly once,
fingerprinted by task and reason so one outage makes one Sentry issue with a count.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from worker.envelope import Envelope
from worker.settings import Settings

log = logging.getLogger("worker")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WAIT_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600)

DELIVERED = Counter("totango_events_delivered", "Events the gateway answered 200", ["task"])
RETRIED = Counter("totango_events_retried", "Attempts that will be retried", ["task", "reason"])
DEAD_LETTERED = Counter(
    "totango_events_dead_lettered", "Events put on the dead-letter queue", ["task", "reason"]
)
LATENCY = Histogram(
    "totango_gateway_latency_seconds", "Gateway round trip", ["method"], buckets=LATENCY_BUCKETS
)
RESPONSES = Counter("totango_gateway_responses", "Gateway answers by status", ["status"])
IN_FLIGHT = Gauge(
    "totango_gateway_in_flight", "Gateway calls in flight", multiprocess_mode="livesum"
)
QUEUE_WAIT = Histogram(
    "totango_queue_wait_seconds", "Time from enqueue to the start of the task", buckets=WAIT_BUCKETS
)

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
    IN_FLIGHT.inc()
    try:
        yield
    finally:
        IN_FLIGHT.dec()


def record_answer(status: str, method: str, elapsed: float) -> None:
    RESPONSES.labels(status=status).inc()
    LATENCY.labels(method=method).observe(elapsed)


def record_queue_wait(enqueued_at: Any) -> None:
    try:
        waited = time.time() - float(enqueued_at)
    except (TypeError, ValueError):
        return
    if waited >= 0:
        QUEUE_WAIT.observe(waited)


def start_metrics_server(port: int) -> None:
    """Serve /metrics; in multiprocess mode (prefork) aggregate every child's samples."""
    if port <= 0:
        return
    from prometheus_client import CollectorRegistry, start_http_server  # noqa: PLC0415

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess  # noqa: PLC0415

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
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
