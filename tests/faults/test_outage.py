"""A gateway outage four times longer than the retry budget, on a fleet of two workers
that share the breaker: nothing is dead-lettered, only probes reach the gateway while it
is down, one Sentry event marks the start and one the end, and every event is delivered
once it is back. On RabbitMQ and on Redis."""

from __future__ import annotations

import time

import pytest

from tests.faults.harness import CONCURRENCY, MIN_RETRY_BUDGET, Run, assert_nothing_lost, send
from tests.faults.processes import PrivateRedis
from tests.sentry_server import SentryServer
from tests.workers import wait_until
from worker.client import Producer

pytestmark = pytest.mark.faults

EVENTS = 200
WORKERS = 2
OUTAGE_SECONDS = 60.0
THRESHOLD = 20
PROBE_INTERVAL = 5.0
#: The stated bound on calls while the gateway is down: the calls that open the breaker
#: (the threshold, plus what every worker had in flight when it opened, each of which may
#: come back once more as a retry before the worker reads the breaker), then one probe per
#: interval for the fleet, and one more at each end of the outage.
CALL_BOUND = THRESHOLD + 2 * WORKERS * CONCURRENCY + int(OUTAGE_SECONDS / PROBE_INTERVAL) + 2


def outage_events(sentry: SentryServer, phase: str) -> list[str]:
    return [
        str(e.get("message") or e.get("logentry", {}).get("message", ""))
        for e in sentry.events()
        if str(e.get("message") or e.get("logentry", {}).get("message", "")).startswith(
            f"Gateway outage {phase}"
        )
    ]


def test_an_outage_four_times_the_retry_budget_heals_itself(run: Run, store: PrivateRedis) -> None:
    """200 events into a 60 s outage (503) with a retry budget of 10 to 19 s, on two
    workers: 0 dead-lettered, 0 lost, no duplicate; the gateway sees at most CALL_BOUND
    calls during the outage; exactly one outage-start and one outage-end Sentry event."""
    assert OUTAGE_SECONDS > 3 * MIN_RETRY_BUDGET
    with SentryServer() as sentry:
        env = run.env(
            TOTANGO_STATE_URL=store.url,
            TOTANGO_BREAKER="true",
            TOTANGO_BREAKER_THRESHOLD=str(THRESHOLD),
            TOTANGO_BREAKER_PROBE_INTERVAL=f"{PROBE_INTERVAL:g}",
            SENTRY_DSN=sentry.dsn,
        )
        workers = [run.worker(env, f"outage-{n}") for n in range(WORKERS)]
        for worker in workers:
            worker.start()
        app = run.app()
        ledger = run.ledger("9 gateway outage 60 s, breaker on, 2 workers")
        run.gateway.set_outage(503)
        started = time.time()
        send(Producer(app=app), ledger, EVENTS)
        time.sleep(max(0.0, started + OUTAGE_SECONDS - time.time()))
        during = sum(1 for c in run.gateway.calls() if c.received_at >= started)
        run.gateway.set_outage(None)
        ended = time.time()
        tally = run.settle(ledger, app, timeout=90)
        wait_until(lambda: outage_events(sentry, "ended"), 20, "the outage-end Sentry event")
        time.sleep(2.0)  # a second start or end event would have arrived by now
        starts, ends = outage_events(sentry, "started"), outage_events(sentry, "ended")
        late = [k for k, t in tally.first_delivery.items() if t < ended - 0.05]
        row = run.record(
            ledger.row(
                tally,
                duplicate_bound=0,
                note=f"{during} calls during the outage (bound {CALL_BOUND}); "
                f"Sentry: {len(starts)} start, {len(ends)} end",
            )
        )
    assert all(worker.alive for worker in workers), workers[0].tail()
    assert not tally.dead, f"dead-lettered: {tally.reasons}"
    assert not late, f"delivered while the gateway was down: {late[:5]}"
    assert during <= CALL_BOUND, f"{during} calls during the outage, bound {CALL_BOUND}"
    assert (len(starts), len(ends)) == (1, 1), (starts, ends)
    assert row.duplicates == 0
    assert_nothing_lost(run, tally, row)
