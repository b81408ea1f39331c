"""The retry policy of ``worker.retry`` as tables: what retries, when it gives up, how long."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from worker.retry import (
    Decision,
    RetryPolicy,
    backoff,
    decide,
    is_delivered,
    parse_retry_after,
)

FAILURES = ["503", "500", "502", "429", "404", "400", "301", "204", "timeout", "connection_error"]
NOW = datetime(2026, 1, 31, 10, 0, 0, tzinfo=UTC)
POLICY = RetryPolicy(max_retries=2, backoff_base=1.0, backoff_max=300.0, retry_after_max=600.0)


def fixed(value: float) -> Callable[[], float]:
    return lambda: value


def http_date(moment: datetime) -> str:
    return format_datetime(moment, usegmt=True)


# --- what is retried --------------------------------------------------------------------------


@pytest.mark.parametrize("status", FAILURES)
@pytest.mark.parametrize(("retries", "retry"), [(0, True), (1, True), (2, False), (5, False)])
def test_every_failure_retries_until_max_retries(status: str, retries: int, retry: bool) -> None:
    """Every non-200 outcome retries while retries < max_retries and gives up at max_retries."""
    decision = decide(status, retries, POLICY, rand=fixed(0.5))
    assert decision.retry is retry
    assert decision.status == status
    if not retry:
        assert decision.delay == 0.0


@pytest.mark.parametrize("status", FAILURES)
def test_given_up_decision_reason_is_exhausted_status(status: str) -> None:
    """The dead-letter reason of a decision that gave up is ``exhausted:<status>``."""
    decision = decide(status, POLICY.max_retries, POLICY)
    assert decision.reason == f"exhausted:{status}"


@pytest.mark.parametrize(("max_retries", "calls"), [(0, 1), (1, 2), (2, 3), (8, 9)])
def test_max_retries_counts_retries_after_the_first_call(max_retries: int, calls: int) -> None:
    """max_retries=2 means three gateway calls in all (as Celery's request.retries counts)."""
    policy = RetryPolicy(max_retries=max_retries)
    made, retries = 1, 0
    while decide("503", retries, policy, rand=fixed(0.0)).retry:
        made, retries = made + 1, retries + 1
    assert made == calls


def test_a_200_is_not_a_failure_to_decide_on() -> None:
    """decide refuses a 200: a delivery must never be retried or dead-lettered."""
    with pytest.raises(ValueError, match="200"):
        decide("200", 0, POLICY)


@pytest.mark.parametrize(
    ("status", "delivered"),
    [("200", True), ("201", False), ("204", False), ("timeout", False), ("", False)],
)
def test_only_200_is_delivered(status: str, delivered: bool) -> None:
    """Totango documents one success answer: 200. Even another 2xx is a failure."""
    assert is_delivered(status) is delivered


def test_decision_reason_uses_its_status() -> None:
    """Decision.reason is built from the status it holds."""
    assert Decision(retry=False, delay=0.0, status="connection_error").reason == (
        "exhausted:connection_error"
    )


# --- backoff ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retries", "rand", "expected"),
    [
        (0, 0.0, 1.0),  # ceiling 1: half of it is under the base, so the base wins
        (0, 1.0, 1.0),
        (1, 0.0, 1.0),
        (1, 0.5, 1.5),
        (1, 1.0, 2.0),
        (3, 0.0, 4.0),
        (3, 0.5, 6.0),
        (3, 1.0, 8.0),
        (8, 0.0, 128.0),
        (8, 1.0, 256.0),
        (9, 0.0, 150.0),  # ceiling capped at 300
        (9, 0.5, 225.0),
        (9, 1.0, 300.0),
        (40, 1.0, 300.0),
        (10_000, 1.0, 300.0),  # no overflow for absurd retry counts
    ],
)
def test_backoff_table(retries: int, rand: float, expected: float) -> None:
    """The delay is drawn from the upper half of a doubling ceiling capped at backoff_max."""
    assert backoff(retries, POLICY, fixed(rand)) == expected


