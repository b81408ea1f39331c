"""The worker's consumer: bad messages go to the dead-letter queue instead of vanishing.

Celery's own consumer acknowledges an undecodable message and rejects an unknown task; on
Redis both are then gone. This subclass publishes an envelope first, then acknowledges.
It also declares the dead-letter queue at start and keeps the health heartbeat file fresh.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from celery import Task, bootsteps
from celery.worker.consumer import Consumer
from celery.worker.consumer.delayed_delivery import DelayedDelivery
from celery.worker.request import Request

from worker.contract import BATCH_QUEUE, QUEUE
from worker.deadletter import dead_letter
from worker.envelope import Envelope
from worker.settings import Settings, broker_kind
from worker.topology import dead_letter_queue

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 10.0


_CELERY_DELAYED_DELIVERY = "celery.worker.consumer.delayed_delivery:DelayedDelivery"


_ConsumerBlueprint: Any = Consumer.Blueprint

#: Task events (received, started, succeeded) are published together this often, on the
#: consumer's loop: Flower's task view lags by at most this much.
EVENT_FLUSH_INTERVAL = 0.05
#: ... or as soon as this many are buffered, by the thread that buffers the last one
#: (Celery's default is 24).
EVENT_BUFFER_LIMIT = 500


#: Pools that run a task in the consumer's own process, where a decoded body can be handed
#: over as it is (prefork pickles it to a child, which decodes the raw body faster itself).
IN_PROCESS_POOLS = frozenset({"threads", "solo"})


class DecodedOnce(Request):
    """Celery's request, handing the pool the body the consumer has already decoded.

    For a protocol-2 message Celery parses the body in the consumer (``Request`` reads
    ``message.payload`` for the task's arguments, and the default strategy reads it to spot a
    hybrid message), then passes the raw body to the pool, whose tracer parses it again:
    every message's JSON decoded twice, both under the one GIL. Marked decoded, the pool
    takes the consumer's arguments as Celery does for a protocol-1 message. The consumer's
    decode checks the content type against ``accept_content`` as before, and a body that
    does not decode still raises here, in the consumer, where ``RelayConsumer``
    dead-letters it."""

    __slots__ = ()

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        if not kwargs.get("decoded"):
            kwargs.update(body=message.payload, decoded=True)
        super().__init__(message, *args, **kwargs)


def request_class(settings: Settings) -> str:
    """A task's ``Request`` option: ``DecodedOnce`` where the pool is in-process."""
    if settings.pool in IN_PROCESS_POOLS:
        return f"{__name__}:{DecodedOnce.__name__}"
    return str(Task.Request)  # Celery's default


class RelayConsumer(Consumer):
    class Blueprint(_ConsumerBlueprint):  # type: ignore[misc]  # celery's stubs: a variable
        # Celery's delayed-delivery step, replaced by one that waits for DeclareQueues.
        default_steps = (
            *(
                "worker.consumer:QueuesThenDelayedDelivery"
                if step == _CELERY_DELAYED_DELIVERY
                else step
                for step in _ConsumerBlueprint.default_steps
            ),
            "worker.consumer:TaskEventsTogether",
        )

    def on_send_event_buffered(self) -> None:  # type: ignore[override]  # the stubs: a Callable
        """Nothing: ``TaskEventsTogether`` flushes the buffered task events on a timer.
        Celery flushes them on the loop's next turn, and a pool thread that buffers one
        wakes the loop for it: one publish per turn, that is about one per task, and on
        Redis a round trip the consumer waits for."""

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> None:
            # Celery unpacks the body into (args, kwargs, embed) here, in the main process,
            # and lets the error of any other shape out: the worker would stop, and meet the
            # same message again after every restart.
            try:
                handle(message)
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                self._dead_letter(message, "undecodable", exc)

        return on_task_received

    def connection_for_write(self, url: str | None = None, heartbeat: float | None = None) -> Any:
        """The connection of the task-event dispatcher (Celery's Events step, its only user).

        Task events are monitoring data. Published with confirms, a pool thread waited for a
        confirm while holding the dispatcher's lock, and only the consumer's loop reads that
        confirm, which blocked on the same lock: the worker froze on RabbitMQ under load.
        Events go without confirms; tasks, retries and dead letters keep them.
        """
        options = {**self.app.conf.broker_transport_options, "confirm_publish": False}
        connection = self.app.connection_for_write(
            url=url, heartbeat=heartbeat, transport_options=options
        )
        return self.ensure_connected(connection)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._dead_letter(message, "undecodable", exc)

    def on_unknown_message(self, _body: Any, message: Any) -> None:
        self._dead_letter(message, "undecodable", None)

    def on_unknown_task(self, _body: Any, message: Any, exc: Exception) -> None:
        self._dead_letter(message, "unknown_task", exc)

    def on_invalid_task(self, _body: Any, message: Any, exc: Exception) -> None:
        self._dead_letter(message, "undecodable", exc)

    def _dead_letter(self, message: Any, reason: str, exc: Exception | None) -> None:
        envelope = Envelope.unreadable(
            reason,
            headers=message.headers if isinstance(message.headers, dict) else {},
            kwargs=_kwargs(message) if reason == "unknown_task" else None,
            body=message.body,
            content_type=message.content_type,
            excerpt=repr(exc) if exc else "",
        )
        try:
            dead_letter(self.app, envelope, self.app.settings)  # type: ignore[attr-defined]
        except Exception:
            # The broker is unreachable or refused the envelope: put the message back rather
            # than drop it. It will be dead-lettered when the broker answers again.
            log.exception("could not dead-letter a %s message; requeueing it", reason)
            message.reject_log_error(log, self.connection_errors, requeue=True)  # type: ignore[attr-defined]
            return
        message.ack_log_error(log, self.connection_errors)  # type: ignore[attr-defined]


