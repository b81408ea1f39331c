"""PURE: the dead-letter envelope, the record of one event that will not be delivered,
with one named constructor per family of reasons (``REASONS``, the README's table)."""

from __future__ import annotations

import base64
import socket
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

ENVELOPE_VERSION = 1
HOSTNAME = socket.gethostname()

#: Every reason code, by family, as the README's dead-letter table lists them.
REASONS: dict[str, str] = {
    "invalid:<field>": "the event can never be valid as it stands; it was never sent",
    "exhausted:<status>": "the retries ran out; the status of the last attempt",
    "undecodable": "the body could not be decoded as a JSON task message",
    "unknown_task": "the message names a task this worker does not have",
    "worker_lost": "the worker process died on this message until the retry budget was spent",
    "time_limit": "the task passed its hard time limit",
    "error:<exception>": "a bug in the worker's own code, on this event only",
    "delivery_limit": "delivered DELIVERY_LIMIT times without an outcome",
    "broker:<reason>": "RabbitMQ dead-lettered the raw message for another reason",
}


#: How much of an error or an answer's body an envelope keeps.
EXCERPT_LENGTH = 200


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

    # --- one constructor per family of reasons -------------------------------------------

    @classmethod
    def invalid(
        cls,
        code: str,
        message: str,
        *,
        event_id: str | None,
        task: str | None,
        kwargs: dict[str, Any] | None,
        task_id: str | None,
    ) -> Envelope:
        """``invalid:<field>``: never sent, so no attempt; replaying enqueues ``task``."""
        return cls(
            reason=code,
            event_id=event_id,
            task=task,
            kwargs=kwargs,
            attempts=0,
            worker_host=HOSTNAME,
            last_excerpt=message[:EXCERPT_LENGTH],
            task_id=task_id,
        )

    @classmethod
    def exhausted(
        cls,
        reason: str,
        *,
        event_id: str,
        task: str,
        kwargs: dict[str, Any],
        attempts: int,
        first_attempt_at: str,
        last_status: str,
        last_excerpt: str,
        task_id: str | None,
    ) -> Envelope:
        """``exhausted:<status>``: the gateway's last answer was not 200, and no retry is left."""
        return cls(
            reason=reason,
            event_id=event_id,
            task=task,
            kwargs=kwargs,
            attempts=attempts,
            worker_host=HOSTNAME,
            first_attempt_at=first_attempt_at,
            last_attempt_at=now_iso(),
            last_status=last_status,
            last_excerpt=last_excerpt,
            task_id=task_id,
        )

    @classmethod
    def failed(
        cls,
        reason: str,
        *,
        event_id: str | None,
        task: str,
        kwargs: dict[str, Any] | None,
        attempts: int,
        excerpt: str,
        task_id: str | None,
    ) -> Envelope:
        """The task itself failed: ``worker_lost``, ``time_limit``, ``error:<exception>``,
        ``delivery_limit``."""
        return cls(
            reason=reason,
            event_id=event_id,
            task=task,
            kwargs=kwargs,
            attempts=attempts,
            worker_host=HOSTNAME,
            last_attempt_at=now_iso(),
            last_excerpt=excerpt[:EXCERPT_LENGTH],
            task_id=task_id,
        )

    @classmethod
    def unreadable(
        cls,
        reason: str,
        *,
        headers: dict[str, Any],
        kwargs: dict[str, Any] | None,
        body: bytes | str | None,
        content_type: str | None,
        excerpt: str,
    ) -> Envelope:
        """``undecodable`` or ``unknown_task``: a message that never became an event. Its
        body is kept whole (raw) unless its arguments could be read."""
        return cls(
            reason=reason,
            kwargs=kwargs,
            attempts=0,
            worker_host=HOSTNAME,
            content_type=content_type,
            last_excerpt=excerpt[:EXCERPT_LENGTH],
            **_message_fields(headers, kwargs, body),
        )

    @classmethod
    def from_broker(
        cls,
        reason: str,
        *,
        headers: dict[str, Any],
        kwargs: dict[str, Any] | None,
        body: bytes | str | None,
        content_type: str | None,
        attempts: int,
    ) -> Envelope:
        """``delivery_limit`` or ``broker:<reason>``: a raw task message that RabbitMQ itself
        dead-lettered (``x-death``), read back as an envelope; its id is its task id."""
        fields = _message_fields(headers, kwargs, body)
        return cls(
            reason=reason,
            kwargs=kwargs,
            attempts=attempts,
            worker_host="broker",
            content_type=content_type,
            id=fields["task_id"] or uuid.uuid4().hex,
            **fields,
        )

    @property
    def replayable(self) -> bool:
        """Only an envelope that still holds a task and its arguments can be put back."""
        return self.task is not None and self.kwargs is not None


def _message_fields(
    headers: dict[str, Any], kwargs: dict[str, Any] | None, body: bytes | str | None
) -> dict[str, Any]:
    """What an envelope keeps of a raw task message: its task, ids, and the body whole
    unless its arguments could be read."""
    task_id = headers.get("id") if isinstance(headers.get("id"), str) else None
    raw, encoding = (None, None) if kwargs is not None else raw_body_fields(body)
    return {
        "task": headers.get("task") if isinstance(headers.get("task"), str) else None,
        "task_id": task_id,
        "event_id": event_id_of(kwargs, task_id),
        "raw_body": raw,
        "raw_body_encoding": encoding,
    }


def event_id_of(kwargs: Any, task_id: str | None) -> str | None:
    """The event id of a message: its own ``event_id`` argument (an integer one in its
    decimal form, as ``events.event_id_text`` makes it), else its task id."""
    if isinstance(kwargs, dict):
        value = kwargs.get("event_id")
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() < 420:
            return str(value)  # 420 bits: at most 127 digits, within MAX_EVENT_ID_LENGTH
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
