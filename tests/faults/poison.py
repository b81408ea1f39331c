"""Poison messages, and valid events with awkward ids, each tagged with an event key.

Some are published through Celery's client (``send_task`` can carry wrong arguments and
unknown task names); what it cannot produce (a body that is not JSON, a wrong content type,
no task header, nesting deeper than JSON encoders go) is published with kombu directly, as
a foreign producer would.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kombu import Connection

from tests.faults.accounting import DEAD_LETTER, DELIVER, Ledger
from tests.faults.harness import ACCOUNT, activity
from worker.application import TotangoCelery
from worker.client import Producer
from worker.contract import ROUTING_KEY
from worker.settings import broker_kind
from worker.topology import task_queue

TRACK = "totango.track_activity"
SERVICE_ID = "SP-1234-56"  # the default service id of tests.workers.worker_env
ONE_MB = 1_000_000
SHALLOW_DEPTH = 50  # nested values JSON carries fine; the worker must refuse them
DEEP_DEPTH = 5000  # deeper than Python's JSON decoder recurses


@dataclass
class Outlet:
    """Where poison goes: a Celery app (send_task, the producer API) and a raw kombu
    producer on the same queue."""

    app: TotangoCelery
    producer: Producer
    raw: Any  # kombu.Producer
    exchange: str

    def publish_raw(self, body: bytes, content_type: str | None, headers: dict | None) -> None:
        self.raw.publish(
            body,
            exchange=self.exchange,
            routing_key=ROUTING_KEY,
            content_type=content_type,
            content_encoding="utf-8" if content_type else None,
            headers=headers or {},
            retry=True,
        )


@dataclass
class Poison:
    kind: str
    key: str
    #: The dead-letter reasons (or reason prefixes) this one may end with.
    reasons: tuple[str, ...]
    publish: Callable[[Outlet], None]
    #: For a valid event: the exact decoded parameters the gateway must receive.
    params: list[tuple[str, str]] | None = None


@dataclass
class Batch:
    items: list[Poison]

    @property
    def invalid(self) -> list[Poison]:
        return [p for p in self.items if p.params is None]

    @property
    def valid(self) -> list[Poison]:
        return [p for p in self.items if p.params is not None]


def task_headers(name: str, key: str) -> dict[str, Any]:
    """The headers of Celery's message protocol 2, as a foreign client would set them."""
    return {
        "lang": "py", "task": name, "id": key, "root_id": key, "parent_id": None,
        "group": None, "retries": 0, "eta": None, "expires": None, "shadow": None,
        "timelimit": [None, None], "argsrepr": "()", "kwargsrepr": "{}", "origin": "faults",
        "ignore_result": True,
    }  # fmt: skip


def nested(depth: int) -> Any:
    value: Any = "bottom"
    for n in range(depth):
        value = {"level": value} if n % 2 else [value]
    return value


def _send(name: str, key: str, kwargs: Any = None, args: Any = None) -> Callable[[Outlet], None]:
    return lambda o: o.app.send_task(name, args=args, kwargs=kwargs, task_id=key)


def _raw(body: bytes, content_type: str | None, headers: dict | None) -> Callable[[Outlet], None]:
    return lambda o: o.publish_raw(body, content_type, headers)


def _not_json(key: str, n: int) -> Callable[[Outlet], None]:
    bodies = [
        f"not json {key}".encode(),
        b"\x80\x81\xfe\xff " + key.encode(),  # not even UTF-8
        f'[[], {{"account_id": "{key}"'.encode(),  # cut short
        f"<event id='{key}'/>".encode(),
        b"",
    ]
    return _raw(bodies[n % len(bodies)], "application/json", task_headers(TRACK, key))


CONTENT_TYPES = [
    "application/x-python-serialize", "application/x-yaml", "text/plain",
    "application/xml", "application/x-msgpack", "application/data", "application/text",
]  # fmt: skip


def _wrong_content_type(key: str, n: int) -> Callable[[Outlet], None]:
    # A valid event in a JSON body, labelled as something else: it must not be read.
    body = json.dumps([[], activity(key), {}]).encode()
    content_type = CONTENT_TYPES[n % len(CONTENT_TYPES)]
    return _raw(body, content_type, task_headers(TRACK, key))


def _wrong_arguments(key: str, n: int) -> Callable[[Outlet], None]:
    a = activity(key)
    cases: list[tuple[str, dict[str, Any], Any]] = [
        (TRACK, {k: v for k, v in a.items() if k != "user_id"}, None),
        (TRACK, {**a, "colour": "red"}, None),
        (TRACK, {"event_id": key}, [ACCOUNT, f"user-{key}", "Login", "Faults"]),
        (TRACK, {**a, "account_id": [ACCOUNT]}, None),
        (TRACK, {**a, "account_id": None}, None),
        (TRACK, {**a, "user_attributes": ["plan", "gold"]}, None),
        (TRACK, {**a, "user_attributes": {"plan": {"tier": "gold"}}}, None),
        (TRACK, {**a, "service_id": "SP-x"}, None),
        (TRACK, {**a, "account_attributes": {"Contract Value": "1,200"}}, None),
        (TRACK, {**a, "user_attributes": {"Contact": "YES"}}, None),
        ("totango.update_account", {"account_id": ACCOUNT, "event_id": key}, None),
        ("totango.update_account", {"account_id": ACCOUNT, "attributes": {"a": 1},
                                    "writeback": "yes", "event_id": key}, None),
        (TRACK, {**a, "event_id": key + "-" + "x" * 200}, None),
    ]  # fmt: skip
    name, kwargs, args = cases[n % len(cases)]
    return _send(name, key, kwargs, args)


