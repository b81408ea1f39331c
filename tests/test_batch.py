"""The batch path end to end: ``totango.track_batch`` through a real worker process, a real
broker (RabbitMQ and Redis, via the ``broker_url`` fixture) and the loopback gateway.

Events are told apart at the gateway by a user id of their own. None of these tests times
anything: each waits, with a bound, for an outcome and then checks counts.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest

from tests.brokers import main_queue_length
from tests.workers import wait_until
from worker.app import TotangoCelery
from worker.client import Producer
from worker.deadletter import browse
from worker.emulator import Call, GatewayEmulator
from worker.events import MAX_BATCH_EVENTS, TRACK_ACTIVITY, TRACK_BATCH

pytestmark = pytest.mark.integration

Env = dict[str, str]
StartWorker = Callable[..., AbstractContextManager[Popen[bytes]]]

#: Bounds on waits, generous next to the few seconds the runs take (a retry comes ~1 s later).
OUTCOME_TIMEOUT = 30.0
#: How long to keep watching after the expected outcome, to catch a duplicate or a late call.
SETTLE_SECONDS = 1.5


def user_of(call: Call) -> str:
    return dict(call.params)["sdr_u"]


def calls_by_user(gateway: GatewayEmulator) -> dict[str, list[Call]]:
    found: dict[str, list[Call]] = {}
    for call in sorted(gateway.calls(), key=lambda c: c.received_at):
        found.setdefault(user_of(call), []).append(call)
    return found


def activity(user_id: str, **extra: Any) -> dict[str, Any]:
    return {"account_id": "acme", "user_id": user_id, "activity": "A", "module": "M", **extra}


@pytest.mark.usefixtures("worker")
def test_a_batch_delivers_each_event_once_and_retries_only_the_failed_ones(
    app: TotangoCelery, gateway: GatewayEmulator, worker_log: Path
) -> None:
    """One batch of 30: 3 events get a 503 once, 1 is invalid, 26 go through at once.

    - each valid event is delivered exactly once (a delivered event is never sent again
      because a neighbour failed);
    - each failed event is re-enqueued alone and delivered on its retry: 2 calls, 503 then
      200;
    - the invalid event is alone in the dead-letter queue with ``invalid:<field>``, under
      the id the worker derived (``<batch task id>:<index>``, as it carried none) and with
      its own task and arguments, so that it replays as a single event;
    - nothing else is dead-lettered."""
    run = uuid.uuid4().hex[:8]
    users = [f"u{n}-{run}@example.com" for n in range(30)]
    failing, invalid_index = users[5:8], 17
    for user in failing:
        gateway.add_rule({"sdr_u": user}, [503])
    batch = []
    for index, user in enumerate(users):
        if index == invalid_index:
            kwargs = activity(user, account_attributes={"Contract Value": "1,200"})
        else:
            kwargs = activity(user, event_id=f"event-{index}-{run}")
        batch.append({"task": TRACK_ACTIVITY, "kwargs": kwargs})
    batch_id = f"batch-{run}"
    app.send_task(TRACK_BATCH, kwargs={"events": batch}, task_id=batch_id)

    valid = [user for index, user in enumerate(users) if index != invalid_index]
    wait_until(
        lambda: (
            len(calls_by_user(gateway)) >= len(valid)
            and all(calls[-1].status == 200 for calls in calls_by_user(gateway).values())
        ),
        OUTCOME_TIMEOUT,
        "every valid event delivered",
        worker_log,
    )
    time.sleep(SETTLE_SECONDS)

    seen = calls_by_user(gateway)
    assert sorted(seen) == sorted(valid)
    for user in valid:
        statuses = [call.status for call in seen[user]]
        assert statuses == ([503, 200] if user in failing else [200]), user
    assert len(gateway.calls()) == len(valid) + len(failing)

    (envelope,) = browse(app, timeout=0)
    assert envelope.reason == "invalid:Contract Value"
    assert envelope.task == TRACK_ACTIVITY
    assert envelope.event_id == f"{batch_id}:{invalid_index}"
    assert envelope.kwargs == {
        **activity(users[invalid_index], account_attributes={"Contract Value": "1,200"}),
        "event_id": f"{batch_id}:{invalid_index}",
    }
    assert envelope.attempts == 0
    assert envelope.replayable


@pytest.mark.usefixtures("worker")
def test_a_malformed_batch_is_dead_lettered_whole_and_nothing_is_sent(
    app: TotangoCelery, gateway: GatewayEmulator, worker_log: Path
) -> None:
    """A batch whose shape is wrong (``events`` not a list, more than MAX_BATCH_EVENTS
    events, an element without ``kwargs``) is dead-lettered as one envelope with reason
    ``invalid:events`` that keeps the whole message, so no event in it is lost; none of its
    events reaches the gateway, not even the valid ones."""
    too_many = [
        {"task": TRACK_ACTIVITY, "kwargs": activity(f"many-{n}")}
        for n in range(MAX_BATCH_EVENTS + 1)
    ]
    missing = [
        {"task": TRACK_ACTIVITY, "kwargs": activity("fine")},
        {"task": TRACK_ACTIVITY},
    ]
    sent = {
        "not-a-list": {"events": {"task": TRACK_ACTIVITY, "kwargs": activity("x")}},
        "too-many": {"events": too_many},
        "no-kwargs": {"events": missing},
    }
    for batch_id, kwargs in sent.items():
        app.send_task(TRACK_BATCH, kwargs=kwargs, task_id=batch_id)

    wait_until(
        lambda: len(browse(app, timeout=0)) >= len(sent),
        OUTCOME_TIMEOUT,
        f"{len(sent)} dead letters",
        worker_log,
    )
    time.sleep(SETTLE_SECONDS)
    envelopes = browse(app, timeout=0)
    assert sorted(e.task_id or "" for e in envelopes) == sorted(sent)
    for envelope in envelopes:
        assert envelope.reason == "invalid:events"
        assert envelope.task == TRACK_BATCH
        assert envelope.kwargs == sent[str(envelope.task_id)]
    assert gateway.calls() == []


def test_the_producer_chunks_250_events_into_3_messages(
    app: TotangoCelery,
    env: Env,
    start_worker: StartWorker,
    gateway: GatewayEmulator,
    worker_log: Path,
) -> None:
    """``Producer.send_batch`` validates each event, returns every event id in order, and
    puts 250 events in 3 messages (100, 100, 50) on the queue, as seen on the broker before
    any worker runs; a worker then delivers each of the 250 exactly once."""
    producer = Producer(app=app)
    run = uuid.uuid4().hex[:8]
    users = [f"p{n}-{run}" for n in range(250)]
    prepared = [producer.prepare(TRACK_ACTIVITY, **activity(user)) for user in users]

    ids = producer.send_batch(prepared)

    assert ids == [p.event_id for p in prepared]
    assert len(set(ids)) == 250
    assert main_queue_length(app) == 3
    with start_worker(env):
        wait_until(
            lambda: len(gateway.delivered()) >= 250, OUTCOME_TIMEOUT, "250 deliveries", worker_log
        )
        time.sleep(SETTLE_SECONDS)
    assert sorted(user_of(call) for call in gateway.calls()) == sorted(users)
    assert browse(app, timeout=0) == []
