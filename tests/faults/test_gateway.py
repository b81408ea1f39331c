"""The gateway fails for real (503, refused connections, answers slower than the timeout):
an outage shorter than the retry budget costs nothing, a longer one dead-letters every event
with a reason, and a replay then delivers them all. On RabbitMQ and on Redis."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.faults.harness import (
    MIN_RETRY_BUDGET,
    Run,
    assert_nothing_lost,
    send,
)
from totango_emulator import GatewayEmulator
from worker.client import Producer
from worker.deadletter import replay

pytestmark = pytest.mark.faults

# --- 3. short outage -----------------------------------------------------------------------

SHORT_EVENTS = 100
#: Well inside the retry budget: 6 retries wait at least 10 s in all (MIN_RETRY_BUDGET).
SHORT_OUTAGE_SECONDS = 3.0
#: The emulator holds a "timeout" call this long; the worker's read timeout is 1 s.
HANG_SECONDS = 2.0


def _outages(gateway: GatewayEmulator) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    def slow() -> None:
        gateway.hang_seconds = HANG_SECONDS
        gateway.set_outage("timeout")

    return {
        "503": (lambda: gateway.set_outage(503), lambda: gateway.set_outage(None)),
        "refused": (gateway.stop, gateway.start),
        "slower than the timeout": (slow, lambda: gateway.set_outage(None)),
    }


def test_an_outage_shorter_than_the_retry_budget_costs_nothing(run: Run) -> None:
    """For each kind of outage (503 answers, connections refused with the gateway stopped,
    answers that outlast the 1 s read timeout), 100 events are sent into a 3 s outage:
    every one is delivered once the gateway is back, none before, and none dead-lettered."""
    assert SHORT_OUTAGE_SECONDS < MIN_RETRY_BUDGET
    worker = run.worker(run.env(), "short-outage")
    worker.start()
    app = run.app()
    producer = Producer(app=app)
    for name, (begin, end) in _outages(run.gateway).items():
        ledger = run.ledger(f"3 short outage: {name}")
        begin()
        started = time.time()
        send(producer, ledger, SHORT_EVENTS)
        time.sleep(max(0.0, started + SHORT_OUTAGE_SECONDS - time.time()))
        ended = time.time()
        end()
        tally = run.settle(ledger, app, timeout=40, worker=worker)
        failed = sum(1 for c in run.gateway.calls() if c.status != 200 and c.received_at >= started)
        note = f"{failed} failed calls at the gateway during the outage" if failed else ""
        row = run.record(ledger.row(tally, duplicate_bound=0, note=note))
        assert not tally.dead, f"{name}: dead-lettered {tally.reasons}"
        assert row.duplicates == 0
        early = [k for k, t in tally.first_delivery.items() if t < ended - 0.05]
        assert not early, f"{name}: delivered during the outage: {early[:5]}"
        assert_nothing_lost(run, tally, row)


# --- 4. long outage ------------------------------------------------------------------------

LONG_EVENTS = 200
#: A small budget for this scenario (3 calls, 2-3 s of backoff), so that an outage longer
#: than it stays short in wall time.
LONG_MAX_RETRIES = 2


def test_an_outage_longer_than_the_retry_budget_dead_letters_all_then_replay_delivers(
    run: Run,
) -> None:
    """With MAX_RETRIES=2 and the gateway answering 503 throughout, each of 200 events is
    tried 3 times and dead-lettered as ``exhausted:503`` with 3 attempts; nothing reaches
    a 200. Once the gateway is back, ``replay`` puts every envelope back and each event is
    delivered, with the same event id, and the dead-letter queue is empty."""
    worker = run.worker(run.env(TOTANGO_MAX_RETRIES=str(LONG_MAX_RETRIES)), "long-outage")
    worker.start()
    app = run.app()
    ledger = run.ledger("4 long outage: 503")
    run.gateway.set_outage(503)
    send(Producer(app=app), ledger, LONG_EVENTS)
    tally = run.settle(ledger, app, timeout=60, worker=worker)
    row = run.record(ledger.row(tally))
    assert not tally.delivered
    assert {e.reason for e in tally.dead.values()} == {"exhausted:503"}
    assert {e.attempts for e in tally.dead.values()} == {LONG_MAX_RETRIES + 1}
    assert_nothing_lost(run, tally, row)
    assert len(tally.dead) == LONG_EVENTS

    run.gateway.set_outage(None)
    replayed = replay(app, lambda _envelope: True)
    assert {e.event_id for e in replayed} == set(ledger.expected)
    ledger.scenario = "4 long outage: then replay"
    tally = run.settle(ledger, app, timeout=60, worker=worker)
    row = run.record(ledger.row(tally, duplicate_bound=0))
    assert worker.alive, worker.tail()
    assert not tally.dead
    assert row.duplicates == 0
    assert_nothing_lost(run, tally, row)
    assert tally.delivered == set(ledger.expected)
