"""Validation rules and the exact gateway parameters of ``worker.events``, as tables.

Also the dead-letter envelope (``worker.envelope``), the record of an event that will not be
delivered.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

import pytest

from worker import events
from worker.envelope import Envelope, raw_body_fields
from worker.errors import InvalidEvent
from worker.events import (
    MAX_ATTRIBUTES,
    MAX_EVENT_ID_LENGTH,
    MAX_ID_LENGTH,
    MAX_NAME_LENGTH,
    MAX_VALUE_LENGTH,
    TRACK_ACTIVITY,
    UPDATE_ACCOUNT,
    UPDATE_USER,
)

ACTIVITY, ACCOUNT, USER = TRACK_ACTIVITY, UPDATE_ACCOUNT, UPDATE_USER
DEFAULT_SID = "SP-1-2"

#: The smallest valid message of each kind.
BASE: dict[str, dict[str, Any]] = {
    ACTIVITY: {
        "account_id": "acc-1",
        "user_id": "joe@example.com",
        "activity": "Login",
        "module": "Application",
    },
    ACCOUNT: {"account_id": "acc-1", "attributes": {"plan": "gold"}},
    USER: {"account_id": "acc-1", "user_id": "joe@example.com", "attributes": {"role": "admin"}},
}

#: Where an attribute lives in each kind of call: (task, argument, parameter prefix).
ATTRIBUTE_ARGS = [
    (ACTIVITY, "account_attributes", "sdr_o"),
    (ACTIVITY, "user_attributes", "sdr_u"),
    (ACCOUNT, "attributes", "sdr_o"),
    (USER, "attributes", "sdr_u"),
    (USER, "account_attributes", "sdr_o"),
]
ATTRIBUTE_IDS = [f"{task.split('.')[1]}.{arg}" for task, arg, _ in ATTRIBUTE_ARGS]

DROP = object()  # marks an argument to leave out of the message


def build(
    task: str, *, task_id: str | None = "task-id", default: str | None = DEFAULT_SID, **changes: Any
) -> events.Event:
    """The kind's smallest valid message with ``changes``, as the worker would read it."""
    kwargs = {**BASE[task], **changes}
    kwargs = {k: v for k, v in kwargs.items() if v is not DROP}
    return events.from_message(task, kwargs, event_id=task_id, default_service_id=default)


def refused(task: str, **changes: Any) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        build(task, **changes)
    exc = info.value
    assert exc.reason, "every refusal says why"
    assert exc.code == f"invalid:{exc.field}"
    assert str(exc) == f"{exc.field}: {exc.reason}"
    return exc


def with_attribute(arg: str, name: Any, value: Any) -> dict[str, Any]:
    """The changes that make ``arg`` hold one attribute."""
    return {arg: {name: value}}


def param(event: events.Event, name: str) -> str:
    values = [v for k, v in event.params if k == name]
    assert len(values) == 1, f"{name} appears {len(values)} times in {event.params}"
    return values[0]


def names(event: events.Event) -> list[str]:
    return [k for k, _ in event.params]


# --- the exact wire contract ----------------------------------------------------------------


def test_track_activity_with_every_argument_has_exact_params() -> None:
    """An activity with all optional arguments maps each one to its documented parameter."""
    event = events.from_message(
        ACTIVITY,
        {
            "account_id": "acc-1",
            "user_id": "joe@example.com",
            "activity": "Login",
            "module": "Application",
            "account_name": "ACME Inc.",
            "account_attributes": {"Account Type": "Demo", "Contract Value": 1200.5, "gone": None},
            "user_attributes": {"role": "admin", "Contact": True},
            "service_id": "SP-0000-11",
            "event_id": "evt-1",
        },
        event_id="task-id",
        default_service_id=DEFAULT_SID,
    )
    assert event.params == (
        ("sdr_s", "SP-0000-11"),
        ("sdr_o", "acc-1"),
        ("sdr_u", "joe@example.com"),
        ("sdr_a", "Login"),
        ("sdr_m", "Application"),
        ("sdr_o.account_name", "ACME Inc."),
        ("sdr_o.Account Type", "Demo"),
        ("sdr_o.Contract Value", "1200.5"),
        ("sdr_u.role", "admin"),
        ("sdr_u.Contact", "yes"),
    )
    assert (event.task, event.event_id, event.service_id) == (ACTIVITY, "evt-1", "SP-0000-11")
    assert (event.account_id, event.user_id) == ("acc-1", "joe@example.com")


def test_update_account_with_every_argument_has_exact_params() -> None:
    """An account update: display name, attributes, then enableWriteback=true last."""
    event = events.from_message(
        ACCOUNT,
        {
            "account_id": 42,
            "attributes": {"Create Date": "2026-01-31", "paid": False, "seats": 12},
            "account_name": "ACME Inc.",
            "writeback": True,
            "service_id": "SP-0000-11",
            "event_id": "evt-2",
        },
        event_id="task-id",
        default_service_id=DEFAULT_SID,
    )
    assert event.params == (
        ("sdr_s", "SP-0000-11"),
        ("sdr_o", "42"),
        ("sdr_o.account_name", "ACME Inc."),
        ("sdr_o.Create Date", "2026-01-31"),
        ("sdr_o.paid", "false"),
        ("sdr_o.seats", "12"),
        ("enableWriteback", "true"),
    )
    assert (event.task, event.event_id, event.account_id, event.user_id) == (
        ACCOUNT,
        "evt-2",
        "42",
        None,
    )


