"""What every fault scenario does: settings, sending events, looking into the broker, and
waiting, within a bound, until each event is delivered or dead-lettered."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from kombu import Connection
from kombu.transport.native_delayed_delivery import MAX_LEVEL, level_name

from tests.faults.accounting import DELIVER, KEY_RE, Ledger, Row, Tally
from tests.faults.processes import Worker
from tests.workers import wait_until, worker_env
from totango_emulator import GatewayEmulator
from worker.application import TotangoCelery, create_app
from worker.client import Producer
from worker.contract import BATCH_QUEUE, DEAD_LETTER_QUEUE, QUEUE
from worker.deadletter import browse
from worker.events import TRACK_ACTIVITY
from worker.settings import Settings

#: Redis: a reserved message comes back after this long. Short, so that the messages a
#: killed worker held come back within the run; the retry delays below stay under half.
VISIBILITY_TIMEOUT = 20.0
#: kombu looks for expired reservations on a timer (``unacked_restore_interval``, 10 s at
#: most). Its default ``unacked_restore_throttle`` of 10 scans only every 10th look, which
#: makes it 100 s: worker/application.py must set the throttle to 1 for this promise to hold.
RESTORE_SWEEP = 10.0
#: What the settings promise on Redis: a message held by a dead worker is back and
#: delivered within this long of the fault. Later than this, it counts as lost.
PROMISED_RECOVERY = VISIBILITY_TIMEOUT + RESTORE_SWEEP + 10.0
#: Retry budget: 6 retries at 1, 1-2, 2-4, 2-4, 2-4, 2-4 s: at least 10 s, at most 19 s.
MAX_RETRIES = 6
MIN_RETRY_BUDGET = 10.0
PREFETCH_MULTIPLIER = 2
CONCURRENCY = 4
#: The most messages one worker of the suite (threads, 4) holds unacknowledged at a time.
IN_FLIGHT = PREFETCH_MULTIPLIER * CONCURRENCY

SUITE_ENV = {
    "TOTANGO_VISIBILITY_TIMEOUT": f"{VISIBILITY_TIMEOUT:g}",
    "TOTANGO_MAX_RETRIES": str(MAX_RETRIES),
    "TOTANGO_RETRY_BACKOFF_BASE": "1",
    "TOTANGO_RETRY_BACKOFF_MAX": "4",
    "TOTANGO_RETRY_AFTER_MAX": "5",
    "TOTANGO_CONNECT_TIMEOUT": "1",
    "TOTANGO_READ_TIMEOUT": "1",
    "TOTANGO_SOFT_SHUTDOWN_TIMEOUT": "10",
    "TOTANGO_POOL": "threads",
    "TOTANGO_CONCURRENCY": str(CONCURRENCY),
    "TOTANGO_PREFETCH_MULTIPLIER": str(PREFETCH_MULTIPLIER),
    "TOTANGO_LOG_LEVEL": "INFO",
}

ACCOUNT = "acct-faults"
#: How long a worker may take to consume again once its broker is back.
RECONNECT_TIMEOUT = 60.0
REDIS_UNACKED = "unacked"  # kombu's hash of reserved messages (key ``unacked_key``)


def via(url: str, port: int) -> str:
    """The same broker URL (vhost or database kept) through a proxy on 127.0.0.1:port."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or (5672 if "amqp" in url else 6379)


#: RabbitMQ: the quorum queues where Celery's native delayed delivery holds retry countdowns.
DELAYED_QUEUES = tuple(level_name(level) for level in range(MAX_LEVEL + 1))


@dataclass
class Depths:
    ready: int
    #: Messages that will still arrive: on Redis those reserved (kombu's ``unacked`` hash,
    #: which also holds retry countdowns), on RabbitMQ those waiting in delayed delivery.
    #: RabbitMQ does not tell over AMQP what consumers hold; it requeues that at once.
    pending: int
    dead: int


def depths(url: str, *, delayed: bool = True) -> Depths:
    """How many messages wait in the work queues (``totango`` and ``totango.batch``), are
    still to come, and are dead-lettered."""
    if url.startswith("redis"):
        client = redis.Redis.from_url(url, socket_timeout=5)
        try:
            return Depths(
                client.llen(QUEUE) + client.llen(BATCH_QUEUE),
                client.hlen(REDIS_UNACKED),
                client.llen(DEAD_LETTER_QUEUE),
            )
        finally:
            client.close()
    names = (QUEUE, BATCH_QUEUE, DEAD_LETTER_QUEUE, *(DELAYED_QUEUES if delayed else ()))
    counts = []
    with Connection(url, connect_timeout=5) as connection:
        channel = connection.channel()
        for name in names:
            try:
                counts.append(channel.queue_declare(name, passive=True).message_count)
            except connection.channel_errors:
                channel = connection.channel()  # a missing queue closes the channel
                counts.append(0)
    return Depths(counts[0] + counts[1], sum(counts[3:]), counts[2])


