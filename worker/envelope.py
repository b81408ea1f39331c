"""PURE: the dead-letter envelope, the record of one event that will not be delivered.

Reason codes (documented in the README):
- ``invalid:<field>``: the event can never be valid; it was never sent;
- ``exhausted:<status>``: the retries ran out; the status of the last attempt (``503``,
  ``timeout``, ``connection_error``);
- ``undecodable``: the message body could not be decoded as JSON;
- ``unknown_task``: the message names a task this worker does not have;
- ``worker_lost``: the worker process died on this message every time it took it;
- ``delivery_limit``: RabbitMQ dead-lettered it after ``DELIVERY_LIMIT`` deliveries.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

ENVELOPE_VERSION = 1


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def iso_at(timestamp: float) -> str:
    """A ``time.time()`` stamp in ``now_iso``'s format: take the stamp now, format it only
    if it is needed (a retry or a dead letter, not a delivery)."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Envelope:
    reason: str
    event_id: str | None
    task: str | None
    kwargs: dict[str, Any] | None
    attempts: int
    worker_host: str
    first_attempt_at: str | None = None
    last_attempt_at: str | None = None
    last_status: str | None = None
    last_excerpt: str = ""
    task_id: str | None = None
    raw_body: str | None = None
    raw_body_encoding: str | None = None
    content_type: str | None = None
    dead_lettered_at: str = field(default_factory=now_iso)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    version: int = ENVELOPE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Envelope:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def replayable(self) -> bool:
        """Only an envelope that still holds a task and its arguments can be put back."""
        return self.task is not None and self.kwargs is not None


def event_id_of(kwargs: Any, task_id: str | None) -> str | None:
    """The event id of a message: its own ``event_id`` argument, else its task id."""
    if isinstance(kwargs, dict) and isinstance(kwargs.get("event_id"), str):
        return str(kwargs["event_id"])
    return task_id


def raw_body_fields(body: bytes | str | None) -> tuple[str | None, str | None]:
    """Keep an undecodable body whole: as text when it is UTF-8, else as base64."""
    if body is None:
        return None, None
    if isinstance(body, str):
        return body, "utf-8"
    try:
        return body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(body).decode("ascii"), "base64"
