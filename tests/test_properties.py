"""Properties of ``events.from_message`` over thousands of generated messages (hypothesis).

Whatever comes off the wire, the result is either an ``InvalidEvent`` naming something that
was in the message, or an event whose encoding decodes back to exactly the parameters the
message asked for. Nothing else is ever raised.
"""

from __future__ import annotations

import math
from collections import Counter
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qsl

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from worker import events
from worker.errors import InvalidEvent
from worker.events import (
    MAX_ATTRIBUTES,
    MAX_ID_LENGTH,
    MAX_NAME_LENGTH,
    MAX_VALUE_LENGTH,
    TRACK_ACTIVITY,
    UPDATE_ACCOUNT,
    UPDATE_USER,
)

TASKS = [TRACK_ACTIVITY, UPDATE_ACCOUNT, UPDATE_USER]
TASK_IDS = ["activity", "update_account", "update_user"]
DEFAULT_SID = "SP-1-2"

#: Where each kind takes attributes, in build order: (argument, parameter prefix).
ATTRIBUTE_ARGS = {
    TRACK_ACTIVITY: [("account_attributes", "sdr_o"), ("user_attributes", "sdr_u")],
    UPDATE_ACCOUNT: [("attributes", "sdr_o")],
    UPDATE_USER: [("account_attributes", "sdr_o"), ("attributes", "sdr_u")],
}
ID_ARGS = {
    TRACK_ACTIVITY: ["account_id", "user_id", "activity", "module"],
    UPDATE_ACCOUNT: ["account_id"],
    UPDATE_USER: ["account_id", "user_id"],
}
OPTIONAL_TEXT_ARGS = {
    TRACK_ACTIVITY: ["account_name"],
    UPDATE_ACCOUNT: ["account_name"],
    UPDATE_USER: [],
}
ALL_ARGS = {
    task: {
        *ID_ARGS[task],
        *OPTIONAL_TEXT_ARGS[task],
        *(arg for arg, _ in ATTRIBUTE_ARGS[task]),
        "service_id",
        "event_id",
        "writeback",
    }
    for task in TASKS
}
GENERAL_FIELDS = {"task", "arguments", "event_id", "service_id"}
NAMED_ATTRIBUTES = sorted(
    events.DATE_ATTRIBUTES | events.YES_NO_ATTRIBUTES | events.NUMBER_ATTRIBUTES
)
_CONTROL = {chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]}

PROPERTY_SETTINGS = settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def chance(percent: int) -> st.SearchStrategy[bool]:
    """True about ``percent`` times in a hundred. Hypothesis favours the ends of a range, so
    the rare outcome sits in the middle of it."""
    if percent <= 50:
        return st.integers(0, 99).map(lambda i: 40 <= i < 40 + percent)
    return st.integers(0, 99).map(lambda i: not 40 <= i < 140 - percent)