def test_update_user_with_every_argument_has_exact_params() -> None:
    """A user update: account attributes before user attributes, no activity parameters."""
    event = events.from_message(
        USER,
        {
            "account_id": "acc-1",
            "user_id": 7,
            "attributes": {"role": "admin", "Key Contact": "no"},
            "account_attributes": {"plan": "gold"},
            "service_id": "SP-0000-11",
            "event_id": "evt-3",
        },
        event_id="task-id",
        default_service_id=DEFAULT_SID,
    )
    assert event.params == (
        ("sdr_s", "SP-0000-11"),
        ("sdr_o", "acc-1"),
        ("sdr_u", "7"),
        ("sdr_o.plan", "gold"),
        ("sdr_u.role", "admin"),
        ("sdr_u.Key Contact", "no"),
    )
    assert (event.task, event.event_id, event.user_id) == (USER, "evt-3", "7")


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        (
            ACTIVITY,
            (
                ("sdr_s", "SP-1-2"),
                ("sdr_o", "acc-1"),
                ("sdr_u", "joe@example.com"),
                ("sdr_a", "Login"),
                ("sdr_m", "Application"),
            ),
        ),
        (ACCOUNT, (("sdr_s", "SP-1-2"), ("sdr_o", "acc-1"), ("sdr_o.plan", "gold"))),
        (
            USER,
            (
                ("sdr_s", "SP-1-2"),
                ("sdr_o", "acc-1"),
                ("sdr_u", "joe@example.com"),
                ("sdr_u.role", "admin"),
            ),
        ),
    ],
    ids=["activity", "update_account", "update_user"],
)
def test_minimal_message_has_only_mandatory_params(
    task: str, expected: tuple[tuple[str, str], ...]
) -> None:
    """The smallest valid message of each kind sends exactly its mandatory parameters."""
    event = build(task)
    assert event.params == expected
    assert event.event_id == "task-id", "the task id stands in when the message has no event id"


# --- mandatory arguments --------------------------------------------------------------------

MANDATORY = [
    (ACTIVITY, "account_id"),
    (ACTIVITY, "user_id"),
    (ACTIVITY, "activity"),
    (ACTIVITY, "module"),
    (ACCOUNT, "account_id"),
    (USER, "account_id"),
    (USER, "user_id"),
    (USER, "attributes"),
]
MANDATORY_IDS = [f"{t.split('.')[1]}-{f}" for t, f in MANDATORY]


@pytest.mark.parametrize(("task", "field"), MANDATORY, ids=MANDATORY_IDS)
def test_missing_mandatory_argument_is_named(task: str, field: str) -> None:
    """Leaving a mandatory argument out of the message names that argument."""
    exc = refused(task, **{field: DROP})
    assert (exc.field, exc.reason) == (field, "is required")


@pytest.mark.parametrize(("task", "field"), MANDATORY, ids=MANDATORY_IDS)
def test_mandatory_argument_given_as_null_is_named(task: str, field: str) -> None:
    """A JSON null for a mandatory argument is refused, never dropped from the call.

    (Before a fix, ``user_id: null`` sent an activity without its mandatory ``sdr_u``.)
    """
    exc = refused(task, **{field: None})
    assert exc.field == field


def test_two_missing_arguments_name_the_first_in_signature_order() -> None:
    """With activity and module both missing, the error still names one argument."""
    exc = refused(ACTIVITY, activity=DROP, module=DROP)
    assert (exc.field, exc.reason) == ("activity", "is required")


@pytest.mark.parametrize(
    ("task", "attributes", "extra"),
    [
        (ACCOUNT, {}, {}),
        (ACCOUNT, {"plan": None}, {}),
        (ACCOUNT, {"plan": None, "seats": None}, {}),
        (USER, {}, {}),
        (USER, {"role": None}, {}),
        (USER, {"role": None}, {"account_attributes": {"plan": "gold"}}),
    ],
    ids=[
        "account-empty",
        "account-one-none",
        "account-all-none",
        "user-empty",
        "user-one-none",
        "user-account-attrs-do-not-count",
    ],
)
def test_update_needs_one_attribute_with_a_value(
    task: str, attributes: dict[str, Any], extra: dict[str, Any]
) -> None:
    """Attributes whose values are all None count as none.

    Account attributes do not make a user update.
    """
    exc = refused(task, attributes=attributes, **extra)
    assert exc.field == "attributes"
    assert "at least one" in exc.reason


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"attributes": {}, "account_name": "ACME"}, ("sdr_o.account_name", "ACME")),
        ({"attributes": {"account_name": "ACME"}}, ("sdr_o.account_name", "ACME")),
        ({"attributes": None, "account_name": "ACME"}, ("sdr_o.account_name", "ACME")),
        ({"attributes": {"plan": None}, "account_name": "ACME"}, ("sdr_o.account_name", "ACME")),
    ],
    ids=["arg-empty-attrs", "as-attribute", "arg-null-attrs", "arg-with-none-attr"],
)
def test_account_name_alone_is_an_account_attribute(
    changes: dict[str, Any], expected: tuple[str, str]
) -> None:
    """``account_name`` is ``sdr_o.account_name``, so it alone makes a valid account update."""
    event = build(ACCOUNT, **changes)
    assert event.params[2:] == (expected,)


def test_account_name_alone_needs_no_attributes_argument() -> None:
    """update_account with only account_name (no attributes argument at all) is a valid
    account update (refused as ``attributes: is required`` before)."""
    event = build(ACCOUNT, attributes=DROP, account_name="ACME")
    assert event.params[2:] == (("sdr_o.account_name", "ACME"),)


def test_update_account_with_neither_attributes_nor_account_name_is_refused() -> None:
    """Without attributes and without account_name there is nothing to update."""
    exc = refused(ACCOUNT, attributes=DROP)
    assert (exc.field, exc.reason) == ("attributes", "at least one account attribute is required")


@pytest.mark.parametrize("task", [ACTIVITY, ACCOUNT])
def test_account_name_both_as_argument_and_attribute_is_refused(task: str) -> None:
    """Two display names for one account would be ambiguous: refused, naming account_name."""
    arg = "account_attributes" if task == ACTIVITY else "attributes"
    exc = refused(task, account_name="ACME", **{arg: {"account_name": "Acme"}})
    assert exc.field == "account_name"


def test_account_name_argument_with_null_attribute_is_sent_once() -> None:
    """A None ``account_name`` attribute is left out, so the argument is not a duplicate."""
    event = build(ACCOUNT, account_name="ACME", attributes={"account_name": None, "plan": "x"})
    assert param(event, "sdr_o.account_name") == "ACME"


@pytest.mark.parametrize("value", [42, "", "  ", "a\nb", "\ud800", "x" * (MAX_VALUE_LENGTH + 1)])
def test_bad_account_name_argument_is_refused(value: Any) -> None:
    """The display name argument is checked like any text: a string, non-empty, no controls."""
    assert refused(ACCOUNT, account_name=value).field == "account_name"


def test_account_name_argument_up_to_value_length_is_accepted() -> None:
    """The display name is a value, so its limit is MAX_VALUE_LENGTH, not MAX_NAME_LENGTH."""
    name = "n" * MAX_VALUE_LENGTH
    assert param(build(ACCOUNT, account_name=name), "sdr_o.account_name") == name


