"""The broker topology as kombu declarations: exchanges and queues, built from the names
and arguments in ``worker.contract``, and the discovery of the design a RabbitMQ vhost holds.

On RabbitMQ the work queues exist in one of two designs (``contract.DESIGNS``): ``plain``,
what every Celery client declares by default, and ``quorum``. The worker consumes a queue
in the design it finds (``discover``) rather than failing over a declaration that a
producer made first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from amqp.exceptions import PreconditionFailed
from kombu import Exchange, Queue

from worker.contract import (
    BATCH_QUEUE,
    BATCH_ROUTING_KEY,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DEAD_LETTER_ROUTING_KEY,
    EXCHANGE,
    EXCHANGE_TYPES,
    MISSING_GUARANTEES,
    PLAIN,
    QUEUE,
    QUORUM,
    RABBITMQ_DEAD_LETTER_ARGUMENTS,
    RABBITMQ_QUEUE_ARGUMENTS,
    ROUTING_KEY,
    VHOST_QUORUM,
    VHOST_QUORUM_ARGUMENTS,
)

#: The routing key of each work queue.
ROUTING_KEYS = {QUEUE: ROUTING_KEY, BATCH_QUEUE: BATCH_ROUTING_KEY}

dead_letter_exchange = Exchange(DEAD_LETTER_EXCHANGE, type="direct", durable=True)
#: On Redis, kombu keeps exchange bindings as Redis keys, and remembers in memory that it
#: made them. If Redis restarts without persistence, the keys are gone, nothing re-creates
#: them, and a message published to the exchange is dropped without an error. Publishing to
#: the default exchange puts a message straight on the list named by its routing key, with
#: no binding to lose.
default_exchange = Exchange("")


def rabbitmq_exchange(exchange_type: str = EXCHANGE_TYPES[PLAIN]) -> Exchange:
    """The ``totango`` exchange: direct in the plain design (Celery's default for a named
    queue), topic in the quorum design (Celery's native delayed delivery for quorum queues
    routes only through topic exchanges: a direct one makes it hold retries in memory)."""
    return Exchange(EXCHANGE, type=exchange_type, durable=True)


def exchange_for(broker_kind: str, exchange_type: str = EXCHANGE_TYPES[PLAIN]) -> Exchange:
    return rabbitmq_exchange(exchange_type) if broker_kind == "rabbitmq" else default_exchange


def task_queue(broker_kind: str, design: str = PLAIN, exchange_type: str | None = None) -> Queue:
    """The main queue. Redis has no queue arguments, so it gets a plain declaration."""
    return work_queue(QUEUE, broker_kind, design, exchange_type)


def batch_queue(broker_kind: str, design: str = PLAIN, exchange_type: str | None = None) -> Queue:
    """The batch queue: declared exactly as the main queue, under its own name and key (a
    topic binding ``totango`` does not match ``totango.batch``, nor the other way round)."""
    return work_queue(BATCH_QUEUE, broker_kind, design, exchange_type)


def work_queue(
    name: str, broker_kind: str, design: str = PLAIN, exchange_type: str | None = None
) -> Queue:
    arguments: dict[str, object] | None = None
    if broker_kind == "rabbitmq" and design == QUORUM:
        arguments = dict(RABBITMQ_QUEUE_ARGUMENTS)
    elif broker_kind == "rabbitmq" and design == VHOST_QUORUM:
        # Celery needs to see it: a quorum queue takes no global QoS, and gets native
        # delayed delivery.
        arguments = dict(VHOST_QUORUM_ARGUMENTS)
    return Queue(
        name,
        exchange_for(broker_kind, exchange_type or EXCHANGE_TYPES[design]),
        routing_key=ROUTING_KEYS[name],
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


class ForeignDeclaration(Exception):  # noqa: N818  the name reads as the finding
    """A work queue or the exchange exists on RabbitMQ in neither of the known designs."""

    def __init__(self, name: str, what: str) -> None:
        super().__init__(
            f"{what} {name!r} is declared with a type or arguments the worker does not know "
            f"(in none of the designs of docs/producers.md); move its messages into a "
            f"correctly declared queue with: python -m worker queues migrate --to plain"
        )
        self.name = name


@dataclass(frozen=True)
class Topology:
    """The designs found on the broker: the exchange's type and each work queue's design."""

    broker_kind: str
    exchange_type: str = EXCHANGE_TYPES[PLAIN]
    designs: dict[str, str] = field(default_factory=lambda: dict.fromkeys(ROUTING_KEYS, PLAIN))

    def queue(self, name: str) -> Queue:
        return work_queue(name, self.broker_kind, self.designs[name], self.exchange_type)

    def queues(self) -> list[Queue]:
        return [self.queue(name) for name in ROUTING_KEYS]

    def apply_to(self, app: Any) -> None:
        """Make a Celery app consume, declare and route to the queues in these designs.

        Called in the worker's main process before the queues are selected (``-Q``) and
        before the pool and the consumer start, so every process sees them."""
        queues = app.amqp.queues
        consumed = list(queues.consume_from)
        for queue in self.queues():
            queues[queue.name] = queue
        queues.select(consumed)  # the consumed set holds the queue objects themselves
        app.conf.task_queues = list(queues.values())
        app.conf.task_default_exchange_type = exchange_for(
            self.broker_kind, self.exchange_type
        ).type

    def missing(self) -> dict[str, tuple[str, ...]]:
        """The guarantees each work queue lacks in the design it has (RabbitMQ only: on Redis
        the worker counts deliveries itself, and there is no replication to choose)."""
        if self.broker_kind != "rabbitmq":
            return {}
        return {name: MISSING_GUARANTEES[design] for name, design in self.designs.items()}


def discover(connection: Any, broker_kind: str) -> Topology:
    """Find the design of the exchange and of each work queue, creating in the plain design
    whatever does not exist yet, and bind each queue. Raises ``ForeignDeclaration`` for a
    declaration in neither design. Not RabbitMQ: the plain topology, nothing to find."""
    if broker_kind != "rabbitmq":
        return Topology(broker_kind)
    exchange_types = list(dict.fromkeys(EXCHANGE_TYPES.values()))
    exchange_type = _first_that_fits(
        connection, EXCHANGE, "exchange", exchange_types, rabbitmq_exchange
    )
    designs = {}
    for name in ROUTING_KEYS:
        declare = partial(_queue_only, name, broker_kind)
        design = _first_that_fits(connection, name, "queue", [PLAIN, QUORUM], declare)
        if design == PLAIN:
            # The plain declaration fits a classic queue, and a quorum queue that the vhost's
            # default queue type made of it: only the latter also fits the quorum type.
            design = _first_that_fits(connection, name, "queue", [VHOST_QUORUM, PLAIN], declare)
        designs[name] = design
    topology = Topology(broker_kind, exchange_type, designs)
    with _channel(connection) as channel:
        for queue in topology.queues():
            queue(channel).queue_bind()
    return topology


def _queue_only(name: str, broker_kind: str, design: str) -> Queue:
    return work_queue(name, broker_kind, design)


def _first_that_fits(
    connection: Any,
    name: str,
    what: str,
    candidates: list[str],
    entity: Callable[[str], Exchange | Queue],
) -> str:
    """Declare in each candidate design in turn; the first that RabbitMQ finds equivalent is
    the one that exists (or, for the first, the one just created). A refusal (406) closes
    the channel, so each try has a channel of its own."""
    for candidate in candidates:
        try:
            with _channel(connection) as channel:
                bound = entity(candidate)(channel)
                if isinstance(bound, Queue):
                    bound.queue_declare()
                else:
                    bound.declare()
        except PreconditionFailed:
            continue
        return candidate
    raise ForeignDeclaration(name, what)


@contextmanager
def _channel(connection: Any) -> Iterator[Any]:
    channel = connection.channel()
    try:
        yield channel
    finally:
        with suppress(Exception):  # a channel the broker closed is already gone
            channel.close()
