"""The newest value wins, per attribute, in this process: the store's two scripts on a Redis
database of the test's own, and the task bodies and the batch with ``Task.apply`` on the
embedded broker and the loopback gateway emulator. The emulator's ``attributes()`` is what
Totango would show: every 200's attributes applied in the order the calls arrived.

The race with real worker processes on both brokers is a row of ``make faults``
(``tests/faults/test_newest.py``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import redis

from tests.faults.processes import PrivateRedis, free_port
from tests.test_state import sample
from tests.workers import wait_until
from totango_emulator import GatewayEmulator
from worker import state
from worker.application import TotangoCelery
from worker.contract import QUEUE, TRACK_ACTIVITY, TRACK_BATCH, UPDATE_ACCOUNT
from worker.newest import Claim, Entity
from worker.state import NEWEST_PREFIX, StateStore

T1 = 1_796_000_000_000  # 2026-11-30, epoch ms
T2 = T1 + 1_000
ACME = Entity("SP-1234-56", "acme")


def plan(value: str, at: int, event_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "account_id": "acme",
        "attributes": {"Plan": value, **extra},
        "occurred_at": at,
        "event_id": event_id,
    }


def claim(value: str, at: int, param: str = "sdr_o.Plan") -> Claim:
    return Claim(ACME, param, value, at)


# --- the store's scripts -------------------------------------------------------------------


def test_a_claim_older_than_the_stored_one_is_superseded(store_url: str) -> None:
    """check() stores a claim newer than (or as new as, with the same value) the stored
    one, and reports an older one, or one as new with another value (the first claim of a
    time wins), as superseded; each attribute on its own."""
    store = StateStore(store_url, ttl=600)
    try:
        first = store.check(["e2"], [("e2", claim("v2", T2)), ("e2", claim("5", T2, "sdr_o.S"))])
        assert first is not None
        assert first.superseded == set()
        later = store.check(
            ["e1"], [("e1", claim("v1", T1)), ("e1", claim("9", T2 + 1, "sdr_o.S"))]
        )
        assert later is not None
        assert later.superseded == {0}  # Plan v1 is older; S at T2+1 is newer: stored
        again = store.check(["e2"], [("e2", claim("v2", T2))])  # the same claim: a retry
        assert again is not None
        assert again.superseded == set()
        rival = store.check(["e3"], [("e3", claim("other", T2))])  # same time, another value
        assert rival is not None
        assert rival.superseded == {0}
    finally:
        store.close()


def test_check_also_answers_which_ids_were_delivered_in_the_same_round_trip(
    store_url: str,
) -> None:
    """One script answers both questions; the claims of a delivered event are not made."""
    store = StateStore(store_url, ttl=600)
    client = redis.Redis.from_url(store_url)
    try:
        assert store.record(["done"])
        checked = store.check(["done", "new"], [("done", claim("x", T2)), ("new", claim("y", T1))])
        assert checked is not None
        assert checked.delivered == {"done"}
        assert checked.superseded == set()
        stored = client.hget(f"{NEWEST_PREFIX}{ACME.key}", "sdr_o.Plan")
        assert stored == f"{T1}:y".encode()  # the delivered event's claim was not stored
        assert 590 <= client.ttl(f"{NEWEST_PREFIX}{ACME.key}") <= 600
    finally:
        client.close()
        store.close()


def test_finish_records_the_delivered_and_returns_what_replaced_a_claim(store_url: str) -> None:
    """After the calls: the ids are recorded, and a claim that a newer one replaced while
    its call was in flight comes back as the newer claim (to be sent again)."""
    store = StateStore(store_url, ttl=600)
    try:
        assert store.check(["e1"], [("e1", claim("v1", T1))]) is not None
        assert store.check(["e2"], [("e2", claim("v2", T2))]) is not None
        assert store.finish(["e2"], [claim("v2", T2)]) == []  # its own claim still stands
        assert store.finish(["e1"], [claim("v1", T1)]) == [claim("v2", T2)]
        assert store.delivered(["e1", "e2"]) == {"e1", "e2"}
    finally:
        store.close()


def test_the_scripts_go_by_sha_alone_and_are_loaded_again_after_a_flush(
    store: PrivateRedis,
) -> None:
    """Each check and finish is one round trip: no ``SCRIPT EXISTS`` before it (redis-py's
    own Script sends one per pipeline). A store that lost its scripts (a restart, a
    ``SCRIPT FLUSH``) answers NOSCRIPT; the scripts are loaded and the commands sent again,
    and the caller gets its answer. On a redis-server of the test's own: a flush of the
    shared one would reach other runs' scripts."""
    state_store = StateStore(store.url, ttl=600)
    client = redis.Redis.from_url(store.url)
    try:
        for n in range(5):
            assert state_store.check([f"e{n}"], [(f"e{n}", claim("v", T1 + n))]) is not None
        assert state_store.finish(["e4"], [claim("v", T1 + 4)]) == []
        loaded = client.info("commandstats")["cmdstat_script|load"]["calls"]  # on first use
        assert client.script_flush()
        checked = state_store.check(["e4", "e5"], [("e5", claim("w", T2))])
        assert checked is not None
        assert checked.delivered == {"e4"}
        assert checked.superseded == set()
        assert client.hget(f"{NEWEST_PREFIX}{ACME.key}", "sdr_o.Plan") == f"{T2}:w".encode()
        stats = client.info("commandstats")
        assert "cmdstat_script|exists" not in stats
        assert stats["cmdstat_script|load"]["calls"] == loaded + 2  # both, once, after it
    finally:
        client.close()
        state_store.close()


