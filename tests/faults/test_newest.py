"""The newest value wins, with real worker processes on both brokers and a state store of
the test's own: what Totango ends with is read from the emulator (``attributes()``: every
200's attributes in the order the calls arrived).

- A retried v1 after a delivered v2: v1's first call is answered 503; v2 is delivered while
  v1 waits for its retry; v1's retry is superseded (acknowledged without a call).
- The race, on two workers: v1 is claimed first and its call is the slower one (held in
  transit by the emulator until v2 has been delivered), so it reaches Totango last; the
  newer value is then sent again, and Totango ends with v2.
"""

from __future__ import annotations

import uuid

import pytest

from tests.faults.accounting import Row
from tests.faults.harness import Run
from tests.faults.processes import PrivateRedis, Worker
from tests.workers import wait_until
from worker.application import TotangoCelery
from worker.client import Producer
from worker.deadletter import browse

pytestmark = pytest.mark.faults

WAIT = 60.0


def workers(run: Run, store: PrivateRedis, count: int) -> list[Worker]:
    started = []
    for n in range(count):
        env = run.env(
            TOTANGO_STATE_URL=store.url,
            TOTANGO_HEARTBEAT_FILE=str(run.tmp / f"newest-{n}.heartbeat"),
        )
        worker = run.worker(env, f"newest-{n}")
        worker.start()
        started.append(worker)
    return started


def logged(worker_list: list[Worker], text: str) -> int:
    return sum(
        w.log_path.read_text(errors="replace").count(text)
        for w in worker_list
        if w.log_path.exists()
    )


def values(run: Run, account: str) -> list[tuple[str, int]]:
    """Each call's Plan value and status at the gateway, in arrival order."""
    return [
        (dict(c.params)["sdr_o.Plan"], int(c.status))
        for c in run.gateway.calls()
        if dict(c.params).get("sdr_o") == account and "sdr_o.Plan" in dict(c.params)
    ]


def record(run: Run, app: TotangoCelery, scenario: str, delivered: int, note: str) -> Row:
    """The row of one stale-update scenario: two updates sent, none lost or repeated."""
    return run.record(
        Row(
            scenario,
            run.kind,
            sent=2,
            delivered=delivered,
            duplicates=0,
            dead_lettered=len(browse(app, timeout=0)),
            lost=0,
            duplicate_bound=0,
            note=note,
        )
    )


def test_a_retried_older_update_after_a_delivered_newer_one(run: Run, store: PrivateRedis) -> None:
    """v1 answered 503 (its retry comes a second or more later), v2 delivered meanwhile, v1's
    retry superseded: one call for v1 (the 503), none more, and Totango shows v2."""
    started = workers(run, store, 1)
    app = run.app()
    producer = Producer(app=app)
    account = f"acct-newest-{uuid.uuid4().hex[:8]}"
    run.gateway.add_rule({"sdr_o": account, "sdr_o.Plan": "v1"}, [503])
    old = producer.update_account(account_id=account, attributes={"Plan": "v1"})
    wait_until(lambda: values(run, account) == [("v1", 503)], WAIT, "v1 answered 503")
    new = producer.update_account(account_id=account, attributes={"Plan": "v2"})
    wait_until(lambda: logged(started, f"superseded event_id={old}") == 1, WAIT, "v1 superseded")

    shown = run.gateway.attributes(account)
    row = record(
        run,
        app,
        "8 stale update: v1 retried after v2 delivered",
        1,
        f"v1 {old[:8]} superseded, acked unsent; Totango shows Plan={shown.get('Plan')}",
    )
    assert values(run, account) == [("v1", 503), ("v2", 200)]
    assert shown == {"Plan": "v2"}
    assert row.dead_lettered == 0
    assert new != old
    assert all(w.alive for w in started)


def test_the_older_call_slower_than_the_newer_one_two_workers(
    run: Run, store: PrivateRedis
) -> None:
    """Two workers. v1's call is held in transit (claimed, sent, not yet at Totango); v2 is
    claimed and delivered; then v1 reaches Totango, which shows v1: the race the rule must
    survive. v1's check after its call finds v2's newer claim and puts v2 back on the
    queue; it is delivered, and Totango ends with v2. One extra call, no dead letter."""
    started = workers(run, store, 2)
    app = run.app()
    producer = Producer(app=app)
    account = f"acct-race-{uuid.uuid4().hex[:8]}"
    run.gateway.delay_arrival({"sdr_o": account, "sdr_o.Plan": "v1"})
    producer.update_account(account_id=account, attributes={"Plan": "v1"})
    wait_until(lambda: run.gateway.in_transit() == 1, WAIT, "v1's call in transit")
    producer.update_account(account_id=account, attributes={"Plan": "v2"})
    wait_until(lambda: values(run, account) == [("v2", 200)], WAIT, "v2 delivered first")
    run.gateway.let_arrive()
    wait_until(lambda: len(values(run, account)) >= 3, WAIT, "v2 sent again after v1 landed")

    calls = values(run, account)
    shown = run.gateway.attributes(account)
    repaired = logged(started, "newer value sent again")
    row = record(
        run,
        app,
        "8 stale update race: older call slower, 2 workers",
        2,
        "arrival order " + " → ".join(v for v, _ in calls) + f"; {repaired} repair; "
        f"Totango shows Plan={shown.get('Plan')}",
    )
    assert calls == [("v2", 200), ("v1", 200), ("v2", 200)]  # the race happened, then healed
    assert shown == {"Plan": "v2"}
    assert repaired == 1
    assert row.dead_lettered == 0
    assert all(w.alive for w in started)
