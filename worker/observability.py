"""Logging and Sentry: the only module that imports sentry_sdk (metrics are in metrics.py).

Retries are logged and counted but never alerted; each dead letter is alerted exactly once,
fingerprinted by task and reason so one outage makes one Sentry issue with a count.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from worker.envelope import Envelope
from worker.settings import Settings

log = logging.getLogger("worker")

#: Celery's own line per task ("Received task", "Task ... succeeded", "... retry"), at INFO.
#: The worker logs one line per outcome itself, with the event id, the account and the
#: attempt, so these would repeat it, and two more log records per event cost about 7% of a
#: relayed event's CPU (py-spy). Shown at DEBUG only; their warnings and errors still show.
CELERY_PER_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace", "celery.worker.request")

#: urllib3's connection pool logs each request line at DEBUG, query string and all. The
#: gateway's calls go through libcurl, which logs nothing, but sentry-sdk's transport uses
#: urllib3, and a line per report at DEBUG is noise. Its warnings still show at any level.
URLLIB3_LOGGER = "urllib3"

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
    quiet = logging.NOTSET if logging.getLevelName(level) == logging.DEBUG else logging.WARNING
    for name in CELERY_PER_TASK_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
    logging.getLogger(URLLIB3_LOGGER).setLevel(logging.WARNING)  # even at DEBUG


#: Seconds between two summary lines of the single events delivered (``DeliveredSummary``).
DELIVERED_SUMMARY_INTERVAL = 60.0


class Throttle:
    """Lets one of many happenings through every ``interval`` seconds, the first one at
    once, and counts the others in between; thread-safe. One line for many: a line per
    event from 128 threads queues them all on the stream handler's lock."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._last: float | None = None
        self._count = 0

    def passes(self) -> tuple[int, float | None] | None:
        """Count one happening. ``None`` while it is held back; else how many happened
        since the last one let through (this one included) and the seconds since that one
        (``None`` for the first)."""
        with self._lock:
            self._count += 1
            now = self._clock()
            last = self._last
            if last is not None and now - last < self.interval:
                return None
            count, self._count, self._last = self._count, 0, now
        return count, None if last is None else now - last


class DeliveredSummary:
    """One INFO line for many deliveries: the count since the last line, logged with the
    first delivery after ``interval`` seconds (and with the first delivery after start, so a
    fresh worker shows at once that calls go through).

    A line per delivered event was a tenth of a single event's CPU (docs/benchmarks.md);
    each delivery's own line is logged at DEBUG. Retries, dead letters and suppressed
    events keep a line each.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = DELIVERED_SUMMARY_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._throttle = Throttle(interval, clock)

    def add(self) -> bool:
        """Count one delivery; True when the summary line was logged with it."""
        passed = self._throttle.passes()
        if passed is None:
            return False
        count, since = passed
        if since is None:
            self._logger.info(
                "delivered the first event since start; a summary follows every %gs",
                self._throttle.interval,
            )
        else:
            self._logger.info("delivered %d events in the last %.0fs", count, since)
        return True


class RateLimitedWarning:
    """A warning logged at most once per ``interval`` seconds in a process, saying how many
    were held back since: one proxy page per event must not flood the logs."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._throttle = Throttle(interval, clock)

    def warn(self, message: str, *args: object) -> bool:
        """Log now, or count it for the next line; True when it was logged."""
        passed = self._throttle.passes()
        if passed is None:
            return False
        self._logger.warning(message + " (%d more since the last warning)", *args, passed[0] - 1)
        return True


# --- Sentry -----------------------------------------------------------------------------

_SCRUBBED = "[scrubbed]"
_sentry_send_pii = False
_sentry_on = False


def init_sentry(settings: Settings) -> bool:
    """Start sentry-sdk when a DSN is set; with none it stays cleanly off."""
    global _sentry_send_pii, _sentry_on  # noqa: PLW0603  set once at start-up
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
    _sentry_on = True
    return True


def failed_call_breadcrumb(url: str, method: str, status: str, elapsed: float) -> None:
    """A Sentry breadcrumb for a gateway call that did not deliver, so that the alert of a
    dead letter shows its last calls: the method, the gateway's URL without any query (the
    event's parameters, an API token), the answer and how long it took. sentry-sdk makes
    one for each ``http.client`` call by itself; libcurl's calls are not seen by it."""
    if not _sentry_on:
        return
    import sentry_sdk  # noqa: PLC0415

    data: dict[str, Any] = {
        "url": url.partition("?")[0],
        "method": method,
        "reason": status,
        "elapsed_ms": round(elapsed * 1000, 1),
    }
    if status.isdigit():
        data["status_code"] = int(status)
    sentry_sdk.add_breadcrumb(type="http", category="gateway", level="warning", data=data)


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


def alert_outage(phase: str, gateway: str, detail: str, settings: Settings) -> None:
    """One Sentry event when a gateway outage starts (level error) and one when it ends
    (level info), sent by the worker whose call opened or closed the fleet's breaker; never
    one per event."""
    import sentry_sdk  # noqa: PLC0415

    if not sentry_sdk.get_client().is_active():
        return
    with sentry_sdk.new_scope() as scope:
        scope.fingerprint = ["totango-gateway-outage", gateway, phase]
        scope.set_tag("gateway", gateway)
        scope.set_tag("outage", phase)
        scope.set_tag("region", settings.region)
        sentry_sdk.capture_message(
            f"Gateway outage {phase}: {gateway} ({detail})",
            level="error" if phase == "started" else "info",
            scope=scope,
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
