"""The arithmetic of ``make bench``'s ratios and targets (bench/ratios.py), on made-up
figures: no worker runs and nothing is timed."""

from __future__ import annotations

import math

import pytest

from bench.ratios import (
    TARGETS,
    latency_rate,
    ratios,
    state_store_cost,
    steady_window,
    verdict_text,
    verdicts,
)
from bench.report import state_store_line, state_store_lines, waiting_lines
from bench.run import best_round, parse_args, store_baseline

#: One broker's phases as bench/run.py records them.
FIGURES = {
    "noop": {"events_per_s": 3000.0, "worker_cpu_ms": 0.36},
    "sameconf": {"events_per_s": 2000.0, "worker_cpu_ms": 0.47},
    "waiting": {"events_per_s": 1300.0, "worker_cpu_ms": 0.66},
    "http": {"events_per_s": 2100.0, "worker_cpu_ms": 0.45},
    "naive": {"events_per_s": 500.0, "worker_cpu_ms": 1.5},
    "ours": {"events_per_s": 650.0, "worker_cpu_ms": 1.30, "p99_ms": 58.0, "rss_mb": 70.0},
    "store": {"events_per_s": 610.0, "worker_cpu_ms": 1.43},
    "batch": {"events_per_s": 1500.0, "worker_cpu_ms": 0.70, "rss_mb": 80.0},
}


def test_relay_overhead_is_single_cpu_minus_both_floors() -> None:
    """1.30 - (0.47 + 0.45) = 0.38 ms: what the relay adds above Celery and HTTP."""
    assert ratios(FIGURES, delay_ms=50)["relay_overhead_ms"] == pytest.approx(0.38)


def test_relay_overhead_with_the_store_counts_the_store_phase_against_the_same_floors() -> None:
    """1.43 - (0.47 + 0.45) = 0.51 ms: the features' round trips count toward the relay's
    overhead (#14), judged against the same bound; no store phase, no figure."""
    values = ratios(FIGURES, delay_ms=50)
    assert values["relay_overhead_with_store_ms"] == pytest.approx(0.51)
    assert verdicts(values)["relay_overhead_with_store_ms"] is False
    light = {**FIGURES, "store": {"events_per_s": 900.0, "worker_cpu_ms": 0.99}}
    assert verdicts(ratios(light, delay_ms=50))["relay_overhead_with_store_ms"] is True
    without = {phase: f for phase, f in FIGURES.items() if phase != "store"}
    assert ratios(without, delay_ms=50)["relay_overhead_with_store_ms"] is None


def test_rate_and_cpu_ratios_divide_the_right_phases() -> None:
    """Single over the same-config no-op, batch CPU over bare HTTP CPU, single over naive,
    and the old ratio to the prefork no-op, each from its own two phases."""
    values = ratios(FIGURES, delay_ms=50)
    assert values["single_over_sameconf"] == 0.325
    assert values["batch_cpu_over_http"] == 1.556
    assert values["ours_over_naive"] == 1.3
    assert values["ours_over_prefork_noop"] == 0.217


def test_a_ratio_just_under_its_bound_is_not_rounded_up_to_pass() -> None:
    """702.6 / 1,408.7 = 0.4988: printed as 0.499 and failed, not rounded to a passing 0.5."""
    figures = {**FIGURES, "ours": {**FIGURES["ours"], "events_per_s": 702.6}}
    figures["sameconf"] = {**FIGURES["sameconf"], "events_per_s": 1408.7}
    values = ratios(figures, delay_ms=50)
    assert values["single_over_sameconf"] == 0.499
    assert verdicts(values)["single_over_sameconf"] is False


def test_rss_is_per_process_and_latency_is_above_the_gateway_delay() -> None:
    """The higher of ours' and batch's peak, each divided by its own processes; p99 minus
    the gateway's delay."""
    figures = {**FIGURES, "batch": {**FIGURES["batch"], "processes": 2}}
    values = ratios(figures, delay_ms=50)
    assert values["rss_mb_per_process"] == 70.0
    figures["ours"] = {**FIGURES["ours"], "processes": 2}
    assert ratios(figures, delay_ms=50)["rss_mb_per_process"] == 40.0
    assert values["p99_over_delay_ms"] == 8.0


def test_a_missing_phase_gives_no_figure_not_zero() -> None:
    """Without the bare HTTP phase there is no overhead and no batch ratio, and the targets
    on them are neither passed nor failed."""
    figures = {k: v for k, v in FIGURES.items() if k != "http"}
    values = ratios(figures, delay_ms=50)
    assert values["relay_overhead_ms"] is None
    assert values["batch_cpu_over_http"] is None
    judged = verdicts(values)
    assert judged["relay_overhead_ms"] is None
    assert judged["single_over_sameconf"] is False
    assert verdict_text(judged["relay_overhead_ms"]) == "n/a"


