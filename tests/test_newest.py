"""The newest value wins, the pure part: ``occurred_at`` parsed and refused with a reason,
the claims an event makes, what is left of it without its superseded attributes, and the
repair updates that send a newer value again (``worker.newest``)."""

from __future__ import annotations

from typing import Any

import pytest

from worker import events
from worker.contract import TRACK_ACTIVITY, UPDATE_ACCOUNT, UPDATE_USER
from worker.errors import InvalidEvent
from worker.newest import Claim, Entity, claims_of, repairs, without

SID = "SP-1234-56"
NOW = 1_796_000_000_000  # 2026-11-30, epoch ms


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        ("2026-01-31T09:30:00.250Z", 1_769_851_800_250),
        ("2026-01-31T09:30:00Z", 1_769_851_800_000),
        ("2026-01-31T11:30:00.250+02:00", 1_769_851_800_250),  # converted to UTC
        ("2026-01-31T09:30Z", 1_769_851_800_000),
        ("2026-01-31T09:30:00.2509Z", 1_769_851_800_250),  # below a millisecond: truncated
        (1_769_851_800_250, 1_769_851_800_250),
        (None, None),
    ],
)
def test_occurred_at_is_iso_8601_with_an_offset_or_epoch_milliseconds(value: Any, ms: Any) -> None:
    """Both forms the producers may use name the same instant in epoch milliseconds."""
    assert events.occurred_at_ms(value, now_ms=NOW) == ms


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("2026-01-31T09:30:00", "without its offset is ambiguous"),
        ("2026-01-31", "without its offset is ambiguous"),
        ("31/01/2026 09:30", "ISO 8601"),
        ("2026-02-31T09:30:00Z", "ISO 8601"),
        ("1999-12-31T23:59:59Z", "from 2000 to 2100"),
        (1_769_851_800, "looks like epoch seconds"),
        (10**13, "from 2000 to 2100"),
        (1_769_851_800.25, "got a float"),
        (True, "got a bool"),
        ({"ms": 1}, "got a dict"),
        (NOW + 2 * 24 * 3600 * 1000, "more than a day ahead"),
    ],
)
def test_a_bad_occurred_at_is_an_invalid_event_naming_it(value: Any, reason: str) -> None:
    """Each wrong form is refused as ``InvalidEvent("occurred_at")`` with why, never
    guessed: seconds for milliseconds, a naive local time, a float, a date from a clock far
    ahead (it would beat every later value until then)."""
    with pytest.raises(InvalidEvent) as info:
        events.occurred_at_ms(value, now_ms=NOW)
    assert info.value.field == "occurred_at"
    assert reason in str(info.value)


def test_the_builders_carry_occurred_at_and_never_send_it() -> None:
    """``occurred_at`` becomes the event's time; it is no gateway parameter (Totango takes
    no time with an update)."""
    event = events.update_account(
        account_id="acme",
        attributes={"Plan": "Gold"},
        event_id="e-1",
        occurred_at="2026-01-31T09:30:00Z",
        default_service_id=SID,
    )
    assert event.occurred_at == 1_769_851_800_000
    assert all("occurred" not in name for name, _ in event.params)


def test_from_message_refuses_a_bad_occurred_at() -> None:
    """A raw producer's bad keyword is an InvalidEvent naming it, as every field is."""
    with pytest.raises(InvalidEvent) as info:
        events.from_message(
            UPDATE_ACCOUNT,
            {"account_id": "acme", "attributes": {"Plan": "Gold"}, "occurred_at": "soon"},
            event_id="e-2",
            default_service_id=SID,
        )
    assert info.value.field == "occurred_at"


def user_update(occurred_at: Any = NOW) -> events.Event:
    return events.update_user(
        account_id="acme",
        user_id="jo",
        attributes={"Contact": True, "Title": "CTO"},
        account_attributes={"Plan": "Gold"},
        event_id="e-1",
        occurred_at=occurred_at,
        default_service_id=SID,
    )