def often(good: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` about eight times in ten, so enough generated messages are valid."""
    return chance(80).flatmap(lambda yes: good if yes else other)


# --- text ---------------------------------------------------------------------------------------

TRICKY_CHARS = st.sampled_from(
    ["&", "=", "#", "+", "%", " ", "?", "/", ".", ";", "é", "日", "😀", "\u3000", "\u2028"]
)
BAD_CHARS = st.sampled_from(["\n", "\r", "\t", "\x00", "\x1f", "\x7f", "\x85", "\ud800", "\udfff"])
#: Every code point, surrogates and control characters included.
ANY_CHAR = st.one_of(st.characters(exclude_categories=()), TRICKY_CHARS, BAD_CHARS)
ANY_TEXT = st.text(ANY_CHAR, max_size=12)
#: Text that a name or an id may hold: no control characters, no surrogates, not blank.
SAFE_CHAR = st.one_of(st.characters(exclude_categories=("Cc", "Cs")), TRICKY_CHARS)
SAFE_TEXT = st.text(SAFE_CHAR, min_size=1, max_size=12).filter(lambda s: bool(s.strip()))
LIMIT_TEXT = st.sampled_from(
    [
        "i" * MAX_ID_LENGTH,
        "i" * (MAX_ID_LENGTH + 1),
        "n" * MAX_NAME_LENGTH,
        "n" * (MAX_NAME_LENGTH + 1),
        "v" * MAX_VALUE_LENGTH,
        "v" * (MAX_VALUE_LENGTH + 1),
        "",
        "   ",
    ]
)
TEXT = st.one_of(SAFE_TEXT, ANY_TEXT, LIMIT_TEXT)

# --- values -------------------------------------------------------------------------------------

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([10**5000, -(10**300)]),
    st.floats(),  # nan, inf and subnormals included
    TEXT,
    st.sampled_from(
        [
            "2026-01-31",
            "2026-01-31T10:00:00Z",
            "2026-01-31T10:00:00+02:00",
            "31/01/2026",
            "2026-13-01",
            "yes",
            "no",
            "YES",
            "1200.5",
            "1,200",
            "$1200",
            "1e3",
        ]
    ),
)
NESTED = st.one_of(
    st.lists(SCALARS, max_size=2),
    st.dictionaries(ANY_TEXT, SCALARS, max_size=2),
)
VALUES = often(SCALARS, NESTED)
NAMES = often(
    st.one_of(
        st.sampled_from([*NAMED_ATTRIBUTES, "account_name", "Success Manager", "parent_id"]),
        SAFE_TEXT,
    ),
    st.one_of(ANY_TEXT, LIMIT_TEXT, st.integers(-2, 2)),
)
ATTRIBUTES = often(
    st.dictionaries(NAMES, VALUES, min_size=1, max_size=4),
    st.one_of(
        st.none(),
        st.dictionaries(NAMES, st.none(), max_size=2),
        st.sampled_from(
            [{f"k{i}": i for i in range(n)} for n in (MAX_ATTRIBUTES, MAX_ATTRIBUTES + 1)]
        ),
        st.lists(TEXT, max_size=2),
        TEXT,
        st.integers(),
    ),
)
IDS = often(
    st.one_of(SAFE_TEXT, st.integers()), st.one_of(TEXT, st.floats(), st.booleans(), NESTED)
)
SERVICE_IDS = often(
    st.one_of(st.none(), st.sampled_from(["SP-1-2", "SP-0000-11"])),
    st.one_of(st.sampled_from(["SP-1-2\n", "sp-1-2", "SP-\u0661-2", "SP-1"]), TEXT, st.integers()),
)
EVENT_IDS = often(
    st.one_of(st.none(), SAFE_TEXT, st.integers()), st.one_of(TEXT, st.booleans(), st.floats())
)
WRITEBACK = often(st.booleans(), st.one_of(st.none(), st.integers(), TEXT))

ARG_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "account_id": IDS,
    "user_id": IDS,
    "activity": IDS,
    "module": IDS,
    "account_name": often(st.one_of(st.none(), SAFE_TEXT), st.one_of(TEXT, st.integers())),
    "account_attributes": ATTRIBUTES,
    "user_attributes": ATTRIBUTES,
    "attributes": ATTRIBUTES,
    "service_id": SERVICE_IDS,
    "event_id": EVENT_IDS,
    "writeback": WRITEBACK,
}
#: Names that are arguments of some kind, plus the internal one that no message may set.
OTHER_ARGS = sorted(set(ARG_VALUES) | {"default_service_id", "positional"})


@st.composite
def messages(draw: st.DrawFn, task: str) -> Any:
    """The keyword arguments of one message, with arguments missing, extra or of any type."""
    kwargs: dict[Any, Any] = {}
    mandatory = {*ID_ARGS[task], *(["attributes"] if task != TRACK_ACTIVITY else [])}
    for arg in sorted(ALL_ARGS[task]):
        if draw(chance(95 if arg in mandatory else 50)):
            kwargs[arg] = draw(ARG_VALUES[arg])
    if draw(chance(10)):
        kwargs[draw(st.one_of(st.sampled_from(OTHER_ARGS), ANY_TEXT))] = draw(SCALARS)
    if draw(chance(3)):
        return draw(st.one_of(st.lists(SCALARS, max_size=2), TEXT, st.none()))
    return kwargs


# --- the oracle ---------------------------------------------------------------------------------


def allowed_fields(task: str, kwargs: Any) -> set[Any]:
    """What an InvalidEvent may name: an argument, an attribute name in the input, or a
    general field."""
    fields: set[Any] = {*ALL_ARGS[task], *GENERAL_FIELDS}
    if isinstance(kwargs, dict):
        fields |= set(kwargs)
        for arg, _ in ATTRIBUTE_ARGS[task]:
            if isinstance(kwargs.get(arg), dict):
                fields |= set(kwargs[arg])
    return fields


def check_refusal(exc: InvalidEvent, task: str, kwargs: Any) -> None:
    field = exc.field
    assert isinstance(field, str)
    assert field
    assert field in allowed_fields(task, kwargs)
    assert exc.code == f"invalid:{field}"
    assert isinstance(exc.reason, str)
    assert exc.reason
    # The field becomes a dead-letter reason, a metric label and a Sentry tag: safe text only.
    field.encode("utf-8")
    assert not _CONTROL & set(field)
    assert len(field) <= MAX_NAME_LENGTH


def rendered(prefix: str, name: str, value: Any) -> str:
    """The wire form of one attribute value, worked out without events.py where possible.
    Contact and Key Contact map a bool to yes/no under ``sdr_u`` only."""
    if prefix == "sdr_u" and name in events.YES_NO_ATTRIBUTES and isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = events.attribute_value(prefix, name, value)
        assert text is not None
        assert "e" not in text.lower(), "a float is sent without an exponent"
        assert float(text) == value
        return text
    assert isinstance(value, str)
    return value


def as_id(value: Any) -> str:
    return str(value) if isinstance(value, int) else value


def expected_event_id(kwargs: dict[str, Any]) -> str:
    """The message's event id (an integer one as its decimal form), else the task id."""
    value = kwargs.get("event_id")
    return "e" if value is None else as_id(value)


def expected_params(task: str, kwargs: dict[str, Any]) -> Counter[tuple[str, str]]:
    service_id = kwargs.get("service_id")
    params = [
        ("sdr_s", DEFAULT_SID if service_id is None else service_id),
        ("sdr_o", as_id(kwargs["account_id"])),
    ]
    if task != UPDATE_ACCOUNT:
        params.append(("sdr_u", as_id(kwargs["user_id"])))
    if task == TRACK_ACTIVITY:
        params += [("sdr_a", kwargs["activity"]), ("sdr_m", kwargs["module"])]
    if kwargs.get("account_name") is not None:
        params.append(("sdr_o.account_name", kwargs["account_name"]))
    for arg, prefix in ATTRIBUTE_ARGS[task]:
        for name, value in (kwargs.get(arg) or {}).items():
            if value is not None:
                params.append((f"{prefix}.{name}", rendered(prefix, name, value)))
    if kwargs.get("writeback") is True:
        params.append(("enableWriteback", "true"))
    return Counter(params)


def check_event(event: events.Event, task: str, kwargs: dict[str, Any]) -> None:
    decoded = parse_qsl(events.encode(event.params), keep_blank_values=True, strict_parsing=True)
    assert decoded == list(event.params), "encoding split, added or dropped a parameter"
    names = [name for name, _ in event.params]
    assert names.count("sdr_s") == 1
    assert names.count("sdr_o") == 1
    assert Counter(event.params) == expected_params(task, kwargs)
    assert event.task == task
    assert event.account_id == as_id(kwargs["account_id"])
    assert event.user_id == (None if task == UPDATE_ACCOUNT else as_id(kwargs["user_id"]))
    assert ("sdr_s", event.service_id) in event.params
    assert event.event_id == expected_event_id(kwargs)


def outcome(task: str, kwargs: Any) -> events.Event | InvalidEvent:
    try:
        return events.from_message(task, kwargs, event_id="e", default_service_id=DEFAULT_SID)
    except InvalidEvent as exc:
        return exc


# --- the properties -----------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS, ids=TASK_IDS)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_any_message_is_refused_with_a_field_or_encoded_exactly(
    task: str, data: st.DataObject
) -> None:
    """Any message gives an InvalidEvent naming its input, or an exactly encoded event; no
    other exception (UnicodeEncodeError, TypeError, bare ValueError) ever escapes."""
    kwargs = data.draw(messages(task), label="kwargs")
    result = outcome(task, kwargs)
    if isinstance(result, InvalidEvent):
        named = result.field if result.field in ALL_ARGS[task] | GENERAL_FIELDS else "<attribute>"
        event(f"refused, naming {named}")
        check_refusal(result, task, kwargs)
    else:
        event("accepted")
        check_event(result, task, kwargs)


# Valid messages only: validation must never refuse what the documentation allows.

GOOD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(ANY_CHAR.filter(lambda c: not 0xD800 <= ord(c) <= 0xDFFF), max_size=20),
)
#: Every date and date-time Python writes with ``isoformat`` (what the producer API sends for
#: a ``date`` or ``datetime``), with and without a UTC offset of whole minutes.
OFFSETS = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
ISO_DATES = st.one_of(
    st.dates().map(date.isoformat),
    st.datetimes().map(datetime.isoformat),
    st.datetimes(timezones=OFFSETS).map(datetime.isoformat),
    st.datetimes().map(lambda d: d.isoformat(timespec="minutes")),
    st.datetimes(timezones=st.just(UTC)).map(
        lambda d: d.isoformat(timespec="seconds").replace("+00:00", "Z")
    ),
)
GOOD_BY_NAME: dict[str, st.SearchStrategy[Any]] = {
    **{name: st.one_of(st.none(), ISO_DATES) for name in events.DATE_ATTRIBUTES},
    **{
        name: st.sampled_from(["yes", "no", True, False, None]) for name in events.YES_NO_ATTRIBUTES
    },
    "Contract Value": st.one_of(
        st.integers(-(10**20), 10**20),
        st.floats(allow_nan=False, allow_infinity=False),
        st.from_regex(r"-?[0-9]{1,12}(\.[0-9]{1,6})?", fullmatch=True),
    ),
}


@st.composite
def good_attributes(draw: st.DrawFn, prefix: str) -> dict[str, Any]:
    names = draw(
        st.lists(
            st.one_of(st.sampled_from(NAMED_ATTRIBUTES), SAFE_TEXT).filter(
                lambda name: events.misspelt_named_attribute(prefix, name) is None
            ),
            max_size=6,
            unique=True,
        )
    )
    rules = events.NAMED_ATTRIBUTES[prefix]
    return {
        # A named attribute without a value rule (parent_id, product_id) takes custom values.
        name: draw(
            GOOD_BY_NAME[name] if name in rules and name in GOOD_BY_NAME else custom_values(name)
        )
        for name in names
    }


def custom_values(name: str) -> st.SearchStrategy[Any]:
    """A custom attribute takes any good value; one named like the other prefix's rule
    (an account ``Contact``) still gets that rule's values sometimes."""
    if name in GOOD_BY_NAME:
        return st.one_of(GOOD_BY_NAME[name], GOOD_VALUES)
    return GOOD_VALUES


GOOD_IDS = st.one_of(SAFE_TEXT, st.integers())


@st.composite
def good_messages(draw: st.DrawFn, task: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"account_id": draw(GOOD_IDS)}
    if task != UPDATE_ACCOUNT:
        kwargs["user_id"] = draw(GOOD_IDS)
    if task == TRACK_ACTIVITY:
        kwargs["activity"] = draw(SAFE_TEXT)
        kwargs["module"] = draw(SAFE_TEXT)
    for arg, prefix in ATTRIBUTE_ARGS[task]:
        if arg == "attributes" or draw(st.booleans()):
            kwargs[arg] = draw(good_attributes(prefix))
    if task != UPDATE_USER and draw(st.booleans()):
        kwargs["account_name"] = draw(SAFE_TEXT)
        for arg in ("attributes", "account_attributes"):
            kwargs.get(arg, {}).pop("account_name", None)
    if draw(st.booleans()):
        kwargs["service_id"] = draw(st.from_regex(r"SP-[0-9]{1,6}-[0-9]{1,4}", fullmatch=True))
    if draw(st.booleans()):
        kwargs["event_id"] = draw(st.one_of(SAFE_TEXT, st.integers(-(10**30), 10**30)))
    if draw(st.booleans()):
        kwargs["writeback"] = draw(st.one_of(st.booleans(), st.none()))
    return kwargs


def has_value(attributes: dict[str, Any] | None) -> bool:
    return any(value is not None for value in (attributes or {}).values())


@pytest.mark.parametrize("task", TASKS, ids=TASK_IDS)
@settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(data=st.data())
def test_valid_message_is_accepted_and_encoded_exactly(task: str, data: st.DataObject) -> None:
    """A message within every documented rule is never refused, and encodes exactly."""
    kwargs = data.draw(good_messages(task), label="kwargs")
    if task == UPDATE_ACCOUNT:
        assume(has_value(kwargs.get("attributes")) or "account_name" in kwargs)
    if task == UPDATE_USER:
        assume(has_value(kwargs["attributes"]))
    result = outcome(task, kwargs)
    assert not isinstance(result, InvalidEvent), f"refused: {result}"
    check_event(result, task, kwargs)


@PROPERTY_SETTINGS
@given(task=ANY_TEXT, kwargs=st.one_of(st.dictionaries(ANY_TEXT, SCALARS, max_size=3), SCALARS))
def test_unknown_task_is_always_refused_as_task(task: str, kwargs: Any) -> None:
    """Any task name that is not one of the three is refused as ``task``, whatever the body."""
    assume(task not in events.BUILDERS)
    result = outcome(task, kwargs)
    assert isinstance(result, InvalidEvent)
    assert result.field == "task"


@settings(max_examples=500, deadline=None)
@given(value=st.floats(allow_nan=False, allow_infinity=False))
def test_every_finite_float_is_a_plain_contract_value(value: float) -> None:
    """Any finite float is accepted as Contract Value and rendered without an exponent."""
    text = events.attribute_value("sdr_o", "Contract Value", value)
    assert text is not None
    assert float(text) == value
    assert "e" not in text.lower()
    assert len(text) <= MAX_VALUE_LENGTH
    assert math.isfinite(float(text))


@settings(max_examples=500, deadline=None)
@given(name=st.sampled_from(sorted(events.DATE_ATTRIBUTES)), value=ISO_DATES)
def test_every_python_isoformat_is_an_accepted_date(name: str, value: str) -> None:
    """What ``date.isoformat`` and ``datetime.isoformat`` write (the producer API's form for
    date objects) is always an accepted date, sent unchanged."""
    assert events.attribute_value("sdr_o", name, value) == value


PREFIXED_NAMES = [
    (prefix, name) for prefix, names in events.NAMED_ATTRIBUTES.items() for name in sorted(names)
]
INVISIBLE = st.sampled_from(["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad"])


@st.composite
def variants(draw: st.DrawFn) -> tuple[str, str, str]:
    """A named attribute with one or more of: its case changed, whitespace around it, an
    invisible character inside, its spaces percent-encoded."""
    prefix, name = draw(st.sampled_from(PREFIXED_NAMES))
    variant = name
    changes = draw(st.sets(st.sampled_from(["case", "space", "invisible", "percent"]), min_size=1))
    if "case" in changes:
        flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
        variant = "".join(c.swapcase() if f else c for c, f in zip(variant, flips, strict=True))
    if "percent" in changes and " " in variant:
        variant = variant.replace(" ", draw(st.sampled_from(["%20", "%20"])))
    if "invisible" in changes:
        at = draw(st.integers(0, len(variant)))
        variant = variant[:at] + draw(INVISIBLE) + variant[at:]
    if "space" in changes:
        variant = (
            draw(st.sampled_from(["", " ", "  ", "\u00a0"]))
            + variant
            + draw(st.sampled_from([" ", "\u3000", "\u00a0"]))
        )
    assume(variant != name)
    return prefix, name, variant


@settings(max_examples=1000, deadline=None)
@given(variant=variants())
def test_every_spelling_variant_of_a_named_attribute_is_refused_with_its_name(
    variant: tuple[str, str, str],
) -> None:
    """However a named attribute is misspelt (case, whitespace, invisible characters,
    percent-encoding), it is refused naming the field, and the hint names the attribute."""
    prefix, name, written = variant
    task, arg = (UPDATE_ACCOUNT, "attributes") if prefix == "sdr_o" else (UPDATE_USER, "attributes")
    kwargs = {
        "account_id": "a",
        arg: {written: "x"},
        **({"user_id": "u"} if task == UPDATE_USER else {}),
    }
    result = outcome(task, kwargs)
    assert isinstance(result, InvalidEvent)
    assert result.field == written
    assert repr(name) in result.reason