def test_verdicts_hold_at_the_bound_and_fail_past_it() -> None:
    """A value equal to a target's bound passes; just past it fails, in either direction."""
    at_bounds = {t.key: t.bound for t in TARGETS}
    assert all(verdicts(at_bounds).values())
    past = {t.key: t.bound + (0.01 if t.op == "<=" else -0.01) for t in TARGETS}
    assert not any(verdicts(past).values())
    assert verdict_text(True) == "PASS"
    assert verdict_text(False) == "FAIL"


def test_every_target_names_a_ratio_that_is_computed() -> None:
    """A target whose key the ratios never produce would silently read n/a forever."""
    assert {t.key for t in TARGETS} <= set(ratios(FIGURES, delay_ms=50))


def test_steady_window_spans_ten_to_ninety_percent_of_completions() -> None:
    """101 completions, one per 10 ms but a slow start and tail: the window is completions
    10 to 90, 80 intervals over 0.8 s, 100 per second whatever the ends did."""
    times = [0.01 * i for i in range(101)]
    times[0], times[100] = -5.0, 9.0
    window = steady_window(times)
    assert window.completions == 80
    assert window.start == pytest.approx(0.10)
    assert window.end == pytest.approx(0.90)
    assert window.rate == pytest.approx(100.0)


def test_steady_window_of_too_few_completions() -> None:
    """Two completions are one interval; fewer give no rate at all."""
    assert steady_window([1.0, 3.0]).rate == pytest.approx(0.5)
    assert steady_window([1.0]).rate == 0.0
    assert math.isinf(steady_window([2.0, 2.0]).rate)


def test_latency_is_paced_at_half_the_measured_rate() -> None:
    """Half of what the worker just reached, or the fallback when that phase failed."""
    assert latency_rate(650.0, 200.0) == 325.0
    assert latency_rate(None, 200.0) == 200.0
    assert latency_rate(math.inf, 200.0) == 200.0


def test_state_store_cost_is_the_store_phase_minus_ours_as_a_share_of_ours() -> None:
    """1.43 - 1.30 = +0.13 ms per event with the features on, 10 % of the event's 1.30 ms
    without them: exactly at the target's bound, which passes."""
    values = ratios(FIGURES, delay_ms=50)
    assert values["state_store_cost_ms"] == pytest.approx(0.13)
    assert values["state_store_cost_share"] == pytest.approx(0.1)
    assert verdicts(values)["state_store_cost_share"] is True
    figures = {**FIGURES, "store": {"worker_cpu_ms": 1.45}}
    assert ratios(figures, delay_ms=50)["state_store_cost_share"] == pytest.approx(0.115)
    assert verdicts(ratios(figures, delay_ms=50))["state_store_cost_share"] is False


def test_state_store_cost_keeps_a_negative_difference_and_needs_both_phases() -> None:
    """A store phase cheaper than ours (noise between the two) is reported as measured,
    not as 0; without either phase, or with ours at 0 ms, there is no share."""
    assert state_store_cost(1.25, 1.30) == (pytest.approx(-0.05), pytest.approx(-0.038))
    assert state_store_cost(None, 1.30) == (None, None)
    assert state_store_cost(1.30, None) == (None, None)
    assert state_store_cost(0.1, 0.0) == (0.1, None)
    figures = {k: v for k, v in FIGURES.items() if k != "store"}
    assert verdicts(ratios(figures, delay_ms=50))["state_store_cost_share"] is None


def test_state_store_line_states_ms_and_percent() -> None:
    """The line the bench prints, per broker with the target's verdict, and n/a without a
    figure."""
    values = ratios(FIGURES, delay_ms=50)
    line = state_store_line(values)
    assert line == "state store cost: +0.130 ms CPU per event (10.0 % of the event's CPU)"
    assert state_store_line({}) == "state store cost: n/a"
    summary = {"state_store": {"text": line}, "targets": {"state_store_cost_share": "PASS"}}
    assert state_store_lines({"redis": summary}) == f"redis: {line}, target <= 10 %: PASS"


