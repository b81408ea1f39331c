"""Sentry alerting, end to end: real workers run the real sentry-sdk against a loopback Sentry
server, on a real broker, relaying to the gateway emulator. A dead letter alerts exactly once,
retries never do, one cause is one fingerprint, and no email address reaches Sentry."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest

from tests.conftest import drain_dead_letters
from tests.sentry_server import SentryServer
from totango_emulator import GatewayEmulator
from worker import observability
from worker.application import TotangoCelery
from worker.deadletter import HOSTNAME
from worker.envelope import Envelope
from worker.events import TRACK_ACTIVITY, UPDATE_ACCOUNT
from worker.settings import Settings

pytestmark = pytest.mark.integration

EnvFor = Callable[..., dict[str, str]]
StartWorker = Callable[..., AbstractContextManager[Popen[bytes]]]
AppFor = Callable[[dict[str, str]], TotangoCelery]

#: How long to keep listening after the expected events, to be sure no extra one follows.
QUIET_SECONDS = 3.0
EMAIL = "jane.doe@example.com"


@pytest.fixture
def sentry() -> Iterator[SentryServer]:
    """A real Sentry ingestion endpoint on loopback that records every event it is sent."""
    with SentryServer() as server:
        yield server
        assert server.errors() == [], "the SDK sent something the server could not read"


def send(app: TotangoCelery, task: str, **kwargs: Any) -> str:
    """Enqueue a task message as any producer could, without the client's validation, so
    that an invalid event reaches the worker."""
    event_id = str(uuid.uuid4())
    app.send_task(task, kwargs={**kwargs, "event_id": event_id}, task_id=event_id)
    return event_id


def dump(events: list[dict[str, Any]]) -> str:
    return json.dumps(events, sort_keys=True)


def quiet_then_count(sentry: SentryServer, expected: int) -> list[dict[str, Any]]:
    """Wait for ``expected`` events, then listen a while longer: no extra event may come."""
    sentry.wait_for(expected, timeout=20)
    time.sleep(QUIET_SECONDS)
    events = sentry.events()
    assert len(events) == expected, [e.get("message") for e in events]
    return events


def test_retries_then_a_dead_letter_make_exactly_one_sentry_event(
    env_for: EnvFor,
    start_worker: StartWorker,
    app_for: AppFor,
    gateway: GatewayEmulator,
    sentry: SentryServer,
) -> None:
    """A gateway that always answers 503, with 3 retries: 4 calls, no Sentry event for any
    retry, then 1 dead letter and exactly 1 Sentry event (level error, tagged with task,
    reason, status, region, service id and event id), still 1 after the worker has stopped
    and flushed."""
    gateway.set_outage(503)
    env = env_for(SENTRY_DSN=sentry.dsn, TOTANGO_MAX_RETRIES="3")
    app = app_for(env)
    with start_worker(env):
        event_id = send(
            app, TRACK_ACTIVITY, account_id="acme", user_id="u-1", activity="Login", module="App"
        )
        gateway.wait_for(3, timeout=30, delivered_only=False)
        # Each retry waits at least 1 s; a retry's own event would have arrived by now.
        time.sleep(0.5)
        assert len(gateway.calls()) == 3, "still inside the retry window"
        assert sentry.events() == [], "a retry made a Sentry event"
        (event,) = quiet_then_count(sentry, 1)
        dead = drain_dead_letters(app, timeout=5)
    assert len(sentry.events()) == 1, "a second event arrived when the worker stopped"
    assert len(gateway.calls()) == 4
    assert [(d["event_id"], d["reason"], d["attempts"]) for d in dead] == [
        (event_id, "exhausted:503", 4)
    ]
    assert event["level"] == "error"
    assert "exception" not in event
    assert event["tags"] == event["tags"] | {
        "task": TRACK_ACTIVITY,
        "reason": "exhausted:503",
        "status": "503",
        "region": "us",
        "service_id": "SP-1234-56",
        "event_id": event_id,
    }
    assert event["contexts"]["dead_letter"]["event_id"] == event_id
    assert event["fingerprint"] == ["totango-dead-letter", TRACK_ACTIVITY, "exhausted:503"]


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_fifty_dead_letters_with_one_reason_share_one_fingerprint(
    env_for: EnvFor,
    start_worker: StartWorker,
    app_for: AppFor,
    sentry: SentryServer,
) -> None:
    """50 events dead-lettered for the same reason (``Contract Value: "1,200"``) make 50
    Sentry events with one identical fingerprint, so Sentry groups them as one issue; a
    different reason gets a different fingerprint."""
    env = env_for(SENTRY_DSN=sentry.dsn)
    app = app_for(env)
    with start_worker(env):
        same = {
            send(
                app, UPDATE_ACCOUNT, account_id=f"acct-{n}", attributes={"Contract Value": "1,200"}
            )
            for n in range(50)
        }
        other = send(app, UPDATE_ACCOUNT, account_id="acct-x", attributes={"Create Date": "soon"})
        events = quiet_then_count(sentry, 51)
    by_id = {e["tags"]["event_id"]: e for e in events}
    assert set(by_id) == same | {other}, "one event per dead letter, none twice"
    fingerprints = {tuple(by_id[event_id]["fingerprint"]) for event_id in same}
    assert fingerprints == {("totango-dead-letter", UPDATE_ACCOUNT, "invalid:Contract Value")}
    assert tuple(by_id[other]["fingerprint"]) == (
        "totango-dead-letter",
        UPDATE_ACCOUNT,
        "invalid:Create Date",
    )


def _dead_letter_with_emails(
    env_for: EnvFor,
    start_worker: StartWorker,
    app_for: AppFor,
    gateway: GatewayEmulator,
    sentry: SentryServer,
    **extra: str,
) -> list[dict[str, Any]]:
    """One invalid and one exhausted event, each with an email as the user id and in its
    attributes; returns the two Sentry events."""
    gateway.set_outage(503)
    # One retry, so that a retried call comes before the alert too.
    env = env_for(SENTRY_DSN=sentry.dsn, TOTANGO_MAX_RETRIES="1", **extra)
    app = app_for(env)
    people = {"Email": EMAIL, "Manager": "boss@example.com"}
    with start_worker(env):
        send(
            app,
            TRACK_ACTIVITY,
            account_id="acme",
            user_id=EMAIL,
            activity="Login",
            module="App",
            account_attributes={"Contract Value": "1,200", "Owner": "owner@example.com"},
            user_attributes=people,
        )
        send(
            app,
            TRACK_ACTIVITY,
            account_id="acme",
            user_id=EMAIL,
            activity="Login",
            module="App",
            account_name="Acme (billing@example.com)",
            user_attributes=people,
        )
        events = quiet_then_count(sentry, 2)
    assert sorted(e["tags"]["reason"] for e in events) == [
        "exhausted:503",
        "invalid:Contract Value",
    ]
    return events


def test_no_email_address_reaches_sentry(
    env_for: EnvFor,
    start_worker: StartWorker,
    app_for: AppFor,
    gateway: GatewayEmulator,
    sentry: SentryServer,
) -> None:
    """Dead letters (invalid and exhausted) whose user id and attributes are email addresses
    make Sentry events with no email anywhere: not in tags, contexts, extra data or
    breadcrumbs, and not percent-encoded either (a gateway URL carries ``%40``)."""
    events = _dead_letter_with_emails(env_for, start_worker, app_for, gateway, sentry)
    text = dump(events).lower()
    assert "example.com" not in text
    assert "jane.doe" not in text
    exhausted = next(e for e in events if e["tags"]["reason"] == "exhausted:503")
    crumbs = exhausted.get("breadcrumbs", {}).get("values", [])
    # The check above did cover breadcrumbs: the last gateway call is one, with its URL.
    [call] = [c for c in crumbs if c.get("type") == "http"]
    assert call["category"] == "gateway"
    assert call["data"]["url"] == f"{gateway.url}/pixel.gif"
    assert (call["data"]["method"], call["data"]["status_code"]) == ("GET", 503)


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_opting_in_to_personal_data_sends_the_user_id(
    env_for: EnvFor,
    start_worker: StartWorker,
    app_for: AppFor,
    gateway: GatewayEmulator,
    sentry: SentryServer,
) -> None:
    """With ``TOTANGO_SENTRY_SEND_PII=true`` the same dead letters do carry the user's email:
    it is the scrubbing, not the way the test sends them, that keeps emails out otherwise."""
    events = _dead_letter_with_emails(
        env_for, start_worker, app_for, gateway, sentry, TOTANGO_SENTRY_SEND_PII="true"
    )
    for event in events:
        assert EMAIL in dump([event])


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_without_a_dsn_sentry_is_cleanly_off(
    env_for: EnvFor,
    start_worker: StartWorker,
    app_for: AppFor,
    gateway: GatewayEmulator,
    tmp_path: Path,
) -> None:
    """With no SENTRY_DSN the worker delivers and dead-letters as usual and logs no error
    about Sentry; in-process, init_sentry says it is off and an alert is a no-op."""
    env = env_for()
    assert "SENTRY_DSN" not in env
    app = app_for(env)
    with start_worker(env):
        send(app, TRACK_ACTIVITY, account_id="acme", user_id="u-1", activity="Login", module="A")
        bad = send(app, UPDATE_ACCOUNT, account_id="acme", attributes={"Contract Value": "1,2"})
        gateway.wait_for(1, timeout=20)
        dead = drain_dead_letters(app, timeout=10)
    assert [(d["event_id"], d["reason"]) for d in dead] == [(bad, "invalid:Contract Value")]
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert "Traceback" not in log
    noisy = ("ERROR", "WARNING", "CRITICAL", "Exception", "Error")
    complaints = [
        line
        for line in log.splitlines()
        if "sentry" in line.lower() and any(word in line for word in noisy)
    ]
    assert complaints == []

    settings = Settings()
    assert settings.sentry_dsn is None
    assert observability.init_sentry(settings) is False
    envelope = Envelope("invalid:x", "e-1", TRACK_ACTIVITY, {}, 0, HOSTNAME)
    observability.alert_dead_letter(envelope, settings)  # no client: returns quietly


def _children(pid: int) -> list[int]:
    """The direct children of a process, from /proc (psutil is not installed)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


