"""The outage rules (worker/outage.py), pure: which answers count toward an outage, which
open a cooldown, when the next probe is due and how long a deferred event waits."""

from __future__ import annotations

import pytest

from worker.outage import Breaker, cooldown, defer_delay, is_down, outage_summary


@pytest.mark.parametrize(
    ("status", "down"),
    [
        ("500", True),
        ("502", True),
        ("503", True),
        ("504", True),
        ("429", True),
        ("timeout", True),
        ("connection_error", True),
        ("200", False),
        # One event's or one account's refusal: the gateway answers, it is not down.
        ("400", False),
        ("401", False),
        ("403", False),
        ("404", False),
        ("413", False),
        ("414", False),
        ("302", False),
    ],
)
def test_only_answers_that_say_the_gateway_is_down_count(status: str, down: bool) -> None:
    """5xx, 429, timeouts and broken connections count toward an outage; a 200 and a
    per-event 4xx (a bad payload, one account refused) never do."""
    assert is_down(status) is down


def test_a_429_or_503_that_says_when_opens_a_cooldown_capped() -> None:
    """Retry-After in seconds or as a date, else RateLimit-Reset; capped; only 429 and
    503 open one."""
    assert cooldown("429", "30", None, cap=600) == 30
    assert cooldown("503", None, "12", cap=600) == 12
    assert cooldown("503", "7", "12", cap=600) == 7, "Retry-After wins over RateLimit-Reset"
    assert cooldown("429", "9999", None, cap=600) == 600
    assert cooldown("500", "30", None, cap=600) is None
    assert cooldown("503", None, None, cap=600) is None
    assert cooldown("429", "soon", None, cap=600) is None
    assert cooldown("429", "Wed, 21 Oct 2015 07:28:00 GMT", None, cap=600) == 0.0


def test_the_next_probe_waits_for_the_cooldown_and_the_interval() -> None:
    """A probe comes one interval after the last one, and never inside a cooldown."""
    closed = Breaker()
    assert not closed.probe_due(now=1000.0, interval=5)
    opened = Breaker(failures=20, opened_at=1000.0, probed_at=1000.0)
    assert not opened.probe_due(1004.9, 5)
    assert opened.probe_due(1005.0, 5)
    cooling = Breaker(failures=1, opened_at=1000.0, probed_at=1000.0, until=1030.0)
    assert cooling.next_probe(5) == 1030.0
    assert not cooling.probe_due(1029.0, 5)


def test_a_deferred_event_comes_back_after_the_next_probe_spread_over_an_interval() -> None:
    """Whole seconds, at least 1, from the next probe to one interval after it."""
    breaker = Breaker(failures=20, opened_at=1000.0, probed_at=1000.0)
    assert defer_delay(breaker, 1001.0, 5, rand=lambda: 0.0) == 4.0
    assert defer_delay(breaker, 1001.0, 5, rand=lambda: 0.999) == 9.0
    assert defer_delay(breaker, 1009.0, 5, rand=lambda: 0.0) == 1.0
    cooling = Breaker(failures=1, opened_at=1000.0, probed_at=1000.0, until=1100.0)
    assert defer_delay(cooling, 1000.0, 5, rand=lambda: 0.5) == 103.0


def test_an_outage_is_summed_up_in_seconds_then_minutes() -> None:
    assert outage_summary(1000.0, 1061.25) == "61.2s"
    assert outage_summary(1000.0, 1300.0) == "5.0 min"