def test_the_store_cost_takes_the_pairs_baseline_when_the_run_measured_more_pairs() -> None:
    """With more (ours, store) pairs than rounds, the cost is taken against the least ours
    CPU of all the pairs (1.25 here), not against the ours phase's own best of its rounds
    (1.30): 1.43 - 1.25 = 0.18 ms, 14.4 %, which fails where 10 % passed."""
    figures = {**FIGURES, "store": {**FIGURES["store"], "baseline_cpu_ms": 1.25}}
    values = ratios(figures, delay_ms=50)
    assert values["state_store_cost_ms"] == pytest.approx(0.18)
    assert values["state_store_cost_share"] == pytest.approx(0.144)
    assert verdicts(values)["state_store_cost_share"] is False
    # The ours phase's own figures are untouched: the baseline serves the store's cost only.
    assert values["relay_overhead_ms"] == pytest.approx(0.38)


def test_thestore_baseline_is_the_least_ours_cpu_of_the_pairs_and_each_pairs_share() -> None:
    """Three pairs, one whose ours round failed: the baseline is the least ours CPU of the
    two that finished, and each finished pair's store-over-ours share is kept, in order."""
    pairs = [
        ({"worker_cpu_ms": 1.30}, {"worker_cpu_ms": 1.43}),
        ({"worker_cpu_ms": 1.25}, {"worker_cpu_ms": 1.40}),
        ({"error": "timed out"}, {"worker_cpu_ms": 1.50}),
    ]
    assert store_baseline(pairs) == {"baseline_cpu_ms": 1.25, "pair_shares": [0.1, 0.12]}
    assert store_baseline([({"error": "x"}, {"error": "y"})]) == {
        "baseline_cpu_ms": None,
        "pair_shares": [],
    }


def test_the_store_line_lists_each_pair_when_there_were_several() -> None:
    """The pairs' own shares follow the cost, so that a reader sees the spread behind it;
    one pair adds nothing."""
    values = ratios(FIGURES, delay_ms=50)
    line = state_store_line(values, [0.1, 0.125, -0.02])
    assert line == (
        "state store cost: +0.130 ms CPU per event (10.0 % of the event's CPU); "
        "3 pairs of rounds, each: 10.0, 12.5, -2.0 %"
    )
    assert state_store_line(values, [0.1]) == state_store_line(values)


def test_a_phase_keeps_the_fastest_round_the_least_cpu_and_the_lowest_p99() -> None:
    """Each figure from the round least slowed by other load: events/s from the first
    round, CPU from the second, the latency (p99 with its p50 and pace) from the second,
    and the peak RSS of both; a round that failed counts for none of them."""
    tries = [
        {"events_per_s": 700.0, "worker_cpu_ms": 1.30, "p50_ms": 52.0, "p99_ms": 70.0,
         "latency_rate": 340.0, "rss_mb": 70.0},
        {"events_per_s": 650.0, "worker_cpu_ms": 1.25, "p50_ms": 51.0, "p99_ms": 62.0,
         "latency_rate": 340.0, "rss_mb": 74.0},
        {"error": "timed out"},
    ]  # fmt: skip
    best = best_round(tries)
    assert best["events_per_s"] == 700.0
    assert best["worker_cpu_ms"] == 1.25
    assert (best["p50_ms"], best["p99_ms"], best["latency_rate"]) == (51.0, 62.0, 340.0)
    assert best["rss_mb"] == 74.0
    assert best_round([{"error": "timed out"}]) == {"error": "timed out"}


def test_store_pairs_default_to_four_and_quick_runs_one() -> None:
    """make bench measures the store's cost over 4 pairs; --quick and --profile over 1; more
    than 8 is refused."""
    assert parse_args([]).store_pairs == 4
    assert parse_args(["--quick"]).store_pairs == 1
    assert parse_args(["--profile"]).store_pairs == 1
    with pytest.raises(SystemExit):
        parse_args(["--store-pairs", "9"])


def test_the_waiting_floor_is_read_against_the_no_op_and_ours_against_it() -> None:
    """1,300 / 2,000 = 0.65: what holding the thread for the call costs a task that does
    nothing else; 650 / 1,300 = 0.5: ours against that floor. Readings, not targets: no
    verdict is given for either, and without the phase there is no figure and no line."""
    values = ratios(FIGURES, delay_ms=50)
    assert values["waiting_over_sameconf"] == 0.65
    assert values["single_over_waiting"] == 0.5
    assert not {"waiting_over_sameconf", "single_over_waiting"} & set(verdicts(values))
    line = waiting_lines({"rabbitmq": {"ratios": values}}, 50)
    assert line == (
        "rabbitmq: a no-op waiting 50 ms in its thread runs at 0.65 of the no-op's events/s; "
        "ours at 0.5 of that"
    )
    without = {k: v for k, v in FIGURES.items() if k != "waiting"}
    assert ratios(without, delay_ms=50)["single_over_waiting"] is None
    assert waiting_lines({"redis": {"ratios": ratios(without, delay_ms=50)}}, 50) == ""
