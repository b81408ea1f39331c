"""PURE: the event model, its validation, and its gateway parameters.

One module decides what a valid event is, for the producer API and the worker alike. It
imports neither celery nor an HTTP client, so every rule is testable as a table.
"""

from __future__ import annotations

import functools
import math
import re
import time
import unicodedata
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import quote, unquote

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

#: Totango's named attributes with rules. Each rule belongs to a prefix, as Totango's table
#: has it: the dates and Contract Value are account (``sdr_o.``) rules, Contact and Key Contact
#: user (``sdr_u.``) rules. The same name under the other prefix is a custom attribute.
DATE_ATTRIBUTES = frozenset({"Create Date", "Contract Renewal Date", "Contract Start Date"})
YES_NO_ATTRIBUTES = frozenset({"Contact", "Key Contact"})
NUMBER_ATTRIBUTES = frozenset({"Contract Value"})
#: Every named attribute of Totango's table, by prefix: a spelling variant of one of these
#: (case, whitespace, an invisible character, percent-encoding) is refused with a hint,
#: because sent as it is it makes a junk attribute in Totango and skips the rule.
NAMED_ATTRIBUTES: dict[str, frozenset[str]] = {
    "sdr_o": DATE_ATTRIBUTES
    | NUMBER_ATTRIBUTES
    | frozenset({"Success Manager", "parent_id", "product_id"}),
    "sdr_u": YES_NO_ATTRIBUTES,
}

CONTRACT_VALUE_RULE = (
    "must be a valid number without comma separator and currency sign: an optional "
    "leading minus, digits, and optionally a point followed by digits, such as 1200.5"
)
DATE_RULE = (
    "must be an ISO 8601 date string in the extended calendar form: YYYY-MM-DD, or "
    "YYYY-MM-DDThh:mm[:ss[.fraction]] with an optional Z or +hh:mm, such as 2026-01-31"
)

#: The extended calendar forms, and only those: ASCII digits, ``-`` and ``:`` separators,
#: ``T`` between date and time, an offset of hours and minutes. ``fromisoformat`` (used
#: before) also took basic and week forms, any separator, seconds in an offset and junk.
_ISO_DATE_RE = re.compile(
    r"(?P<year>[0-9]{4})-(?P<month>[0-9]{2})-(?P<day>[0-9]{2})"
    r"(?:T(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2})(?::(?P<second>[0-9]{2})(?:\.[0-9]+)?)?"
    r"(?:Z|[+-](?P<off_hour>[0-9]{2}):(?P<off_minute>[0-9]{2}))?)?"
)
_PERCENT_ESCAPE_RE = re.compile(r"%[0-9A-Fa-f]{2}")
#: Characters that render as nothing but are not Unicode format characters (category Cf,
#: which covers the zero-width space, joiners, marks and the BOM).
_INVISIBLE_EXTRA = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u3164\uffa0") | frozenset(
    chr(c) for c in range(0xFE00, 0xFE10)
)

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
    #: When it happened, in epoch milliseconds (``occurred_at``); never sent to the gateway,
    #: which takes no time. ``None``: the newest-value rule does not apply to it.
    occurred_at: int | None = None


def track_activity(
    *,
    account_id: Any,
    user_id: Any,
    activity: Any,
    module: Any,
    account_name: Any = None,
    account_attributes: Any = None,
    user_attributes: Any = None,
    writeback: Any = False,
    service_id: Any = None,
    event_id: Any = None,
    occurred_at: Any = None,
    default_service_id: str | None = None,
) -> Event:
    """An activity, optionally with account and user attributes in the same call."""
    ids = _ids(
        service_id, default_service_id, account_id, user_id, event_id, occurred_at=occurred_at
    )
    params = [*ids.head, ("sdr_a", _text("activity", activity)), ("sdr_m", _text("module", module))]
    params += _account_name(account_name, account_attributes)
    params += _attributes("sdr_o", "account_attributes", account_attributes)
    params += _attributes("sdr_u", "user_attributes", user_attributes)
    return ids.event(TRACK_ACTIVITY, params + _writeback(writeback))


