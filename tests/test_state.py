"""Duplicate suppression by event id, in this process: the task bodies and the batch run with
``Task.apply`` on the embedded (filesystem) broker, the loopback gateway emulator, and a
state store in a Redis database of the test's own. Also the settings that turn it on, the
store's fail-open behaviour, and a replay that skips what was delivered."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest
import redis
from prometheus_client import REGISTRY

from tests.faults.processes import PrivateRedis, free_port
from tests.workers import wait_until
from totango_emulator import GatewayEmulator
from worker import relay, state
from worker.application import TotangoCelery
from worker.contract import TRACK_ACTIVITY, TRACK_BATCH
from worker.deadletter import browse, pause_before, publish, replay
from worker.envelope import HOSTNAME, Envelope
from worker.errors import ConfigError
from worker.settings import Settings
from worker.state import (
    KEY_PREFIX,
    RETRY_AFTER,
    Pipeliner,
    StateStore,
    delivered_key,
    redacted,
)

REDIS = "redis://127.0.0.1:6379/3"
AMQP = "amqp://guest:guest@127.0.0.1:5672//"


def activity(event_id: str) -> dict[str, str]:
    return {
        "account_id": "acme",
        "user_id": f"u-{event_id}",
        "activity": "Login",
        "module": "App",
        "event_id": event_id,
    }


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- settings ------------------------------------------------------------------------------


def test_the_store_defaults_to_a_redis_broker_and_is_off_on_rabbitmq() -> None:
    """Unset TOTANGO_STATE_URL: the broker itself on Redis (suppression on); none on
    RabbitMQ (suppression off) unless a URL is given."""
    on_redis = Settings.from_env({"TOTANGO_BROKER_URL": REDIS})
    assert (on_redis.state_store_url, on_redis.dedup_on) == (REDIS, True)
    on_rabbit = Settings.from_env({"TOTANGO_BROKER_URL": AMQP})
    assert (on_rabbit.state_store_url, on_rabbit.dedup_on) == (None, False)
    given = Settings.from_env({"TOTANGO_BROKER_URL": AMQP, "TOTANGO_STATE_URL": REDIS})
    assert (given.state_store_url, given.dedup_on) == (REDIS, True)
    off = Settings.from_env({"TOTANGO_BROKER_URL": REDIS, "TOTANGO_DEDUP": "false"})
    assert off.dedup_on is False


def test_a_state_url_that_is_not_redis_is_refused() -> None:
    """TOTANGO_STATE_URL must be a Redis URL; the error names the variable."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"TOTANGO_STATE_URL": "http://127.0.0.1:6379"})
    assert info.value.variable == "TOTANGO_STATE_URL"


def test_the_ttl_must_outlast_the_longest_path_to_a_redelivery() -> None:
    """A record that expires before the last copy of its message can arrive is refused:
    the TTL must exceed the broker's hold plus every retry delay at its cap."""
    env = {"TOTANGO_BROKER_URL": REDIS, "TOTANGO_VISIBILITY_TIMEOUT": "3600"}
    settings = Settings.from_env(env)
    assert settings.redelivery_span == 3600 + 8 * 600
    assert settings.dedup_ttl == 7 * 24 * 3600
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**env, "TOTANGO_DEDUP_TTL": "8400"})
    assert info.value.variable == "TOTANGO_DEDUP_TTL"
    # With suppression off, the TTL does not matter.
    Settings.from_env({**env, "TOTANGO_DEDUP_TTL": "60", "TOTANGO_DEDUP": "false"})


def test_a_logged_store_url_hides_its_password() -> None:
    """The start-up line names the store without its password."""
    assert redacted("redis://:s3cret@store:6379/2") == "redis://:***@store:6379/2"
    assert redacted("redis://user:s3cret@store/0") == "redis://user:***@store/0"
    assert redacted("redis://store:6379/0") == "redis://store:6379/0"


# --- the store -----------------------------------------------------------------------------


