"""Task events as Flower receives them, from a real worker on a real broker: every task's
received, started and succeeded events arrive, grouped in few messages
(``worker.consumer.TaskEventsTogether``) rather than about one message per task."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from subprocess import Popen
from typing import Any

from celery.events.receiver import EventReceiver

from tests.workers import wait_until
from worker.application import TotangoCelery
from worker.client import Producer
from worker.consumer import EVENT_FLUSH_INTERVAL

EnvFor = Callable[..., dict[str, str]]
StartWorker = Callable[..., AbstractContextManager[Popen[bytes]]]
AppFor = Callable[[dict[str, str]], TotangoCelery]

EVENTS = 60
TIMEOUT = 60.0


class CountingReceiver(EventReceiver):
    """Celery's own event receiver (Flower's), which also keeps, per message of task events
    in the order they arrived, the times the worker stamped on its events."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.messages: list[list[float]] = []

    def _receive(self, body: Any, message: Any, **kwargs: Any) -> None:
        events = body if isinstance(body, list) else [body]
        stamps = [
            float(e["timestamp"]) for e in events if str(e.get("type", "")).startswith("task-")
        ]
        if stamps:
            self.messages.append(stamps)
        super()._receive(body, message, **kwargs)


@contextmanager
def receiving(app: TotangoCelery) -> Iterator[tuple[CountingReceiver, dict[str, list[str]]]]:
    """A receiver consuming every event in a thread of its own; yields it and what it saw:
    per task id, the types of that task's events; for an event without a task id (the
    ``worker-*`` ones), its type under its own type, once per event."""
    seen: dict[str, list[str]] = defaultdict(list)

    def on_event(event: dict[str, Any]) -> None:
        key = event.get("uuid") or event["type"]
        seen[key].append(event["type"])

    with app.connection_for_read() as connection:
        receiver = CountingReceiver(connection, handlers={"*": on_event}, app=app)
        thread = threading.Thread(
            target=lambda: receiver.capture(limit=None, timeout=None, wakeup=False), daemon=True
        )
        thread.start()
        try:
            yield receiver, seen
        finally:
            receiver.should_stop = True
            thread.join(10)


def test_task_events_arrive_grouped_and_complete(
    *, env_for: EnvFor, start_worker: StartWorker, app_for: AppFor
) -> None:
    """60 single events relayed: a receiver started before the worker gets the three task
    events (received, started, succeeded) of each, and in few messages. The consumer
    publishes what is buffered every ``EVENT_FLUSH_INTERVAL``: message k holds the events
    stamped after flush k-1 and by flush k, so n messages need n-2 intervals between the
    first message's last stamp and the last message's first, on the worker's clock (the
    receiver's own delays do not count). Celery's own consumer publishes on each turn of
    its loop, about a message per task (79 to 100 for these 60 tasks)."""
    env = env_for()
    app = app_for(env)
    with receiving(app) as (receiver, seen), start_worker(env):
        wait_until(lambda: seen.get("worker-online"), TIMEOUT, "the worker's online event")
        producer = Producer(app=app)
        ids = [
            producer.track_activity(
                account_id=f"acct-{n}", user_id="u1", activity="Login", module="App"
            )
            for n in range(EVENTS)
        ]

        def complete() -> bool:
            return all("task-succeeded" in seen.get(i, ()) for i in ids)

        wait_until(complete, TIMEOUT, "every task-succeeded event")
    for task_id in ids:
        assert sorted(seen[task_id]) == ["task-received", "task-started", "task-succeeded"]
    messages = receiver.messages
    assert sum(map(len, messages)) == 3 * EVENTS
    span = min(messages[-1]) - max(messages[0])
    bound = int(span / EVENT_FLUSH_INTERVAL) + 2
    assert len(messages) <= bound, (len(messages), span, [len(m) for m in messages])
