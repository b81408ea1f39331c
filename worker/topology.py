"""The broker topology that producers and workers share: exchanges, queues and their arguments.

This is part of the public message contract. A producer that declares ``totango`` must
declare it with exactly these arguments, or RabbitMQ answers PRECONDITION_FAILED.
"""

from __future__ import annotations

from kombu import Exchange, Queue

QUEUE = "totango"
EXCHANGE = "totango"
ROUTING_KEY = "totango"
#: ``totango.track_batch`` messages have a queue of their own, consumed by workers started
#: with ``-Q totango.batch`` and a low prefetch: a batch message carries up to 100 events,
#: so a prefetch sized for single events would let one pod reserve tens of thousands.
BATCH_QUEUE = "totango.batch"
BATCH_ROUTING_KEY = "totango.batch"
DEAD_LETTER_QUEUE = "totango.dead_letter"
DEAD_LETTER_EXCHANGE = "totango.dlx"
DEAD_LETTER_ROUTING_KEY = "totango.dead_letter"

#: How many times RabbitMQ hands out one message before it dead-letters it. A message that
#: kills the worker every time it is taken reaches the dead-letter queue after this many
#: deliveries instead of cycling forever. Fixed, because it is a queue argument: changing it
#: makes every producer's declaration fail. An operator policy can still override it.
DELIVERY_LIMIT = 5

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


RABBITMQ_QUEUE_ARGUMENTS: dict[str, object] = {
    "x-queue-type": "quorum",
    "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
    "x-dead-letter-routing-key": DEAD_LETTER_ROUTING_KEY,
    "x-delivery-limit": DELIVERY_LIMIT,
}


def task_queue(broker_kind: str) -> Queue:
    """The main queue. Redis has no queue arguments, so it gets a plain declaration."""
    return _work_queue(QUEUE, ROUTING_KEY, broker_kind)


def batch_queue(broker_kind: str) -> Queue:
    """The batch queue: declared exactly as the main queue, under its own name and key (a
    topic binding ``totango`` does not match ``totango.batch``, nor the other way round)."""
    return _work_queue(BATCH_QUEUE, BATCH_ROUTING_KEY, broker_kind)


def _work_queue(name: str, routing_key: str, broker_kind: str) -> Queue:
    arguments = RABBITMQ_QUEUE_ARGUMENTS if broker_kind == "rabbitmq" else None
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
        queue_arguments={"x-queue-type": "quorum"} if rabbitmq else None,
    )