def update_account(
    *,
    account_id: Any,
    attributes: Any = None,
    account_name: Any = None,
    writeback: Any = False,
    service_id: Any = None,
    event_id: Any = None,
    occurred_at: Any = None,
    default_service_id: str | None = None,
) -> Event:
    """Account attributes (``account_name`` alone is one); ``writeback=True`` asks Totango
    to write them to Salesforce."""
    ids = _ids(
        service_id, default_service_id, account_id, _NO_USER, event_id, occurred_at=occurred_at
    )
    attrs = _account_name(account_name, attributes) + _attributes("sdr_o", "attributes", attributes)
    if not attrs:
        raise InvalidEvent("attributes", "at least one account attribute is required")
    return ids.event(UPDATE_ACCOUNT, [*ids.head, *attrs, *_writeback(writeback)])


def update_user(
    *,
    account_id: Any,
    user_id: Any,
    attributes: Any,
    account_attributes: Any = None,
    writeback: Any = False,
    service_id: Any = None,
    event_id: Any = None,
    occurred_at: Any = None,
    default_service_id: str | None = None,
) -> Event:
    """User attributes, optionally with account attributes in the same call."""
    ids = _ids(
        service_id, default_service_id, account_id, user_id, event_id, occurred_at=occurred_at
    )
    user_attrs = _attributes("sdr_u", "attributes", attributes)
    if not user_attrs:
        raise InvalidEvent("attributes", "at least one user attribute is required")
    account_attrs = _attributes("sdr_o", "account_attributes", account_attributes)
    tail = _writeback(writeback)
    return ids.event(UPDATE_USER, [*ids.head, *account_attrs, *user_attrs, *tail])


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
    services: Collection[str] | None = None,
) -> Event:
    """Build an event from a task's keyword arguments, as they came off the wire.

    ``event_id`` is used when the message carries none (the worker derives it from the task
    id, which stays the same through every retry). ``services``, when given (the service
    map's ids), are the only service ids accepted: an event for another is refused rather
    than sent to a gateway that is not its own.
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
    event = builder(**args, default_service_id=default_service_id)
    if services is not None and event.service_id not in services:
        raise InvalidEvent(
            "service_id",
            f"{event.service_id} is not in TOTANGO_SERVICE_MAP, so it has no gateway",
        )
    return event


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
    occurred_at: int | None

    def event(self, task: str, params: list[tuple[str, str]]) -> Event:
        if self.event_id is None:
            raise InvalidEvent("event_id", "is required")
        return Event(
            task,
            self.event_id,
            self.service_id,
            self.account_id,
            self.user_id,
            tuple(params),
            self.occurred_at,
        )


#: Marks a kind of call that takes no user (an account update), as opposed to a user id of None.
_NO_USER: Any = object()


def _ids(
    service_id: Any,
    default_service_id: str | None,
    account_id: Any,
    user_id: Any,
    event_id: Any,
    *,
    occurred_at: Any = None,
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
        eid = event_id_text(event_id)
    return _Ids(sid, account, user, eid, tuple(head), occurred_at_ms(occurred_at))


#: ``occurred_at`` as epoch milliseconds: from 2000-01-01 to 2100-01-01 (UTC). A value in
#: the same range divided by 1000 is epoch *seconds*, the likeliest mistake.
_EARLIEST_MS = 946_684_800_000
_LATEST_MS = 4_102_444_800_000
#: The most ``occurred_at`` may be ahead of this host's clock: a time further ahead (a skewed
#: clock, a unit mix-up) would make that event's values beat every later one until then.
MAX_FUTURE_MS = 24 * 3600 * 1000
OCCURRED_AT_RULE = (
    "must be the time the event happened: an ISO 8601 date and time with its offset "
    "(Z for UTC), such as 2026-01-31T09:30:00.250Z, or epoch milliseconds as an integer"
)


def occurred_at_ms(value: Any, *, now_ms: int | None = None) -> int | None:
    """``occurred_at`` in epoch milliseconds (``None`` when it is absent), or an
    ``InvalidEvent("occurred_at", ...)`` that says why not."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if _EARLIEST_MS // 1000 <= value < _LATEST_MS // 1000:
            raise InvalidEvent(
                "occurred_at", f"{OCCURRED_AT_RULE}; {value} looks like epoch seconds"
            )
        if not _EARLIEST_MS <= value < _LATEST_MS:
            raise InvalidEvent("occurred_at", f"{OCCURRED_AT_RULE}, from 2000 to 2100")
        ms = value
    elif isinstance(value, str):
        ms = _iso_instant_ms(value)
    else:
        raise InvalidEvent("occurred_at", f"{OCCURRED_AT_RULE}; got a {type(value).__name__}")
    clock = round(time.time() * 1000) if now_ms is None else now_ms
    if ms > clock + MAX_FUTURE_MS:
        raise InvalidEvent(
            "occurred_at", "is more than a day ahead of this host's clock: check the producer's"
        )
    return ms


