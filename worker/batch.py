"""The batch path: one ``totango.track_batch`` message carries up to ``MAX_BATCH_EVENTS``
events, sent concurrently over the process's pooled session, each with an outcome of its own.

Delivered: done, never sent again. Failed: re-enqueued alone as a single-event task that
follows the normal retry policy. Invalid: dead-lettered alone. A malformed batch: the whole
message is dead-lettered with ``invalid:events``. The batch message is acknowledged
(``acks_late``) only after every re-enqueue and dead letter is published (and confirmed).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery import Task

from worker import events, metrics, relay
from worker.contract import (
    BATCH_QUEUE,
    DEFERRALS_HEADER,
    ENQUEUED_AT_HEADER,
    FIRST_ATTEMPT_HEADER,
    QUEUE,
    TRACK_BATCH,
)
from worker.deadletter import PUBLISH_RETRY_POLICY, dead_letter
from worker.envelope import Envelope, event_id_of, now_iso
from worker.errors import InvalidEvent
from worker.gateway import Answer
from worker.outage import Admit
from worker.outcome import Outcome
from worker.retry import WORKER_LOST_RETRY_DELAY
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.relay import TotangoCelery

log = logging.getLogger(__name__)


def track_batch(self: Task[Any, Any], *args: Any, **kwargs: Any) -> dict[str, int]:
    """``totango.track_batch``: up to ``MAX_BATCH_EVENTS`` events in one message."""
    return relay_batch(self, args, kwargs)


def register(app: TotangoCelery) -> None:
    settings = app.settings
    # Celery enforces time limits only in the prefork pool, where a child sends one batch
    # at a time with its senders: room for every round of calls at their timeout.
    rounds = math.ceil(events.MAX_BATCH_EVENTS / senders_for(events.MAX_BATCH_EVENTS, settings))
    app.task(
        name=TRACK_BATCH,
        shared=False,  # this app's settings: not registered in every later app as well
        bind=True,
        max_retries=settings.max_retries,  # spent only by task_retry_on_worker_lost
        default_retry_delay=WORKER_LOST_RETRY_DELAY,
        time_limit=int(rounds * (settings.connect_timeout + settings.read_timeout)) + 30,
        typing=False,  # the arguments are checked by events.batch_items, with a reason
    )(track_batch)


@dataclass(frozen=True)
class Item:
    """One event of a batch, with the id it keeps through every retry and dead letter."""

    index: int
    task: str
    kwargs: dict[str, Any]
    #: The event's own id (an integer one in its decimal form), else ``<batch id>:<index>``.
    event_id: str


def items_of(kwargs: dict[str, Any], positional: tuple[Any, ...], batch_id: str) -> list[Item]:
    """The batch's events; an event without an id gets ``<batch task id>:<index>``."""
    if positional:
        raise InvalidEvent("events", "positional arguments are not accepted; use events=[...]")
    if set(kwargs) != {"events"}:
        raise InvalidEvent("events", "the only argument is events=[{task, kwargs}, ...]")
    items = []
    for index, (task, event_kwargs) in enumerate(events.batch_items(kwargs["events"])):
        if event_kwargs.get("event_id") is None:
            event_kwargs["event_id"] = f"{batch_id}:{index}"
        event_id = event_id_of(event_kwargs, None) or f"{batch_id}:{index}"
        items.append(Item(index, task, event_kwargs, event_id))
    return items