def test_finish_without_waiting_hands_the_newer_claims_to_a_callback(store_url: str) -> None:
    """finish_later() returns at once; when the store's answer comes, the claims that
    replaced this event's while its call was in flight go to the callback (on the
    flusher's thread), and the id is recorded. A finish with nothing newer calls nothing."""
    store = StateStore(store_url, ttl=600)
    newer: list[list[Claim]] = []
    came = threading.Event()

    def on_newer(claims: list[Claim]) -> None:
        newer.append(claims)
        came.set()

    try:
        assert store.check(["e1"], [("e1", claim("v1", T1))]) is not None
        assert store.check(["e2"], [("e2", claim("v2", T2))]) is not None
        store.finish_later(["e2"], [claim("v2", T2)], on_newer)  # its own claim stands
        store.finish_later(["e1"], [claim("v1", T1)], on_newer)
        assert came.wait(10)
        assert store.delivered(["e1", "e2"]) == {"e1", "e2"}  # after both finishes
        assert newer == [[claim("v2", T2)]]
    finally:
        store.close()


def test_finishes_posted_before_a_round_trip_go_as_one_script_call(
    store: PrivateRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three events' finishes posted before the next round trip reach the store as one
    script call (one command for all, counted on a redis-server of the test's own), and the
    answer is split: only the event whose claim a newer one replaced hears of it, and only
    of its own; every id is recorded."""
    state_store = StateStore(store.url, ttl=600)
    client = redis.Redis.from_url(store.url)
    newer: dict[str, list[Claim]] = {}
    came = threading.Event()

    def hears(event_id: str) -> Callable[[list[Claim]], None]:
        def on_newer(claims: list[Claim]) -> None:
            newer[event_id] = claims
            came.set()

        return on_newer

    def script_calls() -> int:
        stats = client.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

    try:
        assert state_store.check(["e2"], [("e2", claim("v2", T2))]) is not None
        assert state_store.check(["e3"], [("e3", claim("9", T2, "sdr_o.S"))]) is not None
        monkeypatch.setattr(state, "POST_DELAY", 5.0)  # held for the check below
        before = script_calls()
        state_store.finish_later(["e1"], [claim("v1", T1)], hears("e1"))  # v2 replaced it
        state_store.finish_later(["e3"], [claim("9", T2, "sdr_o.S")], hears("e3"))  # stands
        state_store.record_later(["e4"])
        assert state_store.delivered(["e1", "e3", "e4", "e5"]) == {"e1", "e3", "e4"}
        assert script_calls() - before == 1
        assert came.wait(10)
        assert newer == {"e1": [claim("v2", T2)]}
    finally:
        client.close()
        state_store.close()


def test_an_unreachable_store_fails_open_for_claims_too() -> None:
    """check() answers None (send everything) and finish() None (repair nothing); no
    exception; counted."""
    store = StateStore(f"redis://127.0.0.1:{free_port()}/0", ttl=600)
    before = sample("totango_state_errors_total", op="check")
    try:
        assert store.check(["e1"], [("e1", claim("v1", T1))]) is None
    finally:
        store.close()
    assert sample("totango_state_errors_total", op="check") == before + 1


# --- the tasks -----------------------------------------------------------------------------


def test_a_retried_older_update_after_a_newer_one_is_superseded(
    make_app: Callable[..., TotangoCelery], gateway: GatewayEmulator
) -> None:
    """v1 (older) is answered 503 and dead-lettered here (no retries, so that its later
    copy is a replay); v2 (newer) is delivered; v1 again: superseded, acknowledged without a
    call, counted. Totango shows v2."""
    app = make_app(TOTANGO_MAX_RETRIES="0")
    task = app.tasks[UPDATE_ACCOUNT]
    gateway.add_rule({"sdr_o.Plan": "v1"}, [503])
    before = sample("totango_events_superseded_total", task=UPDATE_ACCOUNT)
    assert task.apply(kwargs=plan("v1", T1, "e1"), task_id="e1").get() == "dead_lettered"
    assert task.apply(kwargs=plan("v2", T2, "e2"), task_id="e2").get() == "delivered"
    assert task.apply(kwargs=plan("v1", T1, "e1"), task_id="e1").get() == "superseded"
    assert [c.status for c in gateway.calls()] == [503, 200]
    assert gateway.attributes("acme") == {"Plan": "v2"}
    assert sample("totango_events_superseded_total", task=UPDATE_ACCOUNT) == before + 1


def test_only_the_superseded_attributes_are_left_out(
    make_app: Callable[..., TotangoCelery], gateway: GatewayEmulator
) -> None:
    """An older update of Plan and Seats after a newer Plan: Seats is still sent, Plan is
    not; an activity with an older account attribute is still sent, without it."""
    app = make_app()
    update = app.tasks[UPDATE_ACCOUNT]
    assert update.apply(kwargs=plan("v2", T2, "e2"), task_id="e2").get() == "delivered"
    older = plan("v1", T1, "e1", Seats=5)
    assert update.apply(kwargs=older, task_id="e1").get() == "delivered"
    activity = {
        "account_id": "acme",
        "user_id": "jo",
        "activity": "Login",
        "module": "App",
        "account_attributes": {"Plan": "v0"},
        "occurred_at": T1 - 1,
        "event_id": "a1",
    }
    assert app.tasks[TRACK_ACTIVITY].apply(kwargs=activity, task_id="a1").get() == "delivered"
    second, third = (dict(c.params) for c in gateway.calls()[1:])
    assert "sdr_o.Plan" not in second
    assert second["sdr_o.Seats"] == "5"
    assert third["sdr_a"] == "Login"
    assert "sdr_o.Plan" not in third
    assert gateway.attributes("acme") == {"Plan": "v2", "Seats": "5"}


def test_events_without_occurred_at_are_sent_as_before(
    make_app: Callable[..., TotangoCelery], gateway: GatewayEmulator
) -> None:
    """No time, no rule: an update without occurred_at is sent even after a newer one."""
    app = make_app()
    update = app.tasks[UPDATE_ACCOUNT]
    assert update.apply(kwargs=plan("v2", T2, "e2"), task_id="e2").get() == "delivered"
    untimed = {"account_id": "acme", "attributes": {"Plan": "v1"}, "event_id": "e1"}
    assert update.apply(kwargs=untimed, task_id="e1").get() == "delivered"
    assert gateway.attributes("acme") == {"Plan": "v1"}


def test_the_rule_turned_off_sends_every_update(
    make_app: Callable[..., TotangoCelery], gateway: GatewayEmulator
) -> None:
    """TOTANGO_NEWEST_WINS=false: the older update is sent and overwrites the newer one
    (as without the rule); duplicate suppression still runs on its own."""
    app = make_app(TOTANGO_NEWEST_WINS="false")
    update = app.tasks[UPDATE_ACCOUNT]
    assert update.apply(kwargs=plan("v2", T2, "e2"), task_id="e2").get() == "delivered"
    assert update.apply(kwargs=plan("v1", T1, "e1"), task_id="e1").get() == "delivered"
    assert update.apply(kwargs=plan("v1", T1, "e1"), task_id="e1").get() == "duplicate"
    assert gateway.attributes("acme") == {"Plan": "v1"}


def test_the_older_call_landing_last_is_repaired(
    make_app: Callable[..., TotangoCelery], gateway: GatewayEmulator
) -> None:
    """The race: v1 is claimed first and its call is the slower one (held in transit);
    v2 is claimed, sent and delivered meanwhile; then v1's call reaches Totango, which now
    shows v1. v1's check after its call finds the newer claim and puts v2 back on the work
    queue as an update of its own; sent, Totango shows v2."""
    app = make_app()
    update = app.tasks[UPDATE_ACCOUNT]
    gateway.delay_arrival({"sdr_o.Plan": "v1"})
    results: list[str] = []
    slow = threading.Thread(
        target=lambda: results.append(update.apply(kwargs=plan("v1", T1, "e1"), task_id="e1").get())
    )
    slow.start()
    wait_until(lambda: gateway.in_transit() == 1, 10, "v1's call in transit")
    assert update.apply(kwargs=plan("v2", T2, "e2"), task_id="e2").get() == "delivered"
    gateway.let_arrive()
    slow.join(10)
    assert results == ["delivered"]
    assert gateway.attributes("acme") == {"Plan": "v1"}  # the race happened: v1 landed last

    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue(QUEUE)
        try:
            message = queue.get(timeout=10)
            task_name = message.headers["task"]
            _, kwargs, _ = message.decode()
            message.ack()
        finally:
            queue.close()
    assert task_name == UPDATE_ACCOUNT
    assert kwargs["attributes"] == {"Plan": "v2"}
    assert kwargs["occurred_at"] == T2
    result = app.tasks[task_name].apply(kwargs=kwargs, task_id=kwargs["event_id"]).get()
    assert result == "delivered"
    assert gateway.attributes("acme") == {"Plan": "v2"}


def test_a_batch_claims_in_one_round_trip_and_counts_the_superseded(
    make_app: Callable[..., TotangoCelery], gateway: GatewayEmulator
) -> None:
    """A batch with a newer and an older update of one attribute, and an activity: the
    older update is superseded whole and counted in the batch's result; Totango shows the
    newer value."""
    app = make_app()
    update = app.tasks[UPDATE_ACCOUNT]
    assert update.apply(kwargs=plan("v2", T2, "e2"), task_id="e2").get() == "delivered"
    batch = {
        "events": [
            {"task": UPDATE_ACCOUNT, "kwargs": plan("v1", T1, "b1")},
            {"task": UPDATE_ACCOUNT, "kwargs": plan("v3", T2 + 1, "b3")},
        ]
    }
    counts = app.tasks[TRACK_BATCH].apply(kwargs=batch, task_id="batch-1").get()
    assert counts["superseded"] == 1
    assert counts["delivered"] == 1
    assert gateway.attributes("acme") == {"Plan": "v3"}
