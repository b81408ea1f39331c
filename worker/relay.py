"""What the single-event task and the batch do with one event: send it, then act on the
one outcome decision (``worker.outcome``): count a delivery, publish a retry, or dead-letter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from celery import Celery

from worker import metrics, observability
from worker.circuit import Circuit
from worker.contract import DEFERRALS_HEADER, ENQUEUED_AT_HEADER, FIRST_ATTEMPT_HEADER, QUEUE
from worker.deadletter import PUBLISH_RETRY_POLICY, dead_letter
from worker.envelope import Envelope, iso_at
from worker.gateway import Answer, Gateways
from worker.newest import Claim, claims_of, repairs, without
from worker.outage import Admit
from worker.outcome import Kind, Outcome, decide
from worker.process_local import PerProcess
from worker.retry import is_delivered
from worker.settings import Settings
from worker.state import StateStore
from worker.transfers import Transfer

if TYPE_CHECKING:
    from worker.events import Event

log = logging.getLogger("worker.tasks")


class TotangoCelery(Celery):
    """A Celery app that carries the settings it was made from, and this process's
    gateway connection pool and batch senders (each made again in a forked child).
    ``worker.application.create_app`` makes it."""

    settings: Settings
    gateway: PerProcess[Gateways]
    batch_executor: PerProcess[ThreadPoolExecutor]
    #: The records of delivered event ids; ``None`` when duplicate suppression is off.
    state_store: PerProcess[StateStore] | None
    #: The fleet's breakers as this process sees them; ``None`` when the breaker is off.
    circuit: PerProcess[Circuit] | None
    #: The state store's check of single events on the gateway engine's thread.
    vetting: Vetting


#: Returned by the tasks and counted by the batch.
DELIVERED = "delivered"
RETRYING = "retrying"
DEAD_LETTERED = "dead_lettered"
#: A copy of an event already delivered: acknowledged without a call.
DUPLICATE = "duplicate"
#: An attribute update whose every attribute has a newer value sent: acknowledged unsent.
SUPERSEDED = "superseded"
#: The gateway is down for the fleet (the breaker is open): put back unsent, budget unspent.
DEFERRED = "deferred"

#: Puts an event back on its queue unsent, to come back after the given seconds.
PutBack = Callable[["Attempt", float], None]


@dataclass(frozen=True)
class Attempt:
    """One attempt at one event, with what its outcome needs to be logged, retried or
    dead-lettered."""

    task: str
    event_id: str
    account_id: str
    kwargs: dict[str, Any]
    task_id: str | None
    #: 1 for the first attempt.
    number: int
    #: The first attempt's time from the retry header; ``None`` on a first attempt.
    first_attempt_at: str | None
    started_at: float
    #: Appended to the log line: `` batch=<id>`` for an event of a batch.
    context: str = ""
    #: A delivery is logged at DEBUG, and counted in the summary line at INFO
    #: (``delivered_summary``); a batch logs its own line for the whole batch instead.
    summarised: bool = True

    @property
    def first_attempt(self) -> str:
        """Formatted only when a retry or a dead letter needs it, not on a delivery."""
        return self.first_attempt_at or iso_at(self.started_at)

    @property
    def who(self) -> str:
        return f"event_id={self.event_id} account={self.account_id} task={self.task}{self.context}"


def current_attempt(task: str, event: Event, kwargs: dict[str, Any], request: Any) -> Attempt:
    """The attempt a single-event task is making now (``request.retries`` came before)."""
    return Attempt(
        task=task,
        event_id=event.event_id,
        account_id=event.account_id,
        kwargs=kwargs,
        task_id=request.id,
        number=request.retries + 1,
        first_attempt_at=header(request, FIRST_ATTEMPT_HEADER),
        started_at=time.time(),
    )


#: A 200 that is not the GIF: once a minute at most, per process.
unexpected_body_warning = observability.RateLimitedWarning(log, 60.0)
#: The single events delivered: one INFO line a minute with their count.
delivered_summary = observability.DeliveredSummary(log)


@dataclass(frozen=True)
class Plan:
    """What is sent for one event that was not delivered before."""

    #: The event as it came.
    original: Event
    #: The call to make: the event without its superseded attributes; ``None`` when an
    #: attribute update has none left.
    event: Event | None
    #: The claims the call carries, stored as the newest (checked again after the call).
    claims: tuple[Claim, ...] = ()
    #: The gateway parameters left out: a newer value of each was sent.
    superseded: tuple[str, ...] = ()


def checks(app: TotangoCelery) -> bool:
    """Whether an event is checked in the state store before its call."""
    return app.state_store is not None and (app.settings.dedup_on or app.settings.newest_wins_on)


def check(
    app: TotangoCelery, batch: list[Event], *, here: bool = False
) -> tuple[set[str], list[Plan]]:
    """One round trip to the state store for these events: the ids already delivered
    (acknowledged without a call), and a plan for each of the others. When the store is off
    or cannot be reached, nothing is known: every event is sent as it came (fail open).
    ``here``: the round trip on this thread (``StateStore.check``)."""
    settings = app.settings
    store = app.state_store
    claims = (
        [(event.event_id, claim) for event in batch for claim in claims_of(event)]
        if settings.newest_wins_on
        else []
    )
    if store is None or not batch or not (settings.dedup_on or claims):
        return set(), [Plan(event, event) for event in batch]
    checked = store.get().check(
        [event.event_id for event in batch], claims, dedup=settings.dedup_on, here=here
    )
    if checked is None:
        return set(), [Plan(event, event) for event in batch]
    lost: dict[str, list[str]] = {}
    for position in checked.superseded:
        event_id, claim = claims[position]
        lost.setdefault(event_id, []).append(claim.param)
    kept: dict[str, list[Claim]] = {}
    for position, (event_id, claim) in enumerate(claims):
        if position not in checked.superseded:
            kept.setdefault(event_id, []).append(claim)
    plans = []
    for event in batch:
        if event.event_id in checked.delivered:
            continue
        dropped = tuple(lost.get(event.event_id, ()))
        claimed = tuple(kept.get(event.event_id, ()))
        plans.append(Plan(event, without(event, dropped), claimed, dropped))
    return checked.delivered, plans


class Vetting:
    """The state store's check of single events, on the gateway engine's thread
    (``worker.transfers``): every event handed over since the engine's last round, in one
    round trip made there. Each transfer's note becomes its plan (``None``: delivered
    before), and its event the plan's (``None``: nothing left to send). One per process,
    so that the engine finds every event's vet the same and checks them together."""

    def __init__(self, app: TotangoCelery) -> None:
        self.app = app

    def __call__(self, transfers: list[Transfer]) -> None:
        _, plans = check(self.app, [transfer.event for transfer in transfers], here=True)
        by_id = {plan.original.event_id: plan for plan in plans}
        for transfer in transfers:
            plan = by_id.get(transfer.event.event_id)
            transfer.note = plan
            transfer.event = None if plan is None else plan.event


