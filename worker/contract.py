"""PURE: the message contract that producers and workers share: task names, queue and
exchange names, the work queues' arguments, and the headers the worker reads.

A producer in any language needs only these names (README, "The message contract");
``worker.topology`` turns them into kombu declarations.
"""

from __future__ import annotations

from typing import Final

TRACK_ACTIVITY: Final = "totango.track_activity"
UPDATE_ACCOUNT: Final = "totango.update_account"
UPDATE_USER: Final = "totango.update_user"
#: One message carrying many events (the batch path, ``worker/batch.py``); never nested.
TRACK_BATCH: Final = "totango.track_batch"

QUEUE: Final = "totango"
EXCHANGE: Final = "totango"
ROUTING_KEY: Final = "totango"
#: ``totango.track_batch`` messages have a queue of their own, consumed by workers started
#: with ``-Q totango.batch`` and a low prefetch: a batch message carries up to 100 events,
#: so a prefetch sized for single events would let one pod reserve tens of thousands.
BATCH_QUEUE: Final = "totango.batch"
BATCH_ROUTING_KEY: Final = "totango.batch"
DEAD_LETTER_QUEUE: Final = "totango.dead_letter"
DEAD_LETTER_EXCHANGE: Final = "totango.dlx"
DEAD_LETTER_ROUTING_KEY: Final = "totango.dead_letter"

#: How many times RabbitMQ hands out one message before it dead-letters it. A message that
#: kills the worker every time it is taken reaches the dead-letter queue after this many
#: deliveries instead of cycling forever. Fixed, because in the quorum design it is a queue
#: argument: changing it makes every producer's declaration fail. An operator policy can
#: still override it. On Redis the worker counts deliveries itself against the same limit
#: (``redeliveries.py``).
DELIVERY_LIMIT: Final = 5

#: The two declarations of ``totango`` and ``totango.batch`` on RabbitMQ
#: (docs/producers.md, "Queue designs"). Whoever declares a queue first fixes its design, and
#: the worker consumes the queue in the design it finds.
#:
#: ``plain``: durable, no arguments, on a direct exchange: what every Celery client declares
#: by default (``send_task(..., queue="totango")``, celery-node's ``sendTask``), so any
#: producer can declare it, before or after the worker. The worker creates this one.
#: ``quorum``: a quorum queue with dead-lettering and a delivery limit, on a topic exchange
#: (Celery's native delayed delivery for quorum queues needs a topic exchange). A producer
#: must declare it with exactly these arguments, or not at all. Made by
#: ``python -m worker queues migrate --to quorum``.
#: ``vhost-quorum``: the plain declaration, in a vhost whose default queue type is quorum
#: (``rabbitmqctl add_vhost --default-queue-type quorum``, RabbitMQ 3.10 and later): RabbitMQ
#: makes the queue a quorum queue and finds every plain declaration equivalent, and a policy
#: supplies dead-lettering and the delivery limit. Every producer's default declaration
#: matches and the guarantees are the quorum design's (docs/producers.md).
PLAIN: Final = "plain"
QUORUM: Final = "quorum"
VHOST_QUORUM: Final = "vhost-quorum"
DESIGNS: Final = (PLAIN, QUORUM, VHOST_QUORUM)
#: The exchange type of each design.
EXCHANGE_TYPES: Final[dict[str, str]] = {PLAIN: "direct", QUORUM: "topic", VHOST_QUORUM: "direct"}
#: The guarantees a queue design does not give on RabbitMQ, named in the worker's start-up
#: warning and in the ``totango_queue_guarantee_missing`` metric. ``replication``: a quorum
#: queue keeps its messages on a majority of nodes, a classic queue on one.
#: ``delivery_limit``: a message that kills the worker every time it is taken reaches the
#: dead-letter queue after ``DELIVERY_LIMIT`` deliveries instead of cycling forever.
MISSING_GUARANTEES: Final[dict[str, tuple[str, ...]]] = {
    PLAIN: ("replication", "delivery_limit"),
    QUORUM: (),
    # The delivery limit and dead-lettering come from the policy, which AMQP cannot show.
    VHOST_QUORUM: (),
}
#: What the worker declares in the vhost-quorum design: the argument RabbitMQ added itself.
VHOST_QUORUM_ARGUMENTS: Final[dict[str, object]] = {"x-queue-type": "quorum"}

#: The arguments of ``totango`` and ``totango.batch`` in the quorum design. Redis has no
#: queue arguments.
RABBITMQ_QUEUE_ARGUMENTS: Final[dict[str, object]] = {
    "x-queue-type": "quorum",
    "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
    "x-dead-letter-routing-key": DEAD_LETTER_ROUTING_KEY,
    "x-delivery-limit": DELIVERY_LIMIT,
}
#: The dead-letter queue's arguments on RabbitMQ.
RABBITMQ_DEAD_LETTER_ARGUMENTS: Final[dict[str, object]] = {"x-queue-type": "quorum"}

#: Message headers. Producers may set ``ENQUEUED_AT_HEADER`` (epoch seconds) for the
#: queue-wait metric; the worker adds ``FIRST_ATTEMPT_HEADER`` to a retry.
ENQUEUED_AT_HEADER: Final = "totango_enqueued_at"
FIRST_ATTEMPT_HEADER: Final = "totango_first_attempt_at"
#: How many times the worker put a message back unsent in a gateway outage (the breaker).
DEFERRALS_HEADER: Final = "totango_deferrals"
#: Headers of a dead letter, so that a broker-side tool can filter without decoding it.
REASON_HEADER: Final = "totango_reason"
EVENT_ID_HEADER: Final = "totango_event_id"
