"""``python -m worker queues migrate``: re-declare a RabbitMQ work queue in another design
without losing a message.

A queue's arguments cannot change in place. Each message is moved to a holding queue, the
queue is deleted (only once empty) and declared again in the chosen design, and the
messages are moved back. Every move publishes with confirms and acknowledges the original
only after the broker has confirmed the copy: a crash leaves a message in one queue or in
both (a duplicate, which the event id identifies), never in neither. Running the command
again resumes from the holding queue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from amqp.exceptions import AMQPNotImplementedError, NotFound, PreconditionFailed
from kombu import Exchange, Queue

from worker.contract import EXCHANGE, EXCHANGE_TYPES
from worker.topology import ROUTING_KEYS, rabbitmq_exchange, work_queue

log = logging.getLogger(__name__)

#: A bounded number of rounds: producers may publish to the queue while it is emptied.
MAX_ROUNDS = 20
#: Message properties a move keeps (the body, content type, encoding and headers always).
_KEPT = (
    "correlation_id",
    "reply_to",
    "priority",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
)


@dataclass(frozen=True)
class Moved:
    queue: str
    design: str
    messages: int


def holding_queue(name: str) -> Queue:
    """Where a queue's messages wait while it is declared again: a durable classic queue of
    its own (one that can be deleted only if empty), consumed by nobody."""
    return Queue(f"{name}.migrating", Exchange(""), routing_key=f"{name}.migrating", durable=True)


def migrate(connection: Any, design: str) -> list[Moved]:
    """Declare the ``totango`` exchange and both work queues in ``design``, moving the
    messages they hold. ``connection`` must publish with confirms."""
    _redeclare_exchange(connection, EXCHANGE_TYPES[design])
    moved = [_migrate_queue(connection, name, design) for name in ROUTING_KEYS]
    for name in ROUTING_KEYS:  # bindings go with a deleted exchange or queue
        work_queue(name, "rabbitmq", design)(connection.channel()).declare()
    return moved


def _migrate_queue(connection: Any, name: str, design: str) -> Moved:
    holding = holding_queue(name)
    holding(connection.channel()).declare()
    target = work_queue(name, "rabbitmq", design)
    moved = 0
    for _ in range(MAX_ROUNDS):
        moved += _move(connection, name, holding.name)
        if _delete_if_empty(connection, name):
            break
    else:
        raise RuntimeError(f"queue {name!r} kept receiving messages; stop its producers first")
    target(connection.channel()).declare()
    _move(connection, holding.name, name)
    holding(connection.channel()).delete(if_empty=True)
    log.info(
        "queue %r is in the %s design; %d messages moved through %r",
        name,
        design,
        moved,
        holding.name,
    )
    return Moved(name, design, moved)


def _move(connection: Any, source: str, destination: str) -> int:
    """Move every message from ``source`` to ``destination`` (default exchange): publish with
    confirms, then acknowledge the original."""
    channel = connection.channel()
    producer_channel = connection.channel()
    moved = 0
    try:
        queue = Queue(source, no_declare=True)(channel)
        while True:
            try:
                message = queue.get(no_ack=False, accept=None)
            except NotFound:  # nothing to move from a queue that does not exist
                return moved
            if message is None:
                return moved
            properties = {k: v for k, v in message.properties.items() if k in _KEPT}
            producer_channel.basic_publish(
                _raw(message, properties),
                exchange="",
                routing_key=destination,
                mandatory=True,
            )
            message.ack()
            moved += 1
    finally:
        channel.close()
        producer_channel.close()


def _raw(message: Any, properties: dict[str, Any]) -> Any:
    from amqp import Message  # noqa: PLC0415  py-amqp's message, published as it came

    return Message(
        message.body,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        application_headers=message.headers,
        delivery_mode=2,
        **properties,
    )


def _delete_if_empty(connection: Any, name: str) -> bool:
    """Delete the queue if it holds nothing. A classic queue does that atomically; a quorum
    queue refuses the if-empty flag (and closes the connection, hence the clone), so it is
    counted and then deleted: its producers must be stopped first (docs/producers.md)."""
    with connection.clone() as probe:
        channel = probe.channel()
        try:
            channel.queue_delete(name, if_empty=True)
        except PreconditionFailed:  # messages arrived while it was emptied: another round
            return False
        except AMQPNotImplementedError:
            pass
        else:
            return True
    channel = connection.channel()
    try:
        _, count, _ = channel.queue_declare(name, passive=True)
        if count:
            return False
        channel.queue_delete(name)
    finally:
        channel.close()
    return True


def _redeclare_exchange(connection: Any, exchange_type: str) -> None:
    """The exchange holds no messages: delete it if it has the other type, then declare."""
    try:
        rabbitmq_exchange(exchange_type)(connection.channel()).declare()
    except PreconditionFailed:
        Exchange(EXCHANGE)(connection.channel()).delete()
        rabbitmq_exchange(exchange_type)(connection.channel()).declare()
