"""The relay end to end: a real worker process, a real broker and the loopback gateway.

Every test runs on RabbitMQ and on Redis (the ``broker_url`` fixture) against a worker
started with ``celery -A worker.app worker``, exactly as in production.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest
from kombu import Connection

from tests.workers import tail, wait_until
from totango_emulator import Call, GatewayEmulator
from worker.application import TotangoCelery
from worker.client import Producer
from worker.contract import DEAD_LETTER_QUEUE, EXCHANGE, QUEUE, ROUTING_KEY
from worker.deadletter import browse
from worker.envelope import Envelope
from worker.settings import broker_kind
from worker.topology import task_queue

pytestmark = pytest.mark.integration

Env = dict[str, str]
StartWorker = Callable[..., AbstractContextManager[Popen[bytes]]]

#: Upper bounds for waits. Generous next to what the runs take (well under a second per
#: delivery, a few seconds per retry chain) so a slow machine does not flake, yet bounded.
DELIVERY_TIMEOUT = 15.0
RETRY_CHAIN_TIMEOUT = 30.0
#: How long to keep watching after the expected outcome, to catch a duplicate or a late call.
SETTLE_SECONDS = 1.0
DEFAULT_SERVICE_ID = "SP-1234-56"  # what tests.workers.worker_env sets


# --- helpers ----------------------------------------------------------------------------


def calls_for(gateway: GatewayEmulator, account_id: str) -> list[Call]:
    """The gateway calls of one event, recognised by its account id."""
    return [call for call in gateway.calls() if ("sdr_o", account_id) in call.params]


def wait_calls(
    gateway: GatewayEmulator,
    account_id: str,
    count: int,
    log: Path,
    timeout: float = DELIVERY_TIMEOUT,
    *,
    delivered: bool = True,
) -> list[Call]:
    def probe() -> list[Call] | None:
        calls = calls_for(gateway, account_id)
        done = [c for c in calls if c.status == 200] if delivered else calls
        return calls if len(done) >= count else None

    kind = "delivered" if delivered else "recorded"
    result: list[Call] = wait_until(probe, timeout, f"{count} {kind} calls for {account_id}", log)
    return result


def wait_dead_letters(
    app: TotangoCelery, count: int, log: Path, timeout: float = DELIVERY_TIMEOUT
) -> list[Envelope]:
    """Browse the dead-letter queue (without taking anything) until it holds ``count``."""

    def probe() -> list[Envelope] | None:
        found = browse(app, timeout=0)
        return found if len(found) >= count else None

    result: list[Envelope] = wait_until(probe, timeout, f"{count} dead letters", log)
    return result


def by_task_id(envelopes: list[Envelope]) -> dict[str | None, Envelope]:
    return {envelope.task_id: envelope for envelope in envelopes}


def sorted_params(call: Call) -> list[tuple[str, str]]:
    return sorted(call.params)


def timestamp(iso: str | None) -> float:
    assert iso is not None
    return datetime.fromisoformat(iso).timestamp()


def statuses(calls: list[Call]) -> list[int | str]:
    return [call.status for call in sorted(calls, key=lambda c: c.received_at)]


def valid_activity(account_id: str) -> dict[str, Any]:
    return {"account_id": account_id, "user_id": "u@example.com", "activity": "A", "module": "M"}


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def producer(app: TotangoCelery) -> Producer:
    return Producer(app=app)


# --- 1. the wire contract ------------------------------------------------------------------


@pytest.mark.usefixtures("worker")
def test_every_task_kind_arrives_with_exactly_the_documented_params(
    producer: Producer, gateway: GatewayEmulator, worker_log: Path
) -> None:
    """Each task kind published through ``Producer`` reaches the gateway once, with exactly
    the documented decoded parameters: ids holding ``&``, ``=``, ``+``, ``#``, spaces and
    non-ASCII survive intact, ``True`` becomes ``yes`` for Contact, ``None`` attributes are
    left out, the worker's default service id applies when a message names none and a
    message's own service id wins. The raw query encodes spaces as ``%20``, never ``+``,
    and the User-Agent names the worker."""
    activity_account = "a&b=c #1 + ünï"
    account_account = "acct+2 ø&x=y"
    user_account = "#3 日本 a&b"
    producer.track_activity(
        account_id=activity_account,
        user_id="jo+test@exämple.com",
        activity="Log in",
        module="App & Co",
        account_name="ACME Ünïcode",
        account_attributes={"Account Type": "Demo & Trial", "Contract Value": 1200.5, "gone": None},
        user_attributes={"Contact": True, "Key Contact": False, "role": "admin=1"},
    )
    producer.update_account(
        account_id=account_account,
        attributes={
            "Create Date": "2026-01-31",
            "Success Manager": "Jo Doe",
            "product_id": 7,
            "trial": True,
            "gone": None,
        },
        account_name="Two & Co",
        writeback=True,
        service_id="SP-77-1",
    )
    producer.update_user(
        account_id=user_account,
        user_id="user 3",
        attributes={"Key Contact": "yes", "title": "Ünï Boss #1", "gone": None},
        account_attributes={"parent_id": activity_account},
    )

    gateway.wait_for(3, timeout=DELIVERY_TIMEOUT)
    time.sleep(SETTLE_SECONDS)
    calls = gateway.calls()
    assert len(calls) == 3, [c.params for c in calls]
    (activity,) = calls_for(gateway, activity_account)
    (account,) = calls_for(gateway, account_account)
    (user,) = calls_for(gateway, user_account)

    assert sorted_params(activity) == sorted(
        [
            ("sdr_s", DEFAULT_SERVICE_ID),
            ("sdr_o", activity_account),
            ("sdr_u", "jo+test@exämple.com"),
            ("sdr_a", "Log in"),
            ("sdr_m", "App & Co"),
            ("sdr_o.account_name", "ACME Ünïcode"),
            ("sdr_o.Account Type", "Demo & Trial"),
            ("sdr_o.Contract Value", "1200.5"),
            ("sdr_u.Contact", "yes"),
            ("sdr_u.Key Contact", "no"),
            ("sdr_u.role", "admin=1"),
        ]
    )
    assert sorted_params(account) == sorted(
        [
            ("sdr_s", "SP-77-1"),
            ("sdr_o", account_account),
            ("sdr_o.account_name", "Two & Co"),
            ("sdr_o.Create Date", "2026-01-31"),
            ("sdr_o.Success Manager", "Jo Doe"),
            ("sdr_o.product_id", "7"),
            ("sdr_o.trial", "true"),
            ("enableWriteback", "true"),
        ]
    )
    assert sorted_params(user) == sorted(
        [
            ("sdr_s", DEFAULT_SERVICE_ID),
            ("sdr_o", user_account),
            ("sdr_u", "user 3"),
            ("sdr_o.parent_id", activity_account),
            ("sdr_u.Key Contact", "yes"),
            ("sdr_u.title", "Ünï Boss #1"),
        ]
    )

    assert all(call.status == 200 and call.method == "GET" for call in calls)
    raw = activity.raw
    assert "sdr_a=Log%20in" in raw
    assert "sdr_o=a%26b%3Dc%20%231%20%2B%20" in raw  # nothing in an id can split a parameter
    assert "sdr_o.Account%20Type=Demo%20%26%20Trial" in raw  # the dot after sdr_o stays literal
    assert "sdr_u=jo%2Btest%40ex%C3%A4mple.com" in raw  # UTF-8, then percent-encoded
    for call in calls:
        assert "+" not in call.raw, call.raw
        user_agent = {k.lower(): v for k, v in call.headers.items()}.get("user-agent", "")
        assert user_agent.startswith("totango-worker/"), user_agent
    assert "sdr_s=SP-1234-56" in raw, tail(worker_log, 40)


# --- 2, 3, 6, 10. what is retried, and when --------------------------------------------------


@pytest.mark.usefixtures("worker")
def test_failed_attempts_are_retried_then_delivered_exactly_once(
    producer: Producer, gateway: GatewayEmulator, app: TotangoCelery, worker_log: Path
) -> None:
    """Every kind of failed attempt is retried until it delivers, and is then sent no more.
    One worker run, one event per case, recognised by its account id:

    - 503 twice: delivered on the third attempt (3 calls, 1 delivered);
    - 429 with ``Retry-After: 2``: the next attempt comes at least 2 s later (the backoff
      alone would retry after 1 s);
    - a call outliving the worker's 2 s read timeout (the gateway hangs 3 s), and a
      connection reset by the gateway: each retried, then delivered;
    - 302 (the emulator adds ``Location: /elsewhere``): not followed but retried, so both
      calls go to ``pixel.gif``.

    Nothing is dead-lettered."""
    gateway.hang_seconds = 3.0
    cases: dict[str, list[int | str]] = {
        "acct-503": [503, 503],
        "acct-timeout": ["timeout"],
        "acct-reset": ["reset"],
        "acct-302": [302],
    }
    for account, failures in cases.items():
        gateway.add_rule({"sdr_o": account}, failures)
    gateway.add_rule({"sdr_o": "acct-429"}, [429], retry_after="2")
    cases["acct-429"] = [429]
    for account in cases:
        producer.track_activity(**valid_activity(account))

    for account in cases:
        wait_calls(gateway, account, 1, worker_log, RETRY_CHAIN_TIMEOUT)
    time.sleep(SETTLE_SECONDS)
    for account, failures in cases.items():
        assert statuses(calls_for(gateway, account)) == [*failures, 200], account
    assert len(gateway.calls()) == sum(len(f) + 1 for f in cases.values())
    assert len(gateway.delivered()) == len(cases)
    first, second = sorted(calls_for(gateway, "acct-429"), key=lambda c: c.received_at)
    assert second.received_at - first.received_at >= 2.0
    assert browse(app, timeout=0) == []


def test_a_redirect_answer_is_judged_as_its_own_status(
    env_for: Callable[..., Env],
    app_for: Callable[[Env], TotangoCelery],
    start_worker: StartWorker,
    gateway: GatewayEmulator,
    worker_log: Path,
) -> None:
    """The worker judges the 3xx answer itself: with no retries left, a 302 is dead-lettered
    as ``exhausted:302`` with last status 302. Had it followed ``Location: /elsewhere`` (which
    the emulator answers 404, unrecorded) it would report 404; had the HTTP client refused the
    hop it would report a connection error."""
    env = env_for(TOTANGO_MAX_RETRIES="0")
    app = app_for(env)
    gateway.add_rule({"sdr_o": "acct-302-once"}, [302])
    with start_worker(env):
        Producer(app=app).track_activity(**valid_activity("acct-302-once"))
        (envelope,) = wait_dead_letters(app, 1, worker_log)
    assert statuses(calls_for(gateway, "acct-302-once")) == [302]
    assert (envelope.reason, envelope.last_status) == ("exhausted:302", "302")


@pytest.mark.usefixtures("worker")
def test_timeouts_and_connection_resets_are_retried(
    producer: Producer, gateway: GatewayEmulator, app: TotangoCelery, worker_log: Path
) -> None:
    """A call that outlives the worker's 2 s read timeout, and a connection reset by the
    gateway, are both retried and then delivered; neither is dead-lettered."""
    gateway.hang_seconds = 3.0
    gateway.add_rule({"sdr_o": "acct-timeout"}, ["timeout"])
    gateway.add_rule({"sdr_o": "acct-reset"}, ["reset"])
    producer.track_activity(**valid_activity("acct-timeout"))
    producer.track_activity(**valid_activity("acct-reset"))

    timed_out = wait_calls(gateway, "acct-timeout", 1, worker_log, RETRY_CHAIN_TIMEOUT)
    reset = wait_calls(gateway, "acct-reset", 1, worker_log, RETRY_CHAIN_TIMEOUT)
    assert statuses(timed_out) == ["timeout", 200]
    assert statuses(reset) == ["reset", 200]
    assert browse(app, timeout=0) == []


# --- 5, 11. running out of retries ---------------------------------------------------------


@pytest.mark.usefixtures("worker")
def test_an_event_that_always_fails_is_dead_lettered_after_the_retries(
    producer: Producer, gateway: GatewayEmulator, app: TotangoCelery, worker_log: Path
) -> None:
    """With the gateway answering 503 to everything, an event gets MAX_RETRIES + 1 = 3
    calls and then lands in ``totango.dead_letter`` as one complete envelope: reason
    ``exhausted:503``, 3 attempts, last status 503, the producer's event id, the worker's
    host, and both attempt times. ``first_attempt_at`` travels in a custom message header
    through Celery's retries, so it is the time of the first call, not of a later one, and
    lies before ``last_attempt_at`` by at least the two retry delays (1 s or more each)."""
    gateway.set_outage(503)
    event_id = producer.track_activity(**valid_activity("acct-down"))

    (envelope,) = wait_dead_letters(app, 1, worker_log, RETRY_CHAIN_TIMEOUT)
    time.sleep(SETTLE_SECONDS)
    calls = sorted(calls_for(gateway, "acct-down"), key=lambda c: c.received_at)
    assert statuses(calls) == [503, 503, 503]
    assert envelope.reason == "exhausted:503"
    assert envelope.attempts == 3
    assert envelope.last_status == "503"
    assert envelope.event_id == event_id
    assert envelope.task_id == event_id
    assert envelope.task == "totango.track_activity"
    stamped = envelope.kwargs["occurred_at"]  # the producer API's stamp, an epoch in ms
    assert isinstance(stamped, int)
    assert envelope.kwargs == {
        **valid_activity("acct-down"),
        "event_id": event_id,
        "occurred_at": stamped,
    }
    assert envelope.worker_host
    assert len(browse(app, timeout=0)) == 1  # one envelope, not one per attempt

    first, last = timestamp(envelope.first_attempt_at), timestamp(envelope.last_attempt_at)
    # Stamped just before the first call left: near it, and well before the second call.
    assert calls[0].received_at - 1.0 <= first <= calls[0].received_at + 0.05
    assert first < calls[1].received_at - 0.5
    assert last >= calls[2].received_at - 0.05
    assert last - first >= 2.0


# --- 4, 9, 7. what never reaches the gateway -----------------------------------------------


def test_invalid_input_is_dead_lettered_without_a_call_and_stays_there(
    *,
    broker_url: str,
    worker: Popen[bytes],
    app: TotangoCelery,
    producer: Producer,
    gateway: GatewayEmulator,
    worker_log: Path,
) -> None:
    """Raw messages that can never be valid (published with ``send_task``, bypassing the
    producer's own validation) never reach the gateway: each lands in the dead-letter queue
    with reason ``invalid:<field>`` and 0 attempts, and a valid event sent after them is
    still delivered. The worker, started without ``-Q``, consumes ``totango`` but never
    ``totango.dead_letter``: the envelopes are all still there after it has run on for 2 s,
    and on RabbitMQ the dead-letter queue has no consumer at all."""
    activity = valid_activity("inv")
    cases: list[tuple[str, str, dict[str, Any], list[Any]]] = [
        (
            "totango.update_account",
            "invalid:Contract Value",
            {"account_id": "inv", "attributes": {"Contract Value": "1,200"}},
            [],
        ),
        (
            "totango.update_user",
            "invalid:Contact",
            {"account_id": "inv", "user_id": "u", "attributes": {"Contact": "YES"}},
            [],
        ),
        ("totango.track_activity", "invalid:account_id", {**activity, "account_id": ""}, []),
        ("totango.track_activity", "invalid:service_id", {**activity, "service_id": "SP-x"}, []),
        ("totango.track_activity", "invalid:colour", {**activity, "colour": "red"}, []),
        ("totango.update_account", "invalid:attributes", {"account_id": "inv"}, []),
        ("totango.track_activity", "invalid:arguments", {}, ["inv", "u", "A", "M"]),
    ]
    sent = {}
    for task, reason, kwargs, args in cases:
        task_id = new_id()
        app.send_task(task, args=args, kwargs=kwargs, task_id=task_id)
        sent[task_id] = (task, reason, kwargs)
    producer.track_activity(**valid_activity("after-invalid"))

    wait_calls(gateway, "after-invalid", 1, worker_log)
    envelopes = by_task_id(wait_dead_letters(app, len(cases), worker_log))
    assert set(envelopes) == set(sent)
    for task_id, (task, reason, kwargs) in sent.items():
        envelope = envelopes[task_id]
        assert (envelope.reason, envelope.attempts, envelope.task) == (reason, 0, task)
        assert envelope.kwargs == kwargs
        assert envelope.event_id == task_id
        assert envelope.last_status is None
    assert len(gateway.calls()) == 1  # only the valid event

    time.sleep(2.0)
    assert worker.poll() is None
    assert sorted(e.id for e in browse(app, timeout=0)) == sorted(e.id for e in envelopes.values())
    if broker_kind(broker_url) == "rabbitmq":
        # Ask the broker itself which queues have consumers (a passive declare's consumer
        # count on a quorum queue was seen to report the message count instead).
        vhost = broker_url.rsplit("/", 1)[1]
        listed = subprocess.run(
            ["rabbitmqctl", "-q", "list_consumers", "-p", vhost, "queue_name"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.split()
        assert DEAD_LETTER_QUEUE not in listed
        assert QUEUE in listed


def publish_raw(broker_url: str, body: Any, **options: Any) -> None:
    """Publish with plain kombu, as a foreign producer might, to where ``worker.topology``
    routes the ``totango`` queue: the ``totango`` exchange on RabbitMQ, the default exchange
    (straight onto the list) on Redis."""
    queue = task_queue(broker_kind(broker_url))
    assert queue.exchange is not None
    assert queue.exchange.name in {EXCHANGE, ""}
    with Connection(broker_url) as connection:
        connection.Producer().publish(
            body,
            exchange=queue.exchange.name,
            routing_key=ROUTING_KEY,
            declare=[queue],
            retry=True,
            **options,
        )


def test_bad_messages_neither_crash_nor_wedge_the_worker(
    *,
    broker_url: str,
    worker: Popen[bytes],
    app: TotangoCelery,
    producer: Producer,
    gateway: GatewayEmulator,
    worker_log: Path,
) -> None:
    """Messages the worker cannot even read (a body that is not JSON, a pickle content
    type, an unknown task name, no task header at all) each end in the dead-letter queue as
    ``undecodable`` or ``unknown_task``, with what could be kept of them; the worker keeps
    running and delivers a valid event sent afterwards."""
    garbage_id, pickle_id, unknown_id = new_id(), new_id(), new_id()
    task_headers = {"task": "totango.track_activity", "lang": "py", "argsrepr": "()"}
    publish_raw(
        broker_url,
        b"\x80\x81 not json {",
        content_type="application/json",
        content_encoding="utf-8",
        headers={**task_headers, "id": garbage_id},
    )
    publish_raw(
        broker_url,
        b"\x80\x05N.",  # pickle.dumps(None): the worker must refuse, never unpickle
        content_type="application/x-python-serialize",
        content_encoding="binary",
        headers={**task_headers, "id": pickle_id},
    )
    app.send_task(
        "totango.nope", kwargs={"account_id": "x", "event_id": "ev-nope"}, task_id=unknown_id
    )
    publish_raw(broker_url, {"hello": "world"}, serializer="json")
    producer.track_activity(**valid_activity("after-bad"))

    wait_calls(gateway, "after-bad", 1, worker_log)
    envelopes = wait_dead_letters(app, 4, worker_log)
    assert worker.poll() is None, tail(worker_log, 40)
    assert len(gateway.calls()) == 1
    found = by_task_id(envelopes)

    garbage = found[garbage_id]
    assert (garbage.reason, garbage.attempts, garbage.kwargs) == ("undecodable", 0, None)
    assert garbage.raw_body_encoding == "base64"  # not UTF-8: kept whole as base64
    assert garbage.content_type == "application/json"
    refused = found[pickle_id]
    assert refused.reason == "undecodable"
    assert refused.content_type == "application/x-python-serialize"
    unknown = found[unknown_id]
    assert (unknown.reason, unknown.task) == ("unknown_task", "totango.nope")
    assert unknown.kwargs == {"account_id": "x", "event_id": "ev-nope"}
    assert unknown.event_id == "ev-nope"
    headerless = found[None]
    assert (headerless.reason, headerless.task) == ("undecodable", None)
    assert headerless.raw_body is not None
    assert "hello" in headerless.raw_body


def test_protocol_1_and_hybrid_messages_are_delivered(
    *,
    broker_url: str,
    worker: Popen[bytes],
    gateway: GatewayEmulator,
    worker_log: Path,
) -> None:
    """A foreign producer's protocol-1 message (task and arguments in the body, no task
    header) and a hybrid one (a task header, the arguments in a protocol-1 body) are
    delivered like a protocol-2 one: the consumer decodes each body once and hands the pool
    what it decoded (``worker.consumer.DecodedOnce``), whichever protocol it came in."""
    proto1, hybrid = valid_activity("proto-1"), valid_activity("hybrid")
    publish_raw(
        broker_url,
        {"task": "totango.track_activity", "id": new_id(), "args": [], "kwargs": proto1},
        serializer="json",
    )
    publish_raw(
        broker_url,
        {"args": [], "kwargs": hybrid},
        serializer="json",
        headers={"task": "totango.track_activity", "id": new_id(), "lang": "py"},
    )
    (first,) = wait_calls(gateway, "proto-1", 1, worker_log)
    (second,) = wait_calls(gateway, "hybrid", 1, worker_log)
    assert worker.poll() is None, tail(worker_log, 40)
    assert ("sdr_a", "A") in first.params
    assert ("sdr_a", "A") in second.params


# --- 8. settings are checked at start ------------------------------------------------------


def test_a_wrong_setting_stops_the_worker_at_start(env_for: Callable[..., Env]) -> None:
    """An unknown ``TOTANGO_REGION`` and a missing ``TOTANGO_SERVICE_ID`` each make
    ``celery -A worker.app worker`` exit non-zero within 30 s, naming the variable."""
    mars = env_for(TOTANGO_REGION="mars")
    no_service = {k: v for k, v in env_for().items() if k != "TOTANGO_SERVICE_ID"}
    command = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--loglevel=INFO"]
    runs = {
        "TOTANGO_REGION": Popen(
            command, env=mars, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        ),
        "TOTANGO_SERVICE_ID": Popen(
            command, env=no_service, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        ),
    }
    try:
        for variable, proc in runs.items():
            output, _ = proc.communicate(timeout=30)
            text = output.decode(errors="replace")
            assert proc.returncode != 0, text
            assert f"{variable}:" in text, text  # ConfigError reads "VARIABLE: what to fix"
    finally:
        for proc in runs.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)  # reaps it and closes its pipe


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_a_query_too_long_for_a_url_goes_as_a_post_form(
    env_for: Callable[..., Env],
    app_for: Callable[[Env], TotangoCelery],
    start_worker: StartWorker,
    gateway: GatewayEmulator,
) -> None:
    """GET by default; an event whose URL would pass TOTANGO_MAX_URL_LENGTH is sent as a
    POST form body with exactly the same decoded parameters."""
    env = env_for(TOTANGO_MAX_URL_LENGTH="300")
    app = app_for(env)
    short = {"account_id": "short", "user_id": "u1", "activity": "Login", "module": "App"}
    long_value = "x&y=z " * 50
    long = {**short, "account_id": "long", "account_attributes": {"Notes": long_value}}
    with start_worker(env):
        app.send_task("totango.track_activity", kwargs=short)
        app.send_task("totango.track_activity", kwargs=long)
        calls = gateway.wait_for(2, timeout=20)
    by_account = {dict(c.params)["sdr_o"]: c for c in calls}
    assert by_account["short"].method == "GET"
    assert by_account["long"].method == "POST"
    assert dict(by_account["long"].params)["sdr_o.Notes"] == long_value
    assert len(by_account["long"].params) == 6