# --- ids --------------------------------------------------------------------------------------

ID_FIELDS = [(ACTIVITY, "account_id"), (ACTIVITY, "user_id"), (USER, "user_id")]
TEXT_FIELDS = [*ID_FIELDS, (ACTIVITY, "activity"), (ACTIVITY, "module"), (ACCOUNT, "account_id")]
TEXT_FIELD_IDS = [f"{t.split('.')[1]}-{f}" for t, f in TEXT_FIELDS]


@pytest.mark.parametrize(("task", "field"), TEXT_FIELDS, ids=TEXT_FIELD_IDS)
@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "must not be empty"),
        (" ", "must not be empty"),
        ("  \t ", "must not be empty"),
        ("\u3000", "must not be empty"),
        (None, "is required"),
    ],
    ids=["empty", "space", "whitespace", "ideographic-space", "none"],
)
def test_blank_id_or_name_is_refused(task: str, field: str, value: Any, reason: str) -> None:
    """Ids, activity and module must hold something other than whitespace."""
    exc = refused(task, **{field: value})
    assert (exc.field, exc.reason) == (field, reason)


@pytest.mark.parametrize(
    ("value", "sent"), [(12345, "12345"), (0, "0"), (-7, "-7"), (10**30, str(10**30))]
)
@pytest.mark.parametrize("field", ["account_id", "user_id"])
def test_int_id_is_sent_as_decimal(field: str, value: int, sent: str) -> None:
    """An integer id is accepted and sent as its decimal form."""
    event = build(ACTIVITY, **{field: value})
    assert param(event, "sdr_o" if field == "account_id" else "sdr_u") == sent


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (True, "bool"),
        (False, "bool"),
        (1.0, "float"),
        (1.5, "float"),
        ({"id": 1}, "dict"),
        (["a"], "list"),
    ],
    ids=["true", "false", "float-integral", "float", "dict", "list"],
)
@pytest.mark.parametrize("field", ["account_id", "user_id"])
def test_non_string_non_int_id_is_refused(field: str, value: Any, type_name: str) -> None:
    """Bools (although ints in Python), floats and containers are not ids."""
    exc = refused(ACTIVITY, **{field: value})
    assert (exc.field, exc.reason) == (field, f"must be a string, not {type_name}")


@pytest.mark.parametrize("field", ["account_id", "user_id"])
def test_huge_int_id_is_refused_as_invalid(field: str) -> None:
    """An int too long for str() raises InvalidEvent, not a bare ValueError (fixed bug)."""
    exc = refused(ACTIVITY, **{field: 10**5000})
    assert exc.field == field
    assert "longer than" in exc.reason


@pytest.mark.parametrize(
    ("field", "limit"),
    [
        ("account_id", MAX_ID_LENGTH),
        ("user_id", MAX_ID_LENGTH),
        ("activity", MAX_NAME_LENGTH),
        ("module", MAX_NAME_LENGTH),
        ("event_id", MAX_EVENT_ID_LENGTH),
    ],
)
def test_text_argument_length_limit(field: str, limit: int) -> None:
    """An id or name of exactly the limit passes; one character more is refused."""
    build(ACTIVITY, **{field: "x" * limit})
    exc = refused(ACTIVITY, **{field: "x" * (limit + 1)})
    assert (exc.field, exc.reason) == (field, f"is longer than {limit} characters")


@pytest.mark.parametrize(
    "field", ["account_id", "user_id", "activity", "module", "event_id", "account_name"]
)
@pytest.mark.parametrize(
    "value",
    ["a\nb", "a\rb", "a\x00b", "a\x1fb", "a\x7fb", "a\x85b", "tab\there"],
    ids=["newline", "cr", "nul", "unit-sep", "del", "c1-nel", "tab"],
)
def test_control_characters_in_text_arguments_are_refused(field: str, value: str) -> None:
    """Ids, names and the display name must not hold C0, DEL or C1 control characters."""
    exc = refused(ACTIVITY, **{field: value})
    assert (exc.field, exc.reason) == (field, "must not hold control characters")


@pytest.mark.parametrize(
    "field", ["account_id", "user_id", "activity", "module", "event_id", "account_name"]
)
def test_lone_surrogate_in_text_argument_is_invalid_not_unicode_error(field: str) -> None:
    """A lone surrogate (JSON can decode to one) is an InvalidEvent, not UnicodeEncodeError."""
    exc = refused(ACTIVITY, **{field: "ab\ud800"})
    assert (exc.field, exc.reason) == (field, "is not encodable as UTF-8")


# --- the service id ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message_value", "default", "sent"),
    [
        ("SP-9-9", "SP-1-2", "SP-9-9"),
        (None, "SP-1-2", "SP-1-2"),
        (DROP, "SP-1-2", "SP-1-2"),
        ("SP-0000-11", None, "SP-0000-11"),
        ("SP-1234567890-0", None, "SP-1234567890-0"),
    ],
    ids=["message-beats-default", "null-uses-default", "absent-uses-default", "no-default", "long"],
)
def test_service_id_source(message_value: Any, default: str | None, sent: str) -> None:
    """The message's service id wins over the worker default; the default fills in when absent."""
    event = build(ACTIVITY, default=default, service_id=message_value)
    assert param(event, "sdr_s") == sent
    assert event.service_id == sent


def test_service_id_missing_everywhere_is_refused() -> None:
    """No service id in the message and no default set: refused, naming service_id."""
    exc = refused(ACTIVITY, default=None)
    assert exc.field == "service_id"
    assert "required" in exc.reason


@pytest.mark.parametrize(
    "value",
    [
        "sp-1-2",
        "SP-1",
        "SP-1-2-3",
        "SP-a-b",
        "SP--2",
        "SP-1-2\n",
        " SP-1-2",
        "SP-1-2 ",
        "SP-\u0661-\u0662",
        "",
        12,
        ["SP-1-2"],
    ],
    ids=[
        "lowercase",
        "one-part",
        "three-parts",
        "letters",
        "empty-part",
        "trailing-newline",
        "leading-space",
        "trailing-space",
        "arabic-digits",
        "empty",
        "int",
        "list",
    ],
)
def test_malformed_service_id_is_refused_not_defaulted(value: Any) -> None:
    """A bad service id in the message is refused even though a good default exists.

    The trailing newline and the non-ASCII digits passed before a fix (``^...$`` and ``\\d``).
    """
    exc = refused(ACTIVITY, service_id=value)
    assert exc.field == "service_id"