def test_the_store_remembers_delivered_ids_for_the_ttl(store_url: str) -> None:
    """record() sets one key per id with the TTL; delivered() finds exactly those."""
    store = StateStore(store_url, ttl=600)
    client = redis.Redis.from_url(store_url)
    try:
        assert store.delivered(["a", "b"]) == set()
        assert store.record(["a", "c"])
        assert store.delivered(["a", "b", "c"]) == {"a", "c"}
        assert 590 <= client.ttl(delivered_key("a")) <= 600
        assert sorted(client.keys(f"{KEY_PREFIX}*")) == [
            delivered_key("a").encode(),
            delivered_key("c").encode(),
        ]
    finally:
        client.close()
        store.close()


def test_an_unreachable_store_fails_open_and_counts() -> None:
    """Nothing listens on the store's port: delivered() answers None (nothing known, send
    it), record() False, no exception; each is counted in totango_state_errors_total."""
    store = StateStore(f"redis://127.0.0.1:{free_port()}/0", ttl=600)
    checks = sample("totango_state_errors_total", op="check")
    records = sample("totango_state_errors_total", op="record")
    try:
        assert store.delivered(["a", "b"]) is None
        assert store.record(["a"]) is False  # skipped for RETRY_AFTER after the failure
    finally:
        store.close()
    assert sample("totango_state_errors_total", op="check") == checks + 2
    assert sample("totango_state_errors_total", op="record") == records + 1


def test_an_unreachable_store_is_warned_about_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first failed round trip is logged at once, with the count since the last
    warning; the next ones within LOG_EVERY are counted, not logged."""
    caplog.set_level(logging.WARNING, logger="worker.state")
    store = StateStore(f"redis://127.0.0.1:{free_port()}/0", ttl=600)
    try:
        assert store.delivered(["a"]) is None
        time.sleep(RETRY_AFTER)  # the store is asked again
        assert store.delivered(["b"]) is None
    finally:
        store.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "worker.state"]
    assert len(lines) == 1, lines
    assert lines[0].startswith("state store unreachable (check: ")
    assert lines[0].endswith("(1 failed round trips since the last warning)")


def test_a_record_sent_without_waiting_is_seen_by_the_next_check_and_sent_at_close(
    store_url: str,
) -> None:
    """record_later() returns at once; a check queued after it, from another thread of
    the process, already finds the id (one connection, in order); close() sends what is
    still queued before the process would exit."""
    store = StateStore(store_url, ttl=600)
    client = redis.Redis.from_url(store_url)
    found: list[set[str] | None] = []
    try:
        store.record_later(["later-a", "later-b"])
        checker = threading.Thread(target=lambda: found.append(store.delivered(["later-a"])))
        checker.start()
        checker.join(10)
        assert found == [{"later-a"}]
        store.record_later(["at-close"])
        store.close()
        assert client.exists(delivered_key("at-close")) == 1
        assert 590 <= client.ttl(delivered_key("later-b")) <= 600
    finally:
        client.close()
        store.close()


def test_a_record_rides_with_the_next_check_or_goes_alone_after_the_post_delay(
    store: PrivateRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record nobody waits for is held for the next round trip that a caller waits for:
    the record and the check after it reach the store in one read (one round trip, not
    two). With no check coming, the record goes on its own after POST_DELAY. On a
    redis-server of the test's own, whose read count is the worker's alone."""
    state_store = StateStore(store.url, ttl=600)
    client = redis.Redis.from_url(store.url)

    def reads() -> int:
        return int(client.info("stats")["total_reads_processed"])

    try:
        assert state_store.delivered(["warm-up"]) == set()  # the store's connection is open
        monkeypatch.setattr(state, "POST_DELAY", 5.0)  # the check surely comes first
        before = reads()
        state_store.record_later(["ride-1"])
        assert state_store.delivered(["ride-1"]) == {"ride-1"}
        assert reads() - before == 2  # the store's one, and this INFO's
        monkeypatch.setattr(state, "POST_DELAY", 0.05)
        state_store.record_later(["alone-1"])
        wait_until(lambda: client.exists(delivered_key("alone-1")) == 1, 5, "the lone record")
    finally:
        client.close()
        state_store.close()