@pytest.mark.parametrize("broker_url", ["rabbitmq"], indirect=True)
def test_a_task_lost_with_its_pool_child_dead_letters_and_alerts_once(
    env_for: EnvFor,
    start_worker: StartWorker,
    app_for: AppFor,
    gateway: GatewayEmulator,
    sentry: SentryServer,
) -> None:
    """A prefork child killed (SIGKILL) in the middle of a gateway call, with no retries
    left, ends in the dead-letter queue with reason ``worker_lost`` and exactly one Sentry
    event, and the event is not relayed again."""
    gateway.set_outage("timeout")
    gateway.hang_seconds = 20
    env = env_for(
        SENTRY_DSN=sentry.dsn,
        TOTANGO_POOL="prefork",
        TOTANGO_CONCURRENCY="1",
        TOTANGO_MAX_RETRIES="0",
        TOTANGO_READ_TIMEOUT="30",
    )
    app = app_for(env)
    with start_worker(env) as worker:
        event_id = send(
            app, TRACK_ACTIVITY, account_id="acme", user_id="u-1", activity="Login", module="App"
        )
        gateway.wait_for(1, timeout=20, delivered_only=False)
        (child,) = _children(worker.pid)
        os.kill(child, signal.SIGKILL)
        (event,) = quiet_then_count(sentry, 1)
        dead = drain_dead_letters(app, timeout=5)
        assert len(gateway.calls()) == 1, "the lost task ran again"
    assert len(sentry.events()) == 1
    assert [(d["event_id"], d["reason"], d["attempts"]) for d in dead] == [
        (event_id, "worker_lost", 1)
    ]
    assert event["level"] == "error"
    assert event["tags"]["reason"] == "worker_lost"
    assert event["tags"]["event_id"] == event_id
    assert event["fingerprint"] == ["totango-dead-letter", TRACK_ACTIVITY, "worker_lost"]
