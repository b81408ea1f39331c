"""Duplicate suppression through a real worker process on RabbitMQ and on Redis, with the
loopback gateway: a producer that publishes one event id twice, a batch published twice,
and a dead-letter replay that skips what was delivered. On Redis the store is the broker
itself (the default); on RabbitMQ a Redis database of the test's own (TOTANGO_STATE_URL)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest

from tests.brokers import redis_database
from tests.workers import wait_until
from totango_emulator import GatewayEmulator
from worker.application import TotangoCelery
from worker.client import Producer
from worker.contract import TRACK_ACTIVITY
from worker.deadletter import browse, publish, replay
from worker.envelope import HOSTNAME, Envelope

pytestmark = pytest.mark.integration

OUTCOME_TIMEOUT = 30.0


@pytest.fixture
def dedup_env(broker_url: str, env_for: Callable[..., dict[str, str]]) -> Iterator[dict[str, str]]:
    """A worker environment with a state store: the Redis broker itself, or on RabbitMQ a
    Redis database of the test's own."""
    with ExitStack() as stack:
        if broker_url.startswith("redis"):
            yield env_for()
        else:
            yield env_for(TOTANGO_STATE_URL=stack.enter_context(redis_database()))


def activity(event_id: str) -> dict[str, Any]:
    return {
        "account_id": "acme",
        "user_id": f"u-{event_id}",
        "activity": "Login",
        "module": "App",
        "event_id": event_id,
    }


def calls_for(gateway: GatewayEmulator, event_id: str) -> int:
    return sum(1 for c in gateway.calls() if dict(c.params).get("sdr_u") == f"u-{event_id}")


def logged(log: Path, text: str) -> bool:
    return log.exists() and text in log.read_text(errors="replace")


def test_an_event_id_published_twice_reaches_the_gateway_once(
    dedup_env: dict[str, str],
    app_for: Callable[[dict[str, str]], TotangoCelery],
    start_worker: Callable[..., AbstractContextManager[Popen[bytes]]],
    gateway: GatewayEmulator,
    worker_log: Path,
) -> None:
    """A producer that retries its own publish sends one event id twice: the worker logs
    at start that suppression is on, delivers the first copy, and acknowledges the second
    without a call, logging it."""
    event_id = f"twice-{uuid.uuid4().hex[:8]}"
    producer = Producer(app=app_for(dedup_env))
    with start_worker(dedup_env):
        assert logged(worker_log, "duplicate suppression on")
        producer.track_activity(**activity(event_id))
        wait_until(lambda: calls_for(gateway, event_id), OUTCOME_TIMEOUT, "the first copy")
        producer.track_activity(**activity(event_id))
        wait_until(
            lambda: logged(worker_log, f"duplicate suppressed event_id={event_id}"),
            OUTCOME_TIMEOUT,
            "the second copy suppressed",
            worker_log,
        )
    assert calls_for(gateway, event_id) == 1


def test_a_batch_published_twice_sends_each_event_once(
    dedup_env: dict[str, str],
    app_for: Callable[[dict[str, str]], TotangoCelery],
    start_worker: Callable[..., AbstractContextManager[Popen[bytes]]],
    gateway: GatewayEmulator,
    worker_log: Path,
) -> None:
    """The same batch message twice (a batch run again): its second run checks all ids in
    one round trip and sends nothing."""
    ids = [f"bt-{uuid.uuid4().hex[:8]}-{n}" for n in range(5)]
    producer = Producer(app=app_for(dedup_env))
    with start_worker(dedup_env):
        prepared = [producer.prepare(TRACK_ACTIVITY, **activity(e)) for e in ids]
        producer.send_batch(prepared)
        wait_until(lambda: len(gateway.delivered()) == 5, OUTCOME_TIMEOUT, "the first batch")
        producer.send_batch(prepared)
        wait_until(
            lambda: logged(worker_log, "count=5: already delivered"),
            OUTCOME_TIMEOUT,
            "the second batch suppressed",
            worker_log,
        )
    assert [calls_for(gateway, e) for e in ids] == [1] * 5


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", "dead-letters", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_replay_skips_a_dead_letter_whose_event_was_delivered(
    dedup_env: dict[str, str],
    app_for: Callable[[dict[str, str]], TotangoCelery],
    start_worker: Callable[..., AbstractContextManager[Popen[bytes]]],
    gateway: GatewayEmulator,
) -> None:
    """A dead letter whose event was in fact delivered (its pool process died after the
    200), next to one that was not: ``replay --all --rate 50`` republishes only the second,
    says it skipped one, and the first still reached the gateway once."""
    delivered, pending = (f"rp-{uuid.uuid4().hex[:8]}-{n}" for n in range(2))
    app = app_for(dedup_env)
    with start_worker(dedup_env):
        Producer(app=app).track_activity(**activity(delivered))
        wait_until(lambda: calls_for(gateway, delivered), OUTCOME_TIMEOUT, "the delivery")
        for event_id in (delivered, pending):
            publish(
                app,
                Envelope(
                    reason="worker_lost",
                    event_id=event_id,
                    task=TRACK_ACTIVITY,
                    kwargs=activity(event_id),
                    attempts=1,
                    worker_host=HOSTNAME,
                ),
            )
        done = cli(dedup_env, "replay", "--all", "--yes", "--rate", "50")
        assert done.returncode == 0, done.stderr
        assert "replay: 1 entries" in done.stdout
        assert "skipped 1 entries already delivered" in done.stdout
        wait_until(lambda: calls_for(gateway, pending), OUTCOME_TIMEOUT, "the replayed event")
    assert browse(app) == []
    assert calls_for(gateway, delivered) == 1


def test_replay_refuses_a_rate_that_is_not_positive(dedup_env: dict[str, str]) -> None:
    """--rate 0 would never finish: refused before anything changes."""
    refused = cli(dedup_env, "replay", "--all", "--yes", "--rate", "0")
    assert refused.returncode == 2
    assert "must be a positive number" in refused.stderr


def test_every_entry_a_replay_skips_leaves_the_dead_letter_queue(
    dedup_env: dict[str, str], app_for: Callable[[dict[str, str]], TotangoCelery]
) -> None:
    """300 entries whose events are all recorded as delivered, skipped back to back with
    no publish between the acknowledgements: none is left (on RabbitMQ 3.10 a quorum
    queue requeued about two thirds of them at the channel's close until the acks were
    settled first)."""
    app = app_for(dedup_env)
    ids = [f"sk-{uuid.uuid4().hex[:8]}-{n}" for n in range(300)]
    assert app.state_store is not None
    store = app.state_store.get()
    assert store.record(ids)
    for event_id in ids:
        publish(
            app,
            Envelope(
                reason="exhausted:503",
                event_id=event_id,
                task=TRACK_ACTIVITY,
                kwargs=activity(event_id),
                attempts=1,
                worker_host=HOSTNAME,
            ),
        )
    done = replay(app, lambda _: True, store=store)
    assert (len(done), len(done.skipped)) == (0, 300)
    assert browse(app) == []
