"""PURE: the one decision after a gateway call: delivered, retry after a delay, or dead
letter with a reason. The single-event task and the batch both act on it."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from worker.retry import RetryPolicy, is_delivered
from worker.retry import decide as decide_retry


class Kind(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    #: The answer it was decided on: ``"200"``, ``"503"``, ``"timeout"``, ...
    status: str
    #: Seconds before the retry (``RETRY`` only).
    delay: float = 0.0
    #: The dead-letter reason code (``DEAD_LETTER`` only), e.g. ``exhausted:503``.
    reason: str | None = None


DELIVERED_200 = Outcome(Kind.DELIVERED, "200")


def decide(
    status: str,
    retries: int,
    policy: RetryPolicy,
    retry_after: str | None = None,
    *,
    now: datetime | None = None,
    rand: Callable[[], float] = random.random,
) -> Outcome:
    """What follows an answer, for an attempt after ``retries`` earlier retries."""
    if is_delivered(status):
        return DELIVERED_200
    decision = decide_retry(status, retries, policy, retry_after, now=now, rand=rand)
    if decision.retry:
        return Outcome(Kind.RETRY, status, delay=decision.delay)
    return Outcome(Kind.DEAD_LETTER, status, reason=decision.reason)