def reserved_keys(url: str) -> set[str]:
    """Redis: the event keys of the messages in kombu's ``unacked`` hash right now."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        entries = client.hvals(REDIS_UNACKED)
    finally:
        client.close()
    keys: set[str] = set()
    for raw in entries:
        message = json.loads(raw)[0]
        keys |= set(KEY_RE.findall(str(message.get("headers", {}).get("id"))))
    return keys


def queued_keys(url: str) -> set[str]:
    """Redis: the event keys of the messages waiting on the main list right now."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        entries = client.lrange(QUEUE, 0, -1)
    finally:
        client.close()
    return {k for raw in entries for k in KEY_RE.findall(raw.decode("utf-8", "replace")[:4096])}


@dataclass
class Run:
    """One scenario on one broker: its settings, processes, apps and ledgers."""

    kind: str
    broker_url: str
    gateway: GatewayEmulator
    tmp: Path
    results: list[Row]
    apps: list[TotangoCelery] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)

    def env(self, broker_url: str | None = None, **extra: str) -> dict[str, str]:
        env = worker_env(
            broker_url or self.broker_url, f"{self.gateway.url}/pixel.gif", self.tmp, **SUITE_ENV
        )
        env.update(extra)
        return env

    def app(self, broker_url: str | None = None) -> TotangoCelery:
        """A producer-side app, straight to the broker (never through a proxy)."""
        app = create_app(Settings.from_env(self.env(broker_url)))
        self.apps.append(app)
        return app

    def worker(self, env: dict[str, str], name: str, *args: str) -> Worker:
        worker = Worker(env, self.tmp / f"{name}.log", name, args)
        self.workers.append(worker)
        return worker

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        for app in self.apps:
            app.close()

    def ledger(self, scenario: str) -> Ledger:
        return Ledger(scenario, self.kind)

    def record(self, row: Row) -> Row:
        self.results.append(row)
        print(f"\n[faults] {row}")
        return row

    def settle(
        self,
        ledger: Ledger,
        app: TotangoCelery,
        timeout: float,
        *,
        url: str | None = None,
        quiet: float = 1.5,
        worker: Worker | None = None,
    ) -> Tally:
        """Wait, at most ``timeout`` seconds, until every event of the ledger is delivered or
        dead-lettered and the broker holds nothing more (no message waiting, none reserved),
        then ``quiet`` seconds more to catch late duplicates; return the tally. Stop waiting
        at once if ``worker`` has died: nothing would come any more."""
        url = url or self.broker_url
        deadline = time.monotonic() + timeout
        while True:
            if worker is not None and not worker.alive:
                break
            done = delivered_keys(self.gateway, ledger)
            depth = depths(url)
            idle = depth.ready == 0 and depth.pending == 0
            if idle and len(done) + depth.dead >= len(ledger):
                tally = ledger.tally(self.gateway.calls(), browse(app, timeout=0))
                if not tally.lost:
                    break
            if time.monotonic() >= deadline:
                break
            time.sleep(0.25)
        time.sleep(quiet)
        return ledger.tally(self.gateway.calls(), browse(app, timeout=0))


def delivered_keys(gateway: GatewayEmulator, ledger: Ledger | None = None) -> set[str]:
    """The event keys the gateway answered 200 for (of one ledger, if given)."""
    keys: set[str] = set()
    for call in gateway.calls():
        if call.status == 200:
            keys.update(k for _, v in call.params for k in KEY_RE.findall(v))
    return keys if ledger is None else keys & ledger.expected.keys()


def activity(key: str, **extra: Any) -> dict[str, Any]:
    """An activity's arguments, valid unless ``extra`` says otherwise, with ``key`` as its
    event id and in its user id."""
    return {
        "account_id": ACCOUNT, "user_id": f"user-{key}", "activity": "Login",
        "module": "Faults", "event_id": key, **extra,
    }  # fmt: skip