def _kwargs(message: Any) -> dict[str, Any] | None:
    try:
        body = message.decode()
    except Exception:  # noqa: BLE001  any decoding failure means: keep the raw body
        return None
    if isinstance(body, list | tuple) and len(body) >= 2 and isinstance(body[1], dict):
        return dict(body[1])  # protocol 2: (args, kwargs, embed)
    if isinstance(body, dict) and isinstance(body.get("kwargs"), dict):
        return dict(body["kwargs"])  # protocol 1
    return None


class DeclareQueues(bootsteps.StartStopStep):
    """Declare the dead-letter queue and both work queues when the consumer connects.

    Celery declares only the queues a worker consumes, and a message routed to an undeclared
    queue vanishes. A worker started with ``-Q totango`` must still create ``totango.batch``
    (and the other way round): producers that declare nothing publish to either, and Celery's
    delayed-delivery step binds every queue of the app, failing on a missing one.
    """

    requires = ("celery.worker.consumer.connection:Connection",)

    def start(self, c: Any) -> None:
        kind = broker_kind(c.app.conf.broker_url)
        channel = c.connection.default_channel
        # The work queues as the app holds them: in the design found on the broker when the
        # worker started (signals.on_celeryd_init, topology.discover).
        queues = c.app.amqp.queues
        for queue in (dead_letter_queue(kind), queues[QUEUE], queues[BATCH_QUEUE]):
            queue(channel).declare()


class TaskEventsTogether(bootsteps.StartStopStep):
    """Publish the buffered task events every ``EVENT_FLUSH_INTERVAL`` seconds, from the
    consumer's loop, in one message (Celery's ``task.multi``, which Flower and every event
    receiver read). Task events stay on; what changes is how many go per publish."""

    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.timer_entry: Any = None

    def start(self, c: Any) -> None:
        dispatcher = c.event_dispatcher
        if dispatcher is None or c.hub is None:  # no loop: Celery's own way
            return
        dispatcher.buffer_limit = EVENT_BUFFER_LIMIT
        self._cancel()
        self.timer_entry = c.timer.call_repeatedly(EVENT_FLUSH_INTERVAL, c._flush_events)

    def stop(self, c: Any) -> None:
        self._cancel()
        if c.event_dispatcher is not None:
            try:
                c.event_dispatcher.flush()
            except Exception:  # monitoring data: the consumer stops regardless
                log.debug("task events not flushed at stop", exc_info=True)

    def _cancel(self) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None


class QueuesThenDelayedDelivery(DelayedDelivery):
    """Celery's native delayed delivery (retry countdowns on quorum queues), started only
    after DeclareQueues: it binds every queue of the app, and on a queue that does not exist
    yet RabbitMQ answers NOT_FOUND and Celery turns delayed delivery off for the process.
    Bootsteps without a dependency between them start in no fixed order."""

    requires: tuple[Any, ...] = (*(DelayedDelivery.requires or ()), "worker.consumer:DeclareQueues")


class Heartbeat(bootsteps.StartStopStep):
    """Touch a file while the consumer runs, for a liveness probe that costs one stat().

    It starts after the queues are declared as well as after the task consumer: the file
    means ready, and a producer that publishes to ``totango.batch`` without declaring it
    must not find it missing (bootsteps without a dependency start in no fixed order)."""

    requires = ("celery.worker.consumer.tasks:Tasks", "worker.consumer:DeclareQueues")

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.path = Path(c.app.settings.heartbeat_file)
        self.timer_entry: Any = None

    def start(self, c: Any) -> None:
        self.touch()
        self.timer_entry = c.timer.call_repeatedly(HEARTBEAT_INTERVAL, self.touch)

    def stop(self, _c: Any) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
        self.path.unlink(missing_ok=True)

    def touch(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
            os.utime(self.path)
        except OSError as exc:
            log.warning("cannot touch heartbeat file %s: %s", self.path, exc)
