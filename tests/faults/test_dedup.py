"""Effectively once: the fault rows with the state store on. The store is a redis-server of
the test's own (no persistence, as ``--save '' --appendonly no``), on both brokers.

- kill -9 of a single-event worker and of a batch worker, as in ``test_faults.py``, with
  duplicate suppression on: the copies the broker hands out again are acknowledged without
  a call when their 200 was recorded. What remains are the calls in flight at the kill
  (sent, 200 not yet recorded): nothing written after the 200 can recognise those.
- The same dead letters replayed twice: each event id reaches the gateway once.
- The state store killed mid-run: nothing lost, duplicates allowed and counted.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.faults.accounting import Row
from tests.faults.harness import (
    CONCURRENCY,
    Run,
    assert_nothing_lost,
    delivered_keys,
    probe_delivery,
    send,
    sending,
)
from tests.faults.processes import PrivateRedis, free_port
from tests.faults.test_faults import (
    BATCH_KILLS,
    BATCH_WORKER,
    CRASH_CONCURRENCY,
    CRASH_PLAN,
    THREADS_DELAY,
    THREADS_EVENTS,
    THREADS_PLAN,
    crash_at_random_moments,
    kill_batch_worker,
)
from tests.workers import wait_until
from worker.client import Producer
from worker.deadletter import browse, publish

pytestmark = pytest.mark.faults


def suppressed_in_logs(run: Run) -> int:
    """Copies acknowledged without a call, as the workers logged them (single events one
    line each; a batch one line with its count)."""
    total = 0
    for worker in run.workers:
        text = worker.log_path.read_text(errors="replace") if worker.log_path.exists() else ""
        total += text.count("duplicate suppressed event_id=")
        for line in text.splitlines():
            if "duplicates suppressed batch=" in line:
                total += int(line.split("count=", 1)[1].split(":", 1)[0])
    return total


def _note(row: Row, text: str) -> None:
    row.note = "; ".join(filter(None, [row.note, text]))


def test_kill_9_with_the_state_store_on(run: Run, store: PrivateRedis) -> None:
    """The kill -9 plan of the crash row (three whole-worker kills, two pool processes)
    with duplicate suppression on. A copy whose 200 was recorded is suppressed; what can
    still be sent twice is a call in flight at a kill, at most one per pool process: the
    bound is kills x pool processes."""
    bound = len(CRASH_PLAN) * CRASH_CONCURRENCY
    row = crash_at_random_moments(
        run, "1 crash: kill -9, state store on", bound, TOTANGO_STATE_URL=store.url
    )
    _note(row, f"{suppressed_in_logs(run)} copies suppressed")


def kill_threads_worker(
    run: Run, store: PrivateRedis, scenario: str, *, threads: int, events: int
) -> None:
    """The threads worker's kills of ``test_faults.py`` (the default pool, the gateway at
    20 ms) with suppression on. A thread has one call at a time, and its event is recorded
    in the round trip of the thread's next check at the latest, which the next call waits
    for, so each kill can repeat at most one call per thread: the bound is kills x threads,
    where at-least-once allows kills x prefetch x threads."""
    row = crash_at_random_moments(
        run,
        scenario,
        len(THREADS_PLAN) * threads,
        plan=THREADS_PLAN,
        events=events,
        delay=THREADS_DELAY,
        TOTANGO_POOL="threads",
        TOTANGO_CONCURRENCY=str(threads),
        TOTANGO_STATE_URL=store.url,
    )
    _note(row, f"{suppressed_in_logs(run)} copies suppressed; bound: {threads} per kill")


def test_kill_9_of_a_threads_worker_with_the_state_store_on(run: Run, store: PrivateRedis) -> None:
    """Four threads, 1,000 events: at most one duplicate per thread per kill."""
    kill_threads_worker(
        run,
        store,
        "1 crash: kill -9 of a threads worker, state store on",
        threads=CONCURRENCY,
        events=THREADS_EVENTS,
    )


#: Events for the one-thread row: one thread makes under 50 calls a second at 20 ms each.
ONE_THREAD_EVENTS = 300


def test_kill_9_of_a_one_thread_worker_repeats_at_most_one_call_per_kill(
    run: Run, store: PrivateRedis
) -> None:
    """``TOTANGO_CONCURRENCY=1``, the single-event setting for at most one duplicate per
    kill: one call in flight per process, so a kill can repeat only the call it cut off.
    The bound is the kills."""
    kill_threads_worker(
        run,
        store,
        "1 crash: kill -9 of a one-thread worker, state store on",
        threads=1,
        events=ONE_THREAD_EVENTS,
    )


def test_kill_9_of_the_batch_worker_with_the_state_store_on(run: Run, store: PrivateRedis) -> None:
    """The batch worker killed three times mid-send, with suppression on. Each event of a
    batch is recorded as its 200 arrives, before its sender takes the next event, so a batch
    cut short by a kill sends again only the calls that were in flight at it: at most one
    per batch sender (the process's senders are shared by its batches), so the bound is
    kills x senders, not the kills x slots x batch size that at-least-once allows."""
    senders = int(BATCH_WORKER["TOTANGO_BATCH_SENDERS"])
    row = kill_batch_worker(
        run,
        "1 crash: kill -9 of the batch worker, state store on",
        bound=BATCH_KILLS * senders,
        TOTANGO_STATE_URL=store.url,
    )
    _note(row, f"{suppressed_in_logs(run)} copies suppressed; bound: {senders} senders per kill")


#: Events for the one-sender row: a sender makes about 19 calls a second at 50 ms each.
ONE_SENDER_EVENTS = 300


def test_kill_9_of_a_one_sender_batch_worker_repeats_at_most_one_call_per_kill(
    run: Run, store: PrivateRedis
) -> None:
    """The same kills with ``TOTANGO_BATCH_SENDERS=1``, the setting for at most one
    duplicate per kill: one call in flight per process, so each kill can repeat at most
    the one call it cut off (its 200 may have come, unrecorded). The bound is the kills."""
    row = kill_batch_worker(
        run,
        "1 crash: kill -9 of a one-sender batch worker, state store on",
        bound=BATCH_KILLS,
        events=ONE_SENDER_EVENTS,
        TOTANGO_STATE_URL=store.url,
        TOTANGO_BATCH_SENDERS="1",
    )
    _note(row, f"{suppressed_in_logs(run)} copies suppressed; bound: 1 per kill")


REPLAY_EVENTS = 100


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", "dead-letters", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_the_same_dead_letters_replayed_twice_reach_the_gateway_once(
    run: Run, store: PrivateRedis
) -> None:
    """100 events dead-lettered by a gateway outage (503, one retry). Replayed with
    ``dead-letters replay --all``: all delivered. The same 100 envelopes are put on the
    dead-letter queue again (a second copy of each) and replayed again: the replay skips
    all 100, and each event id got exactly one 200."""
    env = run.env(TOTANGO_MAX_RETRIES="1", TOTANGO_STATE_URL=store.url)
    worker = run.worker(env, "replay-twice")
    worker.start()
    app = run.app()
    ledger = run.ledger("4 replay twice: state store on")
    run.gateway.set_outage(503)
    send(Producer(app=app), ledger, REPLAY_EVENTS)
    wait_until(lambda: len(browse(app)) == REPLAY_EVENTS, 60, "every event dead-lettered")
    copies = browse(app)
    run.gateway.set_outage(None)

    first = cli(env, "replay", "--all", "--yes", "--rate", "500")
    assert first.returncode == 0, first.stderr
    assert f"replay: {REPLAY_EVENTS} entries" in first.stdout
    wait_until(
        lambda: len(delivered_keys(run.gateway, ledger)) == REPLAY_EVENTS, 60, "the first replay"
    )
    for envelope in copies:
        publish(app, envelope)
    second = cli(env, "replay", "--all", "--yes")
    assert second.returncode == 0, second.stderr
    assert "replay: 0 entries" in second.stdout
    assert f"skipped {REPLAY_EVENTS} entries already delivered" in second.stdout

    tally = run.settle(ledger, app, timeout=60, worker=worker)
    note = f"second replay: {second.stdout.strip().splitlines()[-1]}"
    row = run.record(ledger.row(tally, duplicate_bound=0, note=note))
    assert worker.alive, worker.tail()
    assert row.duplicates == 0
    assert not tally.dead
    assert_nothing_lost(run, tally, row)


STORE_EVENTS = 600
STORE_RATE = 100.0


def scrape(port: int) -> dict[str, float]:
    """The worker's counters by name and first label value, e.g. ``state_errors:check``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            label = next(iter(sample.labels.values()), "")
            found[f"{sample.name}:{label}"] = sample.value
    return found


def test_the_state_store_killed_mid_run(run: Run, store: PrivateRedis) -> None:
    """Events flow at 100/s through a worker whose state store is killed -9 after a
    quarter of them and started again (empty) after half: every event is delivered, none
    lost; the events sent while it was down are counted in totango_state_errors_total; and
    once it is back, deliveries are recorded in it again."""
    port = free_port()
    env = run.env(TOTANGO_STATE_URL=store.url, TOTANGO_METRICS_PORT=str(port))
    worker = run.worker(env, "store-kill")
    worker.start()
    app = run.app()
    ledger = run.ledger("2 state store killed: kill -9")
    producer = Producer(app=app)
    with sending(producer, ledger, STORE_EVENTS, STORE_RATE) as background:
        wait_until(lambda: len(run.gateway.delivered()) >= STORE_EVENTS // 4, 60, "deliveries")
        store.kill()
        killed_at = len(run.gateway.delivered())
        wait_until(lambda: len(run.gateway.delivered()) >= STORE_EVENTS // 2, 60, "deliveries")
        down = len(run.gateway.delivered()) - killed_at
        store.start()
    assert background.error is None, background.error
    probe_delivery(producer, ledger, run.gateway)
    client = store.client()
    try:
        wait_until(client.dbsize, 30, "deliveries recorded in the restarted store")
    finally:
        client.close()

    tally = run.settle(ledger, app, timeout=60, worker=worker)
    counts = scrape(port)
    errors = counts.get("totango_state_errors_total:check", 0.0)
    unrecorded = counts.get("totango_state_errors_total:record", 0.0)
    note = (
        f"{down} delivered while the store was down; totango_state_errors_total "
        f"check {errors:g}, record {unrecorded:g}"
    )
    row = run.record(ledger.row(tally, duplicate_bound="allowed", note=note))
    assert worker.alive, worker.tail()
    assert errors > 0, "the events sent unchecked were not counted"
    assert row.dead_lettered == 0, f"a store outage is no reason to dead-letter: {row.reasons}"
    assert_nothing_lost(run, tally, row)
