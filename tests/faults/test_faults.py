"""The promise, tested by breaking the worker for real: kill -9 at random moments, a pool
process killed mid-call, SIGTERM with calls in flight. An event that was enqueued is
delivered (the gateway answered 200) or sits in ``totango.dead_letter`` with a reason. Each
scenario runs on RabbitMQ and on Redis with real worker processes and ends with a row of
the table (see ``accounting.py``).

Duplicates are allowed by at-least-once, but only as many as the messages in flight at the
faults: a worker reserves at most prefetch multiplier x concurrency messages, so the bound is
that times the number of faults.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import pytest

from tests.faults.accounting import KEY_RE, Row
from tests.faults.harness import (
    CONCURRENCY,
    IN_FLIGHT,
    PREFETCH_MULTIPLIER,
    PROMISED_RECOVERY,
    Run,
    assert_nothing_lost,
    delivered_keys,
    first_200_after,
    queued_keys,
    reserved_keys,
    send,
    send_batches,
)
from tests.workers import wait_until
from worker.client import Producer
from worker.contract import BATCH_QUEUE
from worker.deadletter import browse

pytestmark = pytest.mark.faults

# --- 1. crash ------------------------------------------------------------------------------

CRASH_EVENTS = 2000
#: prefork with 2 pool processes, so that a kill -9 can hit the main process and its pool
#: processes together (an OOM kill of the pod) or one pool process alone.
CRASH_CONCURRENCY = 2
CRASH_PLAN = ("all", "child", "all", "child", "all")


@dataclass
class Kill:
    what: str
    at: float
    #: Redis: the events in the dead worker's reservations (kombu's ``unacked`` hash).
    stranded: set[str] = field(default_factory=set)
    #: Redis: events the dead worker had taken off the list but not yet recorded as
    #: reserved. Nothing in Redis holds them any more.
    in_memory_only: set[str] = field(default_factory=set)


def test_kill_9_at_random_moments_loses_nothing(run: Run) -> None:
    """2,000 events; kill -9 at random moments while they flow: three times the whole worker
    (main and pool processes, its broker connections die with it), restarting it each time,
    and twice one pool process (the main process survives and retries that event). Every
    event ends delivered or dead-lettered; duplicates stay within what the kills held in
    flight; on Redis, what the dead worker had reserved comes back through the restarted
    worker within the promised recovery time (visibility timeout + sweep + margin).

    Duplicate suppression is off here (``TOTANGO_DEDUP=false``): this row measures plain
    at-least-once; ``test_dedup.py`` runs the same kills with the state store on."""
    bound = len(CRASH_PLAN) * PREFETCH_MULTIPLIER * CRASH_CONCURRENCY
    crash_at_random_moments(run, "1 crash: kill -9", bound, TOTANGO_DEDUP="false")


def crash_at_random_moments(
    run: Run,
    scenario: str,
    bound: int,
    *,
    plan: tuple[str, ...] = CRASH_PLAN,
    events: int = CRASH_EVENTS,
    delay: float = 0.0,
    **extra: str,
) -> Row:
    """The kill -9 ``plan`` (``all``: the whole worker, restarted; ``child``: one pool
    process) while ``events`` flow, the gateway answering after ``delay`` s, on a prefork
    worker with ``CRASH_CONCURRENCY`` processes unless ``extra`` names another pool; the row,
    with duplicates asserted within ``bound`` and nothing lost."""
    pool = {"TOTANGO_POOL": "prefork", "TOTANGO_CONCURRENCY": str(CRASH_CONCURRENCY)}
    env = run.env(**{**pool, **extra})
    app = run.app()
    ledger = run.ledger(scenario)
    run.gateway.set_delay(delay)
    send(Producer(app=app), ledger, events)
    worker = run.worker(env, "crash")
    worker.start()

    rng = random.Random()
    marks = sorted(rng.sample(range(events // 10, events * 8 // 10), len(plan)))
    kills: list[Kill] = []
    for what, mark in zip(plan, marks, strict=True):
        # Past the mark, and delivering since its last start: a pool process killed while
        # the pool is still starting makes Celery give up ("Could not start worker
        # processes"), which a supervisor would answer with a restart like any other.
        wait_until(lambda m=mark: _running_past(run, worker.ready_at, m), 120, f"{mark} deliveries")
        time.sleep(rng.uniform(0, 0.2))  # a random moment, not just after a delivery
        kill = Kill(what, time.time())
        if what == "all":
            worker.kill_all()
            if run.kind == "redis":
                kill.stranded = reserved_keys(run.broker_url)
                known = kill.stranded | queued_keys(run.broker_url)
                settled = delivered_keys(run.gateway) | {e.event_id for e in browse(app)}
                kill.in_memory_only = set(ledger.expected) - known - settled
            worker.start()
        else:
            assert worker.kill_child() is not None, worker.tail()
        kills.append(kill)

    tally = run.settle(ledger, app, timeout=PROMISED_RECOVERY + 30, worker=worker)
    recovery, late = _recovery(run, kills)
    row = ledger.row(tally, duplicate_bound=bound, recovery=recovery)
    row.delivered -= len(late & tally.delivered)  # delivered, but later than promised
    row.lost += len(late - tally.lost)
    row.note = _kill_note(kills, late)
    run.record(row)
    assert row.duplicates <= bound
    assert_nothing_lost(run, tally, row, late)
    return row


#: The default pool, threads (the suite's 4 here), killed whole three times: a threads
#: worker is one process, so every kill takes its main process and its calls together.
THREADS_PLAN = ("all", "all", "all")
THREADS_EVENTS = 1000
#: The gateway answers after 20 ms, so that each kill finds calls in flight in its threads.
THREADS_DELAY = 0.02


def test_kill_9_of_a_threads_worker_loses_nothing(run: Run) -> None:
    """The pool production runs by default, threads: 1,000 events, the gateway answering
    after 20 ms, the worker killed -9 three times at random moments and restarted. Every
    event ends delivered or dead-lettered; on Redis its reservations come back within the
    promised recovery time. Plain at-least-once (suppression off): the duplicates stay
    within what each kill held unacknowledged, prefetch x threads."""
    crash_at_random_moments(
        run,
        "1 crash: kill -9 of a threads worker",
        len(THREADS_PLAN) * IN_FLIGHT,
        plan=THREADS_PLAN,
        events=THREADS_EVENTS,
        delay=THREADS_DELAY,
        TOTANGO_POOL="threads",
        TOTANGO_CONCURRENCY=str(CONCURRENCY),
        TOTANGO_DEDUP="false",
    )


def _running_past(run: Run, since: float, mark: int) -> bool:
    delivered = run.gateway.delivered()
    return len(delivered) >= mark and any(call.received_at > since for call in delivered)


def _recovery(run: Run, kills: list[Kill]) -> tuple[str, set[str]]:
    """Redis: how long after each whole kill the events it stranded were delivered again,
    and which came back later than promised (they count as lost)."""
    if run.kind != "redis":
        return "requeued at once", set()
    worst, late = 0.0, set()
    for kill in kills:
        times = first_200_after(run, kill.stranded, kill.at)
        # With duplicate suppression on, a stranded event whose 200 came before the kill
        # (recorded, not yet acknowledged) comes back and is acknowledged without a call:
        # it was delivered, and there is nothing to recover.
        before = delivered_before(run, kill.stranded - times.keys(), kill.at)
        for key in kill.stranded - before:
            took = times.get(key, float("inf")) - kill.at
            worst = max(worst, took)
            if took > PROMISED_RECOVERY:
                late.add(key)
    return f"{worst:.1f} s (promised <= {PROMISED_RECOVERY:g} s)", late


def delivered_before(run: Run, keys: set[str], at: float) -> set[str]:
    """The keys among these that the gateway answered 200 for before ``at``."""
    found: set[str] = set()
    for call in run.gateway.delivered():
        if call.received_at < at:
            found.update({k for _, v in call.params for k in KEY_RE.findall(v)} & keys)
    return found


def _kill_note(kills: list[Kill], late: set[str]) -> str:
    note = "kill -9 of " + ", ".join(
        "the worker" if kill.what == "all" else "a pool process" for kill in kills
    )
    stranded = set().union(*(kill.stranded for kill in kills))
    if stranded:
        # The killed worker cannot give them back: the restarted one restored them.
        note += (
            f"; {len(stranded)} events were reserved by killed workers, "
            f"{len(stranded - late)} delivered again through the restarted worker in time"
        )
    lost_at_kill = set().union(*(kill.in_memory_only for kill in kills))
    if lost_at_kill:
        note += f"; {len(lost_at_kill)} taken off the list but never reserved"
    return note + (f"; {len(late)} back later than promised" if late else "")


BATCH_EVENTS = 1000
BATCH_SIZE = 20
#: The batch Deployment's settings, scaled down: batches at once, prefetch, senders.
BATCH_WORKER = {
    "TOTANGO_CONCURRENCY": "2",
    "TOTANGO_PREFETCH_MULTIPLIER": "1",
    "TOTANGO_BATCH_SENDERS": "8",
}
BATCH_KILLS = 3
#: Batches a batch worker holds at once: its slots times its prefetch.
BATCH_SLOTS = int(BATCH_WORKER["TOTANGO_CONCURRENCY"]) * int(
    BATCH_WORKER["TOTANGO_PREFETCH_MULTIPLIER"]
)


def test_kill_9_of_the_batch_worker_loses_nothing(run: Run) -> None:
    """1,000 events in batches of 20 on ``totango.batch``, consumed by a batch worker as
    production runs it (``-Q totango.batch``, prefetch 1, scaled down); the gateway answers
    after 50 ms, so batches are mid-send when the worker is killed -9, three times at random
    moments, and restarted. A killed worker's batches come back whole (RabbitMQ at once,
    Redis after the visibility timeout) and run again: every event is delivered, and the
    duplicates stay within the batches the kills held (kills x slots x batch size).
    Duplicate suppression is off here, as in the row above."""
    kill_batch_worker(run, "1 crash: kill -9 of the batch worker", TOTANGO_DEDUP="false")


def kill_batch_worker(
    run: Run,
    scenario: str,
    bound: int = BATCH_KILLS * BATCH_SLOTS * BATCH_SIZE,
    events: int = BATCH_EVENTS,
    **extra: str,
) -> Row:
    """The batch worker killed ``BATCH_KILLS`` times (``extra`` settings added) while it
    sends ``events``; the row, with duplicates asserted within ``bound`` (by default what
    at-least-once allows: kills x slots x batch size) and nothing lost."""
    env = run.env(**{**BATCH_WORKER, **extra})
    app = run.app()
    ledger = run.ledger(scenario)
    run.gateway.set_delay(0.05)
    send_batches(Producer(app=app), ledger, events, BATCH_SIZE)
    worker = run.worker(env, "batch-crash", "-Q", BATCH_QUEUE)
    worker.start()

    rng = random.Random()
    marks = sorted(rng.sample(range(events // 10, events * 7 // 10), BATCH_KILLS))
    for mark in marks:
        wait_until(lambda m=mark: _running_past(run, worker.ready_at, m), 120, f"{mark} deliveries")
        time.sleep(rng.uniform(0, 0.1))
        worker.kill_all()
        worker.start()

    tally = run.settle(ledger, app, timeout=PROMISED_RECOVERY + 60, worker=worker)
    recovery = "requeued at once" if run.kind == "rabbitmq" else "after the visibility timeout"
    note = f"kill -9 of the batch worker x{BATCH_KILLS}, batches of {BATCH_SIZE}"
    row = run.record(ledger.row(tally, duplicate_bound=bound, recovery=recovery, note=note))
    assert row.duplicates <= bound
    assert_nothing_lost(run, tally, row)
    return row


#: What the settings promise for an event whose pool process died under it: a retry after
#: at most the longest retry delay (``TOTANGO_RETRY_BACKOFF_MAX``, 4 s here), plus a margin.
WORKER_LOST_PROMISE = 4.0 + 10.0


def test_a_pool_process_killed_mid_call_is_retried_within_the_retry_delays(run: Run) -> None:
    """prefork with one pool process; the gateway holds the call 2 s (and would answer 503,
    so that call delivers nothing); kill -9 that process mid-call. The main process
    survives and task_retry_on_worker_lost retries the event; it is delivered within the
    longest retry delay plus a margin, not after Celery's own default of 180 s (a countdown
    that also outlasts the suite's Redis visibility timeout, so the event would run twice)."""
    env = run.env(TOTANGO_POOL="prefork", TOTANGO_CONCURRENCY="1")
    worker = run.worker(env, "child-kill")
    worker.start()
    app = run.app()
    ledger = run.ledger("1 crash: pool process killed mid-call")
    run.gateway.set_delay(2.0)
    run.gateway.set_outage(503)
    send(Producer(app=app), ledger, 1)
    wait_until(run.gateway.calls, 30, "the call to start")
    killed_at = time.time()
    assert worker.kill_child() is not None
    run.gateway.set_outage(None)
    run.gateway.set_delay(0)

    tally = run.settle(ledger, app, timeout=WORKER_LOST_PROMISE, worker=worker)
    took = min(first_200_after(run, set(ledger.expected), killed_at).values(), default=None)
    after = None if took is None else took - killed_at
    recovery = "not delivered" if after is None else f"delivered {after:.1f} s after the kill"
    row = run.record(ledger.row(tally, duplicate_bound=1, recovery=recovery))
    assert worker.alive, worker.tail()
    assert after is not None, f"not delivered within {WORKER_LOST_PROMISE} s"
    assert after <= WORKER_LOST_PROMISE, recovery
    assert_nothing_lost(run, tally, row)


