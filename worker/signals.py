"""Worker life-cycle hooks: check settings and start Sentry at start-up, metrics for the
pool, and a dead letter (with one alert) for a task that failed outside our own handling.

The handlers are connected once per process (``connect``), and act only for an app made by
``create_app``: they find its settings on the sender.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import signals
from celery.exceptions import TimeLimitExceeded

from worker import metrics, observability, relay
from worker.contract import (
    EXCHANGE,
    TRACK_ACTIVITY,
    TRACK_BATCH,
    UPDATE_ACCOUNT,
    UPDATE_USER,
    VHOST_QUORUM,
)
from worker.deadletter import dead_letter
from worker.envelope import Envelope, event_id_of
from worker.errors import ConfigError
from worker.gateway import check_gateway
from worker.settings import Settings
from worker.state import StateStore, close_all, redacted
from worker.topology import ForeignDeclaration, Topology, discover

log = logging.getLogger(__name__)


def connect() -> None:
    """Connect every handler; connecting again changes nothing (``dispatch_uid``)."""
    signals.celeryd_init.connect(on_celeryd_init, dispatch_uid="totango.celeryd_init")
    signals.worker_init.connect(on_worker_init, dispatch_uid="totango.worker_init")
    signals.worker_process_shutdown.connect(
        on_worker_process_shutdown, dispatch_uid="totango.worker_process_shutdown"
    )
    signals.worker_shutdown.connect(on_worker_shutdown, dispatch_uid="totango.worker_shutdown")
    signals.task_failure.connect(on_task_failure, dispatch_uid="totango.task_failure")
    # Outside the task body: no task_failure follows.
    signals.task_internal_error.connect(on_task_failure, dispatch_uid="totango.internal_error")


def _settings_of(holder: Any) -> Settings | None:
    """The settings of the app behind a signal's sender, if ``create_app`` made it."""
    settings = getattr(getattr(holder, "app", None), "settings", None)
    return settings if isinstance(settings, Settings) else None


def on_celeryd_init(instance: Any = None, **_: Any) -> None:
    settings = _settings_of(instance)
    if settings is None:
        return
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
    use_broker_topology(instance.app, settings)


#: The topology found at celeryd_init, in the worker's main process (sent before worker_init).
_found: list[Topology] = []


def use_broker_topology(app: Any, settings: Settings) -> None:
    """Consume the work queues in the design the broker holds, before the queues are selected
    and the pool and the consumer start.

    A producer may have declared ``totango`` first, with Celery's defaults (a direct exchange
    and a classic queue): the worker consumes it as it is and says loudly, in the log and in
    a metric, which guarantees that design lacks. A declaration in neither design stops the
    worker with one line naming the queue and the command that moves its messages.
    """
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=app.conf.broker_connection_max_retries)
            topology = discover(connection, settings.broker_kind)
    except ForeignDeclaration as exc:
        sys.stderr.write(f"totango-worker: {exc}\n")
        raise SystemExit(2) from None
    except app.connection_for_write().recoverable_connection_errors as exc:
        sys.stderr.write(f"totango-worker: cannot reach the broker to find its queues: {exc}\n")
        raise SystemExit(2) from None
    topology.apply_to(app)
    _found.append(topology)  # recorded as metrics at worker_init, once the directory is fresh
    for queue, missing in topology.missing().items():
        design = topology.designs[queue]
        if design == VHOST_QUORUM:
            log.info(
                "queue %r is a quorum queue by the vhost's default queue type; its "
                "dead-lettering and delivery limit are the policy's (docs/producers.md)",
                queue,
            )
        if missing:
            log.warning(
                "queue %r is in the %s design (exchange %r is %s): it lacks %s. "
                "Events are consumed as they are; docs/producers.md#queue-designs says what "
                "each design keeps and how to move to the other",
                queue,
                design,
                EXCHANGE,
                topology.exchange_type,
                ", ".join(missing),
            )
    log_features(settings)


