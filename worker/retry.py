"""PURE: which outcomes are retried, and after how long.

Celery's retry machinery does the retrying (``Task.retry`` with a countdown and
``max_retries``); this module only decides, so the policy is testable as a table.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

#: Totango documents one success answer. Anything else (another 2xx, a 3xx that we do not
#: follow, a 4xx, a 5xx), a timeout and a connection error are all retried.
SUCCESS_STATUS = "200"
#: Seconds before a task whose pool process died is tried again (Celery's
#: ``task_retry_on_worker_lost`` uses the task's ``default_retry_delay``, 180 s by default).
WORKER_LOST_RETRY_DELAY = 5


@dataclass(frozen=True)
class RetryPolicy:
    """``max_retries`` counts the retries after the first attempt: 2 means 3 calls in all."""

    max_retries: int = 8
    backoff_base: float = 1.0
    #: The backoff cap, and the Retry-After cap below, stay under the broker's limits for a
    #: held message (Redis ``visibility_timeout``, RabbitMQ ``consumer_timeout``);
    #: ``Settings.check_delays`` refuses to start otherwise.
    backoff_max: float = 300.0
    retry_after_max: float = 600.0


@dataclass(frozen=True)
class Decision:
    retry: bool
    delay: float
    #: The status that made the decision: ``"503"``, ``"timeout"``, ``"connection_error"``.
    status: str

    @property
    def reason(self) -> str:
        """The dead-letter reason code when the retries have run out."""
        return f"exhausted:{self.status}"


def is_delivered(status: str) -> bool:
    return status == SUCCESS_STATUS


def decide(
    status: str,
    retries: int,
    policy: RetryPolicy,
    retry_after: str | None = None,
    *,
    now: datetime | None = None,
    rand: Callable[[], float] = random.random,
) -> Decision:
    """Decide what follows a failed attempt. ``retries`` is how many retries came before."""
    if is_delivered(status):
        raise ValueError("a 200 is a delivery, not a failure to decide on")
    if retries >= policy.max_retries:
        return Decision(retry=False, delay=0.0, status=status)
    delay = backoff(retries, policy, rand)
    waited = parse_retry_after(retry_after, now=now)
    if waited is not None:
        delay = max(delay, min(waited, policy.retry_after_max))
    # Whole seconds: RabbitMQ's native delayed delivery (quorum queues) counts in seconds
    # and refuses a countdown that rounds down to 0. Rounding up never undercuts Retry-After.
    return Decision(retry=True, delay=float(max(1, math.ceil(delay))), status=status)


def backoff(retries: int, policy: RetryPolicy, rand: Callable[[], float] = random.random) -> float:
    """Exponential backoff with jitter, between the base and the cap.

    The ceiling doubles with each retry; the delay is drawn from its upper half so that
    retries spread out (jitter) but never come back sooner than half the ceiling.
    """
    ceiling = min(policy.backoff_max, policy.backoff_base * 2.0 ** min(retries, 62))
    delay = ceiling / 2.0 + rand() * ceiling / 2.0
    return min(policy.backoff_max, max(policy.backoff_base, delay))


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Retry-After as delay-seconds or as an HTTP date; ``None`` when absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():  # str.isdigit alone accepts "²", which float() refuses
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = now or datetime.now(UTC)
    return max(0.0, (when - current).total_seconds())