def test_malformed_default_service_id_is_refused() -> None:
    """The default is checked like a message value."""
    assert refused(ACTIVITY, default="SP-x").field == "service_id"


# --- event ids -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message_value", "sent"),
    [("evt-9", "evt-9"), (None, "task-id"), (DROP, "task-id")],
    ids=["message-wins", "null-falls-back", "absent-falls-back"],
)
def test_message_event_id_beats_the_task_id(message_value: Any, sent: str) -> None:
    """The producer's event id travels with the event; the task id is only a fallback."""
    assert build(ACTIVITY, task_id="task-id", event_id=message_value).event_id == sent


def test_no_event_id_anywhere_is_refused() -> None:
    """Every event carries an id; with none in the message and no task id, it is refused."""
    assert refused(ACTIVITY, task_id=None).field == "event_id"


@pytest.mark.parametrize(
    "value",
    ["", "a\nb", True, 1.5, ["e"], 10**200, 10**5000],
    ids=["empty", "newline", "bool", "float", "list", "int-too-long", "int-over-str-limit"],
)
def test_malformed_event_id_in_message_is_refused(value: Any) -> None:
    """The message's event id must be non-empty text without control characters, or an
    integer of at most MAX_EVENT_ID_LENGTH digits (never a bare ValueError)."""
    assert refused(ACTIVITY, event_id=value).field == "event_id"


@pytest.mark.parametrize("task", [ACTIVITY, ACCOUNT, USER])
@pytest.mark.parametrize(("value", "sent"), [(17, "17"), (0, "0"), (-3, "-3")])
def test_integer_event_id_is_accepted_as_its_decimal_form(task: str, value: int, sent: str) -> None:
    """The README says ids may be integers: an integer event id is accepted, and the event
    carries its string form (refused as ``invalid:event_id`` before)."""
    assert build(task, event_id=value).event_id == sent


# --- named attributes with rules --------------------------------------------------------------

DATE_NAMES = sorted(events.DATE_ATTRIBUTES)


@pytest.mark.parametrize("name", DATE_NAMES)
@pytest.mark.parametrize(
    "value",
    [
        "2026-01-31",
        "2026-01-31T10:00:00Z",
        "2026-01-31T10:00:00+02:00",
        "2026-01-31T10:00:00.250",
        "2026-01-31T10:00",
        "2026-01-31T10:00Z",
        "2026-01-31T10:00-05:30",
        "2026-01-31T23:59:59.123456789+14:00",
        "2024-02-29",
    ],
)
def test_iso_8601_date_is_accepted(name: str, value: str) -> None:
    """The extended calendar forms (a date; a date and time to the minute, second or a
    fraction, with Z or an offset) are sent unchanged."""
    assert param(build(ACCOUNT, attributes={name: value}), f"sdr_o.{name}") == value


@pytest.mark.parametrize("name", DATE_NAMES)
@pytest.mark.parametrize(
    "value",
    [
        "31/01/2026",
        "yesterday",
        "2026-13-01",
        "2026-02-30",
        "2026-01-31T25:00",
        "2026-01-31\n",
        "",
        1769853600,
        True,
    ],
    ids=[
        "dmy",
        "word",
        "month-13",
        "feb-30",
        "hour-25",
        "trailing-newline",
        "empty",
        "epoch-int",
        "bool",
    ],
)
def test_non_iso_date_is_refused(name: str, value: Any) -> None:
    """A date attribute that is not ISO 8601 is refused, naming the attribute.

    (A bool was sent as ``true`` before a fix: it skipped the date check.)
    """
    exc = refused(ACCOUNT, attributes={name: value})
    assert exc.field == name
    assert "ISO 8601" in exc.reason


#: Accepted by ``fromisoformat`` (the check before), and not ISO 8601's extended calendar form.
LENIENT_DATES = [
    ("20260131", "basic-date"),
    ("20260131T1000", "basic-date-time"),
    ("2026-01-31 10:00", "space-separator"),
    ("2026-01-31X10:00", "other-separator"),
    ("2026-01-31t10:00", "lowercase-t"),
    ("2026-01-31T10", "hour-only"),
    ("2026-01-31T1000", "basic-time"),
    ("2026-01-31T10:00:00,5", "comma-fraction"),
    ("2026-01-31T10:00:00+0200", "basic-offset"),
    ("2026-01-31T10:00:00.5+02", "hour-offset"),
    ("2026-01-31T10:00:00+02:00:30", "seconds-in-offset"),
    ("2026-W05-1", "week-date"),
    ("2026W051", "basic-week-date"),
    ("2026-W05", "week"),
    ("20260131.0", "float-as-string"),
]


@pytest.mark.parametrize("name", DATE_NAMES)
@pytest.mark.parametrize("value", [v for v, _ in LENIENT_DATES], ids=[i for _, i in LENIENT_DATES])
def test_date_that_fromisoformat_took_but_iso_8601_extended_does_not_is_refused(
    name: str, value: str
) -> None:
    """Only YYYY-MM-DD and YYYY-MM-DDThh:mm[:ss[.fraction]][Z|+hh:mm] pass: basic and week
    forms, other separators and seconds in an offset are refused (all sent before)."""
    exc = refused(ACCOUNT, attributes={name: value})
    assert exc.field == name
    assert exc.reason == events.DATE_RULE


@pytest.mark.parametrize("name", DATE_NAMES)
@pytest.mark.parametrize(
    "value", [20260131, 20260131.0, 1769853600.5], ids=["int", "float", "epoch-float"]
)
def test_date_that_is_not_a_string_is_refused(name: str, value: float) -> None:
    """A number is no date, even one whose digits read as one (sent before: 20260131)."""
    exc = refused(ACCOUNT, attributes={name: value})
    assert exc.field == name
    assert exc.reason.startswith(events.DATE_RULE)
    assert type(value).__name__ in exc.reason


@pytest.mark.parametrize("name", DATE_NAMES)
@pytest.mark.parametrize(
    "value",
    ["2026-01-31T10:60", "2026-01-31T10:00:60", "2026-01-31T10:00+24:00", "2026-01-31T10:00+02:60"],
    ids=["minute-60", "second-60", "offset-hour-24", "offset-minute-60"],
)
def test_date_time_that_does_not_exist_is_refused(name: str, value: str) -> None:
    """The right shape is not enough: the time and the offset must exist too."""
    assert refused(ACCOUNT, attributes={name: value}).reason == events.DATE_RULE


