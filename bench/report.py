"""The tables ``make bench`` prints (Markdown, for docs/benchmarks.md): events/s of each
phase, CPU per event, and each target's value and verdict per broker."""

from __future__ import annotations

from typing import Any

from bench.ratios import TARGETS

#: The phases in the order of the tables and the plot, with their column titles.
TITLES = {
    "noop": "no-op prefork c=2",
    "sameconf": "no-op, worker's config",
    "waiting": "no-op waiting the delay",
    "http": "bare HTTP",
    "naive": "naive relay",
    "ours": "ours (single)",
    "store": "ours + state store",
    "batch": "ours (batch)",
}


def _markdown(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def table(results: dict[str, dict[str, Any]]) -> str:
    """Events/s (calls/s for bare HTTP) of each phase, the latency and the peak RSS."""
    phases = [p for p in TITLES if any(p in s["events_per_s"] for s in results.values())]
    rows = [["broker", *(f"{TITLES[p]} ev/s" for p in phases), "p99 ms @ rate", "RSS MB"]]
    for kind, summary in results.items():
        rates = summary["events_per_s"]
        rss = [v for p, v in summary["rss_mb"].items() if p in ("ours", "batch") and v]
        p99 = summary.get("p99_ms")
        latency = f"{p99:g} @ {summary['latency_rate']:g}/s" if p99 is not None else "-"
        peak = _cell(max(rss, default=None))
        rows.append([kind, *(_cell(rates.get(p)) for p in phases), latency, peak])
    return _markdown(rows)


def cpu_table(results: dict[str, dict[str, Any]]) -> str:
    """CPU ms per event of each phase's process tree (user + system) in the steady window,
    and the gateway emulator's per call while ours ran."""
    phases = [p for p in TITLES if any(p in s["cpu_ms_per_event"] for s in results.values())]
    rows = [["CPU ms per event", *(TITLES[p] for p in phases), "gateway emulator (ours)"]]
    for kind, summary in results.items():
        cpu = summary["cpu_ms_per_event"]
        emulator = summary["gateway_cpu_ms_per_event"].get("ours")
        rows.append([kind, *(_cell(cpu.get(p)) for p in phases), _cell(emulator)])
    return _markdown(rows)


def targets_table(results: dict[str, dict[str, Any]]) -> str:
    """Each target, its bound, and per broker the value measured and PASS or FAIL."""
    rows = [["target", "bound", *results]]
    for target in TARGETS:
        cells = []
        for summary in results.values():
            value = summary["ratios"].get(target.key)
            cells.append(f"{_cell(value)} {summary['targets'][target.key]}")
        rows.append([target.what, target.label, *cells])
    return _markdown(rows)


def state_store_line(values: dict[str, Any], pair_shares: list[float] | None = None) -> str:
    """``state store cost: +X ms CPU per event (Y % of the event's CPU)``, from one broker's
    ratios, and each pair of rounds' own share when there were more than one; ``n/a`` when
    the store phase or ours has no figure."""
    cost, share = values.get("state_store_cost_ms"), values.get("state_store_cost_share")
    if cost is None:
        return "state store cost: n/a"
    line = (
        f"state store cost: {cost:+.3f} ms CPU per event ({_percent(share)} % of the event's CPU)"
    )
    if pair_shares and len(pair_shares) > 1:
        each = ", ".join(_percent(s) for s in pair_shares)
        line += f"; {len(pair_shares)} pairs of rounds, each: {each} %"
    return line


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.1f}"


def state_store_lines(results: dict[str, dict[str, Any]]) -> str:
    """One state-store line per broker, with the target's verdict."""
    target = next(t for t in TARGETS if t.key == "state_store_cost_share")
    bound = f"target <= {target.bound * 100:g} %"
    return "\n".join(
        f"{kind}: {summary['state_store']['text']}, {bound}: {summary['targets'][target.key]}"
        for kind, summary in results.items()
    )


def waiting_lines(results: dict[str, dict[str, Any]], delay_ms: float) -> str:
    """Per broker, the waiting floor's reading: a no-op that holds its pool thread for the
    gateway's delay, against the plain no-op, and ours against it (no target: where the
    floor of a task that waits for its call lies)."""
    lines = []
    for kind, summary in results.items():
        values = summary["ratios"]
        waiting, ours = values.get("waiting_over_sameconf"), values.get("single_over_waiting")
        if waiting is None:
            continue
        lines.append(
            f"{kind}: a no-op waiting {delay_ms:g} ms in its thread runs at {_cell(waiting)} of "
            f"the no-op's events/s; ours at {_cell(ours)} of that"
        )
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def sweep_table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| broker | setting | ev/s | / no-op | CPU ms/ev | batch ev/s | batch CPU ms/ev | RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, phases in results.items():
        noop = phases.get("noop", {})
        rate = noop.get("events_per_s")
        cpu = noop.get("worker_cpu_ms")
        lines.append(f"| {kind} | no-op prefork c=2 | {_cell(rate)} | 1 | {_cell(cpu)} | | | |")
        for name, ours in phases.items():
            if not name.startswith("ours "):
                continue
            label = name.removeprefix("ours ")
            batch = phases.get(f"batch {label}", {})
            value = ours.get("events_per_s")
            ratio = round(value / rate, 2) if value and rate else None
            rss = max(ours.get("rss_mb") or 0, batch.get("rss_mb") or 0) or None
            cells = [
                kind,
                label,
                _cell(value or ours.get("error")),
                _cell(ratio),
                _cell(ours.get("worker_cpu_ms")),
                _cell(batch.get("events_per_s") or batch.get("error")),
                _cell(batch.get("worker_cpu_ms")),
                _cell(rss),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