# --- 5. graceful stop ----------------------------------------------------------------------

STOP_EVENTS = 60
STOP_CALL_SECONDS = 1.5
STOP_READ_TIMEOUT = 5  # longer than the calls: in this scenario they are slow, not failing
SOFT_SHUTDOWN = 10.0  # TOTANGO_SOFT_SHUTDOWN_TIMEOUT in the suite's settings


def test_sigterm_while_calls_are_in_flight(run: Run) -> None:
    """The gateway takes 1.5 s per call (the read timeout is 5 s); SIGTERM the worker (as a
    pod eviction does) while four calls are in flight. It exits within the soft-shutdown
    time; each event whose call was in flight is delivered (it finished, or it was
    redelivered after the restart); the restarted worker delivers the rest; nothing is
    lost."""
    worker = run.worker(run.env(TOTANGO_READ_TIMEOUT=str(STOP_READ_TIMEOUT)), "sigterm")
    worker.start()
    app = run.app()
    ledger = run.ledger("5 graceful stop: SIGTERM")
    run.gateway.set_delay(STOP_CALL_SECONDS)
    send(Producer(app=app), ledger, STOP_EVENTS)
    calls = wait_until(
        lambda: c if len(c := run.gateway.calls()) >= CONCURRENCY else None, 30, "calls"
    )
    in_flight = {k for call in calls for _, v in call.params for k in KEY_RE.findall(v)}
    took = worker.terminate(timeout=SOFT_SHUTDOWN + 20)
    finished = delivered_keys(run.gateway, ledger)
    run.gateway.set_delay(0)
    worker.start()
    tally = run.settle(ledger, app, timeout=60, worker=worker)
    note = (
        f"exit {took:.1f} s after SIGTERM; {len(in_flight & finished)} of {len(in_flight)} "
        "in-flight calls finished before exit"
    )
    row = run.record(ledger.row(tally, duplicate_bound=IN_FLIGHT, note=note))
    assert took < SOFT_SHUTDOWN + 5, worker.tail()
    never = in_flight - tally.delivered
    assert not never, f"in flight at SIGTERM, never delivered: {never}"
    assert row.duplicates <= IN_FLIGHT
    assert_nothing_lost(run, tally, row)