def test_contract_value_refusal_says_what_totango_asks_for() -> None:
    """The message says Totango's rule: a valid number without comma separator and
    currency sign, with the plain-decimal form spelt out."""
    exc = refused(ACCOUNT, attributes={"Contract Value": "$1,200"})
    assert exc.reason == events.CONTRACT_VALUE_RULE
    assert exc.reason.startswith("must be a valid number without comma separator and currency sign")
    assert "optional leading minus" in exc.reason


# --- which rule applies: the prefix -----------------------------------------------------------

ACCOUNT_ARGS = [(t, a, p) for t, a, p in ATTRIBUTE_ARGS if p == "sdr_o"]
USER_ARGS = [(t, a, p) for t, a, p in ATTRIBUTE_ARGS if p == "sdr_u"]
ACCOUNT_ARG_IDS = [f"{t.split('.')[1]}.{a}" for t, a, _ in ACCOUNT_ARGS]
USER_ARG_IDS = [f"{t.split('.')[1]}.{a}" for t, a, _ in USER_ARGS]


@pytest.mark.parametrize(("task", "arg", "prefix"), ACCOUNT_ARGS, ids=ACCOUNT_ARG_IDS)
@pytest.mark.parametrize(
    ("name", "value", "sent"),
    [
        ("Contact", "YES", "YES"),
        ("Contact", True, "true"),
        ("Key Contact", "maybe", "maybe"),
    ],
    ids=["contact-YES", "contact-bool", "key-contact-word"],
)
def test_an_account_attribute_named_like_a_user_rule_is_custom(  # noqa: PLR0917  a table row
    task: str, arg: str, prefix: str, name: str, value: Any, sent: str
) -> None:
    """Contact and Key Contact are sdr_u rules: an account attribute of that name is a
    custom attribute, sent as it is (refused, or turned into yes/no, before)."""
    event = build(task, **with_attribute(arg, name, value))
    assert param(event, f"{prefix}.{name}") == sent


@pytest.mark.parametrize(("task", "arg", "prefix"), USER_ARGS, ids=USER_ARG_IDS)
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Create Date", "last spring"),
        ("Contract Renewal Date", "next year"),
        ("Contract Start Date", "soon"),
        ("Contract Value", "$1,200"),
    ],
)
def test_a_user_attribute_named_like_an_account_rule_is_custom(
    task: str, arg: str, prefix: str, name: str, value: str
) -> None:
    """The dates and Contract Value are sdr_o rules: a user attribute of that name is a
    custom attribute (validated as a date or a number before)."""
    event = build(task, **with_attribute(arg, name, value))
    assert param(event, f"{prefix}.{name}") == value


# --- spelling variants of a named attribute ---------------------------------------------------

#: (name as written, the named attribute meant, a value its rule accepts)
ACCOUNT_VARIANTS = [
    ("create date", "Create Date", "2026-01-31"),
    ("CREATE DATE", "Create Date", "2026-01-31"),
    ("Create Date ", "Create Date", "2026-01-31"),
    (" Contract Start Date", "Contract Start Date", "2026-01-31"),
    ("Create Date\u200b", "Create Date", "2026-01-31"),
    ("\ufeffContract Renewal Date", "Contract Renewal Date", "2026-01-31"),
    ("Create%20Date", "Create Date", "2026-01-31"),
    ("Contract%20Value", "Contract Value", "1200"),
    ("Contract value", "Contract Value", "1200"),
    ("Contract\u00a0Value", "Contract Value", "1200"),
    ("Contract  Value", "Contract Value", "1200"),
    ("success manager", "Success Manager", "jo"),
    ("Parent_ID", "parent_id", "acme-holding"),
    ("product_id\u2060", "product_id", "p1"),
]
USER_VARIANTS = [
    ("contact", "Contact", "yes"),
    ("CONTACT", "Contact", "no"),
    ("Contact ", "Contact", "yes"),
    ("Con\u200btact", "Contact", "yes"),
    ("Key%20Contact", "Key Contact", "yes"),
    ("key%20contact", "Key Contact", "yes"),
    ("key contact", "Key Contact", "no"),
    ("Key\u00a0Contact", "Key Contact", "yes"),
    ("Key Contact\u200d", "Key Contact", "yes"),
]


def _variant_rows(
    args: list[tuple[str, str, str]], variants: list[tuple[str, str | None, str]]
) -> list[Any]:
    return [
        pytest.param(task, arg, name, intended, value, id=f"{task.split('.')[1]}.{arg}-{name!r}")
        for task, arg, _ in args
        for name, intended, value in variants
    ]


@pytest.mark.parametrize(
    ("task", "arg", "name", "intended", "value"),
    _variant_rows(ACCOUNT_ARGS, ACCOUNT_VARIANTS) + _variant_rows(USER_ARGS, USER_VARIANTS),
)
def test_a_spelling_variant_of_a_named_attribute_is_refused_with_a_hint(
    task: str, arg: str, name: str, intended: str, value: str
) -> None:
    """A different case, leading or trailing whitespace, an invisible character or a
    percent-encoded name copied from the documentation: refused naming the field as given,
    and the reason names the intended attribute (each was sent as a junk custom attribute
    before, skipping its rule)."""
    exc = refused(task, **with_attribute(arg, name, value))
    assert exc.field == name
    assert f"did you mean the named attribute {intended!r}" in exc.reason


@pytest.mark.parametrize(
    ("name", "how"),
    [
        ("Key%20Contact", "percent-encoded"),
        ("Con\u200btact", "invisible character (U+200B)"),
        ("Contact ", "leading or trailing whitespace"),
        ("contact", "differs in case"),
        ("Key  Contact", "differs in spacing"),
    ],
)
def test_the_hint_says_how_the_name_differs(name: str, how: str) -> None:
    """The reason says what is wrong with the name, not only what was meant."""
    assert how in refused(USER, attributes={name: "yes"}).reason


