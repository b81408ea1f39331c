"""The broker topology as kombu declarations: exchanges and queues, built from the names
and arguments in ``worker.contract``.

A producer that declares ``totango`` must declare it with exactly these arguments, or
RabbitMQ answers PRECONDITION_FAILED.
"""

from __future__ import annotations

from kombu import Exchange, Queue

from worker.contract import (
    BATCH_QUEUE,
    BATCH_ROUTING_KEY,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DEAD_LETTER_ROUTING_KEY,
    EXCHANGE,
    QUEUE,
    RABBITMQ_DEAD_LETTER_ARGUMENTS,
    RABBITMQ_QUEUE_ARGUMENTS,
    ROUTING_KEY,
)

#: On RabbitMQ a topic exchange, not direct: Celery's native delayed delivery for quorum
#: queues (used for retry countdowns) routes only through topic exchanges.
exchange = Exchange(EXCHANGE, type="topic", durable=True)
dead_letter_exchange = Exchange(DEAD_LETTER_EXCHANGE, type="direct", durable=True)
#: On Redis, kombu keeps exchange bindings as Redis keys, and remembers in memory that it
#: made them. If Redis restarts without persistence, the keys are gone, nothing re-creates
#: them, and a message published to the exchange is dropped without an error. Publishing to
#: the default exchange puts a message straight on the list named by its routing key, with
#: no binding to lose.
default_exchange = Exchange("")


def exchange_for(broker_kind: str) -> Exchange:
    return exchange if broker_kind == "rabbitmq" else default_exchange


def task_queue(broker_kind: str) -> Queue:
    """The main queue. Redis has no queue arguments, so it gets a plain declaration."""
    return _work_queue(QUEUE, ROUTING_KEY, broker_kind)


def batch_queue(broker_kind: str) -> Queue:
    """The batch queue: declared exactly as the main queue, under its own name and key (a
    topic binding ``totango`` does not match ``totango.batch``, nor the other way round)."""
    return _work_queue(BATCH_QUEUE, BATCH_ROUTING_KEY, broker_kind)


def _work_queue(name: str, routing_key: str, broker_kind: str) -> Queue:
    arguments = dict(RABBITMQ_QUEUE_ARGUMENTS) if broker_kind == "rabbitmq" else None
    return Queue(
        name,
        exchange_for(broker_kind),
        routing_key=routing_key,
        durable=True,
        queue_arguments=arguments,
    )


def dead_letter_queue(broker_kind: str) -> Queue:
    """The dead-letter queue. Celery declares only what it consumes, so this is declared
    explicitly by the worker and by every publisher to it; otherwise messages routed to it
    would vanish."""
    rabbitmq = broker_kind == "rabbitmq"
    return Queue(
        DEAD_LETTER_QUEUE,
        dead_letter_exchange if rabbitmq else default_exchange,
        routing_key=DEAD_LETTER_ROUTING_KEY,
        durable=True,
        queue_arguments=dict(RABBITMQ_DEAD_LETTER_ARGUMENTS) if rabbitmq else None,
    )