def send(producer: Producer, ledger: Ledger, count: int) -> list[str]:
    """Enqueue ``count`` valid activities through the producer API, each with its own key as
    event id and in its user id."""
    keys = []
    for _ in range(count):
        key = ledger.key(DELIVER)
        producer.track_activity(**activity(key))
        keys.append(key)
    return keys


def send_batches(producer: Producer, ledger: Ledger, count: int, size: int) -> list[str]:
    """Enqueue ``count`` valid activities as ``totango.track_batch`` messages of ``size``
    events (``Producer.send_batch``), keyed as ``send`` keys them."""
    keys = [ledger.key(DELIVER) for _ in range(count)]
    for start in range(0, count, size):
        prepared = [
            producer.prepare(TRACK_ACTIVITY, **activity(key)) for key in keys[start : start + size]
        ]
        producer.send_batch(prepared)
    return keys


@dataclass
class Background:
    """A producer thread sending events at a steady pace while faults happen."""

    sent: list[str] = field(default_factory=list)
    failed_attempts: int = 0
    error: BaseException | None = None
    thread: threading.Thread | None = None


@contextmanager
def sending(
    producer: Producer, ledger: Ledger, count: int, rate: float, give_up_after: float = 30.0
) -> Iterator[Background]:
    """Send ``count`` events at ``rate`` per second in a thread. A publish that fails (the
    broker is down) is tried again, same event id, until the broker takes it; an event
    counts as sent once the broker has acknowledged it."""
    state = Background()

    def run() -> None:
        try:
            started = time.monotonic()
            for n in range(count):
                pause = started + n / rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                key = ledger.key(DELIVER)
                _send_until_taken(producer, key, state, give_up_after)
                state.sent.append(key)
        except BaseException as exc:  # noqa: BLE001  reported by the test, not swallowed
            state.error = exc

    state.thread = threading.Thread(target=run, daemon=True, name="fault-producer")
    state.thread.start()
    try:
        yield state
    finally:
        state.thread.join(timeout=count / rate + give_up_after + 10)


def probe_delivery(
    producer: Producer, ledger: Ledger, gateway: GatewayEmulator, timeout: float = RECONNECT_TIMEOUT
) -> float:
    """Send one more event (retrying while the broker refuses it) and return how long it
    took to be delivered: proof that the worker is connected and consuming again."""
    started = time.time()
    key = ledger.key(DELIVER)
    _send_until_taken(producer, key, Background(), timeout)
    wait_until(lambda: key in delivered_keys(gateway), timeout, f"{key} delivered")
    return time.time() - started


def _send_until_taken(producer: Producer, key: str, state: Background, limit: float) -> None:
    deadline = time.monotonic() + limit
    while True:
        try:
            producer.track_activity(**activity(key))
        except Exception:
            state.failed_attempts += 1
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
        else:
            return


def first_200_after(run: Run, keys: set[str], after: float) -> dict[str, float]:
    """For each key, when the gateway first answered 200 for it after ``after``."""
    found: dict[str, float] = {}
    for call in run.gateway.delivered():
        if call.received_at < after:
            continue
        for key in {k for _, v in call.params for k in KEY_RE.findall(v)} & keys:
            found[key] = min(found.get(key, call.received_at), call.received_at)
    return found


def assert_nothing_lost(run: Run, tally: Tally, row: Row, late: set[str] | None = None) -> None:
    """Every event delivered or dead-lettered, and, where a recovery time is promised, in
    time. Any loss fails the test.

    The failure says whether a lost event ever reached a worker (its key is in a worker's
    log): one that never did points at the fetch (on Redis, a message taken off the list
    but never reserved, which worker/redis_transport.py exists to prevent), the others at
    the worker's handling.
    """
    logs = "".join(
        w.log_path.read_text(errors="replace") for w in run.workers if w.log_path.exists()
    )
    unseen = {key for key in tally.lost if key not in logs}
    tail = run.workers[-1].tail() if run.workers else ""
    if unseen:
        row.note = "; ".join(filter(None, [row.note, f"{len(unseen)} never reached a worker"]))
    reached = tally.lost - unseen
    assert not reached, f"lost after reaching the worker: {sorted(reached)[:10]}\n{tail}"
    assert not late, f"back later than the promised {PROMISED_RECOVERY:g} s: {sorted(late)[:10]}"
    assert not unseen, f"lost before reaching the worker: {sorted(unseen)[:10]}\n{tail}"
