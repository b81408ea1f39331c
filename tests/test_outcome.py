"""The one decision after a gateway call, as a table: delivered, retry after a delay, or dead
letter with a reason, from the answer, the retries so far and the policy."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from worker.outcome import Kind, Outcome, decide
from worker.retry import RetryPolicy

POLICY = RetryPolicy(max_retries=3, backoff_base=1.0, backoff_max=8.0, retry_after_max=60.0)
NOW = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("status", "retries", "retry_after", "expected"),
    [
        ("200", 0, None, Outcome(Kind.DELIVERED, "200")),
        (
            "200",
            3,
            None,
            Outcome(Kind.DELIVERED, "200"),
        ),  # a 200 is a delivery whatever came before
        # rand=1.0: the top of the jitter range, so the delay is the ceiling base * 2**retries
        ("503", 0, None, Outcome(Kind.RETRY, "503", delay=1.0)),
        ("503", 2, None, Outcome(Kind.RETRY, "503", delay=4.0)),
        ("timeout", 1, None, Outcome(Kind.RETRY, "timeout", delay=2.0)),
        ("connection_error", 0, None, Outcome(Kind.RETRY, "connection_error", delay=1.0)),
        ("429", 0, "30", Outcome(Kind.RETRY, "429", delay=30.0)),  # Retry-After wins
        ("429", 0, "600", Outcome(Kind.RETRY, "429", delay=60.0)),  # capped at retry_after_max
        ("503", 3, None, Outcome(Kind.DEAD_LETTER, "503", reason="exhausted:503")),
        ("404", 3, None, Outcome(Kind.DEAD_LETTER, "404", reason="exhausted:404")),
        ("timeout", 5, None, Outcome(Kind.DEAD_LETTER, "timeout", reason="exhausted:timeout")),
    ],
)
def test_the_outcome_of_an_answer(
    status: str, retries: int, retry_after: str | None, expected: Outcome
) -> None:
    """Each row: what follows that answer after that many retries."""
    assert decide(status, retries, POLICY, retry_after, now=NOW, rand=lambda: 1.0) == expected