def test_each_attribute_is_a_claim_of_its_own_entity() -> None:
    """Account attributes belong to (service, account), user attributes to (service,
    account, user); ids and the user id parameter itself are not attributes."""
    claims = claims_of(user_update())
    account = Entity(SID, "acme")
    user = Entity(SID, "acme", "jo")
    assert claims == [
        Claim(account, "sdr_o.Plan", "Gold", NOW),
        Claim(user, "sdr_u.Contact", "yes", NOW),
        Claim(user, "sdr_u.Title", "CTO", NOW),
    ]


def test_an_event_without_occurred_at_claims_nothing() -> None:
    """Sent as it is: the rule needs a time to compare."""
    assert claims_of(user_update(occurred_at=None)) == []


def test_an_entity_key_is_unambiguous_and_reversible() -> None:
    """Ids may hold any separator: the key quotes them, and reads back."""
    odd = Entity(SID, 'a:b"c', None)
    other = Entity(SID, "a", 'b"c')
    assert odd.key != other.key
    assert Entity.from_key(odd.key) == odd
    assert Entity.from_key(other.key) == other


def test_without_leaves_out_only_the_superseded_attributes() -> None:
    """The rest of the event is still sent: its ids and its other attributes."""
    event = user_update()
    left = without(event, ["sdr_u.Title"])
    assert left is not None
    assert [name for name, _ in left.params] == [
        "sdr_s",
        "sdr_o",
        "sdr_u",
        "sdr_o.Plan",
        "sdr_u.Contact",
    ]


def test_an_update_with_nothing_left_is_superseded_whole() -> None:
    event = user_update()
    assert without(event, ["sdr_o.Plan", "sdr_u.Contact", "sdr_u.Title"]) is None


def test_an_activity_is_never_dropped() -> None:
    """Its attributes may be superseded; the activity is still sent."""
    event = events.track_activity(
        account_id="acme",
        user_id="jo",
        activity="Login",
        module="App",
        account_attributes={"Plan": "Gold"},
        event_id="e-3",
        occurred_at=NOW,
        default_service_id=SID,
    )
    left = without(event, ["sdr_o.Plan"])
    assert left is not None
    assert left.task == TRACK_ACTIVITY
    assert ("sdr_a", "Login") in left.params
    assert not any(name == "sdr_o.Plan" for name, _ in left.params)


def test_repairs_are_valid_updates_of_one_entity_at_one_time() -> None:
    """Newer values are grouped per entity and time into updates that the worker's own
    validation accepts, with the same value on the wire and the same time."""
    account = Entity(SID, "acme")
    user = Entity(SID, "acme", "jo")
    newer = [
        Claim(account, "sdr_o.Plan", "Gold", NOW),
        Claim(account, "sdr_o.account_name", "Acme", NOW),
        Claim(user, "sdr_u.Contact", "yes", NOW + 5),
    ]
    made = repairs(newer, after="e-old")
    assert sorted(r.task for r in made) == [UPDATE_ACCOUNT, UPDATE_USER]
    for repair in made:
        event = events.from_message(
            repair.task, repair.kwargs, event_id=None, default_service_id=None
        )
        assert event.event_id == repair.event_id
        entity = Entity(event.service_id, event.account_id, event.user_id)
        assert set(claims_of(event)) == {c for c in newer if c.entity == entity}


def test_a_repair_id_is_the_same_for_a_copy_and_new_for_another_older_call() -> None:
    """The same older event repairing again (a redelivered copy) makes the same id, which
    duplicate suppression then stops; another older event's repair is its own event."""
    newer = [Claim(Entity(SID, "acme"), "sdr_o.Plan", "Gold", NOW)]
    assert repairs(newer, after="e-1")[0].event_id == repairs(newer, after="e-1")[0].event_id
    assert repairs(newer, after="e-1")[0].event_id != repairs(newer, after="e-2")[0].event_id
    assert len(repairs(newer, after="e-1")[0].event_id) <= events.MAX_EVENT_ID_LENGTH
