"""Outage mode in the consumer: while every gateway this worker calls has its breaker open,
the worker takes no new messages, so events wait in the broker with their retry budget
untouched. It cancels its queues' consumers and adds them back (as the ``cancel_consumer``
and ``add_consumer`` remote-control commands do), always on the consumer's own thread
(``Consumer.call_soon``): kombu's channels are not thread-safe.

When a probe is due, one worker of the fleet takes the lease and consumes again until it
has fetched an event to send as the probe (``Circuit.lease_for_fetch``); the other events
it fetched meanwhile are put back unsent.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from worker.relay import TotangoCelery

log = logging.getLogger("worker.outage")

#: Seconds between two looks at the breakers, on the consumer's timer.
TICK = 0.5


class OutagePause(bootsteps.StartStopStep):
    """Pause and resume the task consumer with the fleet's breakers."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.timer_entry: Any = None
        self.paused = False
        #: The task consumer the pause was applied to: a reconnection makes a new one,
        #: which consumes every queue again until the next tick pauses it.
        self.paused_consumer: Any = None
        self.queues: list[str] = []
        #: A change handed to the consumer's thread and not applied yet.
        self.pending = False

    def include_if(self, c: Any) -> bool:
        app = c.app
        return isinstance(app, TotangoCelery) and app.circuit is not None

    def start(self, c: Any) -> None:
        self.queues = list(c.app.amqp.queues.consume_from)
        self.timer_entry = c.timer.call_repeatedly(TICK, self.tick, (c,))

    def stop(self, _c: Any) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None

    def tick(self, c: Any) -> None:
        """On the timer's thread: decide; the change itself runs on the consumer's."""
        try:
            want = self.want_paused(c.app)
        except Exception:
            log.exception("reading the breakers")
            return
        consumer = c.task_consumer
        stale = want != self.paused or (want and consumer is not self.paused_consumer)
        if stale and not self.pending:
            self.pending = True
            c.call_soon(self.apply, c, want)

    def want_paused(self, app: TotangoCelery) -> bool:
        """Paused while every gateway's breaker is open, unless this process holds (or now
        takes) the lease of a due probe and must fetch an event for it."""
        assert app.circuit is not None  # noqa: S101  include_if
        circuit = app.circuit.get()
        urls = app.settings.gateway_urls
        breakers = {url: circuit.breaker(url) for url in urls}
        if not all(breaker.is_open for breaker in breakers.values()):
            return False
        interval = app.settings.breaker_probe_interval
        now = circuit.now()
        for url, breaker in breakers.items():
            if circuit.holds_lease(url):
                return False
            if breaker.probe_due(now, interval) and circuit.lease_for_fetch(url):
                log.debug("probe leased: consuming again until an event is fetched")
                return False
        return True

    def apply(self, c: Any, pause: bool) -> None:
        """On the consumer's thread."""
        self.pending = False
        consumer = c.task_consumer
        if consumer is None:
            return
        if pause:
            for name in self.queues:
                consumer.cancel_by_queue(name)
            log.debug("gateway outage: stopped taking events from %s", ", ".join(self.queues))
        else:
            queues = c.app.amqp.queues
            for name in self.queues:
                if not consumer.consuming_from(name):
                    consumer.add_queue(queues[name])
            consumer.consume()
            log.debug("taking events from %s", ", ".join(self.queues))
        self.paused = pause
        self.paused_consumer = consumer if pause else None
