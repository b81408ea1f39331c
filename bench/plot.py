"""The PNG ``make bench`` writes (docs/bench.png): events/s and CPU per event of each phase
on each broker, and a single event's CPU split into the two floors and the relay's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")  # no display: a file only

import matplotlib.pyplot as plt

from bench.report import TITLES


def write(results: dict[str, dict[str, Any]], path: Path, *, title: str) -> None:
    kinds = list(results)
    phases = [p for p in TITLES if any(p in s["events_per_s"] for s in results.values())]
    fig, (rates, cpus, split) = plt.subplots(1, 3, figsize=(16, 5.2), width_ratios=[3, 3, 2])
    width = 0.8 / max(1, len(kinds))
    for i, kind in enumerate(kinds):
        xs = [x + (i - (len(kinds) - 1) / 2) * width for x in range(len(phases))]
        for axis, key, fmt in ((rates, "events_per_s", "%.0f"), (cpus, "cpu_ms_per_event", "%.2f")):
            values = [results[kind][key].get(p) or 0 for p in phases]
            bars = axis.bar(xs, values, width, label=kind)
            axis.bar_label(bars, fmt=fmt, fontsize=7)
    for axis, label in ((rates, "events/s (calls/s for bare HTTP)"), (cpus, "CPU ms per event")):
        axis.set_xticks(range(len(phases)), [TITLES[p] for p in phases], rotation=25, ha="right")
        axis.set_ylabel(label)
        axis.legend()
        axis.grid(axis="y", alpha=0.3)
    rates.set_title("throughput (higher is better)")
    cpus.set_title("CPU of the process tree per event (lower is better)")
    _split(split, results)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _split(axis: Any, results: dict[str, dict[str, Any]]) -> None:
    """Per broker, a single event's CPU stacked as the same-config no-op, the bare HTTP call
    and what is left (the relay's own); the same event with the state store on, its cost
    stacked on top; and a batch event's."""
    labels: list[str] = []
    stacks: list[tuple[float, float, float, float]] = []  # Celery, HTTP, relay, store
    for kind, summary in results.items():
        cpu = summary["cpu_ms_per_event"]
        http, floor, single = cpu.get("http") or 0, cpu.get("sameconf") or 0, cpu.get("ours")
        if single is not None:
            labels.append(f"{kind}\nsingle")
            stacks.append((floor, http, single - floor - http, 0.0))
            if cpu.get("store") is not None:
                labels.append(f"{kind}\n+ store")
                stacks.append((floor, http, single - floor - http, cpu["store"] - single))
        if cpu.get("batch") is not None:
            labels.append(f"{kind}\nbatch")
            stacks.append((0.0, http, cpu["batch"] - http, 0.0))
    xs = list(range(len(labels)))
    names = ("Celery: no-op, worker's config", "HTTP: bare urllib3 call", "the relay's own")
    bottoms = [0.0] * len(labels)
    for part, name in enumerate((*names, "the state store")):
        heights = [stack[part] for stack in stacks]
        bars = axis.bar(xs, heights, bottom=bottoms, label=name)
        if part == 2:
            axis.bar_label(bars, labels=[f"{h:+.2f}" for h in heights], fontsize=7)
        if part == 3:
            shown = [f"{h:+.2f}" if h else "" for h in heights]
            axis.bar_label(bars, labels=shown, fontsize=7)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    axis.set_xticks(xs, labels, fontsize=7)
    axis.set_ylabel("CPU ms per event")
    axis.set_title("where an event's CPU goes")
    axis.legend(fontsize=7)
    axis.grid(axis="y", alpha=0.3)