def relay_batch(
    task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, int]:
    app: TotangoCelery = task.app  # type: ignore[assignment]
    settings = app.settings
    request = task.request
    batch_id = str(request.id)
    first_attempt_at = relay.header(request, FIRST_ATTEMPT_HEADER) or now_iso()
    metrics.record_queue_wait(relay.header(request, ENQUEUED_AT_HEADER))
    try:
        items = items_of(kwargs, args, batch_id)
    except InvalidEvent as exc:
        # The whole message, as it came: nothing in it is lost, and it can be inspected.
        envelope = Envelope.invalid(
            exc.code, str(exc), event_id=batch_id, task=TRACK_BATCH, kwargs=kwargs, task_id=batch_id
        )
        dead_letter(app, envelope, settings)
        return {relay.DEAD_LETTERED: 1}

    valid: list[tuple[Item, events.Event]] = []
    invalid: list[tuple[Item, InvalidEvent]] = []
    for item in items:
        try:
            event = events.from_message(
                item.task,
                item.kwargs,
                event_id=item.event_id,
                default_service_id=settings.service_id,
                services=settings.service_ids,
            )
        except InvalidEvent as exc:
            invalid.append((item, exc))
        else:
            valid.append((item, event))

    admission, delay = relay.admit(app, [event for _, event in valid])
    if admission is Admit.DEFER:
        # The gateway is down for the fleet: the whole message goes back as it came, its
        # events unsent and their budgets unspent; a batch that probes sends as usual.
        relay.put_back_request(
            task, request, delay, BATCH_QUEUE, {FIRST_ATTEMPT_HEADER: first_attempt_at}
        )
        metrics.record_deferred(TRACK_BATCH)
        log.info(
            "batch task_id=%s events=%d deferred %.0fs: gateway outage", batch_id, len(items), delay
        )
        return {relay.DEFERRED: len(items)}

    delivered_before, planned, superseded = _plan(app, valid, batch_id, first_attempt_at)
    valid = [(item, plan.event) for item, plan in planned if plan.event is not None]
    sending = _Sending(
        app, [(plan, event) for (_, plan), (_, event) in zip(planned, valid, strict=True)]
    )
    # Dead letters are published while the valid events are in flight.
    for item, problem in invalid:
        excerpt = f"{problem} (batch {batch_id}, index {item.index})"
        envelope = Envelope.invalid(
            problem.code,
            excerpt,
            event_id=item.event_id,
            task=item.task,
            kwargs=item.kwargs,
            task_id=item.event_id,
        )
        dead_letter(app, envelope, settings)

    counts = {
        relay.DELIVERED: 0,
        relay.RETRYING: 0,
        relay.DEAD_LETTERED: len(invalid),
        relay.DEFERRED: 0,
    }
    if delivered_before:  # the key only when there are any: the counts are the task's result
        counts[relay.DUPLICATE] = len(delivered_before)
    if superseded:
        counts[relay.SUPERSEDED] = superseded
    answers = sending.answers()
    settle = _Settle(app, batch_id, first_attempt_at)
    for (item, event), answer, outage in zip(valid, answers, sending.outages, strict=True):
        counts[settle(item, event, answer, outage)] += 1
    log.info(
        "batch task_id=%s events=%d delivered=%d retrying=%d dead_lettered=%d duplicates=%d "
        "superseded=%d deferred=%d",
        batch_id,
        len(items),
        counts[relay.DELIVERED],
        counts[relay.RETRYING],
        counts[relay.DEAD_LETTERED],
        len(delivered_before),
        superseded,
        counts[relay.DEFERRED],
    )
    if not counts[relay.DEFERRED]:  # the key only when there are any, as for duplicates
        del counts[relay.DEFERRED]
    return counts


def _plan(
    app: TotangoCelery,
    valid: list[tuple[Item, events.Event]],
    batch_id: str,
    first_attempt_at: str,
) -> tuple[set[str], list[tuple[Item, relay.Plan]], int]:
    """One round trip for the whole batch: events already delivered (the batch ran before,
    or another copy of an event did) are acknowledged without a call, and attributes with a
    newer value sent are left out. Returns the ids delivered before, the events to send with
    their plans, and how many were superseded whole."""
    delivered_before, plans = relay.check(app, [event for _, event in valid])
    plan_of = {id(plan.original): plan for plan in plans}
    if delivered_before:
        for event_id in sorted(delivered_before):
            metrics.record_duplicate_suppressed(TRACK_BATCH)
            log.debug("duplicate suppressed event_id=%s batch=%s", event_id, batch_id)
        log.info(
            "duplicates suppressed batch=%s count=%d: already delivered",
            batch_id,
            len(delivered_before),
        )
    planned: list[tuple[Item, relay.Plan]] = []
    superseded = 0
    for item, event in valid:
        plan = plan_of.get(id(event))
        if plan is None:  # delivered before
            continue
        relay.note_superseded(_attempt(item, event, batch_id, first_attempt_at), plan)
        if plan.event is None:
            superseded += 1
        else:
            planned.append((item, plan))
    return delivered_before, planned, superseded


#: Events each sender of a batch is planned to send in turn. A Future (with its Condition
#: and a trip through the executor's queue) per event cost about a tenth of a batch's CPU
#: (py-spy); one per 4 events costs a quarter of that. The executor's threads stay busy as
#: long as a few batches are in flight, which the Celery pool's slots and prefetch ensure;
#: a lone batch takes 4 round trips instead of 1.
EVENTS_PER_SENDER = 4


def senders_for(events_in_batch: int, settings: Settings) -> int:
    """How many senders a batch gets: at most one per event and ``batch_senders`` in all."""
    planned = math.ceil(events_in_batch / EVENTS_PER_SENDER)
    return max(1, min(events_in_batch, settings.batch_senders, planned))


def new_executor(settings: Settings) -> ThreadPoolExecutor:
    """The senders of one process, shared by its batches so that the calls in flight stay
    within the HTTP pool (``TOTANGO_BATCH_SENDERS``)."""
    return ThreadPoolExecutor(
        max_workers=settings.batch_senders, thread_name_prefix="totango-batch"
    )


