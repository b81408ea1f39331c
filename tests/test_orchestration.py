"""The task bodies, the batch settle and the failure hook, run in this process without a broker
server: an app built from ``Settings`` on the embedded (filesystem) broker, and the loopback
gateway emulator. One test per outcome: delivered, retried, dead-lettered (invalid, retries
spent, the worker's own failure), and a batch's mix of all three.

``Task.apply`` runs the real task body; a retry comes back as Celery's ``Retry`` (eager mode
publishes nothing), so each test sees exactly the decision the worker made.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from billiard.exceptions import WorkerLostError
from celery.exceptions import Retry
from celery.signals import task_retry

from totango_emulator import GatewayEmulator
from worker import observability, relay, signals
from worker.application import TotangoCelery
from worker.contract import (
    FIRST_ATTEMPT_HEADER,
    QUEUE,
    TRACK_ACTIVITY,
    TRACK_BATCH,
    UPDATE_ACCOUNT,
)
from worker.deadletter import browse
from worker.envelope import Envelope
from worker.topology import task_queue

ACTIVITY = {"account_id": "acme", "user_id": "jo@acme.test", "activity": "Login", "module": "App"}


@pytest.fixture
def make_app(embedded_app: Callable[..., TotangoCelery]) -> Callable[..., TotangoCelery]:
    return embedded_app


def dead_letters(app: TotangoCelery) -> list[Envelope]:
    return browse(app)


def queued_tasks(app: TotangoCelery) -> list[dict[str, Any]]:
    """The task messages waiting on ``totango`` (re-enqueued by a batch), taken off it."""
    found = []
    with app.connection_for_write() as connection:
        queue = task_queue(app.settings.broker_kind)(connection.default_channel)
        queue.declare()
        while (message := queue.get(no_ack=True)) is not None:
            found.append({"headers": message.headers, "body": message.decode()})
    return found


def test_a_delivered_event_makes_one_call_and_no_dead_letter(
    make_app: Callable[..., TotangoCelery], gateway: GatewayEmulator
) -> None:
    """200 from the gateway: the task returns ``delivered``, after exactly one call."""
    app = make_app()
    result = app.tasks[TRACK_ACTIVITY].apply(kwargs=ACTIVITY, task_id="e-1")
    assert result.get() == "delivered"
    (call,) = gateway.calls()
    assert ("sdr_a", "Login") in call.params
    assert dead_letters(app) == []


@pytest.fixture
def summary_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delivered summary with a clock of the test's own: ``clock[0]`` is now."""
    clock = [0.0]
    fresh = observability.DeliveredSummary(relay.log, 60.0, clock=lambda: clock[0])
    monkeypatch.setattr(relay, "delivered_summary", fresh)
    return clock


def test_deliveries_are_logged_at_debug_and_counted_in_one_info_line_a_minute(
    make_app: Callable[..., TotangoCelery],
    gateway: GatewayEmulator,
    caplog: pytest.LogCaptureFixture,
    summary_clock: list[float],
) -> None:
    """Each delivery has its own line at DEBUG (event id, account, attempt); at INFO, the
    first delivery after start says so, and then one line a minute gives the count since."""
    caplog.set_level(logging.DEBUG, logger="worker.tasks")
    app = make_app()
    for n in range(3):
        assert app.tasks[TRACK_ACTIVITY].apply(kwargs=ACTIVITY, task_id=f"d-{n}").get() == (
            "delivered"
        )
        summary_clock[0] += 30.0  # d-0 at 0 s, d-1 at 30 s, d-2 at 60 s
    assert len(gateway.calls()) == 3
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "worker.tasks"]
    debug = [text for level, text in lines if level == logging.DEBUG]
    info = [text for level, text in lines if level == logging.INFO]
    assert debug == [
        f"delivered event_id=d-{n} account=acme task={TRACK_ACTIVITY} attempt=1" for n in range(3)
    ]
    assert info == [
        "delivered the first event since start; a summary follows every 60s",
        "delivered 2 events in the last 60s",
    ]