def log_features(settings: Settings) -> None:
    """Say at start which features of the state store are on, and why one is off."""
    features = {
        "duplicate suppression": (settings.dedup, "TOTANGO_DEDUP"),
        "newest value wins": (settings.newest_wins, "TOTANGO_NEWEST_WINS"),
        "outage breaker": (settings.breaker, "TOTANGO_BREAKER"),
    }
    url = settings.state_store_url
    if url is None:
        log.info(
            "%s off: no state store (the broker is not Redis; set TOTANGO_STATE_URL to a Redis)",
            ", ".join(features),
        )
        return
    off = [f"{name} off ({env}=false)" for name, (on, env) in features.items() if not on]
    on = [f"{name} on" for name, (flag, _) in features.items() if flag]
    if not on:
        log.info("%s", "; ".join(off))
        return
    store = StateStore(url, settings.dedup_ttl)
    try:
        reachable = "reachable" if store.ping() else "UNREACHABLE, failing open"
    finally:
        store.close()
    log.info(
        "%s: state store %s (%s), records kept %gs%s",
        ", ".join(on),
        redacted(url),
        reachable,
        settings.dedup_ttl,
        "".join(f"; {text}" for text in off),
    )


def on_worker_init(sender: Any = None, **_: Any) -> None:
    settings = _settings_of(sender)
    if settings is None:
        return
    # In the main process, before the pool starts: the multiprocess directory is emptied
    # of the last run's files before any child writes to it. A directory that cannot be
    # made or emptied stops the worker here; later, every task would fail on it.
    try:
        metrics.prepare_metrics()
    except OSError as exc:
        sys.stderr.write(f"totango-worker: PROMETHEUS_MULTIPROC_DIR unusable: {exc}\n")
        raise SystemExit(2) from None
    metrics.start_metrics_server(settings.metrics_port)
    metrics.start_at_zero((TRACK_ACTIVITY, UPDATE_ACCOUNT, UPDATE_USER, TRACK_BATCH))
    for topology in _found:
        for queue, missing in topology.missing().items():
            metrics.record_queue_guarantees(queue, topology.designs[queue], missing)


def on_worker_process_shutdown(pid: int | None = None, **_: Any) -> None:
    # Sent by a prefork child itself as it exits cleanly; a killed child's live gauges
    # are dropped at the next scrape instead (metrics._LiveProcessesCollector).
    if pid is not None:
        metrics.forget_process(pid)
    close_all()  # delivery records still queued go out before the child exits,
    relay.close_repairs()  # then the newer values their answers asked to publish again


def on_worker_shutdown(**_: Any) -> None:
    # The threads pool's tasks have finished: their delivery records still queued go out,
    # then the newer values their answers asked to publish again.
    close_all()
    relay.close_repairs()


def on_task_failure(
    sender: Any = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    kwargs: Any = None,
    **_: Any,
) -> None:
    # WorkerLostError and hard time limits surface here, in the main process, where the
    # Sentry integration does not see them. Every failure ends in the dead-letter queue.
    settings = _settings_of(sender)
    name = getattr(sender, "name", None)
    if settings is None or name is None:
        return
    request = getattr(sender, "request", None)
    retries = getattr(request, "retries", 0) or 0
    envelope = Envelope.failed(
        failure_reason(exception),
        event_id=event_id_of(kwargs, task_id),
        task=name,
        kwargs=kwargs if isinstance(kwargs, dict) else None,
        attempts=retries + 1,
        excerpt=repr(exception),
        task_id=task_id,
    )
    dead_letter(sender.app, envelope, settings)


def failure_reason(exception: BaseException | None) -> str:
    if isinstance(exception, WorkerLostError):
        return "worker_lost"
    if isinstance(exception, TimeLimitExceeded):
        return "time_limit"
    return f"error:{type(exception).__name__}"
