"""PURE: the newest value wins, per attribute: what an event claims, what is left of it when
some of its attributes were superseded, and the repair that re-sends a newer value after an
older call may have landed over it.

Totango takes no time with an update: the last call it receives wins. Retries make an older
value's call come after a newer one's, so the state store (``worker.state``) keeps, for each
(service, account, user where it applies, attribute), the newest ``occurred_at`` claimed and
its value. Before a call, each attribute of the event is claimed in one script: one older
than the stored time is dropped from the call (the rest of the event is still sent; an
activity is never dropped). After the call, the claims are read again: when a newer one was
made while this call was in flight, this call may have reached Totango after it, so the
newer value is sent once more (``repairs``), as an event of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from worker.contract import TRACK_ACTIVITY, UPDATE_ACCOUNT, UPDATE_USER
from worker.events import Event

ACCOUNT_PREFIX = "sdr_o."
USER_PREFIX = "sdr_u."


@dataclass(frozen=True)
class Entity:
    """What an attribute belongs to: an account, or a user of an account."""

    service_id: str
    account_id: str
    user_id: str | None = None

    @functools.cached_property
    def key(self) -> str:
        """Unambiguous whatever the ids hold (JSON quotes them); made once per entity (an
        event's check and its finish both name it)."""
        return json.dumps([self.service_id, self.account_id, self.user_id])

    @classmethod
    def from_key(cls, key: str) -> Entity:
        service_id, account_id, user_id = json.loads(key)
        return cls(str(service_id), str(account_id), None if user_id is None else str(user_id))


@dataclass(frozen=True)
class Claim:
    """One attribute of one event: its gateway parameter, value and time."""

    entity: Entity
    param: str
    value: str
    at: int


def claims_of(event: Event) -> list[Claim]:
    """The attributes the event sets, each a claim at its ``occurred_at``; none for an event
    without one (it is sent as it is)."""
    if event.occurred_at is None:
        return []
    account = Entity(event.service_id, event.account_id)
    user = (
        Entity(event.service_id, event.account_id, event.user_id)
        if event.user_id is not None
        else None
    )
    claims = []
    for name, value in event.params:
        if name.startswith(ACCOUNT_PREFIX):
            claims.append(Claim(account, name, value, event.occurred_at))
        elif name.startswith(USER_PREFIX) and user is not None:
            claims.append(Claim(user, name, value, event.occurred_at))
    return claims


def without(event: Event, superseded: Iterable[str]) -> Event | None:
    """The event without its superseded attributes (gateway parameter names), or ``None``
    when an attribute update has nothing left to send. An activity always keeps its call."""
    dropped = set(superseded)
    if not dropped:
        return event
    params = tuple((name, value) for name, value in event.params if name not in dropped)
    left = any(name.startswith((ACCOUNT_PREFIX, USER_PREFIX)) for name, _ in params)
    if not left and event.task != TRACK_ACTIVITY:
        return None
    return dataclasses.replace(event, params=params)


@dataclass(frozen=True)
class Repair:
    """A newer value sent again: an update of one entity at one time."""

    task: str
    event_id: str
    kwargs: dict[str, Any]


def repairs(newer: Iterable[Claim], after: str) -> list[Repair]:
    """The updates that send these newer claims again, one per entity and time. ``after`` is
    the event whose call may have landed over them: with the claims, it makes the repair's
    event id, so that a redelivered copy of the same event repairs once, and another older
    call's repair is an event of its own."""
    grouped: dict[tuple[Entity, int], dict[str, str]] = {}
    for claim in newer:
        grouped.setdefault((claim.entity, claim.at), {})[claim.param] = claim.value
    out = []
    for (entity, at), params in sorted(grouped.items(), key=lambda item: item[0][0].key):
        prefix = USER_PREFIX if entity.user_id is not None else ACCOUNT_PREFIX
        attributes = {param.removeprefix(prefix): value for param, value in sorted(params.items())}
        digest = hashlib.sha256(
            json.dumps([entity.key, at, sorted(params.items()), after]).encode()
        ).hexdigest()[:32]
        kwargs: dict[str, Any] = {
            "service_id": entity.service_id,
            "account_id": entity.account_id,
            "attributes": attributes,
            "occurred_at": at,
            "event_id": f"repair-{digest}",
        }
        task = UPDATE_ACCOUNT
        if entity.user_id is not None:
            task = UPDATE_USER
            kwargs["user_id"] = entity.user_id
        out.append(Repair(task, kwargs["event_id"], kwargs))
    return out
