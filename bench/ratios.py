"""PURE: the steady window of a phase's completions, and the ratios and targets that
``make bench`` reports, computed from one run's figures (no timing, no I/O).

Every target compares the worker with a floor measured in the same run on the same machine:
absolute rates move from machine to machine, the ratios do not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: The steady part of a phase: between these fractions of its completions, so that the
#: start (connections, a pool filling) and the tail (the last threads finishing) are left out.
STEADY_FROM = 0.10
STEADY_TO = 0.90


@dataclass(frozen=True)
class Window:
    """The steady window of a phase: its start and end (wall time), and how many
    completions fall between them (the first one not counted)."""

    start: float
    end: float
    completions: int

    @property
    def rate(self) -> float:
        span = self.end - self.start
        if self.completions <= 0:
            return 0.0
        return self.completions / span if span > 0 else math.inf


def steady_window(times: list[float], low: float = STEADY_FROM, high: float = STEADY_TO) -> Window:
    """From the completion at ``low`` of them to the one at ``high``: ``completions`` is
    the number of intervals between the two, so the rate is completions / (end - start)."""
    ordered = sorted(times)
    if len(ordered) < 2:
        return Window(0.0, 0.0, 0)
    first = min(len(ordered) - 2, math.floor(low * (len(ordered) - 1)))
    last = max(first + 1, math.ceil(high * (len(ordered) - 1)))
    return Window(ordered[first], ordered[last], last - first)


@dataclass(frozen=True)
class Target:
    """One target: a ratio from the summary, ``<=`` or ``>=`` a bound."""

    key: str
    op: str
    bound: float
    what: str

    def check(self, value: float | None) -> bool | None:
        """True or False; None when the run has no figure for it (a phase failed or is off)."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        return value <= self.bound if self.op == "<=" else value >= self.bound

    @property
    def label(self) -> str:
        return f"{self.op} {self.bound:g}"


#: The targets, for 2 cores and a 50 ms gateway (docs/benchmarks.md).
TARGETS: tuple[Target, ...] = (
    Target("relay_overhead_ms", "<=", 0.1, "relay's own CPU ms per single event"),
    Target("relay_overhead_with_store_ms", "<=", 0.1, "the same with the state store on"),
    Target("single_over_sameconf", ">=", 0.5, "single events/s / same-config no-op"),
    Target("single_over_sameconf_stretch", ">=", 0.7, "the same, stretch target"),
    Target("batch_cpu_over_http", "<=", 1.15, "batch CPU per event / bare HTTP per call"),
    Target("ours_over_naive", ">=", 2.5, "single events/s / naive relay"),
    Target("rss_mb_per_process", "<=", 200.0, "peak RSS MB per worker process"),
    Target("p99_over_delay_ms", "<=", 15.0, "p99 enqueue to answer - gateway delay, ms"),
    Target("state_store_cost_share", "<=", 0.10, "state store's added CPU / a single event's"),
)


def _figure(results: dict[str, Any], phase: str, key: str) -> float | None:
    value = results.get(phase, {}).get(key)
    return float(value) if isinstance(value, int | float) else None


def _ratio(top: float | None, bottom: float | None, digits: int = 3) -> float | None:
    """``top / bottom`` to 3 digits: a target is judged on the figure as printed, and 0.4988
    must not pass a bound of 0.5 as a rounded 0.50."""
    if top is None or bottom is None or bottom == 0:
        return None
    return round(top / bottom, digits)


def _overhead(event: float | None, sameconf: float | None, http: float | None) -> float | None:
    """The relay's own CPU ms per event: an event's minus both floors'."""
    if event is None or sameconf is None or http is None:
        return None
    return round(event - (sameconf + http), 3)


def state_store_cost(
    with_store: float | None, without: float | None
) -> tuple[float | None, float | None]:
    """What the state-store features add to a single event: the CPU ms per event of the
    phase with them on minus the same phase's with them off, and that as a share of the
    event's CPU without them (0.08 = 8 %). Negative when the difference is within the noise
    of the two measurements: the figure is kept as measured, not clipped to 0."""
    if with_store is None or without is None:
        return None, None
    cost = round(with_store - without, 3)
    share = round(cost / without, 3) if without > 0 else None
    return cost, share


def ratios(results: dict[str, dict[str, Any]], *, delay_ms: float) -> dict[str, float | None]:
    """The ratios of one broker's phases: ``results[phase]`` has ``events_per_s`` and
    ``worker_cpu_ms`` (CPU per completion), ``ours`` also ``p99_ms``, ours and batch
    ``rss_mb`` (the peak sum over its ``processes`` worker processes, 1 if not given);
    ``store`` is ours with the state-store features on, ``waiting`` the same-config no-op
    that sleeps the gateway's delay in its pool thread first."""
    cpu = {phase: _figure(results, phase, "worker_cpu_ms") for phase in results}
    rate = {phase: _figure(results, phase, "events_per_s") for phase in results}
    single, sameconf, http = cpu.get("ours"), cpu.get("sameconf"), cpu.get("http")
    overhead = _overhead(single, sameconf, http)
    # #14: with the effectively-once features on, their round trips count toward it too.
    overhead_with_store = _overhead(cpu.get("store"), sameconf, http)
    over_sameconf = _ratio(rate.get("ours"), rate.get("sameconf"))
    rss = [
        value / max(1.0, _figure(results, phase, "processes") or 1.0)
        for phase in ("ours", "batch")
        if (value := _figure(results, phase, "rss_mb")) is not None
    ]
    p99 = _figure(results, "ours", "p99_ms")
    # The store's own baseline when the run measured more pairs of the two (bench/run.py).
    baseline = _figure(results, "store", "baseline_cpu_ms")
    store_cost, store_share = state_store_cost(
        cpu.get("store"), single if baseline is None else baseline
    )
    return {
        # Readings, not targets: what holding a pool thread for the call costs a task that
        # does nothing else, and how far ours is from that floor.
        "waiting_over_sameconf": _ratio(rate.get("waiting"), rate.get("sameconf")),
        "single_over_waiting": _ratio(rate.get("ours"), rate.get("waiting")),
        "relay_overhead_ms": overhead,
        "relay_overhead_with_store_ms": overhead_with_store,
        "single_over_sameconf": over_sameconf,
        "single_over_sameconf_stretch": over_sameconf,
        "batch_cpu_over_http": _ratio(cpu.get("batch"), http),
        "ours_over_naive": _ratio(rate.get("ours"), rate.get("naive")),
        "rss_mb_per_process": round(max(rss), 1) if rss else None,
        "p99_over_delay_ms": round(p99 - delay_ms, 1) if p99 is not None else None,
        "state_store_cost_ms": store_cost,
        "state_store_cost_share": store_share,
        # Not a target any more; kept to compare with the earlier rounds.
        "ours_over_prefork_noop": _ratio(rate.get("ours"), rate.get("noop")),
    }


def verdicts(values: dict[str, float | None]) -> dict[str, bool | None]:
    """Each target's PASS (True), FAIL (False) or no figure (None)."""
    return {t.key: t.check(values.get(t.key)) for t in TARGETS}


def verdict_text(ok: bool | None) -> str:
    return "PASS" if ok else ("FAIL" if ok is False else "n/a")


def latency_rate(max_rate: float | None, fallback: float) -> float:
    """The paced rate of the latency phase: half the rate the same worker just reached,
    or ``fallback`` events/s when there is none; at least 1 event/s."""
    if max_rate is None or not math.isfinite(max_rate) or max_rate <= 0:
        return max(1.0, fallback)
    return max(1.0, round(max_rate / 2, 1))
