"""``make bench BENCH_ARGS=--profile``: py-spy samples the worker while it drains the
single-event backlog, and a summary of where the time holding the GIL goes.

``py-spy record --gil`` samples only the thread that holds the GIL: with 128 threads,
sampling every thread falls behind, and the GIL holder is what uses the process's one core.
``--nonblocking`` reads the stacks without pausing the worker. The raw (collapsed) stacks are
kept next to the run's logs for a flame graph (``py-spy``'s speedscope or any
``flamegraph.pl``).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from bench.procs import ROOT, BenchError

#: ``function (path:line)`` in py-spy's raw output.
_FRAME_RE = re.compile(r"^(?P<function>.*?) \((?P<path>[^:()]*):?\d*\)$")


class Recorder:
    """``py-spy record`` attached to one process until ``stop``."""

    def __init__(self, pid: int, output: Path, rate: int = 200) -> None:
        spy = Path(sys.executable).parent / "py-spy"
        if not spy.exists():
            raise BenchError("py-spy is not installed (make install)")
        self.output = output
        self.proc = subprocess.Popen(  # noqa: S603  the venv's py-spy on our own child
            [str(spy), "record", "--gil", "--nonblocking", "--rate", str(rate), "--format",
             "raw", "--output", str(output), "--pid", str(pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip

    def stop(self) -> Path:
        """SIGINT makes py-spy write what it sampled."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        return self.output


def _has(*needles: str) -> Callable[[list[str]], bool]:
    return lambda frames: any(n in f for f in frames for n in needles)


def _logged_by_worker(frames: list[str]) -> bool:
    logging_call = ("Logger.log ", "Logger.info ", "Logger._log ", "Logger.debug ")
    return any(f.startswith(logging_call) for f in frames) and any(" (worker/" in f for f in frames)


#: Where a sample's time goes, the first rule that matches its stack winning: the floors'
#: parts (HTTP, Celery) and the relay's own, for ``make bench --profile``'s summary.
BUCKETS: tuple[tuple[str, Callable[[list[str]], bool]], ...] = (
    ("HTTP: urllib3 urlopen", _has("HTTPConnectionPool.urlopen")),
    ("relay: the log line per event", _logged_by_worker),
    ("relay: metrics", _has("(worker/metrics.py)")),
    ("relay: Redis delivery count", _has("(worker/redeliveries.py)")),
    ("relay: event parsing and encoding", _has("(worker/events.py)")),
    ("bench: a /metrics scrape", _has("prometheus_client/exposition.py")),
    ("relay: task, relay and gateway code", _has("(worker/tasks.py)", "(worker/relay.py)",
                                                "(worker/gateway.py)")),
    ("Celery: the tracer around a task", _has("(celery/app/trace.py)")),
    ("Celery: the consumer loop (receive, task events, ack)", _has("Hub.create_loop")),
)  # fmt: skip


def buckets(counts: Counter[tuple[str, ...]]) -> Counter[str]:
    """Samples per bucket; what no rule matches is the pool threads' own (waiting for work,
    handing the GIL on) and the garbage collector."""
    out: Counter[str] = Counter()
    for stack, n in counts.items():
        frames = [_short(f) for f in stack]
        label = next((name for name, rule in BUCKETS if rule(frames)), "other: pool threads, GC")
        out[label] += n
    return out


def stacks(path: Path) -> Counter[tuple[str, ...]]:
    """The collapsed stacks and their sample counts, outermost frame first."""
    counts: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[tuple(stack.split(";"))] += int(count)
    return counts


def _short(frame: str) -> str:
    """``function (file)``, the file relative to the project or to site-packages."""
    match = _FRAME_RE.match(frame)
    if not match:
        return frame
    path = match["path"].removeprefix(f"{ROOT}/")
    for marker in ("site-packages/", "/lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['function']} ({path})"


def summary(path: Path, top: int = 15) -> str:
    """The frames that hold the GIL longest, by themselves (self) and with what they call
    (inclusive, counted once per sample), as shares of all samples."""
    counts = stacks(path)
    total = sum(counts.values())
    if not total:
        return f"{path}: no samples"
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for stack, n in counts.items():
        own[_short(stack[-1])] += n
        for frame in {_short(f) for f in stack}:
            inclusive[frame] += n
    lines = [f"{path.name}: {total} samples holding the GIL", "where the time goes:"]
    lines += [f"  {n / total:6.1%}  {label}" for label, n in buckets(counts).most_common()]
    lines.append("self:")
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in own.most_common(top)]
    lines.append("inclusive, the worker's own code (worker/):")
    ours = [(f, n) for f, n in inclusive.most_common() if " (worker/" in f]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in ours[:top]]
    return "\n".join(lines)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(summary(Path(name)))
