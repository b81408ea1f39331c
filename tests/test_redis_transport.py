"""worker/redis_transport.py on a real Redis: a fetched message is reserved by the time the
fetch returns, in the format kombu's own restore reads, and nothing is ever dropped.

The fault suite proves the point that matters (a fetch whose answer is lost in transit
leaves the message reserved, tests/faults/test_broker.py); these tests pin down each path
of the channel: consume, basic_get, priorities, no_ack consumers, key prefixes, and list
items that are not kombu messages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.message import Message

from tests.brokers import redis_database
from worker.application import create_app
from worker.redis_transport import UNPARSEABLE_SUFFIX, Transport
from worker.settings import Settings

pytestmark = pytest.mark.integration

UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"


@pytest.fixture
def url() -> Iterator[str]:
    with redis_database() as url:
        yield url


def direct_queue(label: str = "q") -> Queue:
    """A queue of its own on the default exchange, as the worker routes on Redis."""
    name = f"{label}-{uuid.uuid4().hex[:8]}"
    return Queue(name, Exchange("", type="direct"), routing_key=name)


@pytest.fixture
def queue() -> Queue:
    return direct_queue()


def publish(url: str, queue: Queue, body: dict[str, Any], **options: Any) -> None:
    """Publish as any producer does: kombu's stock Redis transport, no worker code."""
    with Connection(url, transport_options=options.pop("transport_options", {})) as conn:
        Producer(conn).publish(
            body, exchange="", routing_key=queue.name, serializer="json", declare=[queue], **options
        )


def ours(url: str, **transport_options: Any) -> Connection:
    return Connection(url, transport=Transport, transport_options=transport_options)


def receive(conn: Connection, queue: Queue, *, no_ack: bool = False) -> list[Message]:
    got: list[Message] = []
    with Consumer(conn, [queue], callbacks=[lambda _b, m: got.append(m)], no_ack=no_ack):
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=1)
            except TimeoutError:
                continue
    return got


def test_the_worker_app_uses_this_transport_on_redis_only(url: str) -> None:
    """The wiring: a worker on a redis:// broker fetches with this channel; on AMQP, kombu's."""
    settings = dataclasses.replace(Settings(), broker_url=url, service_id="SP-1")
    with create_app(settings).connection_for_read() as conn:
        assert conn.transport_cls is not None
        assert type(conn.transport) is Transport
    amqp = dataclasses.replace(settings, broker_url="amqp://guest:guest@127.0.0.1:5672//")
    assert create_app(amqp).conf.broker_transport is None


def test_a_consumed_message_is_reserved_until_acked(url: str, queue: Queue) -> None:
    """A message handed to a consumer is already in ``unacked`` and its index, and off the
    list; the ack removes it from both."""
    publish(url, queue, {"n": 1})
    client = redis.Redis.from_url(url)
    with ours(url) as conn:
        (message,) = receive(conn, queue)
        assert message.payload == {"n": 1}
        assert client.llen(queue.name) == 0
        assert client.hexists(UNACKED, message.delivery_tag)
        assert client.zscore(UNACKED_INDEX, message.delivery_tag) is not None
        message.ack()
        assert client.hlen(UNACKED) == 0
        assert client.zcard(UNACKED_INDEX) == 0


