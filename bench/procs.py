"""The processes a bench run starts (gateway emulator, Celery workers), their cleanup, and
the worker's memory, sampled from /proc.

Every process is started in a session of its own and stopped by its process group, so a
pool child cannot outlive the run; ``Processes.close`` runs on any exit, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
#: The waiting floor's sleep, in seconds, before its no-op task stamps its end
#: (bench/sameconf_app.py); unset or 0: none.
WAIT_VARIABLE = "BENCH_NOOP_WAIT_S"


class BenchError(RuntimeError):
    """A phase could not run (a process failed to start, a wait ran out of time)."""


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM to the process group, then SIGKILL after ``timeout``."""
    if proc.poll() is not None:
        _kill_group(proc.pid, signal.SIGKILL)  # children left behind by a dead parent
        return
    _kill_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class Emulator:
    """``python -m bench.gateway`` (the project's emulator, Nagle off) in its own process (its
    own GIL), on a free loopback port."""

    def __init__(self, delay_ms: float, log_path: Path) -> None:
        self.delay_ms = delay_ms
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603  our own interpreter and module
                [sys.executable, "-m", "bench.gateway", "--host", "127.0.0.1", "--port", "0",
                 "--delay-ms", str(delay_ms)],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=log, start_new_session=True,
            )  # fmt: skip
        if self.proc.stdout is None:
            raise BenchError("gateway emulator has no stdout")
        line = self.proc.stdout.readline().decode().strip()  # "... listening on http://h:p"
        if "listening on " not in line:
            stop_group(self.proc, 5)
            raise BenchError(f"gateway emulator did not start: {line!r}")
        self.url = line.rsplit(" ", 1)[1]
        self.gateway_url = f"{self.url}/pixel.gif"

    def calls(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/_emulator/calls", timeout=30) as answer:  # noqa: S310  loopback URL built here
            data: list[dict[str, Any]] = json.load(answer)
        return data

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.url}/_emulator/calls", method="DELETE")  # noqa: S310
        with urllib.request.urlopen(request, timeout=30):  # noqa: S310  loopback URL built here
            pass

    def close(self) -> None:
        stop_group(self.proc, 5)


def process_tree(root: int) -> list[int]:
    """``root`` and every descendant, from /proc/<pid>/task/<tid>/children."""
    found: list[int] = []
    todo = [root]
    while todo and len(found) < 10_000:
        pid = todo.pop()
        found.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
        except OSError:
            continue
    return found


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (its own threads, not its children)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / CLOCK_TICKS, sum(values) / CLOCK_TICKS


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_KB
    except (OSError, IndexError, ValueError):
        return 0


class RssSampler:
    """The peak over time of the summed RSS of a process tree, sampled every 100 ms, and a
    timeline of its CPU time, of the emulator's and of the whole machine's.

    A sum of RSS counts the pages a prefork parent shares with its children once per
    process, so it overstates a prefork pool's memory: a conservative figure.
    """

    def __init__(self, pids: list[int], interval: float = 0.1, other: int | None = None) -> None:
        self.pids = pids
        self.other = other
        self.interval = interval
        self.peak_kb = 0
        #: (wall time, worker tree CPU s, other process CPU s, machine busy s, machine total s)
        self.timeline: list[tuple[float, float, float, float, float]] = []
        self._cpu_gone = 0.0  # CPU of tree members that have exited
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.timeline) < 100_000:
            tree = [pid for root in self.pids for pid in process_tree(root)]
            total = sum(rss_kb(pid) for pid in tree)
            self.peak_kb = max(self.peak_kb, total)
            now = {pid: cpu_seconds(pid) for pid in tree}
            self._cpu_gone += sum(v for pid, v in self._last.items() if pid not in now)
            self._last = now
            other = cpu_seconds(self.other) if self.other else 0.0
            busy, whole = machine_busy_seconds()
            self.timeline.append(
                (time.time(), self._cpu_gone + sum(now.values()), other, busy, whole)
            )
            self._stop.wait(self.interval)

    def usage(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds used between two wall times: the worker's, the other's, the machine's
        busy share (0..1 of all cores), from the samples nearest inside the window."""
        inside = [s for s in self.timeline if start <= s[0] <= end]
        if len(inside) < 2:
            return {}
        first, last = inside[0], inside[-1]
        wall = last[0] - first[0]
        return {
            "wall": wall,
            "worker": last[1] - first[1],
            "other": last[2] - first[2],
            "machine_busy": (last[3] - first[3]) / max(1e-9, last[4] - first[4]),
        }

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(5)
        return self.peak_kb / 1024


class Worker:
    """Real ``celery -A <app> worker`` processes, one per environment (more than one to
    measure a process per core), their output in one log file; or, with ``module``, one
    ``python -m <module> <args>`` per environment (the bare HTTP loop)."""

    def __init__(
        self,
        app: str,
        envs: list[dict[str, str]],
        args: list[str],
        log_path: Path,
        other: int,
        *,
        module: str | None = None,
    ) -> None:
        self.log_path = log_path
        #: what the processes run, for an error message: the module, or the Celery app
        self.label = module if module is not None else f"celery -A {app}"
        self.procs: list[subprocess.Popen[bytes]] = []
        with log_path.open("ab") as log:
            for env in envs:
                name = f"bench-{os.getpid()}-{time.monotonic_ns()}@%h"
                command = [sys.executable, "-m", "celery", "-A", app, "worker", "-n", name, *args]
                if module is not None:
                    command = [sys.executable, "-m", module, *args]
                proc = subprocess.Popen(  # noqa: S603  our own interpreter and module
                    command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
                self.procs.append(proc)
        self.rss = RssSampler([proc.pid for proc in self.procs], other=other)
        self.peak_rss_mb = 0.0

    def ready(self) -> bool:
        """Every process has logged Celery's "<name> ready.": it is consuming."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return False
        return text.count(" ready.") >= len(self.procs)

    def finished(self) -> bool:
        """Every process has exited; one that exited with an error raises ``BenchError``."""
        for proc in self.procs:
            if proc.poll() is None:
                return False
            if proc.returncode != 0:
                raise BenchError(f"{self.label} exited with {proc.returncode}:\n{self.tail()}")
        return True

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise BenchError(f"worker exited with {proc.returncode}:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        self.peak_rss_mb = max(self.peak_rss_mb, self.rss.stop())
        for proc in self.procs:
            stop_group(proc, 30)


class Stoppable(Protocol):
    def close(self) -> None: ...


class Processes:
    """Everything started in a run (emulator, workers, the state store's redis-server),
    stopped in reverse order on exit."""

    def __init__(self) -> None:
        self._items: list[Stoppable] = []

    def add(self, item: Stoppable) -> None:
        self._items.append(item)

    def discard(self, item: Stoppable) -> None:
        item.close()
        if item in self._items:
            self._items.remove(item)

    def close(self) -> None:
        while self._items:
            self._items.pop().close()