@pytest.mark.parametrize(
    ("task", "arg", "prefix", "name"),
    [
        (USER, "attributes", "sdr_u", "create date"),
        (USER, "attributes", "sdr_u", "contract value"),
        (ACCOUNT, "attributes", "sdr_o", "contact"),
        (ACCOUNT, "attributes", "sdr_o", "key contact"),
    ],
)
def test_a_variant_of_a_named_attribute_of_the_other_prefix_is_custom(
    task: str, arg: str, prefix: str, name: str
) -> None:
    """Variants are checked against the named attributes of their own prefix only."""
    assert param(build(task, **with_attribute(arg, name, "v")), f"{prefix}.{name}") == "v"


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        ("1200.5", "1200.5"),
        ("1200", "1200"),
        ("-5", "-5"),
        (1200, "1200"),
        (1200.5, "1200.5"),
        (0.1, "0.1"),
        (1e20, "100000000000000000000"),
        (1e-7, "0.0000001"),
        (-2.5e16, "-25000000000000000"),
    ],
)
def test_contract_value_plain_number_is_accepted(value: Any, sent: str) -> None:
    """Contract Value is sent as a plain number, never with an exponent."""
    assert param(build(ACCOUNT, attributes={"Contract Value": value}), "sdr_o.Contract Value") == (
        sent
    )


@pytest.mark.parametrize(
    "value",
    [
        "1,200",
        "$1200",
        "1200$",
        "1e3",
        "1.2.3",
        ".5",
        "5.",
        "+5",
        " 1200",
        "1200\n",
        "\u0661\u0662\u0660\u0660",
        "",
        "NaN",
        float("nan"),
        float("inf"),
        float("-inf"),
        True,
    ],
    ids=[
        "thousands-separator",
        "currency-prefix",
        "currency-suffix",
        "exponent-string",
        "two-dots",
        "no-int-part",
        "no-fraction",
        "plus-sign",
        "leading-space",
        "trailing-newline",
        "arabic-digits",
        "empty",
        "nan-string",
        "nan",
        "inf",
        "-inf",
        "bool",
    ],
)
def test_contract_value_not_a_plain_number_is_refused(value: Any) -> None:
    """Contract Value must be a finite plain number; no separators, signs, exponents or words.

    A trailing newline, non-ASCII digits and a bool passed before a fix.
    """
    exc = refused(ACCOUNT, attributes={"Contract Value": value})
    assert exc.field == "Contract Value"


@pytest.mark.parametrize(("value", "sent"), [(1e20, "100000000000000000000"), (1.5, "1.5")])
def test_any_float_attribute_is_sent_without_exponent(value: float, sent: str) -> None:
    """Floats in custom attributes are plain numbers too."""
    assert param(build(ACCOUNT, attributes={"score": value}), "sdr_o.score") == sent


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_float_attribute_is_refused(value: float) -> None:
    """NaN and infinity are no numbers the gateway can store."""
    exc = refused(ACCOUNT, attributes={"score": value})
    assert (exc.field, exc.reason) == ("score", "must be a finite number")


@pytest.mark.parametrize("name", sorted(events.YES_NO_ATTRIBUTES))
@pytest.mark.parametrize(
    ("value", "sent"), [("yes", "yes"), ("no", "no"), (True, "yes"), (False, "no")]
)
def test_contact_flag_yes_no_is_accepted(name: str, value: Any, sent: str) -> None:
    """Contact and Key Contact take lowercase yes/no, or a bool mapped to it."""
    assert param(build(USER, attributes={name: value}), f"sdr_u.{name}") == sent


@pytest.mark.parametrize("name", sorted(events.YES_NO_ATTRIBUTES))
@pytest.mark.parametrize("value", ["YES", "Yes", "No", "true", "false", "y", "", " yes", 1, 0])
def test_contact_flag_other_value_is_refused(name: str, value: Any) -> None:
    """Anything but exactly yes/no (or a bool) is refused, naming the attribute."""
    exc = refused(USER, attributes={name: value})
    assert exc.field == name
    assert "'yes' or 'no'" in exc.reason


@pytest.mark.parametrize(("value", "sent"), [(True, "true"), (False, "false")])
@pytest.mark.parametrize(("task", "arg", "prefix"), ATTRIBUTE_ARGS, ids=ATTRIBUTE_IDS)
def test_other_bool_attribute_is_true_false(
    task: str, arg: str, prefix: str, value: bool, sent: str
) -> None:
    """A bool in any other attribute is sent as lowercase true/false."""
    event = build(task, **with_attribute(arg, "active", value))
    assert param(event, f"{prefix}.active") == sent


@pytest.mark.parametrize(("task", "arg", "prefix"), ATTRIBUTE_ARGS, ids=ATTRIBUTE_IDS)
def test_none_attribute_value_is_left_out(task: str, arg: str, prefix: str) -> None:
    """A None value leaves the attribute out of the call (it is not sent as empty)."""
    attrs = {"kept": "v", "gone": None}
    event = build(task, **({arg: attrs}))
    assert f"{prefix}.gone" not in names(event)
    assert param(event, f"{prefix}.kept") == "v"


@pytest.mark.parametrize(("task", "arg", "prefix"), ATTRIBUTE_ARGS, ids=ATTRIBUTE_IDS)
@pytest.mark.parametrize(
    ("value", "sent"), [("Demo", "Demo"), ("a b", "a b"), (3, "3"), (-3, "-3"), (2.5, "2.5")]
)
def test_custom_attribute_lands_under_its_prefix(
    task: str, arg: str, prefix: str, value: Any, sent: str
) -> None:
    """Account attributes go to ``sdr_o.<name>``, user attributes to ``sdr_u.<name>``."""
    event = build(task, **with_attribute(arg, "Account Type", value))
    assert param(event, f"{prefix}.Account Type") == sent


# --- attribute names, values and sizes --------------------------------------------------------

BAD_NAMES = [
    "",
    "   ",
    "a\nb",
    "a\x00",
    "a\x7f",
    "a\x9f",
    "\ud800",
    "x" * (MAX_NAME_LENGTH + 1),
    1,
    None,
]
BAD_NAME_IDS = [
    "empty",
    "spaces",
    "newline",
    "nul",
    "del",
    "c1",
    "surrogate",
    "too-long",
    "int",
    "none",
]


