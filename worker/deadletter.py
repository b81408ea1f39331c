"""The dead-letter queue: dead-letter an event (publish, count, alert once), and browse,
replay and purge what is there.

Publishing goes through the app's producer pool, which has publisher confirms on RabbitMQ,
so an envelope is on the broker before the original message is acknowledged.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from worker import metrics, observability
from worker.contract import EVENT_ID_HEADER, REASON_HEADER
from worker.envelope import HOSTNAME, Envelope
from worker.settings import Settings, broker_kind
from worker.state import StateStore
from worker.topology import dead_letter_queue

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["HOSTNAME", "Replayed", "browse", "dead_letter", "publish", "purge", "replay"]

log = logging.getLogger(__name__)

#: Publishing a dead letter is retried on a broken connection: failing here would leave the
#: original unacknowledged, which is safe, but it would come back and fail again.
PUBLISH_RETRY_POLICY = {
    "max_retries": 5,
    "interval_start": 0.2,
    "interval_step": 0.5,
    "interval_max": 2.0,
}


def dead_letter(app: Celery, envelope: Envelope, settings: Settings) -> None:
    """The end of an event that will not be delivered: the envelope is published (and
    confirmed), counted, and alerted once."""
    publish(app, envelope)
    metrics.record_dead_lettered(envelope.task or "unknown", envelope.reason)
    observability.alert_dead_letter(envelope, settings)


def publish(app: Celery, envelope: Envelope) -> None:
    """Put one envelope on ``totango.dead_letter``, declaring the queue first."""
    queue = dead_letter_queue(broker_kind(app.conf.broker_url))
    with app.producer_or_acquire() as producer:
        producer.publish(
            envelope.to_dict(),
            exchange=queue.exchange,
            routing_key=queue.routing_key,
            declare=[queue],
            serializer="json",
            delivery_mode=2,
            headers=_headers(envelope),
            retry=True,
            retry_policy=PUBLISH_RETRY_POLICY,
        )
    log.warning(
        "dead-lettered event_id=%s task=%s reason=%s attempts=%d last_status=%s",
        envelope.event_id,
        envelope.task,
        envelope.reason,
        envelope.attempts,
        envelope.last_status,
    )


def _headers(envelope: Envelope) -> dict[str, Any]:
    return {REASON_HEADER: envelope.reason, EVENT_ID_HEADER: envelope.event_id or ""}


# --- reading the queue ------------------------------------------------------------------
#
# RabbitMQ: every message is taken without an acknowledgement; what is not acknowledged is
# requeued by the broker when the channel or the connection closes, even if this process
# is killed. Redis: a message taken that way would sit in kombu's shared ``unacked`` hash
# until the visibility timeout if this process died, so the list is read in place (LRANGE)
# and an entry is removed (LREM) only when it is done with.


class _RedisItem:
    """One element of the Redis list; ``ack`` removes exactly that element."""

    def __init__(self, client: Any, queue: str, raw: bytes) -> None:
        self.client, self.queue, self.raw = client, queue, raw

    def ack(self) -> None:
        self.client.lrem(self.queue, 1, self.raw)


@dataclass
class Entry:
    """One message of the dead-letter queue and the envelope read from it."""

    envelope: Envelope
    message: Any


def envelope_of(message: Any) -> Envelope:
    """Read an envelope; a raw task message that RabbitMQ dead-lettered becomes one too."""
    try:
        body = message.decode()
    except Exception:  # noqa: BLE001  an unreadable body is kept raw, not lost
        body = None
    if isinstance(body, dict) and "reason" in body and "version" in body:
        return Envelope.from_dict(body)
    headers = message.headers if isinstance(message.headers, dict) else {}
    deaths = headers.get("x-death") or [{}]
    reason = str(deaths[0].get("reason") or "rejected")
    kwargs = None
    if isinstance(body, list | tuple) and len(body) >= 2 and isinstance(body[1], dict):
        kwargs = dict(body[1])
    return Envelope.from_broker(
        "delivery_limit" if reason == "delivery_limit" else f"broker:{reason}",
        headers=headers,
        kwargs=kwargs,
        body=message.body,
        content_type=message.content_type,
        attempts=int(headers.get("x-delivery-count") or deaths[0].get("count") or 0),
    )


@contextmanager
def opened(app: Celery) -> Iterator[list[Entry]]:
    """Every entry of the dead-letter queue, oldest first, in place until acknowledged."""
    kind = broker_kind(app.conf.broker_url)
    queue = dead_letter_queue(kind)
    with app.connection_for_write() as connection:
        channel: Any = connection.channel()
        try:
            bound = queue(channel)
            bound.declare()
            if kind == "redis":
                yield _redis_entries(channel, queue.name)
                return
            entries = []
            while (message := bound.get(no_ack=False)) is not None:
                entries.append(Entry(envelope_of(message), message))
            try:
                yield entries
            finally:
                _settle_acks(bound)
        finally:
            channel.close()


def _settle_acks(bound: Any) -> None:
    """RabbitMQ: a quorum queue (3.10) applies acks on its own time, and the channel's close
    can requeue a message acknowledged just before it: about two thirds of 100 entries
    purged back to back came back. One more ``basic.get`` on the same channel waits for
    the queue to process what the channel sent before it, the acks included. A message it
    happens to take is not acknowledged, and goes back with the close."""
    bound.get(no_ack=False)


def _redis_entries(channel: Any, queue: str) -> list[Entry]:
    entries = []
    # kombu pushes on the left and consumers pop on the right: the right end is the oldest.
    for raw in reversed(channel.client.lrange(queue, 0, -1)):
        message = channel.Message(json.loads(raw), channel=channel)
        entries.append(Entry(envelope_of(message), _RedisItem(channel.client, queue, raw)))
    return entries


def browse(app: Celery, timeout: float = 0.0) -> list[Envelope]:
    """The envelopes in the queue, oldest first, left in place. With a timeout, wait that
    long for the queue to be non-empty."""
    deadline = time.monotonic() + timeout
    while True:
        with opened(app) as entries:
            found = [entry.envelope for entry in entries]
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(0.1)


class Replayed(list[Envelope]):
    """The envelopes a replay put back (a list, as before), and the ones it skipped."""

    def __init__(self) -> None:
        super().__init__()
        #: Entries whose event the state store knows as delivered: removed, not replayed.
        self.skipped: list[Envelope] = []
        #: ``False`` when a store was given but could not be reached: nothing was skipped.
        self.checked = True


def replay(
    app: Celery,
    select: Callable[[Envelope], bool],
    *,
    dry_run: bool = False,
    after_publish: Callable[[Envelope], None] | None = None,
    store: StateStore | None = None,
    rate: float | None = None,
) -> Replayed:
    """Put each selected envelope's task back on the main queue with a fresh retry budget
    and the same event id. An entry leaves the dead-letter queue only after its republish
    is confirmed, so an interruption leaves it in one queue or the other, never neither.

    With a state store, an entry whose event id it knows as delivered (the event was in
    fact delivered, or an earlier replay of it was) is removed without being replayed: a
    replay is safe to repeat. The store is asked once for every selected id; if it cannot
    be reached, every entry is replayed (fail open). ``rate`` caps the republishes at that
    many per second, so that a large replay does not flood the workers.
    """
    done = Replayed()
    with opened(app) as entries:
        chosen = [e for e in entries if select(e.envelope) and e.envelope.replayable]
        delivered: set[str] = set()
        if store is not None:
            ids = [str(e.envelope.event_id) for e in chosen if e.envelope.event_id]
            found = store.delivered(ids)
            done.checked = found is not None
            delivered = found or set()
        started = time.monotonic()
        for entry in chosen:
            envelope = entry.envelope
            if envelope.event_id is not None and envelope.event_id in delivered:
                if not dry_run:
                    entry.message.ack()
                    log.info("replay skipped event_id=%s: already delivered", envelope.event_id)
                done.skipped.append(envelope)
                continue
            if not dry_run:
                if rate is not None:
                    _pace(started, len(done), rate)
                _republish(app, envelope)
                if after_publish is not None:
                    after_publish(envelope)
                entry.message.ack()
            done.append(envelope)
    return done


def _pace(started: float, published: int, rate: float) -> None:
    pause = pause_before(started, published, rate, time.monotonic())
    if pause > 0:
        time.sleep(pause)


def pause_before(started: float, published: int, rate: float, now: float) -> float:
    """Seconds to wait before the next republish, so that ``published`` of them take at
    least ``published / rate`` seconds from ``started``; 0 when it is already due."""
    return max(0.0, started + published / rate - now)


def purge(app: Celery, select: Callable[[Envelope], bool]) -> list[Envelope]:
    """Remove the selected envelopes for good."""
    purged = []
    with opened(app) as entries:
        for entry in entries:
            if select(entry.envelope):
                entry.message.ack()
                purged.append(entry.envelope)
    return purged


def _republish(app: Celery, envelope: Envelope) -> None:
    kwargs = dict(envelope.kwargs or {})
    if envelope.event_id and "event_id" not in kwargs:
        kwargs["event_id"] = envelope.event_id
    # A fresh task id: the event id travels in the arguments, and the old task id may
    # still carry a delivery count (redeliveries.py) that would dead-letter it again.
    # The broker confirms the publish (confirm_publish on RabbitMQ) before send_task returns.
    app.send_task(str(envelope.task), kwargs=kwargs, retries=0)