def test_a_check_made_on_the_callers_thread_carries_the_records_posted_before_it(
    store: PrivateRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``here=True`` (the gateway engine's vet): the round trip is made on the calling
    thread, not by the flusher, and the records posted before it go first in the same
    pipeline: the check finds them, in one read of the store."""
    state_store = StateStore(store.url, ttl=600)
    client = redis.Redis.from_url(store.url)

    def reads() -> int:
        return int(client.info("stats")["total_reads_processed"])

    try:
        assert state_store.delivered(["warm-up"], here=True) == set()
        monkeypatch.setattr(state, "POST_DELAY", 5.0)  # the flusher would hold the record
        before = reads()
        state_store.record_later(["posted-1"])
        found = state_store.check(["posted-1", "never"], [], here=True)
        assert found is not None
        assert found.delivered == {"posted-1"}
        assert reads() - before == 2  # this thread's one, and this INFO's
        assert client.exists(delivered_key("posted-1")) == 1
    finally:
        client.close()
        state_store.close()


def test_a_record_sent_without_waiting_to_an_unreachable_store_is_counted() -> None:
    """The round trip of a record nobody waits for fails on the flusher's thread: the
    failure is counted as op="record" for each id and the store is left alone for a while
    (the next check is skipped and counted), with no exception for the caller."""
    store = StateStore(f"redis://127.0.0.1:{free_port()}/0", ttl=600)
    records = sample("totango_state_errors_total", op="record")
    checks = sample("totango_state_errors_total", op="check")
    try:
        store.record_later(["x", "y"])
        store.close()  # waits for the flusher: the failed round trip has been reported
        assert sample("totango_state_errors_total", op="record") == records + 2
        assert store.delivered(["x"]) is None
        assert sample("totango_state_errors_total", op="check") == checks + 1
    finally:
        store.close()


# --- the tasks -----------------------------------------------------------------------------


def test_a_second_copy_of_a_delivered_event_is_acknowledged_without_a_call(
    make_app: Callable[..., TotangoCelery], gateway: GatewayEmulator
) -> None:
    """A producer publishes one event id twice (or the broker redelivers it): the first is
    delivered, the second returns ``duplicate`` with no gateway call, and is counted."""
    app = make_app()
    before = sample("totango_events_duplicates_suppressed_total", task=TRACK_ACTIVITY)
    task = app.tasks[TRACK_ACTIVITY]
    assert task.apply(kwargs=activity("dup-1"), task_id="t-1").get() == "delivered"
    assert task.apply(kwargs=activity("dup-1"), task_id="t-2").get() == "duplicate"
    assert len(gateway.calls()) == 1
    after = sample("totango_events_duplicates_suppressed_total", task=TRACK_ACTIVITY)
    assert after == before + 1


def test_a_check_that_fails_in_the_engine_sends_the_event_and_settles_its_answer(
    make_app: Callable[..., TotangoCelery],
    gateway: GatewayEmulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fail open: when the state store's check raises on the gateway engine's thread (a
    bug, not an unreachable store), the event is sent unchecked and its answer is settled
    as any other: a 503 with no retries left is dead-lettered, not taken for a duplicate."""
    app = make_app(TOTANGO_MAX_RETRIES="0")
    gateway.add_rule(None, [503])

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("a bug in the check")

    monkeypatch.setattr(relay, "check", broken)
    task = app.tasks[TRACK_ACTIVITY]
    assert task.apply(kwargs=activity("unchecked-1"), task_id="t-1").get() == "dead_lettered"
    assert [c.status for c in gateway.calls()] == [503]


def test_an_event_without_an_id_is_known_by_its_task_id(
    make_app: Callable[..., TotangoCelery], gateway: GatewayEmulator
) -> None:
    """No event_id: the task id stands for it, so a redelivery of the same message is
    suppressed, and another message with the same content is not."""
    app = make_app()
    kwargs = {k: v for k, v in activity("x").items() if k != "event_id"}
    task = app.tasks[TRACK_ACTIVITY]
    assert task.apply(kwargs=kwargs, task_id="same").get() == "delivered"
    assert task.apply(kwargs=kwargs, task_id="same").get() == "duplicate"
    assert task.apply(kwargs=kwargs, task_id="other").get() == "delivered"
    assert len(gateway.calls()) == 2


def test_a_failed_call_is_not_recorded(
    make_app: Callable[..., TotangoCelery], gateway: GatewayEmulator
) -> None:
    """Only a 200 is recorded: an event that got a 503 and was dead-lettered is sent
    again by its next copy (a replay)."""
    app = make_app(TOTANGO_MAX_RETRIES="0")
    gateway.add_rule(None, [503])
    task = app.tasks[TRACK_ACTIVITY]
    assert task.apply(kwargs=activity("e-503"), task_id="t-1").get() == "dead_lettered"
    assert task.apply(kwargs=activity("e-503"), task_id="t-2").get() == "delivered"
    assert [c.status for c in gateway.calls()] == [503, 200]


def test_suppression_turned_off_sends_every_copy(
    make_app: Callable[..., TotangoCelery], gateway: GatewayEmulator
) -> None:
    """TOTANGO_DEDUP=false and TOTANGO_NEWEST_WINS=false: no store, and both copies reach
    the gateway (at least once)."""
    app = make_app(TOTANGO_DEDUP="false", TOTANGO_NEWEST_WINS="false")
    assert app.state_store is None
    task = app.tasks[TRACK_ACTIVITY]
    assert task.apply(kwargs=activity("d-1"), task_id="t-1").get() == "delivered"
    assert task.apply(kwargs=activity("d-1"), task_id="t-2").get() == "delivered"
    assert len(gateway.calls()) == 2


def test_a_store_that_cannot_be_reached_sends_the_event(
    make_app: Callable[..., TotangoCelery], gateway: GatewayEmulator
) -> None:
    """Fail open: with nothing listening on the store's port, each copy is sent and
    delivered (a duplicate rather than a loss), counted, and the task does not fail."""
    app = make_app(TOTANGO_STATE_URL=f"redis://127.0.0.1:{free_port()}/0")
    before = sample("totango_state_errors_total", op="check")
    task = app.tasks[TRACK_ACTIVITY]
    assert task.apply(kwargs=activity("o-1"), task_id="t-1").get() == "delivered"
    assert task.apply(kwargs=activity("o-1"), task_id="t-2").get() == "delivered"
    assert len(gateway.delivered()) == 2
    assert sample("totango_state_errors_total", op="check") >= before + 2


def batch_of(*event_ids: str) -> dict[str, list[dict[str, object]]]:
    return {"events": [{"task": TRACK_ACTIVITY, "kwargs": activity(e)} for e in event_ids]}


def test_a_batch_run_again_makes_no_call(
    make_app: Callable[..., TotangoCelery], gateway: GatewayEmulator
) -> None:
    """A batch whose worker died after sending it runs again: every event was recorded, so
    the second run makes no call and counts each as a duplicate."""
    app = make_app()
    task = app.tasks[TRACK_BATCH]
    first = task.apply(kwargs=batch_of("b-1", "b-2", "b-3"), task_id="batch-1").get()
    assert first == {"delivered": 3, "retrying": 0, "dead_lettered": 0}
    again = task.apply(kwargs=batch_of("b-1", "b-2", "b-3"), task_id="batch-1").get()
    assert again == {"delivered": 0, "retrying": 0, "dead_lettered": 0, "duplicate": 3}
    assert len(gateway.calls()) == 3


def test_a_batch_sends_only_its_events_not_yet_delivered(
    make_app: Callable[..., TotangoCelery], gateway: GatewayEmulator
) -> None:
    """One event of a batch was delivered alone before: the batch sends the other two."""
    app = make_app()
    assert app.tasks[TRACK_ACTIVITY].apply(kwargs=activity("m-2")).get() == "delivered"
    counts = app.tasks[TRACK_BATCH].apply(kwargs=batch_of("m-1", "m-2", "m-3")).get()
    assert counts == {"delivered": 2, "retrying": 0, "dead_lettered": 0, "duplicate": 1}
    users = sorted(dict(c.params)["sdr_u"] for c in gateway.calls())
    assert users == ["u-m-1", "u-m-2", "u-m-3"]


# --- replay --------------------------------------------------------------------------------


def dead_letter_of(event_id: str) -> Envelope:
    return Envelope(
        reason="worker_lost",
        event_id=event_id,
        task=TRACK_ACTIVITY,
        kwargs=activity(event_id),
        attempts=1,
        worker_host=HOSTNAME,
    )


def test_a_replay_skips_and_removes_what_was_delivered(
    make_app: Callable[..., TotangoCelery],
) -> None:
    """Two dead letters, one whose event was in fact delivered: the replay republishes the
    other, skips that one and removes it from the dead-letter queue."""
    app = make_app()
    assert app.tasks[TRACK_ACTIVITY].apply(kwargs=activity("r-1")).get() == "delivered"
    publish(app, dead_letter_of("r-1"))
    publish(app, dead_letter_of("r-2"))
    assert app.state_store is not None
    done = replay(app, lambda _: True, store=app.state_store.get())
    assert [e.event_id for e in done] == ["r-2"]
    assert [e.event_id for e in done.skipped] == ["r-1"]
    assert done.checked
    assert browse(app) == []


def test_a_dry_run_replay_reports_what_it_would_skip_and_changes_nothing(
    make_app: Callable[..., TotangoCelery],
) -> None:
    """--dry-run with a store: the delivered entry is reported as skipped, and both stay."""
    app = make_app()
    assert app.tasks[TRACK_ACTIVITY].apply(kwargs=activity("y-1")).get() == "delivered"
    publish(app, dead_letter_of("y-1"))
    publish(app, dead_letter_of("y-2"))
    assert app.state_store is not None
    done = replay(app, lambda _: True, dry_run=True, store=app.state_store.get())
    assert ([e.event_id for e in done], [e.event_id for e in done.skipped]) == (["y-2"], ["y-1"])
    assert sorted(str(e.event_id) for e in browse(app)) == ["y-1", "y-2"]


def test_a_replay_with_the_store_down_replays_everything(
    make_app: Callable[..., TotangoCelery],
) -> None:
    """Fail open: the store cannot be reached, so nothing is skipped and the replay says so."""
    app = make_app()
    publish(app, dead_letter_of("z-1"))
    store = StateStore(f"redis://127.0.0.1:{free_port()}/0", ttl=600)
    try:
        done = replay(app, lambda _: True, store=store)
    finally:
        store.close()
    assert ([e.event_id for e in done], done.skipped, done.checked) == (["z-1"], [], False)


@pytest.mark.parametrize(
    ("published", "rate", "elapsed", "pause"),
    [(0, 10.0, 0.0, 0.0), (5, 10.0, 0.0, 0.5), (5, 10.0, 0.2, 0.3), (5, 10.0, 0.9, 0.0)],
    ids=["first-at-once", "on-schedule", "partly-waited", "behind-schedule"],
)
def test_a_throttled_replay_waits_for_its_schedule(
    published: int, rate: float, elapsed: float, pause: float
) -> None:
    """--rate N: the k-th republish is due k/N seconds after the start, never earlier."""
    assert pause_before(100.0, published, rate, 100.0 + elapsed) == pytest.approx(pause)


def test_many_threads_share_one_pipeline_and_each_gets_its_own_answers(store_url: str) -> None:
    """64 threads record and check ids of their own at once through one store: the
    pipeliner sends their commands together, and every thread reads back exactly its own
    ids (nobody else's answers, none lost)."""
    store = StateStore(store_url, ttl=600)
    errors: list[str] = []

    def work(n: int) -> None:
        mine = [f"t{n}-{i}" for i in range(20)]
        for i, event_id in enumerate(mine):
            if not store.record([event_id]):
                errors.append(f"{event_id} not recorded")
            if store.delivered([*mine[: i + 1], f"never-{n}"]) != set(mine[: i + 1]):
                errors.append(f"{event_id}: wrong answer")

    client = redis.Redis.from_url(store_url)
    try:
        threads = [threading.Thread(target=work, args=(n,)) for n in range(64)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        assert len(client.keys(f"{KEY_PREFIX}*")) == 64 * 20
    finally:
        client.close()
        store.close()


def test_one_callers_bad_command_fails_only_that_caller(store_url: str) -> None:
    """A request whose commands cannot be queued gets its own error; the others in the
    same round trip get their answers."""
    store = StateStore(store_url, ttl=600)
    pipeliner = Pipeliner(redis.Redis.from_url(store_url))

    def broken(_pipe: object) -> None:
        raise ValueError("not a command")

    try:
        with pytest.raises(ValueError, match="not a command"):
            pipeliner.run(broken)
        assert pipeliner.run(lambda pipe: pipe.set("k", "v")) == [True]
        assert pipeliner.run(lambda pipe: (pipe.get("k"), pipe.get("missing"))) == [b"v", None]
    finally:
        pipeliner.close()
        store.close()
