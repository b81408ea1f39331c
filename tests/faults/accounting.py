"""Counting what became of every event a scenario sent: delivered (the gateway answered 200),
dead-lettered (listed in ``totango.dead_letter``), or lost (neither), plus duplicates.

Each event gets a key (``fx-<run>-<n>``) used as its event id, as the Celery task id, and in
its unique user id, so a gateway call and a dead-letter envelope both name the event.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from totango_emulator import Call
from worker.envelope import Envelope

KEY_RE = re.compile(r"fx-[0-9a-f]{8}-[0-9]{5}")

DELIVER = "deliver"
DEAD_LETTER = "dead_letter"


@dataclass
class Row:
    """One line of the table."""

    scenario: str
    broker: str
    sent: int
    delivered: int
    duplicates: int
    dead_lettered: int
    lost: int
    duplicate_bound: int | str = "-"
    recovery: str = "-"
    reasons: dict[str, int] = field(default_factory=dict)
    note: str = ""


HEADER = (
    "| scenario | broker | sent | delivered | duplicates | dead-lettered | lost "
    "| duplicates allowed | recovery |"
)


def table(rows: list[Row]) -> str:
    lines = [HEADER, "|---|---|--:|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        lines.append(
            f"| {r.scenario} | {r.broker} | {r.sent} | {r.delivered} | {r.duplicates} "
            f"| {r.dead_lettered} | {r.lost} | {r.duplicate_bound} | {r.recovery} |"
        )
    return "\n".join(lines)


def details(rows: list[Row]) -> str:
    """Reasons and notes, one line per row that has any."""
    out = []
    for r in rows:
        parts = []
        if r.reasons:
            parts.append("reasons: " + ", ".join(f"{k} {v}" for k, v in _grouped(r.reasons)))
        if r.note:
            parts.append(r.note)
        if parts:
            out.append(f"- {r.scenario} / {r.broker}: " + "; ".join(parts))
    return "\n".join(out)


def _grouped(reasons: dict[str, int]) -> list[tuple[str, int]]:
    """``invalid:<field>`` reasons summed as ``invalid:*`` when there are many fields."""
    invalid = {k: v for k, v in reasons.items() if k.startswith("invalid:")}
    grouped = {k: v for k, v in reasons.items() if k not in invalid or len(invalid) <= 3}
    if len(invalid) > 3:
        grouped[f"invalid:* ({len(invalid)} fields)"] = sum(invalid.values())
    return sorted(grouped.items())


def write_results(rows: list[Row], path: Path, command: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"Command: `{command}`\n\n{table(rows)}\n\n{details(rows)}\n"
    path.write_text(text)


@dataclass
class Tally:
    """What the gateway and the dead-letter queue say about one ledger's events."""

    delivered: set[str]
    duplicates: int
    dead: dict[str, Envelope]
    lost: set[str]
    #: Sent to be dead-lettered, yet delivered (poison that reached the gateway).
    wrongly_delivered: set[str]
    #: Gateway calls that belong to no event of the ledger.
    foreign_calls: int
    #: The time of the first 200 of each delivered event (time.time()).
    first_delivery: dict[str, float]

    @property
    def reasons(self) -> Counter[str]:
        return Counter(envelope.reason for envelope in self.dead.values())


class Ledger:
    """The events of one scenario on one broker, and what each was meant to become."""

    def __init__(self, scenario: str, broker: str) -> None:
        self.scenario, self.broker = scenario, broker
        self.run = uuid.uuid4().hex[:8]
        self.expected: dict[str, str] = {}
        self._next = 0
        self._lock = threading.Lock()  # a producer thread and the test both take keys

    def key(self, expect: str = DELIVER) -> str:
        """A new event key; the event is counted as sent from now on."""
        with self._lock:
            key = f"fx-{self.run}-{self._next:05d}"
            self._next += 1
            self.expected[key] = expect
        return key

    def __len__(self) -> int:
        return len(self.expected)

    def tally(self, calls: list[Call], envelopes: list[Envelope]) -> Tally:
        delivered_calls: Counter[str] = Counter()
        first: dict[str, float] = {}
        foreign = 0
        for call in calls:
            keys = {k for _, v in call.params for k in KEY_RE.findall(v)} & self.expected.keys()
            if not keys:
                foreign += 1
                continue
            if call.status == 200:
                for key in keys:
                    delivered_calls[key] += 1
                    first[key] = min(first.get(key, call.received_at), call.received_at)
        dead: dict[str, Envelope] = {}
        for envelope in envelopes:
            for key in envelope_keys(envelope) & self.expected.keys():
                dead.setdefault(key, envelope)
        delivered = set(delivered_calls)
        settled = delivered | set(dead)
        return Tally(
            delivered=delivered,
            duplicates=sum(n - 1 for n in delivered_calls.values()),
            dead=dead,
            lost=set(self.expected) - settled,
            wrongly_delivered={k for k in delivered if self.expected[k] == DEAD_LETTER},
            foreign_calls=foreign,
            first_delivery=first,
        )

    def row(self, tally: Tally, **extra: object) -> Row:
        return Row(
            scenario=self.scenario,
            broker=self.broker,
            sent=len(self.expected),
            delivered=len(tally.delivered),
            duplicates=tally.duplicates,
            # An event delivered by one copy and dead-lettered by another counts as delivered.
            dead_lettered=len(set(tally.dead) - tally.delivered),
            lost=len(tally.lost),
            reasons=dict(tally.reasons),
            **extra,  # type: ignore[arg-type]
        )


def envelope_keys(envelope: Envelope) -> set[str]:
    """Every event key an envelope names: in its ids, its arguments or its raw body (which
    may be base64 when the body was not UTF-8)."""
    text = " ".join(
        str(part)
        for part in (envelope.event_id, envelope.task_id, envelope.raw_body)
        if part is not None
    )
    if envelope.kwargs is not None:
        text += " " + json.dumps(envelope.kwargs, default=str)
    keys = set(KEY_RE.findall(text))
    if envelope.raw_body_encoding == "base64" and envelope.raw_body:
        try:
            raw = base64.b64decode(envelope.raw_body)
        except (binascii.Error, ValueError):
            raw = b""
        keys |= {m.decode() for m in re.findall(rb"fx-[0-9a-f]{8}-[0-9]{5}", raw)}
    return keys