def _iso_instant_ms(text: str) -> int:
    """An extended-form ISO 8601 date, time and offset, as epoch milliseconds."""
    match = _iso_match(text)
    if match is None:
        raise InvalidEvent("occurred_at", OCCURRED_AT_RULE)
    if match["hour"] is None or not (text.endswith("Z") or match["off_hour"] is not None):
        raise InvalidEvent(
            "occurred_at", f"{OCCURRED_AT_RULE}; a time without its offset is ambiguous"
        )
    if text[:4] < "2000" or text[:4] >= "2100":
        raise InvalidEvent("occurred_at", f"{OCCURRED_AT_RULE}, from 2000 to 2100")
    instant = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (instant - _EPOCH) // timedelta(milliseconds=1)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def event_id_text(value: Any) -> str:
    """An event id as it is used everywhere (logs, task id, dead letters): a string; an
    integer id is accepted and becomes its decimal form."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > _MAX_INT_BITS:  # str() would raise a bare ValueError
            raise InvalidEvent("event_id", f"is longer than {MAX_EVENT_ID_LENGTH} characters")
        value = str(value)
    return _text("event_id", value, limit=MAX_EVENT_ID_LENGTH)


def _writeback(value: Any) -> list[tuple[str, str]]:
    """``enableWriteback=true`` for ``True``; nothing for ``False`` or a JSON null."""
    if value is None or value is False:
        return []
    if value is True:
        return [("enableWriteback", "true")]
    raise InvalidEvent("writeback", "must be true or false")


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
        _check_spelling(prefix, name)
        rendered = attribute_value(prefix, name, value)
        if rendered is not None:
            out.append((f"{prefix}.{name}", rendered))
    return out


def _is_safe_name(name: str) -> bool:
    try:
        _text("name", name)
    except InvalidEvent:
        return False
    return True


def _spelling_key(name: str) -> str:
    """What a name reads as: percent-escapes decoded, compatibility forms folded (a
    no-break space is a space), invisible characters dropped, whitespace collapsed, case
    folded."""
    text = _visible(name)
    if _PERCENT_ESCAPE_RE.search(text):  # after dropping invisibles: one may split an escape
        text = _visible(unquote(text, errors="replace"))
    return " ".join(text.split()).casefold()


def _visible(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    return "".join(char for char in text if not _invisible(char))


def _invisible(char: str) -> bool:
    return unicodedata.category(char) == "Cf" or char in _INVISIBLE_EXTRA


_SPELLINGS: dict[str, dict[str, str]] = {
    prefix: {_spelling_key(name): name for name in names}
    for prefix, names in NAMED_ATTRIBUTES.items()
}


#: Names an app sends are few and repeat on every event: each is folded (NFKC, a scan for
#: invisible characters) once, not once per event. Bounded, so a producer sending ever new
#: names costs the fold each time, never memory.
NAME_CACHE = 4096


@functools.lru_cache(maxsize=NAME_CACHE)
def misspelt_named_attribute(prefix: str, name: str) -> str | None:
    """The named attribute of ``prefix`` that ``name`` reads as without being spelt as it
    (``contact`` -> ``Contact`` under ``sdr_u``), or ``None``."""
    if name in NAMED_ATTRIBUTES[prefix]:
        return None
    return _SPELLINGS[prefix].get(_spelling_key(name))


def _check_spelling(prefix: str, name: str) -> None:
    """Refuse a name that reads as a named attribute of its prefix but is not spelt as it."""
    intended = misspelt_named_attribute(prefix, name)
    if intended is None:
        return
    if _PERCENT_ESCAPE_RE.search(name):
        how = "is percent-encoded (the worker encodes names itself)"
    elif any(_invisible(char) for char in name):
        codes = ", ".join(f"U+{ord(char):04X}" for char in name if _invisible(char))
        how = f"holds an invisible character ({codes})"
    elif name != name.strip():
        how = "has leading or trailing whitespace"
    elif name.casefold() == intended.casefold():
        how = "differs in case"
    else:
        how = "differs in spacing"
    raise InvalidEvent(
        name, f"{how}: did you mean the named attribute {intended!r}? Use exactly {intended!r}"
    )


def attribute_value(prefix: str, name: str, value: AttributeValue | object) -> str | None:
    """Render one attribute value under ``prefix`` (``sdr_o`` or ``sdr_u``) as the gateway
    expects it; ``None`` leaves it out. A named attribute's rule applies under its own
    prefix only."""
    if value is None:
        return None
    account = prefix == "sdr_o"
    if not account and name in YES_NO_ATTRIBUTES:
        return _yes_no(name, value)
    if account and name in DATE_ATTRIBUTES:
        return _date(name, value)
    if isinstance(value, bool):  # still checked below: a bool is no number
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
    if account and name in NUMBER_ATTRIBUTES and not _PLAIN_NUMBER_RE.fullmatch(text):
        raise InvalidEvent(name, CONTRACT_VALUE_RULE)
    return text


def _yes_no(name: str, value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value not in ("yes", "no"):
        raise InvalidEvent(name, "must be exactly 'yes' or 'no' (lowercase), or a bool")
    return str(value)


def _date(name: str, value: object) -> str:
    if not isinstance(value, str):  # an epoch or a float such as 20260131.0 is no date
        raise InvalidEvent(name, f"{DATE_RULE}; got a {type(value).__name__}")
    if not is_iso8601(value):
        raise InvalidEvent(name, DATE_RULE)
    return value


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


def is_iso8601(text: str) -> bool:
    """One of the extended calendar forms, naming a date and time that exist."""
    return _iso_match(text) is not None


_ISO_LIMITS = {"hour": 23, "minute": 59, "second": 59, "off_hour": 23, "off_minute": 59}


def _iso_match(text: str) -> re.Match[str] | None:
    """The parts of an extended calendar form naming a date and time that exist, or
    ``None``."""
    match = _ISO_DATE_RE.fullmatch(text)
    if match is None:
        return None
    try:
        date(int(match["year"]), int(match["month"]), int(match["day"]))
    except ValueError:  # 31 February, month 13, year 0
        return None
    if any(match[part] is not None and int(match[part]) > top for part, top in _ISO_LIMITS.items()):
        return None
    return match


def encode(params: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> str:
    """Percent-encode names and values as UTF-8, the way Totango documents it.

    A space becomes ``%20`` and ``&``, ``=``, ``+`` and ``#`` are escaped, so nothing in an
    id or a name can split into a second parameter. The dot after ``sdr_o``/``sdr_u`` is an
    unreserved character and stays literal.
    """
    return "&".join(f"{_quoted_name(name)}={quote(value, safe='')}" for name, value in params)


@functools.lru_cache(maxsize=NAME_CACHE)
def _quoted_name(name: str) -> str:
    """A parameter's name percent-encoded: names repeat on every event, values mostly not."""
    return quote(name, safe="")


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
