"""Worker life-cycle hooks: check settings and start Sentry at start-up, one session per
child, and a dead letter (with one alert) for a task that failed outside our own handling.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from billiard.exceptions import WorkerLostError
from celery import signals
from celery.exceptions import TimeLimitExceeded

from worker import metrics, observability
from worker.deadletter import HOSTNAME
from worker.envelope import Envelope, event_id_of, now_iso
from worker.errors import ConfigError
from worker.gateway import check_gateway, reset_process_gateway

if TYPE_CHECKING:
    from worker.app import TotangoCelery

log = logging.getLogger(__name__)


def connect(app: TotangoCelery) -> None:
    settings = app.settings

    @signals.celeryd_init.connect(weak=False)
    def on_celeryd_init(**_: Any) -> None:
        # Sentry must start here, in the worker's main process before the pool forks:
        # initialising it later misses events silently.
        observability.configure_logging(settings.log_level)
        try:
            settings.check_worker()
            check_gateway(settings)
        except ConfigError as exc:
            # A signal handler's exception is only logged by Celery; exit so a wrong setting
            # stops the worker at start, not on its first task.
            sys.stderr.write(f"totango-worker: bad setting {exc}\n")
            raise SystemExit(2) from None
        observability.init_sentry(settings)

    @signals.worker_init.connect(weak=False)
    def on_worker_init(**_: Any) -> None:
        # In the main process, before the pool starts: the multiprocess directory is emptied
        # of the last run's files before any child writes to it. A directory that cannot be
        # made or emptied stops the worker here; later, every task would fail on it.
        try:
            metrics.prepare_metrics()
        except OSError as exc:
            sys.stderr.write(f"totango-worker: PROMETHEUS_MULTIPROC_DIR unusable: {exc}\n")
            raise SystemExit(2) from None
        metrics.start_metrics_server(settings.metrics_port)

    @signals.worker_process_shutdown.connect(weak=False)
    def on_worker_process_shutdown(pid: int | None = None, **_: Any) -> None:
        # Sent by a prefork child itself as it exits cleanly; a killed child's live gauges
        # are dropped at the next scrape instead (metrics._LiveProcessesCollector).
        if pid is not None:
            metrics.forget_process(pid)

    @signals.worker_process_init.connect(weak=False)
    def on_worker_process_init(**_: Any) -> None:
        reset_process_gateway()

    @signals.task_failure.connect(weak=False)
    @signals.task_internal_error.connect(weak=False)  # outside the body: no task_failure
    def on_task_failure(
        sender: Any = None,
        task_id: str | None = None,
        exception: BaseException | None = None,
        kwargs: Any = None,
        **_: Any,
    ) -> None:
        # WorkerLostError and hard time limits surface here, in the main process, where the
        # Sentry integration does not see them. Every failure ends in the dead-letter queue.
        name = getattr(sender, "name", None)
        if sender is None or getattr(sender, "app", None) is not app or name is None:
            return
        request = getattr(sender, "request", None)
        retries = getattr(request, "retries", 0) or 0
        from worker.tasks import dead_letter  # noqa: PLC0415  tasks imports this module's peers

        dead_letter(
            app,
            Envelope(
                reason=failure_reason(exception),
                event_id=event_id_of(kwargs, task_id),
                task=name,
                kwargs=kwargs if isinstance(kwargs, dict) else None,
                attempts=retries + 1,
                worker_host=HOSTNAME,
                last_attempt_at=now_iso(),
                task_id=task_id,
                last_excerpt=repr(exception)[:200],
            ),
        )


def failure_reason(exception: BaseException | None) -> str:
    if isinstance(exception, WorkerLostError):
        return "worker_lost"
    if isinstance(exception, TimeLimitExceeded):
        return "time_limit"
    return f"error:{type(exception).__name__}"
