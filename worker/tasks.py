"""Thin tasks: a message becomes an event, the event is sent, the outcome is decided.

Delivered: done. Retryable and budget left: Celery's ``Task.retry`` with the decided delay.
Invalid, or out of retries: an envelope on the dead-letter queue, then the message is acked.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from celery import Task

from worker import events, metrics, observability
from worker.deadletter import HOSTNAME, publish
from worker.envelope import Envelope, event_id_of, iso_at, now_iso
from worker.errors import DeliveryFailed, InvalidEvent
from worker.gateway import Answer, process_gateway
from worker.redeliveries import count_delivery
from worker.retry import decide, is_delivered
from worker.topology import DELIVERY_LIMIT, QUEUE

if TYPE_CHECKING:
    from worker.app import TotangoCelery
    from worker.settings import Settings

log = logging.getLogger(__name__)

#: Message headers the worker adds to a retry; producers never need to set them.
FIRST_ATTEMPT_HEADER = "totango_first_attempt_at"
ENQUEUED_AT_HEADER = "totango_enqueued_at"
#: Seconds before a task whose pool process died is tried again (task_retry_on_worker_lost).
WORKER_LOST_RETRY_DELAY = 5


def register(app: TotangoCelery) -> None:
    settings = app.settings
    for name in events.BUILDERS:
        app.task(
            name=name,
            bind=True,
            max_retries=settings.max_retries,
            # The countdown of a retry after a lost worker process (Celery's default is 180 s).
            default_retry_delay=WORKER_LOST_RETRY_DELAY,
            typing=False,  # arguments are checked by events.from_message, with a reason
        )(_relay_function(name))
    from worker import batch  # noqa: PLC0415  batch.py builds on this module's dead_letter

    batch.register(app)  # totango.track_batch: many events in one message


def _relay_function(name: str) -> Any:
    def run(self: Task[Any, Any], *args: Any, **kwargs: Any) -> str:
        return relay(self, name, args, kwargs)

    run.__name__ = name.rsplit(".", 1)[-1]
    return run


def relay(task: Task[Any, Any], name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    app: TotangoCelery = task.app  # type: ignore[assignment]
    settings = app.settings
    request = task.request
    attempt = request.retries + 1
    # The first attempt's time, formatted only if a retry or a dead letter needs it.
    started_at = time.time()
    first_attempt_at: str | None = header(request, FIRST_ATTEMPT_HEADER)
    if request.retries == 0:  # a retry's wait is its backoff, not a backlog
        metrics.record_queue_wait(header(request, ENQUEUED_AT_HEADER))
    if _over_delivery_limit(app, request):
        dead_letter(
            app,
            Envelope(
                reason="delivery_limit",
                event_id=event_id_of(kwargs, request.id),
                task=name,
                kwargs=kwargs,
                attempts=attempt,
                worker_host=HOSTNAME,
                last_attempt_at=now_iso(),
                task_id=request.id,
                last_excerpt=f"delivered more than {DELIVERY_LIMIT} times without an outcome",
            ),
        )
        return "dead_lettered"
    try:
        event = events.from_message(
            name,
            kwargs,
            event_id=request.id,
            default_service_id=settings.service_id,
            positional=args,
        )
    except InvalidEvent as exc:
        dead_letter(
            app,
            Envelope(
                reason=exc.code,
                event_id=event_id_of(kwargs, request.id),
                task=name,
                kwargs=kwargs,
                attempts=0,
                worker_host=HOSTNAME,
                last_excerpt=str(exc),
                task_id=request.id,
            ),
        )
        return "dead_lettered"

    answer = send(settings, event)
    who = f"event_id={event.event_id} account={event.account_id} task={name}"
    if is_delivered(answer.status):
        metrics.record_delivered(name)
        log.info("delivered %s attempt=%d", who, attempt)
        return "delivered"

    decision = decide(answer.status, request.retries, settings.retry_policy, answer.retry_after)
    if decision.retry:
        metrics.RETRIED.labels(task=name, reason=answer.status).inc()
        log.info(
            "retrying %s attempt=%d status=%s next_delay=%.1fs",
            who,
            attempt,
            answer.status,
            decision.delay,
        )
        raise task.retry(
            countdown=decision.delay,
            max_retries=settings.max_retries,
            exc=DeliveryFailed(answer.status, answer.retry_after, answer.excerpt),
            headers={FIRST_ATTEMPT_HEADER: first_attempt_at or iso_at(started_at)},
            # Route the retry by queue, not by the exchange the producer happened to use:
            # on Redis a producer's exchange binding is a key that a restart can lose.
            queue=QUEUE,
        )
    dead_letter(
        app,
        Envelope(
            reason=decision.reason,
            event_id=event.event_id,
            task=name,
            kwargs=kwargs,
            attempts=attempt,
            worker_host=HOSTNAME,
            first_attempt_at=first_attempt_at or iso_at(started_at),
            last_attempt_at=now_iso(),
            last_status=answer.status,
            last_excerpt=answer.excerpt,
            task_id=request.id,
        ),
    )
    return "dead_lettered"


def send(settings: Settings, event: events.Event) -> Answer:
    """One gateway call, counted in flight and by its answer."""
    with metrics.gateway_call():
        answer = process_gateway(settings).send(event)
    metrics.record_answer(answer.status, answer.method, answer.elapsed)
    return answer


def dead_letter(app: TotangoCelery, envelope: Envelope) -> None:
    """Publish the envelope (confirmed), count it and alert once."""
    publish(app, envelope)
    metrics.DEAD_LETTERED.labels(task=envelope.task or "unknown", reason=envelope.reason).inc()
    observability.alert_dead_letter(envelope, app.settings)


def _over_delivery_limit(app: TotangoCelery, request: Any) -> bool:
    """Redis only (RabbitMQ's quorum queue counts for itself): has this message been
    delivered more than DELIVERY_LIMIT times, each ending with the worker dying on it?"""
    if app.settings.broker_kind != "redis" or not request.id:
        return False
    ttl = app.settings.visibility_timeout * (DELIVERY_LIMIT + 2)
    count = count_delivery(app.settings.broker_url, request.id, request.retries, ttl)
    return count > DELIVERY_LIMIT


def header(request: Any, name: str) -> Any:
    """A custom message header: Celery exposes them as request attributes."""
    value = getattr(request, name, None)
    if value is None and isinstance(request.headers, dict):
        value = request.headers.get(name)
    return value