@pytest.fixture
def retries() -> Iterator[list[Retry]]:
    """Every ``Retry`` a task raises, from Celery's own ``task_retry`` signal."""
    seen: list[Retry] = []

    def on_retry(reason: Any = None, **_: Any) -> None:
        seen.append(reason)

    task_retry.connect(on_retry, weak=False)
    yield seen
    task_retry.disconnect(on_retry)


def test_a_503_is_retried_with_the_decided_delay_and_the_first_attempt_header(
    make_app: Callable[..., TotangoCelery], gateway: GatewayEmulator, retries: list[Retry]
) -> None:
    """A 503, then 200: one Task.retry with a countdown within the backoff (1 to 4 s), routed
    to the totango queue with the first attempt's time in its headers; then delivered."""
    app = make_app()
    gateway.add_rule(None, [503])
    result = app.tasks[TRACK_ACTIVITY].apply(kwargs=ACTIVITY, task_id="e-2")
    assert result.get() == "delivered"
    (retry,) = retries
    assert 1 <= float(retry.when) <= 4
    assert retry.sig.options["headers"][FIRST_ATTEMPT_HEADER]
    assert retry.sig.options["queue"] == QUEUE
    assert [call.status for call in gateway.calls()] == [503, 200]
    assert dead_letters(app) == []


def test_retry_after_sets_the_countdown(
    make_app: Callable[..., TotangoCelery], gateway: GatewayEmulator, retries: list[Retry]
) -> None:
    """A 429 with Retry-After: 3 waits 3 s, more than the first backoff (at most 1 s)."""
    app = make_app()
    gateway.add_rule(None, [429], retry_after="3")
    assert app.tasks[TRACK_ACTIVITY].apply(kwargs=ACTIVITY, task_id="e-3").get() == "delivered"
    (retry,) = retries
    assert float(retry.when) == 3.0


def test_when_the_retries_run_out_the_event_is_dead_lettered_as_exhausted(
    make_app: Callable[..., TotangoCelery], gateway: GatewayEmulator, retries: list[Retry]
) -> None:
    """An outage: 1 attempt and 3 retries (TOTANGO_MAX_RETRIES=3), then a dead letter
    ``exhausted:503`` that counts every attempt and keeps the arguments to replay."""
    app = make_app()
    gateway.set_outage(503)
    result = app.tasks[TRACK_ACTIVITY].apply(kwargs=ACTIVITY, task_id="e-4")
    assert result.get() == "dead_lettered"
    assert len(retries) == 3
    assert len(gateway.calls()) == 4
    (envelope,) = dead_letters(app)
    assert envelope.reason == "exhausted:503"
    assert envelope.attempts == 4
    assert envelope.last_status == "503"
    assert envelope.kwargs == ACTIVITY
    assert envelope.task_id == "e-4"
    assert envelope.first_attempt_at
    assert envelope.replayable


def test_an_invalid_event_is_dead_lettered_without_a_call(
    make_app: Callable[..., TotangoCelery], gateway: GatewayEmulator
) -> None:
    """A Contract Value with a currency sign: ``invalid:Contract Value``, never sent."""
    app = make_app()
    kwargs = {"account_id": "acme", "attributes": {"Contract Value": "$1,200"}}
    result = app.tasks[UPDATE_ACCOUNT].apply(kwargs=kwargs, task_id="e-5")
    assert result.get() == "dead_lettered"
    (envelope,) = dead_letters(app)
    assert envelope.reason == "invalid:Contract Value"
    assert envelope.attempts == 0
    assert gateway.calls() == []


def test_a_lost_worker_process_ends_as_a_worker_lost_dead_letter(
    make_app: Callable[..., TotangoCelery],
) -> None:
    """The failure hook: a task whose process died (WorkerLostError) is dead-lettered with
    ``worker_lost``, its arguments kept."""
    app = make_app()
    task = app.tasks[TRACK_ACTIVITY]
    signals.on_task_failure(
        sender=task, task_id="e-6", exception=WorkerLostError("killed"), kwargs=ACTIVITY
    )
    (envelope,) = dead_letters(app)
    assert envelope.reason == "worker_lost"
    assert envelope.kwargs == ACTIVITY