@pytest.mark.parametrize(("task", "arg", "prefix"), ATTRIBUTE_ARGS, ids=ATTRIBUTE_IDS)
@pytest.mark.parametrize("name", BAD_NAMES, ids=BAD_NAME_IDS)
def test_bad_attribute_name_is_refused_under_its_argument(
    task: str, arg: str, prefix: str, name: Any
) -> None:
    """A bad name is refused and reported under its argument, never echoed.

    The field becomes the dead-letter reason, a metric label and a Sentry tag, so an
    attacker-chosen name with controls, surrogates or 1 MB must not land there (fixed).
    """
    del prefix
    exc = refused(task, **with_attribute(arg, name, "v"))
    assert exc.field == arg
    assert "attribute name" in exc.reason


@pytest.mark.parametrize(("task", "arg", "prefix"), ATTRIBUTE_ARGS, ids=ATTRIBUTE_IDS)
def test_attribute_name_length_limit(task: str, arg: str, prefix: str) -> None:
    """A name of MAX_NAME_LENGTH characters passes; one more is refused."""
    name = "n" * MAX_NAME_LENGTH
    event = build(task, **with_attribute(arg, name, "v"))
    assert param(event, f"{prefix}.{name}") == "v"
    refused(task, **with_attribute(arg, name + "n", "v"))


@pytest.mark.parametrize(("task", "arg", "prefix"), ATTRIBUTE_ARGS, ids=ATTRIBUTE_IDS)
def test_attribute_value_length_limit(task: str, arg: str, prefix: str) -> None:
    """A value of MAX_VALUE_LENGTH characters passes; one more is refused, naming it."""
    value = "v" * MAX_VALUE_LENGTH
    assert param(build(task, **with_attribute(arg, "big", value)), f"{prefix}.big") == value
    exc = refused(task, **with_attribute(arg, "big", value + "v"))
    assert (exc.field, exc.reason) == ("big", f"is longer than {MAX_VALUE_LENGTH} characters")


@pytest.mark.parametrize(
    "value",
    ["x" * 1_000_000, 10 ** (MAX_VALUE_LENGTH + 1), 10**5000],
    ids=["1mb-string", "int-over-limit", "int-over-str-limit"],
)
def test_oversized_value_is_refused(value: Any) -> None:
    """A 1 MB value, or an int with more digits than allowed, is an InvalidEvent (no ValueError)."""
    exc = refused(ACCOUNT, attributes={"big": value})
    assert exc.field == "big"
    assert "longer than" in exc.reason


@pytest.mark.parametrize(("task", "arg", "prefix"), ATTRIBUTE_ARGS, ids=ATTRIBUTE_IDS)
def test_attribute_count_limit(task: str, arg: str, prefix: str) -> None:
    """MAX_ATTRIBUTES attributes pass; one more is refused, naming the argument."""
    attrs = {f"a{i}": i for i in range(MAX_ATTRIBUTES)}
    event = build(task, **{arg: attrs})
    assert sum(name.startswith(f"{prefix}.a") for name in names(event)) == MAX_ATTRIBUTES
    exc = refused(task, **{arg: {**attrs, "one-more": 1}})
    assert exc.field == arg
    assert str(MAX_ATTRIBUTES) in exc.reason


@pytest.mark.parametrize(("task", "arg", "prefix"), ATTRIBUTE_ARGS, ids=ATTRIBUTE_IDS)
@pytest.mark.parametrize("value", ["ab\ud800", "\udfff"], ids=["high", "low"])
def test_lone_surrogate_in_value_is_invalid_event(
    task: str, arg: str, prefix: str, value: str
) -> None:
    """A value that cannot be UTF-8 is an InvalidEvent naming the attribute, never a crash."""
    del prefix
    exc = refused(task, **with_attribute(arg, "note", value))
    assert (exc.field, exc.reason) == ("note", "is not encodable as UTF-8")


@pytest.mark.parametrize(("task", "arg", "prefix"), ATTRIBUTE_ARGS, ids=ATTRIBUTE_IDS)
@pytest.mark.parametrize(
    "value",
    [{"a": 1}, [1, 2], [], {}, ("t",)],
    ids=["dict", "list", "empty-list", "empty-dict", "tuple"],
)
def test_nested_value_is_refused_naming_the_attribute(
    task: str, arg: str, prefix: str, value: Any
) -> None:
    """Values are scalars; a nested object or array is refused, naming its attribute."""
    del prefix
    exc = refused(task, **with_attribute(arg, "nested", value))
    assert exc.field == "nested"
    assert "must be a string, number or bool" in exc.reason


@pytest.mark.parametrize(("task", "arg", "prefix"), ATTRIBUTE_ARGS, ids=ATTRIBUTE_IDS)
@pytest.mark.parametrize(
    "value", ["plan=gold", ["plan"], 3, True], ids=["str", "list", "int", "bool"]
)
def test_attributes_that_are_not_an_object_are_refused(
    task: str, arg: str, prefix: str, value: Any
) -> None:
    """An attributes argument must be an object of names to values."""
    del prefix
    assert refused(task, **{arg: value}).field == arg


def test_value_with_control_characters_is_sent_as_given() -> None:
    """Only names are restricted to printable text: a value may hold a newline (encoded)."""
    event = build(ACCOUNT, attributes={"notes": "line 1\nline 2"})
    assert param(event, "sdr_o.notes") == "line 1\nline 2"


# --- writeback --------------------------------------------------------------------------------


def test_writeback_true_adds_enable_writeback() -> None:
    """writeback=True asks for the Salesforce write-back with enableWriteback=true."""
    assert build(ACCOUNT, writeback=True).params[-1] == ("enableWriteback", "true")


@pytest.mark.parametrize("changes", [{"writeback": False}, {}], ids=["false", "absent"])
def test_writeback_false_or_absent_sends_nothing(changes: dict[str, Any]) -> None:
    """Without write-back there is no enableWriteback parameter at all (not =false)."""
    assert "enableWriteback" not in names(build(ACCOUNT, **changes))


@pytest.mark.parametrize("task", [ACTIVITY, ACCOUNT, USER])
@pytest.mark.parametrize("value", ["true", "false", 1, 0, "yes"])
def test_writeback_must_be_a_bool(task: str, value: Any) -> None:
    """A string or number for writeback is refused instead of guessed."""
    exc = refused(task, writeback=value)
    assert (exc.field, exc.reason) == ("writeback", "must be true or false")


@pytest.mark.parametrize("task", [ACTIVITY, ACCOUNT, USER])
def test_writeback_null_is_accepted_like_false(task: str) -> None:
    """A JSON null for writeback is accepted, as for every other optional argument, and
    sends no enableWriteback (refused as ``invalid:writeback`` before)."""
    assert "enableWriteback" not in names(build(task, writeback=None))