@pytest.mark.parametrize("rand", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize(
    "policy",
    [
        RetryPolicy(backoff_base=1.0, backoff_max=300.0),
        RetryPolicy(backoff_base=5.0, backoff_max=60.0),
        RetryPolicy(backoff_base=0.5, backoff_max=2.0),
        RetryPolicy(backoff_base=7.0, backoff_max=7.0),
    ],
    ids=["1-300", "5-60", "half-2", "flat-7"],
)
def test_backoff_stays_within_base_and_cap(policy: RetryPolicy, rand: float) -> None:
    """Whatever the jitter and the retry count, the backoff is within [base, cap]."""
    for retries in range(30):
        delay = backoff(retries, policy, fixed(rand))
        assert policy.backoff_base <= delay <= policy.backoff_max


@pytest.mark.parametrize("rand", [0.0, 0.5, 1.0])
def test_backoff_ceiling_doubles_until_the_cap(rand: float) -> None:
    """With the same jitter, each retry waits twice as long as the one before, until the cap."""
    policy = RetryPolicy(backoff_base=2.0, backoff_max=1000.0)
    delays = [backoff(r, policy, fixed(rand)) for r in range(1, 9)]  # ceilings 4..512
    assert all(later == 2 * earlier for earlier, later in itertools.pairwise(delays))
    assert backoff(12, policy, fixed(rand)) == 500.0 + rand * 500.0


@pytest.mark.parametrize(
    ("retries", "rand", "delay"),
    [
        (1, 0.5, 2.0),  # 1.5 s rounds up
        (1, 0.01, 2.0),  # 1.01 s rounds up
        (1, 0.0, 1.0),
        (3, 0.5, 6.0),
        (9, 1.0, 300.0),
    ],
)
def test_decided_delay_is_whole_seconds_rounded_up(retries: int, rand: float, delay: float) -> None:
    """Countdowns are whole seconds (RabbitMQ delayed delivery), rounded up, never down."""
    policy = RetryPolicy(max_retries=100)
    decision = decide("503", retries, policy, rand=fixed(rand))
    assert decision.delay == delay
    assert isinstance(decision.delay, float)


@pytest.mark.parametrize("base", [0.0, 0.1, 0.5])
def test_decided_delay_is_at_least_one_second(base: float) -> None:
    """A tiny (or zero) backoff base never gives a countdown of 0."""
    policy = RetryPolicy(backoff_base=base, backoff_max=10.0)
    assert decide("503", 0, policy, rand=fixed(0.0)).delay == 1.0


# --- Retry-After ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("120", 120.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("007", 7.0),
        (http_date(NOW + timedelta(seconds=120)), 120.0),
        ("Sat, 31 Jan 2026 10:02:00 GMT", 120.0),
        ("Sat, 31 Jan 2026 12:02:00 +0200", 120.0),
        ("Sat, 31 Jan 2026 10:02:00 -0000", 120.0),  # no zone: read as UTC
        (http_date(NOW - timedelta(hours=1)), 0.0),  # past: no wait
        ("", None),
        ("soon", None),
        ("-5", None),
        ("1.5", None),
        ("12 s", None),
        ("\u00b2", None),  # str.isdigit says yes, float() says no (fixed)
        ("\u0661\u0662", None),  # Arabic-Indic digits are not delay-seconds
        ("Mon, 01 Jan 99999 00:00:00 GMT", None),
        ("Sat, 31 Jan 2026 10:02:00 +9999", None),
    ],
    ids=[
        "absent",
        "seconds",
        "seconds-padded",
        "zero",
        "leading-zeros",
        "http-date",
        "http-date-literal",
        "http-date-offset",
        "http-date-no-zone",
        "http-date-past",
        "empty",
        "word",
        "negative",
        "fraction",
        "unit",
        "superscript-two",
        "arabic-digits",
        "year-out-of-range",
        "offset-out-of-range",
    ],
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    """Retry-After is delay-seconds or an HTTP date; anything unreadable is ignored (None)."""
    assert parse_retry_after(header, now=NOW) == seconds


@pytest.mark.parametrize(
    ("header", "retries", "delay"),
    [
        ("120", 0, 120.0),
        (http_date(NOW + timedelta(seconds=120)), 0, 120.0),
        ("120", 9, 300.0),  # the backoff is longer: it wins
        ("5000", 0, 600.0),  # clamped to retry_after_max
        (http_date(NOW + timedelta(days=1)), 0, 600.0),
        ("9" * 400, 0, 600.0),  # float('9'*400) is inf: still clamped
        (http_date(NOW - timedelta(seconds=30)), 3, 8.0),  # past date: 0, the backoff wins
        ("0", 3, 8.0),
        ("garbage", 3, 8.0),
        ("\u00b2", 3, 8.0),
    ],
    ids=[
        "seconds",
        "http-date",
        "backoff-longer",
        "clamped",
        "date-clamped",
        "huge-clamped",
        "past-date",
        "zero",
        "garbage",
        "superscript",
    ],
)
def test_decide_with_retry_after(header: str, retries: int, delay: float) -> None:
    """The delay is the longer of the backoff and the (clamped) Retry-After."""
    policy = RetryPolicy(max_retries=100, retry_after_max=600.0)
    decision = decide("429", retries, policy, header, now=NOW, rand=fixed(1.0))
    assert decision.retry
    assert decision.delay == delay


@pytest.mark.parametrize("rand", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("retries", [0, 1, 4, 9])
@pytest.mark.parametrize("seconds", [1, 2, 7, 59, 61, 299, 599, 600])
def test_delay_is_never_below_retry_after_under_the_cap(
    seconds: int, retries: int, rand: float
) -> None:
    """When the server asks to wait N s (N within the cap), no retry comes sooner."""
    policy = RetryPolicy(max_retries=100, retry_after_max=600.0)
    for header in (str(seconds), http_date(NOW + timedelta(seconds=seconds))):
        decision = decide("503", retries, policy, header, now=NOW, rand=fixed(rand))
        assert decision.delay >= seconds
        assert decision.delay == math.ceil(max(seconds, backoff(retries, policy, fixed(rand))))


def test_retry_after_is_ignored_once_retries_are_exhausted() -> None:
    """Giving up does not wait: the Retry-After of the last answer changes nothing."""
    decision = decide("503", POLICY.max_retries, POLICY, "120", now=NOW)
    assert (decision.retry, decision.delay) == (False, 0.0)


def test_default_policy_limits() -> None:
    """The defaults: 8 retries, a 300 s backoff cap, a 600 s Retry-After cap."""
    assert RetryPolicy() == RetryPolicy(
        max_retries=8, backoff_base=1.0, backoff_max=300.0, retry_after_max=600.0
    )
