"""PURE: the event model, its validation, and its gateway parameters.

One module decides what a valid event is, for the producer API and the worker alike. It
imports neither celery nor an HTTP client, so every rule is testable as a table.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote

from worker.contract import TRACK_ACTIVITY, TRACK_BATCH, UPDATE_ACCOUNT, UPDATE_USER
from worker.errors import InvalidEvent

__all__ = [
    "TRACK_ACTIVITY",
    "TRACK_BATCH",
    "UPDATE_ACCOUNT",
    "UPDATE_USER",
    "Event",
    "batch_items",
    "encode",
    "from_message",
    "track_activity",
    "update_account",
    "update_user",
]

#: Limits on sizes. The gateway takes one event per HTTP call; these keep a call well inside
#: what proxies accept for a form body and stop one bad payload from hogging a worker.
MAX_ID_LENGTH = 255
MAX_NAME_LENGTH = 255
MAX_VALUE_LENGTH = 4096
MAX_ATTRIBUTES = 100
MAX_EVENT_ID_LENGTH = 128
#: The most events one ``totango.track_batch`` message carries. The worker sends a batch's
#: events concurrently over the process's HTTP pool, so 100 keeps one message to a few
#: round trips and its JSON well under the brokers' frame limits; producers chunk above it.
MAX_BATCH_EVENTS = 100

#: Matched with ``fullmatch`` and ASCII digits only: ``$`` would let a trailing newline
#: through, and ``\d`` alone would accept non-ASCII digits such as ``١٢٠٠``.
SERVICE_ID_RE = re.compile(r"SP-[0-9]+-[0-9]+")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_PLAIN_NUMBER_RE = re.compile(r"-?[0-9]+(\.[0-9]+)?")

DATE_ATTRIBUTES = frozenset({"Create Date", "Contract Renewal Date", "Contract Start Date"})
YES_NO_ATTRIBUTES = frozenset({"Contact", "Key Contact"})
NUMBER_ATTRIBUTES = frozenset({"Contract Value"})

AttributeValue = str | int | float | bool | None

#: An int with more bits than this has more than MAX_VALUE_LENGTH digits (log10(2) < 0.302).
_MAX_INT_BITS = int(MAX_VALUE_LENGTH / 0.302)


@dataclass(frozen=True)
class Event:
    """One validated event: the gateway parameters of one call, in a stable order."""

    task: str
    event_id: str
    service_id: str
    account_id: str
    user_id: str | None
    params: tuple[tuple[str, str], ...]


def track_activity(
    *,
    account_id: Any,
    user_id: Any,
    activity: Any,
    module: Any,
    account_name: Any = None,
    account_attributes: Any = None,
    user_attributes: Any = None,
    service_id: Any = None,
    event_id: Any = None,
    default_service_id: str | None = None,
) -> Event:
    """An activity, optionally with account and user attributes in the same call."""
    ids = _ids(service_id, default_service_id, account_id, user_id, event_id)
    params = [*ids.head, ("sdr_a", _text("activity", activity)), ("sdr_m", _text("module", module))]
    params += _account_name(account_name, account_attributes)
    params += _attributes("sdr_o", "account_attributes", account_attributes)
    params += _attributes("sdr_u", "user_attributes", user_attributes)
    return ids.event(TRACK_ACTIVITY, params)


def update_account(
    *,
    account_id: Any,
    attributes: Any,
    account_name: Any = None,
    writeback: Any = False,
    service_id: Any = None,
    event_id: Any = None,
    default_service_id: str | None = None,
) -> Event:
    """Account attributes; ``writeback=True`` asks Totango to write them to Salesforce."""
    ids = _ids(service_id, default_service_id, account_id, _NO_USER, event_id)
    attrs = _account_name(account_name, attributes) + _attributes("sdr_o", "attributes", attributes)
    if not attrs:
        raise InvalidEvent("attributes", "at least one account attribute is required")
    if not isinstance(writeback, bool):
        raise InvalidEvent("writeback", "must be true or false")
    tail = [("enableWriteback", "true")] if writeback else []
    return ids.event(UPDATE_ACCOUNT, [*ids.head, *attrs, *tail])


def update_user(
    *,
    account_id: Any,
    user_id: Any,
    attributes: Any,
    account_attributes: Any = None,
    service_id: Any = None,
    event_id: Any = None,
    default_service_id: str | None = None,
) -> Event:
    """User attributes, optionally with account attributes in the same call."""
    ids = _ids(service_id, default_service_id, account_id, user_id, event_id)
    user_attrs = _attributes("sdr_u", "attributes", attributes)
    if not user_attrs:
        raise InvalidEvent("attributes", "at least one user attribute is required")
    account_attrs = _attributes("sdr_o", "account_attributes", account_attributes)
    return ids.event(UPDATE_USER, [*ids.head, *account_attrs, *user_attrs])


BUILDERS: dict[str, Callable[..., Event]] = {
    TRACK_ACTIVITY: track_activity,
    UPDATE_ACCOUNT: update_account,
    UPDATE_USER: update_user,
}


def from_message(
    task: str,
    kwargs: Any,
    *,
    event_id: str | None,
    default_service_id: str | None,
    positional: tuple[Any, ...] = (),
) -> Event:
    """Build an event from a task's keyword arguments, as they came off the wire.

    ``event_id`` is used when the message carries none (the worker derives it from the task
    id, which stays the same through every retry).
    """
    builder = BUILDERS.get(task)
    if builder is None:
        raise InvalidEvent("task", f"unknown task {task!r}")
    if positional:
        raise InvalidEvent("arguments", "positional arguments are not accepted; use keywords")
    if not isinstance(kwargs, Mapping):
        raise InvalidEvent("arguments", "must be a JSON object of keyword arguments")
    accepted = _parameters(builder)
    for name in kwargs:
        if name not in accepted:
            # An unknown name is echoed only when it is safe text: the field becomes the
            # dead-letter reason, a metric label and a Sentry tag.
            field = name if isinstance(name, str) and _is_safe_name(name) else "arguments"
            raise InvalidEvent(field, "is not an argument of " + task)
    # Named here rather than read back from the TypeError of the call, whose wording
    # changes when two arguments are missing ("arguments: 'a' and 'b'").
    for name in accepted:
        if name not in kwargs and name not in (builder.__kwdefaults__ or {}):
            raise InvalidEvent(name, "is required")
    args = dict(kwargs)
    if args.get("event_id") is None:
        args["event_id"] = event_id
    return builder(**args, default_service_id=default_service_id)


@functools.cache  # three builders; read on every message
def _parameters(builder: Callable[..., Event]) -> tuple[str, ...]:
    """The keyword arguments of a builder, in signature order (so errors are stable)."""
    code = builder.__code__
    names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
    return tuple(name for name in names if name != "default_service_id")


@dataclass(frozen=True)
class _Ids:
    service_id: str
    account_id: str
    user_id: str | None
    event_id: str | None
    head: tuple[tuple[str, str], ...]

    def event(self, task: str, params: list[tuple[str, str]]) -> Event:
        if self.event_id is None:
            raise InvalidEvent("event_id", "is required")
        return Event(
            task, self.event_id, self.service_id, self.account_id, self.user_id, tuple(params)
        )


#: Marks a kind of call that takes no user (an account update), as opposed to a user id of None.
_NO_USER: Any = object()


def _ids(
    service_id: Any, default_service_id: str | None, account_id: Any, user_id: Any, event_id: Any
) -> _Ids:
    sid = default_service_id if service_id is None else service_id
    if sid is None:
        raise InvalidEvent("service_id", "is required (no TOTANGO_SERVICE_ID default is set)")
    if not isinstance(sid, str) or not SERVICE_ID_RE.fullmatch(sid):
        raise InvalidEvent("service_id", "must look like SP-<digits>-<digits>")
    account = _id("account_id", account_id)
    head = [("sdr_s", sid), ("sdr_o", account)]
    user = None
    if user_id is not _NO_USER:  # mandatory where it is taken: None is refused, not dropped
        user = _id("user_id", user_id)
        head.append(("sdr_u", user))
    eid = None
    if event_id is not None:
        eid = _text("event_id", event_id, limit=MAX_EVENT_ID_LENGTH)
    return _Ids(sid, account, user, eid, tuple(head))


def _id(field: str, value: Any) -> str:
    """Ids are non-empty strings; an integer id is accepted and sent as its decimal form."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > _MAX_INT_BITS:  # str() would raise a bare ValueError
            raise InvalidEvent(field, f"is longer than {MAX_ID_LENGTH} characters")
        value = str(value)
    return _text(field, value, limit=MAX_ID_LENGTH)


