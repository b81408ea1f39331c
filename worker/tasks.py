"""The single-event tasks: a message becomes an event, the event is sent, the outcome is
settled (``worker.relay``).

Delivered: recorded in the state store (when it is on), done. Already delivered (another
copy of it was): acknowledged without a call. Every attribute superseded by a newer value
(``worker.newest``): acknowledged without a call; some: the rest is sent. Retryable and
budget left: Celery's ``Task.retry`` with the decided delay. Invalid, or out of retries: an
envelope on the dead-letter queue, then the message is acked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import Task

from worker import events, metrics, relay
from worker.contract import (
    DELIVERY_LIMIT,
    ENQUEUED_AT_HEADER,
    FIRST_ATTEMPT_HEADER,
    QUEUE,
    TRACK_ACTIVITY,
    UPDATE_ACCOUNT,
    UPDATE_USER,
)
from worker.deadletter import dead_letter
from worker.envelope import Envelope, event_id_of
from worker.errors import DeliveryFailed, InvalidEvent
from worker.gateway import Answer
from worker.outage import Admit
from worker.outcome import Outcome
from worker.redeliveries import count_delivery
from worker.retry import WORKER_LOST_RETRY_DELAY

if TYPE_CHECKING:
    from worker.relay import TotangoCelery


def track_activity(self: Task[Any, Any], *args: Any, **kwargs: Any) -> str:
    """``totango.track_activity``: what a user did, with optional attributes."""
    return relay_event(self, TRACK_ACTIVITY, args, kwargs)


def update_account(self: Task[Any, Any], *args: Any, **kwargs: Any) -> str:
    """``totango.update_account``: attributes of an account."""
    return relay_event(self, UPDATE_ACCOUNT, args, kwargs)


def update_user(self: Task[Any, Any], *args: Any, **kwargs: Any) -> str:
    """``totango.update_user``: attributes of a user."""
    return relay_event(self, UPDATE_USER, args, kwargs)


def register(app: TotangoCelery) -> None:
    for name, run in (
        (TRACK_ACTIVITY, track_activity),
        (UPDATE_ACCOUNT, update_account),
        (UPDATE_USER, update_user),
    ):
        app.task(
            name=name,
            shared=False,  # this app's settings: not registered in every later app as well
            bind=True,
            max_retries=app.settings.max_retries,
            # The countdown of a retry after a lost worker process (Celery's default: 180 s).
            default_retry_delay=WORKER_LOST_RETRY_DELAY,
            typing=False,  # arguments are checked by events.from_message, with a reason
        )(run)


def relay_event(
    task: Task[Any, Any], name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str:
    app: TotangoCelery = task.app  # type: ignore[assignment]
    request = task.request
    if request.retries == 0:  # a retry's wait is its backoff, not a backlog
        metrics.record_queue_wait(relay.header(request, ENQUEUED_AT_HEADER))
    if _over_delivery_limit(app, request):
        excerpt = f"delivered more than {DELIVERY_LIMIT} times without an outcome"
        envelope = Envelope.failed(
            "delivery_limit",
            event_id=event_id_of(kwargs, request.id),
            task=name,
            kwargs=kwargs,
            attempts=request.retries + 1,
            excerpt=excerpt,
            task_id=request.id,
        )
        dead_letter(app, envelope, app.settings)
        return relay.DEAD_LETTERED
    try:
        event = events.from_message(
            name,
            kwargs,
            event_id=request.id,
            default_service_id=app.settings.service_id,
            positional=args,
            services=app.settings.service_ids,
        )
    except InvalidEvent as exc:
        envelope = Envelope.invalid(
            exc.code,
            str(exc),
            event_id=event_id_of(kwargs, request.id),
            task=name,
            kwargs=kwargs,
            task_id=request.id,
        )
        dead_letter(app, envelope, app.settings)
        return relay.DEAD_LETTERED

    attempt = relay.current_attempt(name, event, kwargs, request)

    def put_back(attempt: relay.Attempt, delay: float) -> None:
        headers = {FIRST_ATTEMPT_HEADER: attempt.first_attempt}
        enqueued_at = relay.header(request, ENQUEUED_AT_HEADER)
        if enqueued_at is not None:
            headers[ENQUEUED_AT_HEADER] = enqueued_at
        relay.put_back_request(task, request, delay, QUEUE, headers)

    admission, delay = relay.admit(app, [event])
    if admission is Admit.DEFER:
        return relay.deferred(attempt, delay, put_back)
    plan, answer = relay.check_and_send(app, event)
    if plan is None:
        return relay.suppressed(attempt)
    relay.note_superseded(attempt, plan)
    if plan.event is None or answer is None:
        return relay.SUPERSEDED
    outage = relay.report(app, plan.event, answer)
    relay.finish(app, [(plan, answer)], wait=False)

    def retry(attempt: relay.Attempt, answer: Answer, outcome: Outcome) -> None:
        raise task.retry(
            countdown=outcome.delay,
            max_retries=app.settings.max_retries,
            exc=DeliveryFailed(answer.status, answer.retry_after, answer.excerpt),
            headers={FIRST_ATTEMPT_HEADER: attempt.first_attempt},
            # Route the retry by queue, not by the exchange the producer happened to use:
            # on Redis a producer's exchange binding is a key that a restart can lose.
            queue=QUEUE,
        )

    return relay.settle(app, attempt, answer, retry, outage=outage, put_back=put_back)


def _over_delivery_limit(app: TotangoCelery, request: Any) -> bool:
    """Redis only (RabbitMQ's quorum queue counts for itself): has this message been
    delivered more than DELIVERY_LIMIT times, each ending with the worker dying on it?

    Only a redelivery is counted: every way a message comes back from Redis's ``unacked``
    marks it ``redelivered`` (kombu's restore), so a first delivery, nearly every one, costs
    no round trip, and the count is of the deliveries after the first."""
    if app.settings.broker_kind != "redis" or not request.id:
        return False
    if not (request.delivery_info or {}).get("redelivered"):
        return False
    ttl = app.settings.visibility_timeout * (DELIVERY_LIMIT + 2)
    redeliveries = count_delivery(
        app.settings.broker_url,
        request.id,
        request.retries,
        ttl,
        deferrals=relay.deferrals(request),
    )
    return redeliveries + 1 > DELIVERY_LIMIT