def _kwargs_not_a_mapping(key: str, n: int) -> Callable[[Outlet], None]:
    bodies = [[[], f"kwargs {key}", {}], [[], [key], {}], [key], {"kwargs": key}]
    body = json.dumps(bodies[n % len(bodies)]).encode()
    return _raw(body, "application/json", task_headers(TRACK, key))


UNKNOWN_TASKS = [
    "totango.track_activty", "totango.nope", "TOTANGO.TRACK_ACTIVITY",
    "totango.track_activity ", "tasks.track_activity", "totango.",
]  # fmt: skip


def _big(key: str, n: int) -> Callable[[Outlet], None]:
    if n % 2:
        return _send(TRACK, key, activity(key, user_attributes={"blob": "x" * ONE_MB}))
    return _send(TRACK, key, activity(key, account_name="n" * ONE_MB))


def _deep(key: str, n: int) -> Callable[[Outlet], None]:
    if n % 11:
        return _send(TRACK, key, activity(key, user_attributes={"deep": nested(SHALLOW_DEPTH)}))
    # Too deep for json.dumps as well: written out by hand.
    prefix = json.dumps([[], activity(key, user_attributes={"deep": None}), {}])
    head, tail = prefix.split("null", 1)
    body = (head + "[" * DEEP_DEPTH + "]" * DEEP_DEPTH + tail).encode()
    return _raw(body, "application/json", task_headers(TRACK, key))


def _not_a_task(key: str, n: int) -> Callable[[Outlet], None]:
    bodies = [{"hello": key}, [1, 2, key], {"task": None, "id": key}]
    return _raw(json.dumps(bodies[n % len(bodies)]).encode(), "application/json", None)


def _awkward_valid(key: str, n: int) -> tuple[Callable[[Outlet], None], list[tuple[str, str]]]:
    account = f"acct&x={n}#frag"
    user = f"user-{key}&role=admin#top"
    kwargs = {
        "account_id": account, "user_id": user, "activity": "Log&in=1#x", "module": "M&=#",
        "user_attributes": {"plan&tier=#": "gold&x=y#z"}, "event_id": key,
    }  # fmt: skip
    params = [
        ("sdr_s", SERVICE_ID), ("sdr_o", account), ("sdr_u", user), ("sdr_a", "Log&in=1#x"),
        ("sdr_m", "M&=#"), ("sdr_u.plan&tier=#", "gold&x=y#z"),
    ]  # fmt: skip
    return (lambda o: o.producer.track_activity(**kwargs)), params


def _awkward_invalid(key: str, n: int) -> Callable[[Outlet], None]:
    cases = [
        activity(key, account_id="&=#" * 100),  # longer than 255 characters
        activity(key, user_id=" "),  # blank
        activity(key, user_attributes={"a&b=\x01#": "x"}),  # a control character in a name
    ]
    return _send(TRACK, key, cases[n % len(cases)])


#: kind: (how many, allowed reasons, builder)
PLAN: dict[str, tuple[int, tuple[str, ...], Callable[[str, int], Callable[[Outlet], None]]]] = {
    "not JSON": (250, ("undecodable",), _not_json),
    "wrong content type": (150, ("undecodable",), _wrong_content_type),
    "wrong or missing arguments": (250, ("invalid:",), _wrong_arguments),
    "arguments not a mapping": (20, ("undecodable", "error:InvalidTaskError"),
                                _kwargs_not_a_mapping),
    "unknown task": (150, ("unknown_task",), lambda k, n: _send(UNKNOWN_TASKS[n % 6], k,
                                                                  activity(k))),
    "1 MB payload": (10, ("invalid:",), _big),
    "deeply nested": (110, ("invalid:", "undecodable"), _deep),
    "ids with & = # (invalid)": (50, ("invalid:",), _awkward_invalid),
    "not a task": (50, ("undecodable", "unknown_task"), _not_a_task),
}  # fmt: skip
AWKWARD_VALID = 150


def build(ledger: Ledger, rng: random.Random) -> Batch:
    items = []
    for kind, (count, reasons, make) in PLAN.items():
        for n in range(count):
            key = ledger.key(DEAD_LETTER)
            items.append(Poison(kind, key, reasons, make(key, n)))
    for n in range(AWKWARD_VALID):
        key = ledger.key(DELIVER)
        publish, params = _awkward_valid(key, n)
        items.append(Poison("ids with & = # (valid)", key, (), publish, params))
    rng.shuffle(items)
    return Batch(items)


@contextmanager
def outlet(app: TotangoCelery, url: str) -> Iterator[Outlet]:
    """A raw kombu producer next to the app, with publisher confirms on RabbitMQ."""
    queue = task_queue(broker_kind(url))
    options = {"confirm_publish": True} if broker_kind(url) == "rabbitmq" else {}
    with Connection(url, transport_options=options) as connection:
        raw = connection.Producer()
        queue(raw.channel).declare()
        yield Outlet(app, Producer(app=app), raw, queue.exchange.name if queue.exchange else "")