def _text(field: str, value: Any, limit: int = MAX_NAME_LENGTH) -> str:
    if value is None:
        raise InvalidEvent(field, "is required")
    if not isinstance(value, str):
        raise InvalidEvent(field, f"must be a string, not {type(value).__name__}")
    if not value.strip():
        raise InvalidEvent(field, "must not be empty")
    if len(value) > limit:
        raise InvalidEvent(field, f"is longer than {limit} characters")
    if _CONTROL_RE.search(value):
        raise InvalidEvent(field, "must not hold control characters")
    _utf8(field, value)
    return value


def _utf8(field: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidEvent(field, "is not encodable as UTF-8") from None


def _account_name(account_name: Any, attributes: Any) -> list[tuple[str, str]]:
    if account_name is None:
        return []
    if isinstance(attributes, Mapping) and attributes.get("account_name") is not None:
        raise InvalidEvent("account_name", "is given both as an argument and as an attribute")
    return [("sdr_o.account_name", _text("account_name", account_name, limit=MAX_VALUE_LENGTH))]


def _attributes(prefix: str, field: str, attributes: Any) -> list[tuple[str, str]]:
    if attributes is None:
        return []
    if not isinstance(attributes, Mapping):
        raise InvalidEvent(field, "must be an object of attribute names to values")
    if len(attributes) > MAX_ATTRIBUTES:
        raise InvalidEvent(field, f"has more than {MAX_ATTRIBUTES} attributes")
    out = []
    for name, value in attributes.items():
        if not isinstance(name, str) or not _is_safe_name(name):
            # A bad name is reported under its container, never echoed: the field becomes
            # the dead-letter reason, a metric label and a Sentry tag.
            raise InvalidEvent(
                field,
                "has an attribute name that is not a non-empty string of at most "
                f"{MAX_NAME_LENGTH} characters in UTF-8 without control characters",
            )
        rendered = attribute_value(name, value)
        if rendered is not None:
            out.append((f"{prefix}.{name}", rendered))
    return out


def _is_safe_name(name: str) -> bool:
    try:
        _text("name", name)
    except InvalidEvent:
        return False
    return True


def attribute_value(name: str, value: AttributeValue | object) -> str | None:
    """Render one attribute value as the gateway expects it; ``None`` leaves it out."""
    if value is None:
        return None
    if name in YES_NO_ATTRIBUTES:
        if isinstance(value, bool):
            return "yes" if value else "no"
        if value not in ("yes", "no"):
            raise InvalidEvent(name, "must be exactly 'yes' or 'no' (lowercase), or a bool")
        return str(value)
    if isinstance(value, bool):  # still checked below: a bool is no date and no number
        text = "true" if value else "false"
    elif isinstance(value, int | float):
        text = _number(name, value)
    elif isinstance(value, str):
        text = value
    else:
        raise InvalidEvent(name, f"must be a string, number or bool, not {type(value).__name__}")
    if len(text) > MAX_VALUE_LENGTH:
        raise InvalidEvent(name, f"is longer than {MAX_VALUE_LENGTH} characters")
    _utf8(name, text)
    if name in NUMBER_ATTRIBUTES and not _PLAIN_NUMBER_RE.fullmatch(text):
        raise InvalidEvent(name, "must be a plain number such as 1200.5 (no separators or signs)")
    if name in DATE_ATTRIBUTES and not _is_iso8601(text):
        raise InvalidEvent(name, "must be an ISO 8601 date such as 2026-01-31")
    return text


def _number(name: str, value: float) -> str:
    if isinstance(value, int):
        # str() refuses an int of more than 4300 digits with a bare ValueError.
        if value.bit_length() > _MAX_INT_BITS:
            raise InvalidEvent(name, f"is longer than {MAX_VALUE_LENGTH} characters")
        return str(value)
    if not math.isfinite(value):
        raise InvalidEvent(name, "must be a finite number")
    text = repr(value)
    if "e" in text or "E" in text:  # no exponent: the gateway expects a plain number
        text = format(Decimal(text), "f")
    return text


def _is_iso8601(text: str) -> bool:
    for parse in (date.fromisoformat, datetime.fromisoformat):
        try:
            parse(text)
        except ValueError:
            continue
        return True
    return False


def encode(params: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> str:
    """Percent-encode names and values as UTF-8, the way Totango documents it.

    A space becomes ``%20`` and ``&``, ``=``, ``+`` and ``#`` are escaped, so nothing in an
    id or a name can split into a second parameter. The dot after ``sdr_o``/``sdr_u`` is an
    unreserved character and stays literal.
    """
    return "&".join(f"{quote(name, safe='')}={quote(value, safe='')}" for name, value in params)


def batch_items(events: Any) -> list[tuple[str, dict[str, Any]]]:
    """The ``(task, kwargs)`` pairs of a batch, or ``InvalidEvent("events", ...)``.

    Only the batch's shape is checked here: a list of at most ``MAX_BATCH_EVENTS`` objects,
    each with a task name and an object of keyword arguments. Each event is then validated
    on its own by ``from_message``, so one bad event does not sink its neighbours.
    """
    if not isinstance(events, list):
        raise InvalidEvent("events", "must be a list of {task, kwargs} objects")
    if len(events) > MAX_BATCH_EVENTS:
        raise InvalidEvent("events", f"has more than {MAX_BATCH_EVENTS} events")
    items = []
    for element in events:
        if not isinstance(element, Mapping) or set(element) != {"task", "kwargs"}:
            raise InvalidEvent("events", "each element must be an object {task, kwargs}")
        task, kwargs = element["task"], element["kwargs"]
        if not isinstance(task, str) or not isinstance(kwargs, Mapping):
            raise InvalidEvent("events", "task must be a string and kwargs an object")
        items.append((task, dict(kwargs)))
    return items