def test_a_reservation_is_what_kombus_own_restore_reads(url: str, queue: Queue) -> None:
    """basic_get reserves the message before it returns; the process then dies without an
    ack. kombu's stock transport, after the visibility timeout, puts the very same message
    back on the list, marked redelivered."""
    publish(url, queue, {"n": 2, "text": "a/b & c"})
    client = redis.Redis.from_url(url)
    # A process takes it with basic_get and is killed with SIGKILL before any ack or close.
    script = (
        "import os, signal, sys\n"
        "from kombu import Connection\n"
        "from worker.redis_transport import Transport\n"
        "conn = Connection(sys.argv[1], transport=Transport)\n"
        "message = conn.default_channel.basic_get(sys.argv[2], no_ack=False)\n"
        "print(message.delivery_tag, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, url, queue.name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    tag = done.stdout.strip()
    assert client.llen(queue.name) == 0
    stored = json.loads(client.hget(UNACKED, tag) or b"null")
    assert stored[1:] == ["", queue.name]
    assert stored[0]["properties"]["delivery_tag"] == tag
    time.sleep(1.2)
    with Connection(url, transport_options={"visibility_timeout": 1}) as stock:
        stock.default_channel.qos.restore_visible(num=10, interval=1)
        again = stock.default_channel.basic_get(queue.name, no_ack=True)
    assert again is not None
    assert again.payload == {"n": 2, "text": "a/b & c"}
    assert again.delivery_info.get("redelivered") or again.headers.get("redelivered")


def test_an_item_that_is_not_a_kombu_message_is_set_aside_not_dropped(
    url: str, queue: Queue
) -> None:
    """Something that is not a kombu message (not JSON, or JSON without a delivery tag) is
    moved whole to ``<queue>.unparseable``; the consumer goes on to the next message."""
    client = redis.Redis.from_url(url)
    publish(url, queue, {"n": 3})
    client.rpush(queue.name, b"not json at all", b'{"properties": {}}')
    with ours(url) as conn:
        (message,) = receive(conn, queue)
        message.ack()
    assert message.payload == {"n": 3}
    assert sorted(client.lrange(queue.name + UNPARSEABLE_SUFFIX, 0, -1)) == [
        b"not json at all",
        b'{"properties": {}}',
    ]
    assert client.llen(queue.name) == 0


def test_a_no_ack_consumer_keeps_kombus_fetch(url: str, queue: Queue) -> None:
    """Nothing acknowledges what a no_ack consumer gets, so nothing may be reserved for it:
    a reservation would come back later as a duplicate."""
    publish(url, queue, {"n": 4})
    with ours(url) as conn:
        (message,) = receive(conn, queue, no_ack=True)
    assert message.payload == {"n": 4}
    client = redis.Redis.from_url(url)
    assert client.hlen(UNACKED) == 0
    assert client.llen(queue.name) == 0


def test_a_message_with_a_priority_is_fetched_and_reserved(url: str, queue: Queue) -> None:
    """A producer that sets a priority puts the message on a list of its own; the fetch
    looks at every priority list, not only the one it waits on."""
    publish(url, queue, {"n": 5}, priority=9)
    client = redis.Redis.from_url(url)
    assert client.llen(queue.name) == 0  # it is on the priority's own list
    with ours(url) as conn:
        (message,) = receive(conn, queue)
        assert client.hexists(UNACKED, message.delivery_tag)
        message.ack()
    assert message.payload == {"n": 5}


def test_a_global_key_prefix_applies_to_every_key_the_fetch_touches(url: str, queue: Queue) -> None:
    """With ``global_keyprefix``, the list, ``unacked`` and its index all carry the prefix,
    as kombu's own commands do."""
    prefix = "pfx:"
    publish(url, queue, {"n": 6}, transport_options={"global_keyprefix": prefix})
    client = redis.Redis.from_url(url)
    assert client.llen(prefix + queue.name) == 1
    with ours(url, global_keyprefix=prefix) as conn:
        (message,) = receive(conn, queue)
        assert client.hexists(prefix + UNACKED, message.delivery_tag)
        assert client.zscore(prefix + UNACKED_INDEX, message.delivery_tag) is not None
        message.ack()
        assert client.hlen(prefix + UNACKED) == 0
    assert message.payload == {"n": 6}
    assert client.llen(prefix + queue.name) == 0


def test_closing_with_a_wake_up_pending_takes_nothing(url: str, queue: Queue) -> None:
    """A consumer waiting in BLMOVE is closed after a message arrived: closing reads the
    pending answer only to free the connection. The message stays on the list, not
    reserved for a consumer that is gone (kombu's BRPOP would have taken it)."""
    client = redis.Redis.from_url(url)
    conn = ours(url)
    with Consumer(conn, [queue], callbacks=[lambda _b, m: m.ack()]):
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=0.2)  # the channel now waits in BLMOVE
        assert conn.default_channel._in_poll
        publish(url, queue, {"n": 7})
        time.sleep(0.2)  # Redis answers the BLMOVE; nobody reads the answer yet
        conn.close()
    assert client.llen(queue.name) == 1
    assert client.hlen(UNACKED) == 0


