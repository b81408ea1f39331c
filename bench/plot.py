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
    and what is left (the relay's own), next to a batch event's."""
    labels, floors, https, rests = [], [], [], []
    for kind, summary in results.items():
        cpu = summary["cpu_ms_per_event"]
        http = cpu.get("http") or 0
        for phase, floor in (("ours", cpu.get("sameconf") or 0), ("batch", 0.0)):
            total = cpu.get(phase)
            if total is None:
                continue
            labels.append(f"{kind}\n{'single' if phase == 'ours' else 'batch'}")
            floors.append(floor)
            https.append(http)
            rests.append(total - floor - http)
    xs = range(len(labels))
    axis.bar(xs, floors, label="Celery: no-op, worker's config")
    axis.bar(xs, https, bottom=floors, label="HTTP: bare urllib3 call")
    bottoms = [f + h for f, h in zip(floors, https, strict=True)]
    bars = axis.bar(xs, rests, bottom=bottoms, label="the relay's own")
    axis.bar_label(bars, labels=[f"{r:+.2f}" for r in rests], fontsize=7)
    axis.set_xticks(list(xs), labels)
    axis.set_ylabel("CPU ms per event")
    axis.set_title("where an event's CPU goes")
    axis.legend(fontsize=7)
    axis.grid(axis="y", alpha=0.3)