@pytest.mark.parametrize(
    ("task", "arg"), [(ACTIVITY, "account_attributes"), (USER, "account_attributes")]
)
def test_writeback_is_taken_wherever_account_attributes_are(task: str, arg: str) -> None:
    """track_activity and update_user carry account attributes too, so they take
    writeback=True (refused as an unknown argument before): enableWriteback=true last."""
    event = build(task, writeback=True, **{arg: {"Account Type": "Demo"}})
    assert event.params[-1] == ("enableWriteback", "true")
    assert param(event, "sdr_o.Account Type") == "Demo"


# --- from_message: the shape of the message ---------------------------------------------------


@pytest.mark.parametrize("task", ["totango.nope", "", "track_activity", "TOTANGO.TRACK_ACTIVITY"])
def test_unknown_task_is_refused(task: str) -> None:
    """A task name this module has no builder for is refused, naming ``task``."""
    with pytest.raises(InvalidEvent) as info:
        events.from_message(task, BASE[ACTIVITY], event_id="e", default_service_id=DEFAULT_SID)
    assert info.value.field == "task"
    assert info.value.code == "invalid:task"


@pytest.mark.parametrize(
    "kwargs", [["acc-1"], "acc-1", None, 3], ids=["list", "str", "none", "int"]
)
def test_kwargs_not_an_object_is_refused(kwargs: Any) -> None:
    """The keyword arguments must be a JSON object."""
    with pytest.raises(InvalidEvent) as info:
        events.from_message(ACTIVITY, kwargs, event_id="e", default_service_id=DEFAULT_SID)
    assert info.value.field == "arguments"


def test_positional_arguments_are_refused() -> None:
    """Positional arguments are refused: the contract is keyword arguments only."""
    with pytest.raises(InvalidEvent) as info:
        events.from_message(
            ACTIVITY,
            BASE[ACTIVITY],
            event_id="e",
            default_service_id=DEFAULT_SID,
            positional=("a",),
        )
    assert info.value.field == "arguments"


@pytest.mark.parametrize(
    ("task", "name"),
    [
        (ACTIVITY, "colour"),
        (ACTIVITY, "attributes"),
        (ACCOUNT, "user_id"),
        (ACCOUNT, "account_attributes"),
        (USER, "activity"),
        (USER, "account_name"),
        (ACTIVITY, "default_service_id"),
    ],
)
def test_unexpected_argument_is_named(task: str, name: str) -> None:
    """An argument the kind does not take is refused by its name (also the internal default)."""
    exc = refused(task, **{name: "x"})
    assert exc.field == name
    assert task in exc.reason


@pytest.mark.parametrize(
    "name",
    ["\ud800", "a\nb", "x" * (MAX_NAME_LENGTH + 1), "", " "],
    ids=["surrogate", "newline", "long", "empty", "space"],
)
def test_unexpected_argument_with_unsafe_name_is_reported_as_arguments(name: str) -> None:
    """An unknown argument whose name is not safe text is reported as ``arguments`` (fixed)."""
    exc = refused(ACTIVITY, **{name: "x"})
    assert exc.field == "arguments"


# --- the dead-letter envelope -----------------------------------------------------------------


def full_envelope() -> Envelope:
    return Envelope(
        reason="exhausted:503",
        event_id="evt-1",
        task=ACTIVITY,
        kwargs={**BASE[ACTIVITY], "account_attributes": {"name": "café 日本"}},
        attempts=3,
        worker_host="host-1",
        first_attempt_at="2026-01-31T10:00:00.000+00:00",
        last_attempt_at="2026-01-31T10:05:00.000+00:00",
        last_status="503",
        last_excerpt="busy",
        task_id="task-1",
        raw_body=None,
        raw_body_encoding=None,
        content_type="application/json",
    )


def test_envelope_round_trips_through_json() -> None:
    """to_dict -> JSON -> from_dict gives back an equal envelope, id and timestamp included."""
    envelope = full_envelope()
    assert Envelope.from_dict(json.loads(json.dumps(envelope.to_dict()))) == envelope


def test_envelope_from_dict_ignores_unknown_keys() -> None:
    """An envelope written by a newer worker with extra keys still loads."""
    envelope = full_envelope()
    assert Envelope.from_dict({**envelope.to_dict(), "added_later": 1}) == envelope


def test_envelope_defaults() -> None:
    """A new envelope gets a fresh hex id, the current version and a parseable UTC timestamp."""
    one, two = full_envelope(), full_envelope()
    assert one.id != two.id
    assert len(one.id) == 32
    int(one.id, 16)
    assert one.version == 1
    assert datetime.fromisoformat(one.dead_lettered_at).utcoffset() is not None


@pytest.mark.parametrize(
    ("task", "kwargs", "replayable"),
    [
        (ACTIVITY, {"account_id": "a"}, True),
        (ACTIVITY, {}, True),
        (None, {"account_id": "a"}, False),
        (ACTIVITY, None, False),
        (None, None, False),
    ],
    ids=["full", "empty-kwargs", "no-task", "no-kwargs", "neither"],
)
def test_envelope_replayable_needs_task_and_kwargs(
    task: str | None, kwargs: dict[str, Any] | None, replayable: bool
) -> None:
    """Only an envelope that still holds a task and its arguments can be put back."""
    envelope = Envelope("undecodable", None, task, kwargs, 0, "host")
    assert envelope.replayable is replayable


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (None, (None, None)),
        ("text {", ("text {", "utf-8")),
        (b"caf\xc3\xa9 {", ("café {", "utf-8")),
        (b"", ("", "utf-8")),
        (b"\xff\x00\xfe", ("/wD+", "base64")),
    ],
    ids=["none", "str", "utf8-bytes", "empty-bytes", "binary"],
)
def test_raw_body_fields(body: bytes | str | None, expected: tuple[str | None, str | None]) -> None:
    """An undecodable body is kept whole: UTF-8 as text, anything else as base64."""
    assert raw_body_fields(body) == expected


def test_raw_body_base64_decodes_back_to_the_bytes() -> None:
    """The base64 form loses nothing."""
    body = bytes(range(256))
    text, encoding = raw_body_fields(body)
    assert encoding == "base64"
    assert text is not None
    assert base64.b64decode(text) == body
