"""The operator's dead-letter tools, on both brokers: list, show, stats, replay and purge,
and the promise that an interrupted replay leaves every entry in one queue or the other."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import queue_length
from totango_emulator import GatewayEmulator
from worker.application import TotangoCelery
from worker.deadletter import HOSTNAME, browse, publish, replay
from worker.envelope import Envelope
from worker.topology import task_queue

pytestmark = pytest.mark.integration


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


def envelope(n: int, reason: str = "exhausted:503") -> Envelope:
    return Envelope(
        reason=reason,
        event_id=f"evt-{n}",
        task="totango.track_activity",
        kwargs={
            "account_id": f"acct-{n}",
            "user_id": f"user-{n}",
            "activity": "Login",
            "module": "App",
            "event_id": f"evt-{n}",
        },
        attempts=3,
        worker_host=HOSTNAME,
        last_status="503",
        task_id=f"task-{n}",
    )


def main_queue_event_ids(app: TotangoCelery) -> list[str]:
    """The event ids on the main queue, read without consuming them."""
    ids = []
    with app.connection_for_write() as connection:
        channel: Any = connection.channel()
        try:
            queue = task_queue(app.settings.broker_kind)(channel)
            queue.declare()
            while (message := queue.get(no_ack=False)) is not None:
                ids.append(message.decode()[1]["event_id"])
        finally:
            channel.close()
    return ids


def test_list_show_stats_and_filters(
    env_for: Callable[..., dict[str, str]], app_for: Callable[..., TotangoCelery]
) -> None:
    """list (table and JSON, by reason and time), show and stats read the queue and leave
    it unchanged."""
    env = env_for()
    app = app_for(env)
    for n in range(3):
        publish(app, envelope(n))
    publish(app, envelope(9, reason="invalid:Contract Value"))

    listed = cli(env, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)
    assert sorted(e["event_id"] for e in entries) == ["evt-0", "evt-1", "evt-2", "evt-9"]

    exhausted = json.loads(cli(env, "list", "--json", "--reason", "exhausted").stdout)
    assert {e["reason"] for e in exhausted} == {"exhausted:503"}
    assert len(exhausted) == 3
    assert json.loads(cli(env, "list", "--json", "--since", "1h").stdout)
    assert json.loads(cli(env, "list", "--json", "--since", "2099-01-01T00:00:00").stdout) == []
    assert len(json.loads(cli(env, "list", "--json", "--limit", "2").stdout)) == 2

    table = cli(env, "list").stdout
    assert "invalid:Contract Value" in table
    assert "4 entries" in table

    shown = json.loads(cli(env, "show", "evt-9").stdout)
    assert shown["reason"] == "invalid:Contract Value"
    assert shown["kwargs"]["account_id"] == "acct-9"
    assert cli(env, "show", "no-such-id").returncode == 1

    stats = json.loads(cli(env, "stats", "--json").stdout)
    assert stats["total"] == 4
    assert stats["by_reason"] == {"exhausted:503": 3, "invalid:Contract Value": 1}
    assert stats["oldest"] <= stats["newest"]
    assert len(browse(app)) == 4, "reading must not consume the queue"


def test_replay_delivers_with_the_same_event_id_and_a_fresh_budget(
    env_for: Callable[..., dict[str, str]],
    app_for: Callable[..., TotangoCelery],
    start_worker: Callable[..., Any],
    gateway: GatewayEmulator,
) -> None:
    """Events dead-lettered during an outage are delivered by a replay once the gateway is
    back, keep their event ids, and leave the dead-letter queue; other entries stay."""
    env = env_for()
    app = app_for(env)
    gateway.set_outage(503)
    with start_worker(env):
        sent = [
            app.send_task(
                "totango.track_activity",
                kwargs={
                    "account_id": "acme",
                    "user_id": f"u{n}",
                    "activity": "Login",
                    "module": "App",
                    "event_id": f"outage-{n}",
                },
            )
            for n in range(3)
        ]
        deadline = time.monotonic() + 30
        while len(browse(app)) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert {e.event_id for e in browse(app)} == {f"outage-{n}" for n in range(3)}
        publish(app, envelope(7, reason="invalid:Contact"))
        assert len(gateway.calls()) == 9, "3 events x (1 call + 2 retries)"

        gateway.set_outage(None)
        dry = cli(env, "replay", "--reason", "exhausted", "--dry-run")
        assert "would replay 3" in dry.stdout
        assert len(browse(app)) == 4, "a dry run changes nothing"
        refused = cli(env, "replay", "--reason", "exhausted")
        assert refused.returncode == 1, "without --yes and without a terminal, refuse"
        assert "--yes" in refused.stderr
        done = cli(env, "replay", "--reason", "exhausted", "--yes")
        assert done.returncode == 0, done.stderr

        delivered = gateway.wait_for(3, timeout=30)
        users = sorted(dict(c.params)["sdr_u"] for c in delivered)
        assert users == ["u0", "u1", "u2"]
    left = browse(app)
    assert [e.reason for e in left] == ["invalid:Contact"]


def test_purge_by_id_and_reason(
    env_for: Callable[..., dict[str, str]], app_for: Callable[..., TotangoCelery]
) -> None:
    """purge removes exactly the selected entries, and only with --yes in a script."""
    env = env_for()
    app = app_for(env)
    for n in range(3):
        publish(app, envelope(n))
    publish(app, envelope(5, reason="undecodable"))
    assert cli(env, "purge", "--all").returncode == 1
    assert len(browse(app)) == 4
    assert cli(env, "purge", "--id", "evt-1", "--yes").returncode == 0
    assert sorted(str(e.event_id) for e in browse(app)) == ["evt-0", "evt-2", "evt-5"]
    assert cli(env, "purge", "--reason", "undecodable", "--yes").returncode == 0
    assert sorted(str(e.event_id) for e in browse(app)) == ["evt-0", "evt-2"]


def test_replay_interrupted_by_an_exception_loses_nothing(
    env_for: Callable[..., dict[str, str]], app_for: Callable[..., TotangoCelery]
) -> None:
    """A replay that fails half-way leaves each entry in the dead-letter queue or on the
    main queue, never neither."""
    env = env_for()
    app = app_for(env)
    ids = {f"evt-{n}" for n in range(10)}
    for n in range(10):
        publish(app, envelope(n))
    replayed: list[str] = []

    def interrupt(entry: Envelope) -> None:
        replayed.append(str(entry.event_id))
        if len(replayed) == 4:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        replay(app, lambda _: True, after_publish=interrupt)
    in_dlq = {str(e.event_id) for e in browse(app)}
    on_main = set(main_queue_event_ids(app))
    assert in_dlq | on_main == ids, f"lost: {ids - (in_dlq | on_main)}"
    assert len(on_main) == 4
    assert len(in_dlq) == 7, "the 4th was republished but not yet removed: kept in both"


def test_replay_killed_mid_way_loses_nothing(
    env_for: Callable[..., dict[str, str]],
    app_for: Callable[..., TotangoCelery],
    tmp_path: Path,
) -> None:
    """SIGKILL of a replay process mid-way leaves every entry in one queue or the other."""
    env = env_for()
    app = app_for(env)
    count = 2000
    ids = {f"evt-{n}" for n in range(count)}
    for n in range(count):
        publish(app, envelope(n))
    with (tmp_path / "replay.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "dead-letters", "replay", "--all", "--yes"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if queue_length(app) >= 1:
            break
        time.sleep(0.005)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL, "the replay finished before it could be killed"
    in_dlq = {str(e.event_id) for e in browse(app)}
    on_main = set(main_queue_event_ids(app))
    assert on_main, "the replay should have moved some entries before it was killed"
    assert in_dlq | on_main == ids, f"lost: {sorted(ids - (in_dlq | on_main))[:5]}"


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_redis_dead_letters_a_message_delivered_past_the_delivery_limit(
    env_for: Callable[..., dict[str, str]],
    app_for: Callable[..., TotangoCelery],
    start_worker: Callable[..., Any],
    gateway: GatewayEmulator,
    broker_url: str,
) -> None:
    """Redis has no x-delivery-limit: the worker counts the redeliveries of each message
    itself, and one that comes back a DELIVERY_LIMIT-th time (DELIVERY_LIMIT deliveries
    before, each killing the worker) is dead-lettered with reason delivery_limit instead of
    being sent; a replay then delivers it. The message here really comes back from Redis's
    unacked hash (taken, then its connection closed unacknowledged), as after a crash."""
    import redis  # noqa: PLC0415  only this test talks to Redis directly

    from worker.contract import DELIVERY_LIMIT, QUEUE  # noqa: PLC0415
    from worker.redeliveries import KEY_PREFIX  # noqa: PLC0415

    env = env_for()
    app = app_for(env)
    client = redis.Redis.from_url(broker_url)
    try:
        # The first delivery is not counted: DELIVERY_LIMIT - 1 redeliveries before this one.
        client.set(f"{KEY_PREFIX}poison-task:0", DELIVERY_LIMIT - 1)
    finally:
        client.close()
    kwargs = {"account_id": "acme", "user_id": "u-poison", "activity": "Login", "module": "App"}
    app.send_task("totango.track_activity", kwargs=kwargs, task_id="poison-task")
    with app.connection_for_read() as connection:
        taken = connection.default_channel.basic_get(QUEUE)
        assert taken is not None
        assert taken.headers["id"] == "poison-task"
    # Closed unacknowledged: kombu restores it from unacked, marked redelivered.
    with start_worker(env):
        app.send_task("totango.track_activity", kwargs={**kwargs, "user_id": "u-fine"})
        gateway.wait_for(1, timeout=20)
        entries = browse(app, timeout=10)
        assert [(e.reason, e.event_id) for e in entries] == [("delivery_limit", "poison-task")]
        assert [dict(c.params)["sdr_u"] for c in gateway.calls()] == ["u-fine"]
        assert cli(env, "replay", "--reason", "delivery_limit", "--yes").returncode == 0
        delivered = gateway.wait_for(2, timeout=20)
    assert sorted(dict(c.params)["sdr_u"] for c in delivered) == ["u-fine", "u-poison"]