def check_and_send(app: TotangoCelery, event: Event) -> tuple[Plan | None, Answer | None]:
    """A single event's check and call, waited for once (``Vetting``): its plan (``None``:
    delivered before) and the call's answer (``None``: not sent). Without the store's check,
    or when the check failed and the call was sent unchecked (no note), the plan is the
    event as it came."""
    vet = app.vetting if checks(app) else None
    with metrics.gateway_call():
        answer, note = app.gateway.get().for_event(event).send_vetted(event, vet)
    if answer is None:
        return note, None
    plan: Plan = note if note is not None else Plan(event, event)
    account(app, plan.event or event, answer)
    return plan, answer


def suppressed(attempt: Attempt) -> str:
    """A copy of a delivered event: counted and logged, then acknowledged without a call."""
    metrics.record_duplicate_suppressed(attempt.task)
    log.info("duplicate suppressed %s attempt=%d: already delivered", attempt.who, attempt.number)
    return DUPLICATE


def note_superseded(attempt: Attempt, plan: Plan) -> None:
    """Count and log the attributes a plan leaves out; when nothing is left to send, the
    message is acknowledged without a call (``SUPERSEDED``)."""
    if not plan.superseded:
        return
    whole = plan.event is None
    metrics.record_superseded(attempt.task, len(plan.superseded), whole=whole)
    log.info(
        "%s %s attempt=%d attributes=%s: a newer value of each was sent",
        "superseded" if whole else "attributes superseded",
        attempt.who,
        attempt.number,
        ",".join(plan.superseded),
    )


