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

from tests.brokers import queue_length
from tests.workers import running_worker, wait_until
from totango_emulator import Call, GatewayEmulator
from worker.application import TotangoCelery
from worker.client import Producer
from worker.contract import BATCH_QUEUE, QUEUE
from worker.deadletter import browse
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
    puts 250 events in 3 messages (100, 100, 50) on the ``totango.batch`` queue and none on
    ``totango``, as seen on the broker before any worker runs; a worker then delivers each
    of the 250 exactly once."""
    producer = Producer(app=app)
    run = uuid.uuid4().hex[:8]
    users = [f"p{n}-{run}" for n in range(250)]
    prepared = [producer.prepare(TRACK_ACTIVITY, **activity(user)) for user in users]

    ids = producer.send_batch(prepared)

    assert ids == [p.event_id for p in prepared]
    assert len(set(ids)) == 250
    assert queue_length(app, BATCH_QUEUE) == 3
    assert queue_length(app) == 0
    with start_worker(env):
        wait_until(
            lambda: len(gateway.delivered()) >= 250, OUTCOME_TIMEOUT, "250 deliveries", worker_log
        )
        time.sleep(SETTLE_SECONDS)
    assert sorted(user_of(call) for call in gateway.calls()) == sorted(users)
    assert browse(app, timeout=0) == []


def test_each_deployment_consumes_only_its_own_queue(
    app: TotangoCelery,
    env: Env,
    start_worker: StartWorker,
    gateway: GatewayEmulator,
    worker_log: Path,
) -> None:
    """Production runs ``-Q totango`` and ``-Q totango.batch`` as two Deployments: a worker
    started with ``-Q totango`` delivers single events and leaves a batch on its queue; a
    worker started with ``-Q totango.batch`` then delivers the batch, and nothing else."""
    producer = Producer(app=app)
    run = uuid.uuid4().hex[:8]
    batched = [producer.prepare(TRACK_ACTIVITY, **activity(f"b{n}-{run}")) for n in range(3)]
    producer.send_batch(batched)
    producer.track_activity(**activity(f"single-{run}"))

    with start_worker(env, "-Q", QUEUE):
        wait_until(lambda: len(gateway.delivered()) >= 1, OUTCOME_TIMEOUT, "single", worker_log)
        time.sleep(SETTLE_SECONDS)  # a batch taken by mistake would be sent by now
        assert [user_of(call) for call in gateway.calls()] == [f"single-{run}"]
        assert queue_length(app, BATCH_QUEUE) == 1

    with start_worker(env, "-Q", BATCH_QUEUE):
        wait_until(lambda: len(gateway.delivered()) >= 4, OUTCOME_TIMEOUT, "batch", worker_log)
        time.sleep(SETTLE_SECONDS)
    assert sorted(user_of(call) for call in gateway.calls()) == sorted(
        [f"single-{run}", *(f"b{n}-{run}" for n in range(3))]
    )
    assert queue_length(app, BATCH_QUEUE) == 0


def test_a_single_event_worker_on_a_fresh_broker_creates_the_batch_queue_and_retries(
    app: TotangoCelery,
    env: Env,
    start_worker: StartWorker,
    gateway: GatewayEmulator,
    worker_log: Path,
) -> None:
    """The first worker on a fresh broker is a ``-Q totango`` one. It still declares
    ``totango.batch`` (a batch published without declaring waits there instead of being
    dropped), and it declares it before Celery's delayed delivery binds every queue: on
    RabbitMQ a missing queue made that step fail and turn delayed delivery off, so a retry
    countdown had nowhere to go. Here a 503 is retried after its countdown and delivered."""
    run = uuid.uuid4().hex[:8]
    gateway.add_rule({"sdr_u": f"retried-{run}"}, [503])
    with start_worker(env, "-Q", QUEUE):
        app.send_task(TRACK_ACTIVITY, kwargs=activity(f"retried-{run}"), declare=[])
        batch = {"events": [{"task": TRACK_ACTIVITY, "kwargs": activity(f"waits-{run}")}]}
        app.send_task(TRACK_BATCH, kwargs=batch, queue=BATCH_QUEUE, declare=[])
        wait_until(lambda: len(gateway.delivered()) >= 1, OUTCOME_TIMEOUT, "the retry", worker_log)
        time.sleep(SETTLE_SECONDS)
        assert [call.status for call in gateway.calls()] == [503, 200]
        assert queue_length(app, BATCH_QUEUE) == 1
    assert "delayed delivery will not be available" not in worker_log.read_text().lower()
    assert "failed to bind" not in worker_log.read_text().lower()


def _delivered_by(log: Path) -> int:
    """Events a worker's batches delivered, from its ``batch ... delivered=N`` log lines."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return sum(int(part.split("=")[1]) for part in text.split() if part.startswith("delivered="))


def test_a_batch_worker_reserves_only_its_slots_so_a_new_worker_shares_the_backlog(
    app: TotangoCelery,
    env_for: Callable[..., Env],
    gateway: GatewayEmulator,
    tmp_path: Path,
) -> None:
    """A batch worker with 2 slots and prefetch multiplier 1 (the batch Deployment's
    settings, scaled down) holds at most 2 batch messages: with 6 slow batches queued, 4
    stay ready on the broker while it works. A second worker started meanwhile (a KEDA
    scale-out) therefore finds batches to take, and both deliver some; every event is
    delivered exactly once. With a prefetch sized for single events, the first worker
    would reserve every batch and the second would idle."""
    gateway.hold()  # every call waits until released: what each worker took stays in flight
    settings = {
        "TOTANGO_CONCURRENCY": "2",
        "TOTANGO_PREFETCH_MULTIPLIER": "1",
        "TOTANGO_BATCH_SENDERS": "2",
        "TOTANGO_READ_TIMEOUT": "60",  # longer than any hold below
    }
    producer = Producer(app=app)
    run = uuid.uuid4().hex[:8]
    users = [f"s{n}-{run}" for n in range(12)]
    for pair in range(6):
        two = users[2 * pair : 2 * pair + 2]
        producer.send_batch([producer.prepare(TRACK_ACTIVITY, **activity(u)) for u in two])
    assert queue_length(app, BATCH_QUEUE) == 6

    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first_env = env_for(TOTANGO_HEARTBEAT_FILE=str(tmp_path / "first.hb"), **settings)
    second_env = env_for(TOTANGO_HEARTBEAT_FILE=str(tmp_path / "second.hb"), **settings)
    try:
        with running_worker(first_env, first_log, ("-Q", BATCH_QUEUE)):
            # Its two batches' first events are at the gateway, held: it has taken 2 of 6.
            wait_until(lambda: len(gateway.calls()) >= 2, 30.0, "first calls", first_log)
            time.sleep(1.0)  # it must not reserve more while its two batches are in flight
            assert queue_length(app, BATCH_QUEUE) == 4
            with running_worker(second_env, second_log, ("-Q", BATCH_QUEUE)):
                wait_until(lambda: len(gateway.calls()) >= 4, 30.0, "second calls", second_log)
                assert queue_length(app, BATCH_QUEUE) == 2
                gateway.release()
                wait_until(
                    lambda: len(gateway.delivered()) >= 12, 3 * OUTCOME_TIMEOUT, "all", second_log
                )
                time.sleep(SETTLE_SECONDS)
    finally:
        gateway.release()
    assert sorted(user_of(call) for call in gateway.calls()) == sorted(users)
    assert _delivered_by(first_log) > 0
    assert _delivered_by(second_log) > 0
    assert _delivered_by(first_log) + _delivered_by(second_log) == 12