class _Sending:
    """A batch's events in flight: a few senders on the process's executor, each taking
    the next unsent event until none is left (``senders_for``). Each event is finished in
    the state store as its answer comes (``relay.finish``: its id recorded after a 200, its
    claims checked), so that a batch cut short by a crash sends again only the calls that
    were in flight, not every event it had delivered. The requests of all senders share
    the store's pipeline."""

    def __init__(self, app: TotangoCelery, plans: list[tuple[relay.Plan, events.Event]]) -> None:
        self._app = app
        self._plans = plans
        self._results: list[Answer | Exception | None] = [None] * len(plans)
        #: Per event, ``relay.report``'s verdict on its answer: the seconds to wait while
        #: the breaker is open, else ``None``.
        self.outages: list[float | None] = [None] * len(plans)
        # deque.popleft is atomic (thread-safe): each index goes to exactly one sender.
        self._todo = deque(range(len(plans)))
        senders = senders_for(len(plans), app.settings) if plans else 0
        executor = app.batch_executor.get()
        self._senders = [executor.submit(self._run) for _ in range(senders)]

    def _run(self) -> None:
        for _ in range(len(self._plans)):  # bounded: at most every event, by one sender
            try:
                index = self._todo.popleft()
            except IndexError:
                return
            plan, event = self._plans[index]
            try:
                answer = relay.send(self._app, event)
            except Exception as exc:  # noqa: BLE001  one event's bug is that event's outcome
                self._results[index] = exc
                continue
            self._results[index] = answer
            try:
                self.outages[index] = relay.report(self._app, event, answer)
                relay.finish(self._app, [(plan, answer)])
            except Exception:  # the answer stands; a repair not published is logged
                log.exception("finishing event_id=%s in the state store", event.event_id)

    def answers(self) -> list[Answer | Exception]:
        """Every event's answer (or the exception its call raised), in batch order."""
        for sender in self._senders:
            sender.result()
        done: list[Answer | Exception] = []
        for result in self._results:
            done.append(result if result is not None else RuntimeError("event not sent"))
        return done


def _attempt(
    item: Item, event: events.Event, batch_id: str, first_attempt_at: str
) -> relay.Attempt:
    return relay.Attempt(
        task=item.task,
        event_id=item.event_id,
        account_id=event.account_id,
        kwargs=item.kwargs,
        task_id=item.event_id,
        number=1,
        first_attempt_at=first_attempt_at,
        started_at=0.0,
        context=f" batch={batch_id}",
        summarised=False,
    )


@dataclass(frozen=True)
class _Settle:
    app: TotangoCelery
    batch_id: str
    first_attempt_at: str

    def __call__(
        self,
        item: Item,
        event: events.Event,
        answer: Answer | Exception,
        outage: float | None = None,
    ) -> str:
        """One event's outcome; a re-enqueue or dead letter is published before it returns."""
        if isinstance(answer, Exception):  # one event's bug must not re-send its neighbours
            log.error(
                "unexpected error sending event_id=%s task=%s batch=%s",
                item.event_id,
                item.task,
                self.batch_id,
                exc_info=answer,
            )
            envelope = Envelope.failed(
                f"error:{type(answer).__name__}",
                event_id=item.event_id,
                task=item.task,
                kwargs=item.kwargs,
                attempts=0,
                excerpt=repr(answer),
                task_id=item.event_id,
            )
            dead_letter(self.app, envelope, self.app.settings)
            return relay.DEAD_LETTERED
        attempt = _attempt(item, event, self.batch_id, self.first_attempt_at)
        return relay.settle(
            self.app, attempt, answer, self._reenqueue, outage=outage, put_back=self._put_back
        )

    def _put_back(self, attempt: relay.Attempt, delay: float) -> None:
        # Alone, as a single event that has spent none of its budget: this call failed
        # because the gateway is down for everyone, not because of the event.
        self.app.send_task(
            attempt.task,
            kwargs=attempt.kwargs,
            task_id=attempt.event_id,
            countdown=delay,
            retries=0,
            headers={FIRST_ATTEMPT_HEADER: attempt.first_attempt, DEFERRALS_HEADER: 1},
            queue=QUEUE,
            retry=True,
            retry_policy=PUBLISH_RETRY_POLICY,
        )

    def _reenqueue(self, attempt: relay.Attempt, _answer: Answer, outcome: Outcome) -> None:
        # As Task.retry would: the same task id and event id, retries=1 so the single-event task
        # spends the rest of the normal budget; published with confirms on RabbitMQ.
        self.app.send_task(
            attempt.task,
            kwargs=attempt.kwargs,
            task_id=attempt.event_id,
            countdown=outcome.delay,
            retries=1,
            headers={FIRST_ATTEMPT_HEADER: attempt.first_attempt},
            retry=True,
            retry_policy=PUBLISH_RETRY_POLICY,
        )
