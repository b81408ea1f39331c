"""PURE: when the gateway is down for everyone, and what a worker does about it.

The fleet's breaker (``worker.breaker`` keeps it in the state store) opens after
``threshold`` consecutive calls, across every worker, that found the gateway down: a 5xx, a
429, a timeout or a broken connection. An answer that shows the gateway up (a 200, or a 4xx
about one event: a bad payload, one account's refusal) resets the count and never opens it.
A 429, or a 503 that says when to come back (``Retry-After`` or ``RateLimit-Reset``), opens
a fleet-wide cooldown until then at once.

While it is open no event is sent but one probe at a time, one per ``probe_interval`` after
the cooldown, under a lease; the others wait in the broker, their retry budget unspent, and
a 200 closes it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from worker.retry import parse_retry_after

#: Answers that say the gateway itself is down or refusing everyone, not one event.
_DOWN_STATUSES = frozenset({"429", "timeout", "connection_error"})
#: Answers whose Retry-After (or RateLimit-Reset) opens a cooldown for the whole fleet.
_COOLDOWN_STATUSES = frozenset({"429", "503"})


def is_down(status: str) -> bool:
    """Whether this answer counts toward an outage: 5xx, 429, a timeout, a broken
    connection. A 200 and every other answer show a gateway that answers."""
    return status in _DOWN_STATUSES or (len(status) == 3 and status.startswith("5"))


def cooldown(
    status: str, retry_after: str | None, rate_limit_reset: str | None, cap: float
) -> float | None:
    """Seconds the whole fleet waits before the next call, when a 429 or a 503 says so
    (``Retry-After``, else ``RateLimit-Reset`` in delta-seconds), at most ``cap``;
    ``None`` otherwise."""
    if status not in _COOLDOWN_STATUSES:
        return None
    waited = parse_retry_after(retry_after)
    if waited is None:
        waited = parse_retry_after(rate_limit_reset)
    if waited is None:
        return None
    return min(waited, cap)


@dataclass(frozen=True)
class Breaker:
    """One gateway's breaker as the store holds it. Times are seconds since the epoch."""

    #: Consecutive calls, across the fleet, that found the gateway down.
    failures: int = 0
    #: When it opened; ``None`` while it is closed.
    opened_at: float | None = None
    #: No call, not even a probe, before this time (a cooldown the gateway asked for).
    until: float = 0.0
    #: When the last probe was leased.
    probed_at: float = 0.0

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def next_probe(self, interval: float) -> float:
        """The earliest time of the next probe."""
        return max(self.until, self.probed_at + interval)

    def probe_due(self, now: float, interval: float) -> bool:
        return self.is_open and now >= self.next_probe(interval)


class Admit(Enum):
    SEND = "send"
    #: The breaker is open and this call is the probe.
    PROBE = "probe"
    #: The breaker is open: back on the queue with its retry budget unspent.
    DEFER = "defer"


def defer_delay(
    breaker: Breaker,
    now: float,
    interval: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """How long a deferred event waits: until the next probe, plus up to one more interval
    so that the deferred events do not all come back at the same moment. Whole seconds
    (RabbitMQ's delayed delivery counts in seconds), at least 1."""
    wait = max(0.0, breaker.next_probe(interval) - now) + rand() * interval
    return float(max(1, math.ceil(wait)))


def outage_summary(opened_at: float, closed_at: float) -> str:
    """How long an outage lasted, for the log line and the Sentry event that end it."""
    seconds = max(0.0, closed_at - opened_at)
    if seconds < 120:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f} min"