def finish(app: TotangoCelery, sent: list[tuple[Plan, Answer]], *, wait: bool = True) -> None:
    """One round trip after the calls: record the ids delivered (a copy that comes later is
    suppressed), and send again any newer value that was claimed while one of these calls
    was in flight (it may have landed after it). Without claims nothing comes back to act
    on, and the records are sent without waiting (``StateStore.record_later``); with
    ``wait=False`` neither are the claims: a newer value is published again from the
    ``repairers`` thread when the store's answer comes."""
    store = app.state_store
    if store is None or not sent:
        return
    delivered = (
        [plan.original.event_id for plan, answer in sent if is_delivered(answer.status)]
        if app.settings.dedup_on
        else []
    )
    # A definite refusal (an HTTP status other than 200) changed nothing at Totango; a 200, a
    # timeout or a broken connection may have.
    landed = [
        (plan, claim)
        for plan, answer in sent
        if is_delivered(answer.status) or not answer.status.isdigit()
        for claim in plan.claims
    ]
    if not delivered and not landed:
        return
    claims = [claim for _, claim in landed]
    if not wait:
        store.get().finish_later(
            delivered, claims, lambda newer: repairers.get().submit(repair, app, newer, landed)
        )
        return
    newer = store.get().finish(delivered, claims)
    if newer:
        republish_newer(app, newer, landed)


#: The thread that publishes newer values again for ``finish(wait=False)``: the store's
#: flusher, which reads the answer, must not wait on the broker.
repairers = PerProcess(partial(ThreadPoolExecutor, 1, thread_name_prefix="totango-repair"))


def close_repairs() -> None:
    """Publish the repairs still queued (at shutdown, after the stores have flushed)."""
    executor = repairers.peek()
    if executor is not None:
        executor.shutdown(wait=True)
        repairers.reset()


def repair(app: TotangoCelery, newer: list[Claim], landed: list[tuple[Plan, Claim]]) -> None:
    """``republish_newer`` on the repairers' thread, where an exception is logged."""
    try:
        republish_newer(app, newer, landed)
    except Exception:
        log.exception("publishing a newer value again")


def republish_newer(
    app: TotangoCelery, newer: list[Claim], landed: list[tuple[Plan, Claim]]
) -> None:
    """Each newer value as an update of its own, on the work queue: it is claimed, sent and
    checked like any other."""
    after = {(claim.entity, claim.param): plan.original.event_id for plan, claim in landed}
    by_event: dict[str, list[Claim]] = {}
    for claim in newer:
        by_event.setdefault(after[(claim.entity, claim.param)], []).append(claim)
    for event_id, claims in by_event.items():
        for repair in repairs(claims, after=event_id):
            app.send_task(
                repair.task,
                kwargs=repair.kwargs,
                task_id=repair.event_id,
                queue=QUEUE,
                headers={ENQUEUED_AT_HEADER: time.time()},
                retry=True,
                retry_policy=PUBLISH_RETRY_POLICY,
            )
            metrics.record_repairs(len(repair.kwargs["attributes"]))
            log.info(
                "newer value sent again event_id=%s account=%s task=%s attributes=%s: the "
                "older call of event_id=%s was in flight when it was claimed",
                repair.event_id,
                repair.kwargs["account_id"],
                repair.task,
                ",".join(repair.kwargs["attributes"]),
                event_id,
            )


def admit(app: TotangoCelery, batch: list[Event]) -> tuple[Admit, float]:
    """May these events' calls go out now (``worker.outage``): ``SEND``, ``PROBE`` (the
    breaker of their gateway is open and this tests it), or ``DEFER`` by some seconds.
    Always ``SEND`` when the breaker is off."""
    if app.circuit is None or not batch:
        return Admit.SEND, 0.0
    circuit = app.circuit.get()
    verdict = Admit.SEND
    for url in dict.fromkeys(app.settings.gateway_for(event.service_id) for event in batch):
        admission, wait = circuit.admit(url)
        if admission is Admit.DEFER:
            return admission, wait
        if admission is Admit.PROBE:
            verdict = admission
    return verdict, 0.0


def report(app: TotangoCelery, event: Event, answer: Answer) -> float | None:
    """Tell the breaker what this call found; ``None`` when its gateway is up as far as the
    fleet knows, else the seconds a failed event is to wait (the breaker is open)."""
    if app.circuit is None:
        return None
    circuit = app.circuit.get()
    url = app.settings.gateway_for(event.service_id)
    if not circuit.report(url, answer):
        return None
    return circuit.deferral(url)


def deferrals(request: Any) -> int:
    """How many times this message was put back in an outage (a new copy each time)."""
    value = header(request, DEFERRALS_HEADER)
    return value if isinstance(value, int) and value >= 0 else 0