def test_with_two_queues_neither_waits_on_the_other(url: str) -> None:
    """A worker without ``-Q`` consumes ``totango`` and ``totango.batch``. Redis cannot block
    on two lists without taking from them, and a channel that waited on the empty queue
    while the other had a backlog fetched one message per wake-up timeout (1 s each: 20 s
    for these 20). Here the backlog is fetched message after message with no wake-up in
    between (20 fetches in well under 10 s), each reserved, then acknowledged; after that
    a message published to either queue is still fetched."""
    idle, busy = direct_queue("q-idle"), direct_queue("q-busy")
    for n in range(20):
        publish(url, busy, {"n": n})
    got: list[Message] = []
    with (
        ours(url) as conn,
        Consumer(conn, [idle, busy], callbacks=[lambda _b, m: got.append(m)]),
    ):
        started = time.monotonic()
        while len(got) < 20 and time.monotonic() - started < 30:
            conn.drain_events(timeout=2)
        took = time.monotonic() - started
        assert sorted(m.payload["n"] for m in got) == list(range(20))
        assert took < 10, f"20 waiting messages took {took:.1f} s: a wake-up per message"
        assert redis.Redis.from_url(url).hlen(UNACKED) == 20
        for message in got:
            message.ack()
        for queue in (idle, busy):
            publish(url, queue, {"late": queue.name})
            conn.drain_events(timeout=5)
            assert got[-1].payload == {"late": queue.name}
            got[-1].ack()
    client = redis.Redis.from_url(url)
    assert client.hlen(UNACKED) == 0
    assert client.llen(idle.name) == client.llen(busy.name) == 0


def test_an_unparseable_item_is_set_aside_under_its_own_queue(url: str) -> None:
    """With two consumed queues, an item that is not a kombu message goes to the
    unparseable list of the queue it was on, not of the first queue consumed."""
    first, second = direct_queue("q-first"), direct_queue("q-second")
    client = redis.Redis.from_url(url)
    publish(url, second, {"n": 7})
    client.rpush(second.name, b"not json either")
    got: list[Message] = []
    with (
        ours(url) as conn,
        Consumer(conn, [first, second], callbacks=[lambda _b, m: got.append(m)]),
    ):
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=1)
        (message,) = got
        message.ack()
    assert message.payload == {"n": 7}
    assert client.lrange(second.name + UNPARSEABLE_SUFFIX, 0, -1) == [b"not json either"]
    assert client.llen(first.name + UNPARSEABLE_SUFFIX) == 0


def test_one_fetch_takes_a_backlog_within_the_prefetch_limit(url: str, queue: Queue) -> None:
    """While a backlog waits, one fetch brings as many messages as the prefetch limit leaves
    room for (here 5 of 12, in one ``drain_events``), each reserved before it is handed
    over; none beyond the limit is taken off the list. Acknowledging them makes room, and
    the next fetches bring the rest, in the order published."""
    for n in range(12):
        publish(url, queue, {"n": n})
    client = redis.Redis.from_url(url)
    got: list[Message] = []
    with (
        ours(url) as conn,
        Consumer(conn, [queue], callbacks=[lambda _b, m: got.append(m)], prefetch_count=5),
    ):
        conn.drain_events(timeout=5)
        assert [m.payload["n"] for m in got] == [0, 1, 2, 3, 4]
        assert client.llen(queue.name) == 7
        assert client.hlen(UNACKED) == 5
        assert all(client.hexists(UNACKED, m.delivery_tag) for m in got)
        deadline = time.monotonic() + 10
        while len(got) < 12 and time.monotonic() < deadline:
            for message in got:
                if not message.acknowledged:
                    message.ack()
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=1)
        for message in got:
            if not message.acknowledged:
                message.ack()
    assert [m.payload["n"] for m in got] == list(range(12))
    assert client.hlen(UNACKED) == 0
    assert client.llen(queue.name) == 0


def test_a_fetch_cut_short_by_a_failing_consumer_puts_the_rest_back(url: str, queue: Queue) -> None:
    """A consumer callback that raises stops the hand-over of a multi-message fetch: the
    messages not handed over go back on the list at once (not left reserved until the
    visibility timeout), and are fetched again; the one handed over stays reserved."""
    for n in range(4):
        publish(url, queue, {"n": n})
    client = redis.Redis.from_url(url)
    got: list[Message] = []
    fail = [True]

    def fail_on_second(_body: Any, message: Message) -> None:
        got.append(message)
        if len(got) == 2 and fail and fail.pop():
            raise RuntimeError("the consumer failed")

    with (
        ours(url) as conn,
        Consumer(conn, [queue], callbacks=[fail_on_second], prefetch_count=10),
    ):
        with pytest.raises(RuntimeError, match="the consumer failed"):
            conn.drain_events(timeout=5)
        assert [m.payload["n"] for m in got] == [0, 1]
        assert client.llen(queue.name) == 2  # messages 2 and 3, put back
        assert client.hlen(UNACKED) == 2  # 0 and 1, handed over
        got.clear()
        conn.drain_events(timeout=5)
        assert sorted(m.payload["n"] for m in got) == [2, 3]
