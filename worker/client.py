"""What producer apps call: validate now, then enqueue, and get the event id back.

Importing this module starts nothing and contacts nothing: the broker connection is made on
the first enqueue, from ``TOTANGO_BROKER_URL`` (or from the ``Producer`` you build).

    from worker import client
    event_id = client.track_activity(account_id="acme", user_id="jo@acme.com",
                                     activity="Login", module="App")
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

from worker import events
from worker.contract import ENQUEUED_AT_HEADER
from worker.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

#: Producers may leave ``service_id`` out so that the worker's default applies; validation
#: still needs one to check the rest of the event against.
_PLACEHOLDER_SERVICE_ID = "SP-0-0"


@dataclass(frozen=True)
class Prepared:
    """A validated event that has not been enqueued yet (for example, until a commit)."""

    producer: Producer
    task: str
    kwargs: dict[str, Any]

    @property
    def event_id(self) -> str:
        return str(self.kwargs["event_id"])

    def enqueue(self) -> str:
        return self.producer.enqueue(self)


class Producer:
    """Validates and enqueues events on the ``totango`` queue, with publisher confirms."""

    def __init__(self, settings: Settings | None = None, app: Celery | None = None):
        self._settings = settings
        self._app = app
        self._adopted = False
        self._lock = threading.Lock()

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            given = getattr(self._app, "settings", None)
            self._settings = given if isinstance(given, Settings) else Settings.from_env()
        return self._settings

    @property
    def app(self) -> Celery:
        """The producer's Celery app (``worker.producer_app``: no tasks, none of the worker's
        runtime), publishing to the work queues in the design the broker holds. Made, and
        the broker asked, on first use."""
        with self._lock:
            if self._app is None:
                from worker.producer_app import producer_app  # noqa: PLC0415  no Celery until first use

                self._app = producer_app(self.settings)
            if not self._adopted:
                from worker.producer_app import adopt_broker_topology  # noqa: PLC0415

                adopt_broker_topology(self._app, self.settings.broker_kind)
                self._adopted = True
            return self._app

    def prepare(self, task: str, **kwargs: Any) -> Prepared:
        """Validate an event, give it an id and stamp it with the time it happened (now,
        unless ``occurred_at`` is given); raises ``InvalidEvent`` naming the field."""
        args = {k: _iso_dates(k, v) for k, v in kwargs.items() if v is not None}
        if args.get("writeback") is False:
            del args["writeback"]
        args.setdefault("event_id", str(uuid.uuid4()))
        when = args.setdefault("occurred_at", round(time.time() * 1000))
        if isinstance(when, datetime):  # aware: with its offset; naive: refused, ambiguous
            args["occurred_at"] = when.isoformat(timespec="milliseconds")
        event = events.from_message(
            task,
            args,
            event_id=None,
            default_service_id=self.settings.service_id or _PLACEHOLDER_SERVICE_ID,
            services=self.settings.service_ids,
        )
        args["event_id"] = event.event_id  # an integer id travels as its string form
        return Prepared(self, task, args)

    def enqueue(self, prepared: Prepared) -> str:
        self.app.send_task(
            prepared.task,
            kwargs=prepared.kwargs,
            task_id=prepared.event_id,
            headers={ENQUEUED_AT_HEADER: time.time()},
        )
        return prepared.event_id

    def send_batch(self, prepared: Sequence[Prepared]) -> list[str]:
        """Enqueue prepared events as ``totango.track_batch`` messages of at most
        ``MAX_BATCH_EVENTS`` each; returns their event ids, in order.

        The worker sends a batch's events concurrently, and retries or dead-letters each
        failed or invalid one on its own, so a batch is no weaker than single events.
        """
        items = list(prepared)
        for start in range(0, len(items), events.MAX_BATCH_EVENTS):
            chunk = items[start : start + events.MAX_BATCH_EVENTS]
            self.app.send_task(
                events.TRACK_BATCH,
                kwargs={"events": [{"task": p.task, "kwargs": p.kwargs} for p in chunk]},
                headers={ENQUEUED_AT_HEADER: time.time()},
            )
        return [p.event_id for p in items]

    def track_activity(self, **kwargs: Any) -> str:
        return self.prepare(events.TRACK_ACTIVITY, **kwargs).enqueue()

    def update_account(self, **kwargs: Any) -> str:
        return self.prepare(events.UPDATE_ACCOUNT, **kwargs).enqueue()

    def update_user(self, **kwargs: Any) -> str:
        return self.prepare(events.UPDATE_USER, **kwargs).enqueue()


_ATTRIBUTE_ARGUMENTS = frozenset({"attributes", "account_attributes", "user_attributes"})


def _iso_dates(argument: str, value: Any) -> Any:
    """Attribute values that are ``date`` or ``datetime`` objects, as ISO 8601 strings: on
    the wire only strings cross (``datetime.isoformat`` writes the extended form)."""
    if argument not in _ATTRIBUTE_ARGUMENTS or not isinstance(value, Mapping):
        return value
    return {k: v.isoformat() if isinstance(v, date) else v for k, v in value.items()}


_default: Producer | None = None
_default_lock = threading.Lock()


def default_producer() -> Producer:
    global _default  # noqa: PLW0603  one lazily built producer per process
    with _default_lock:
        if _default is None:
            _default = Producer()
        return _default


def track_activity(
    *,
    account_id: str,
    user_id: str,
    activity: str,
    module: str,
    account_name: str | None = None,
    account_attributes: dict[str, Any] | None = None,
    user_attributes: dict[str, Any] | None = None,
    writeback: bool = False,
    service_id: str | None = None,
    event_id: str | int | None = None,
    occurred_at: datetime | str | int | None = None,
) -> str:
    """Enqueue an activity; returns its event id. Raises ``InvalidEvent`` on bad input."""
    return default_producer().track_activity(
        account_id=account_id,
        user_id=user_id,
        activity=activity,
        module=module,
        account_name=account_name,
        account_attributes=account_attributes,
        user_attributes=user_attributes,
        writeback=writeback,
        service_id=service_id,
        event_id=event_id,
        occurred_at=occurred_at,
    )


def update_account(
    *,
    account_id: str,
    attributes: dict[str, Any] | None = None,
    account_name: str | None = None,
    writeback: bool = False,
    service_id: str | None = None,
    event_id: str | int | None = None,
    occurred_at: datetime | str | int | None = None,
) -> str:
    """Enqueue an account attribute update; returns its event id."""
    return default_producer().update_account(
        account_id=account_id,
        attributes=attributes,
        account_name=account_name,
        writeback=writeback,
        service_id=service_id,
        event_id=event_id,
        occurred_at=occurred_at,
    )


def update_user(
    *,
    account_id: str,
    user_id: str,
    attributes: dict[str, Any],
    account_attributes: dict[str, Any] | None = None,
    writeback: bool = False,
    service_id: str | None = None,
    event_id: str | int | None = None,
    occurred_at: datetime | str | int | None = None,
) -> str:
    """Enqueue a user attribute update; returns its event id."""
    return default_producer().update_user(
        account_id=account_id,
        user_id=user_id,
        attributes=attributes,
        account_attributes=account_attributes,
        writeback=writeback,
        service_id=service_id,
        event_id=event_id,
        occurred_at=occurred_at,
    )


def send_batch(prepared: Sequence[Prepared]) -> list[str]:
    """Enqueue many prepared events in few messages: ``send_batch([prepare(...), ...])``."""
    return default_producer().send_batch(prepared)


def prepare(task: str, **kwargs: Any) -> Prepared:
    """Validate now, enqueue later: ``transaction.on_commit(client.prepare(...).enqueue)``."""
    return default_producer().prepare(task, **kwargs)