def put_back_request(
    task: Any, request: Any, delay: float, queue: str, headers: dict[str, Any]
) -> None:
    """The same message again after ``delay``, with the same retry count and one deferral
    more: Celery's own signature of the request, as ``Task.retry`` builds it, without
    spending a retry. Published with confirms."""
    task.signature_from_request(
        request,
        countdown=delay,
        retries=request.retries,
        headers={**headers, DEFERRALS_HEADER: deferrals(request) + 1},
        queue=queue,
    ).apply_async(retry=True, retry_policy=PUBLISH_RETRY_POLICY)


def deferred(attempt: Attempt, delay: float, put_back: PutBack) -> str:
    """Back on the queue unsent, its retry budget unspent: the gateway is down for the
    fleet. Counted; logged at DEBUG only (the outage itself is logged once)."""
    put_back(attempt, delay)
    metrics.record_deferred(attempt.task)
    log.debug(
        "deferred %s attempt=%d for %.0fs: gateway outage", attempt.who, attempt.number, delay
    )
    return DEFERRED


def send(app: TotangoCelery, event: Event) -> Answer:
    """One gateway call, counted in flight and by its answer."""
    with metrics.gateway_call():
        answer = app.gateway.get().send(event)
    return account(app, event, answer)


def account(app: TotangoCelery, event: Event, answer: Answer) -> Answer:
    """Count a call by its answer, and note a failure or an unexpected body."""
    if answer.first is not None:  # the GET answered 414, then the POST: both are counted
        metrics.record_answer(answer.first.status, answer.first.method, answer.first.elapsed)
    metrics.record_answer(answer.status, answer.method, answer.elapsed)
    if answer.status != "200":
        url = app.settings.gateway_for(event.service_id)
        observability.failed_call_breadcrumb(url, answer.method, answer.status, answer.elapsed)
    if answer.unexpected_body:
        metrics.record_unexpected_body()
        unexpected_body_warning.warn(
            "gateway answered 200 with a body that is not the GIF, counted as delivered: a "
            "proxy in the way? event_id=%s body=%r",
            event.event_id,
            answer.excerpt,
        )
    return answer


def settle(
    app: TotangoCelery,
    attempt: Attempt,
    answer: Answer,
    reschedule: Callable[[Attempt, Answer, Outcome], None],
    *,
    outage: float | None = None,
    put_back: PutBack | None = None,
) -> str:
    """Decide on the answer and act on it; ``reschedule`` publishes a retry (the task's
    ``Task.retry``, or the batch's re-enqueue as a single event). A failed call while the
    breaker is open (``outage``: the seconds to wait, from ``report``) is put back instead,
    its retry budget unspent, and never dead-lettered for having run out."""
    if outage is not None and put_back is not None and not is_delivered(answer.status):
        return deferred(attempt, outage, put_back)
    outcome = decide(
        answer.status, attempt.number - 1, app.settings.retry_policy, answer.retry_after
    )
    if outcome.kind is Kind.DELIVERED:
        metrics.record_delivered(attempt.task)
        if log.isEnabledFor(logging.DEBUG):  # ``who`` is formatted only for a line shown
            log.debug("delivered %s attempt=%d", attempt.who, attempt.number)
        if attempt.summarised:
            delivered_summary.add()
        return DELIVERED
    if outcome.kind is Kind.RETRY:
        metrics.record_retried(attempt.task, answer.status)
        log.info(
            "retrying %s attempt=%d status=%s next_delay=%.1fs",
            attempt.who,
            attempt.number,
            answer.status,
            outcome.delay,
        )
        reschedule(attempt, answer, outcome)
        return RETRYING
    envelope = Envelope.exhausted(
        str(outcome.reason),
        event_id=attempt.event_id,
        task=attempt.task,
        kwargs=attempt.kwargs,
        attempts=attempt.number,
        first_attempt_at=attempt.first_attempt,
        last_status=answer.status,
        last_excerpt=answer.excerpt,
        task_id=attempt.task_id,
    )
    dead_letter(app, envelope, app.settings)
    return DEAD_LETTERED


def header(request: Any, name: str) -> Any:
    """A custom message header: Celery exposes them as request attributes."""
    value = getattr(request, name, None)
    if value is None and isinstance(request.headers, dict):
        value = request.headers.get(name)
    return value