def test_the_failure_hook_ignores_an_app_it_did_not_make(
    make_app: Callable[..., TotangoCelery],
) -> None:
    """A task of another Celery app is not ours to dead-letter."""
    from celery import Celery  # noqa: PLC0415  only this test needs a foreign app

    app = make_app()
    foreign = Celery("other", set_as_current=False)

    @foreign.task(name="other.task")
    def other() -> None: ...

    signals.on_task_failure(sender=other, task_id="x", exception=RuntimeError(), kwargs={})
    assert dead_letters(app) == []


def test_a_batch_settles_each_event_on_its_own(
    make_app: Callable[..., TotangoCelery], gateway: GatewayEmulator
) -> None:
    """One batch: a delivered event, an invalid one (dead-lettered alone) and a failing one
    (re-enqueued alone as a single-event task, retries=1, same event id)."""
    app = make_app()
    gateway.add_rule({"sdr_a": "Flaky"}, [503])
    events = [
        {"task": TRACK_ACTIVITY, "kwargs": {**ACTIVITY, "event_id": "ok"}},
        {"task": UPDATE_ACCOUNT, "kwargs": {"account_id": "", "attributes": {"a": "b"}}},
        {"task": TRACK_ACTIVITY, "kwargs": {**ACTIVITY, "activity": "Flaky", "event_id": "f"}},
    ]
    result = app.tasks[TRACK_BATCH].apply(kwargs={"events": events}, task_id="b-1")
    assert result.get() == {"delivered": 1, "retrying": 1, "dead_lettered": 1}
    (envelope,) = dead_letters(app)
    assert envelope.reason == "invalid:account_id"
    assert envelope.event_id == "b-1:1"
    (retried,) = queued_tasks(app)
    assert retried["headers"]["task"] == TRACK_ACTIVITY
    assert retried["headers"]["id"] == "f"
    assert retried["headers"]["retries"] == 1
    assert retried["body"][1]["activity"] == "Flaky"


def test_a_batch_event_without_retries_left_is_dead_lettered_as_exhausted(
    make_app: Callable[..., TotangoCelery], gateway: GatewayEmulator
) -> None:
    """TOTANGO_MAX_RETRIES=0: a batch event's first failure is its last: ``exhausted:503``."""
    app = make_app(TOTANGO_MAX_RETRIES="0")
    gateway.set_outage(503)
    events = [{"task": TRACK_ACTIVITY, "kwargs": {**ACTIVITY, "event_id": "x"}}]
    result = app.tasks[TRACK_BATCH].apply(kwargs={"events": events}, task_id="b-2")
    assert result.get() == {"delivered": 0, "retrying": 0, "dead_lettered": 1}
    (envelope,) = dead_letters(app)
    assert envelope.reason == "exhausted:503"
    assert envelope.event_id == "x"
    assert queued_tasks(app) == []


def test_a_malformed_batch_is_dead_lettered_whole(
    make_app: Callable[..., TotangoCelery], gateway: GatewayEmulator
) -> None:
    """A batch whose ``events`` is not a list: the whole message as it came, ``invalid:events``."""
    app = make_app()
    result = app.tasks[TRACK_BATCH].apply(kwargs={"events": "nope"}, task_id="b-3")
    assert result.get() == {"dead_lettered": 1}
    (envelope,) = dead_letters(app)
    assert envelope.reason == "invalid:events"
    assert envelope.kwargs == {"events": "nope"}
    assert gateway.calls() == []


def test_a_throttle_lets_one_through_per_interval_and_counts_the_rest() -> None:
    """The first happening passes at once; the next ones are held back until ``interval``
    has passed, and the one that passes then carries the count since (itself included)
    and the seconds since the last one that passed."""
    clock = [0.0]
    throttle = observability.Throttle(60.0, clock=lambda: clock[0])
    assert throttle.passes() == (1, None)
    assert throttle.passes() is None
    clock[0] = 59.9
    assert throttle.passes() is None
    clock[0] = 60.0
    assert throttle.passes() == (3, 60.0)
    assert throttle.passes() is None
