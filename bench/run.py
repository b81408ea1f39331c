"""``make bench``: the worker against the floors of its own configuration (a no-op task
and a bare HTTP loop), a prefork no-op task and a naive relay, in one run.

For each broker (Redis, RabbitMQ; each on a database or vhost of its own, removed after)
and the project's gateway emulator answering after ``--delay-ms`` (50 ms by default; run by
``bench/gateway.py``, which turns Nagle's algorithm off), ``--rounds`` times:

1. noop: N tasks pre-published, then ``celery -A bench.noop_app worker -P prefork -c 2``
   (plain Celery defaults: the earlier rounds' baseline);
2. sameconf: N events pre-published through the producer API, then
   ``celery -A bench.sameconf_app worker -Q totango``: a no-op task in the worker's own
   Celery configuration (``worker.application.config``), the floor of Celery's cost;
3. waiting: the same no-op that first sleeps ``--delay-ms`` in its pool thread
   (``BENCH_NOOP_WAIT_S``): the floor of any task that holds its thread while its call is
   in flight, which is what the worker's task does; not a target, a reading of how far
   ours is from the floor its design sets;
4. http: ``python -m bench.http_loop``, N calls from as many threads as the worker's pool
   over one urllib3 keep-alive pool to the same emulator, no queue: the floor of HTTP's;
5. naive: N tasks pre-published, then ``celery -A bench.naive_app worker -P threads -c 32``;
6. ours: N events pre-published through the producer API, then the worker as production
   runs it (``celery -A worker.app worker --loglevel=INFO -Q totango`` with
   ``TOTANGO_POOL``/``_CONCURRENCY``/``_PREFETCH_MULTIPLIER`` from ``--config``, and
   ``RECOMMENDED_CONF`` on top until worker/application.py has it), with the state-store
   features off (``TOTANGO_DEDUP=false``, on both brokers); then ``--latency-events``
   more at half the rate the first round reached (or ``--latency-rate``) for the
   enqueue-to-answer latency, in every round at the same pace (the lowest p99 counts);
7. store: the same as ours with the state-store features on: ``TOTANGO_STATE_URL`` names a
   private ``redis-server`` the bench starts on a free port (bench/store.py, emptied before
   each round, stopped at the end), and every delivered event must be recorded there; its
   CPU per event minus ours' is the features' cost (bench/ratios.py), both the least of
   ``--store-pairs`` pairs of rounds (ours straight before the store);
8. batch: a fresh worker as the batch Deployment runs (``-Q totango.batch`` with
   ``--batch-config``), then, once every process is ready, ``--batch-events`` events in
   batches of 100 (``Producer.send_batch``).

A completion is a 200 answered by the gateway, or a no-op task's end. events/s and CPU per
event (the phase's process tree, user + system) are taken between 10 % and 90 % of the
completions (bench/ratios.py); each phase keeps its best round (the most events/s, the
least CPU per event, the lowest p99). Every delivered event is checked to arrive exactly
once. The ratios and targets (bench/ratios.py) compare figures from the same run; a PNG
plot goes to ``--plot`` (docs/bench.png). The last line printed is the whole result as one
JSON object.
``--sweep`` compares settings instead, ``--quick`` is a short run for development and
``--profile`` samples the worker with py-spy. Every process started is stopped, and every
vhost and database removed, on any exit including Ctrl-C; the run stops waiting after
``--time-limit`` seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from bench import load, ratios, report
from bench.procs import ROOT, WAIT_VARIABLE, BenchError, Emulator, Processes, Worker
from bench.store import PrivateStore
from tests.brokers import broker
from tests.faults.processes import free_port
from worker.application import create_app
from worker.client import Producer
from worker.contract import BATCH_QUEUE, QUEUE
from worker.events import MAX_BATCH_EVENTS, TRACK_ACTIVITY
from worker.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

#: The settings the README recommends for production, and what ``make bench`` runs.
RECOMMENDED_POOL = "threads"
RECOMMENDED_CONCURRENCY = 128
RECOMMENDED_PREFETCH = 2
RECOMMENDED_PROCESSES = 1
#: The batch Deployment (ops/base/worker-batch-deployment.yaml, ``-Q totango.batch``): few
#: batch messages at once and reserved (8 x 100 events), ``TOTANGO_BATCH_SENDERS`` (128)
#: calls in flight.
RECOMMENDED_BATCH = "threads:8:1"

#: Celery settings the bench applies on top of worker/application.py (through bench.tuned_app), to
#: measure a proposed change before worker/application.py has it; ``--as-configured`` runs
#: worker.app untouched. Empty: the worker runs exactly as configured, task events on.
RECOMMENDED_CONF: dict[str, Any] = {}

#: The targets are in bench/ratios.py (TARGETS), computed from this run's floors.

#: The longest any single phase may wait for its events, whatever the time limit left.
PHASE_TIMEOUT = 180.0

#: Where ``make bench`` writes its plot (linked from docs/benchmarks.md).
PLOT = ROOT / "docs" / "bench.png"
#: Threads that publish a single-event backlog.
PUBLISHERS = 4
#: ``--profile``: enough events for a few thousand samples.
PROFILE_EVENTS = 10_000
#: ``--quick``: a development run of about a minute and a half, too short for the docs.
QUICK = {
    "rounds": 1,
    "store_pairs": 1,
    "events": 1000,
    "batch_events": 3000,
    "latency_events": 300,
}


@dataclass(frozen=True)
class Config:
    """How the worker runs: ``pool:concurrency:prefetch:processes:loglevel``."""

    pool: str = RECOMMENDED_POOL
    concurrency: int = RECOMMENDED_CONCURRENCY
    prefetch: int = RECOMMENDED_PREFETCH
    processes: int = RECOMMENDED_PROCESSES
    loglevel: str = "INFO"
    conf: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.conf.items())
        copies = f"{self.processes} x " if self.processes > 1 else ""
        level = f" log={self.loglevel}" if self.loglevel != "INFO" else ""
        return f"{copies}{self.pool} c={self.concurrency} prefetch={self.prefetch}{level}{extra}"

    @classmethod
    def parse(cls, text: str, conf: dict[str, Any]) -> Config:
        pool, concurrency, prefetch, processes, level = [*text.split(":"), "", "", "", ""][:5]
        return cls(
            pool or RECOMMENDED_POOL,
            int(concurrency or RECOMMENDED_CONCURRENCY),
            int(prefetch or RECOMMENDED_PREFETCH),
            min(8, int(processes or RECOMMENDED_PROCESSES)),
            (level or "INFO").upper(),
            conf,
        )


class Deadline:
    """The run's time limit: each wait gets what is left of it, at most PHASE_TIMEOUT."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def budget(self, what: str) -> float:
        left = self.end - time.monotonic()
        if left <= 1:
            raise BenchError(f"time limit reached before {what}")
        return min(PHASE_TIMEOUT, left)


@dataclass
class Run:
    args: argparse.Namespace
    emulator: Emulator
    processes: Processes
    deadline: Deadline
    out: Path
    store: PrivateStore | None = None
    #: Per broker, the pace of the latency measurement, set by its first round: every
    #: round is paced the same, so that their p99s can be compared.
    paces: dict[str, float] = field(default_factory=dict)

    def state_store(self) -> PrivateStore:
        """The private redis-server of the store phases, started on first use and emptied
        for each phase; ``Processes`` stops it at the end of the run."""
        if self.store is None:
            self.store = PrivateStore(self.out / "state-store")
            self.processes.add(self.store)
        self.store.flush()
        return self.store

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def start(
        self,
        app: str,
        envs: list[dict[str, str]],
        args: list[str],
        name: str,
        module: str | None = None,
    ) -> Worker:
        log_path = self.out / f"{name}.log"
        worker = Worker(app, envs, args, log_path, self.emulator.proc.pid, module=module)
        self.processes.add(worker)
        return worker

    def stop(self, worker: Worker) -> float:
        self.processes.discard(worker)
        return round(worker.peak_rss_mb, 1)

    def cpu(self, worker: Worker, times: list[float]) -> dict[str, Any]:
        """CPU per event in the steady window (10 % to 90 % of the completions): the
        worker's process tree's and the gateway emulator's (user + system), in ms, and how
        busy the whole machine was (all cores = 1)."""
        window = ratios.steady_window(times)
        used = worker.rss.usage(window.start, window.end) if window.completions else {}
        if not used:
            return {}
        per = window.completions * used["wall"] / max(1e-9, window.end - window.start)
        return {
            "worker_cpu_ms": round(used["worker"] / per * 1000, 3),
            "gateway_cpu_ms": round(used["other"] / per * 1000, 3),
            "machine_busy": round(used["machine_busy"], 2),
        }


# --- the phases ---------------------------------------------------------------------------


def _prepublish(run: Run, app: Celery, task: str, queue: str, *, tag: str, what: str) -> None:
    """A baseline's backlog: ``--events`` tasks published with plain Celery, all queued
    before its worker starts."""
    n, url = run.args.events, app.conf.broker_url
    with app.producer_or_acquire() as producer:
        for i in range(n):
            app.send_task(task, kwargs=load.event_kwargs(tag, i), producer=producer)
    app.close()
    load.wait_for(
        lambda: load.queue_length(url, queue) >= n,
        run.deadline.budget(f"{what} publish"),
        f"the {what} backlog",
    )


def run_noop(run: Run, kind: str, url: str) -> dict[str, Any]:
    from bench import noop_app  # noqa: PLC0415  reads BENCH_* only when a phase needs it

    n, tag = run.args.events, f"noop{uuid.uuid4().hex[:6]}"
    _prepublish(run, noop_app.make_app(url), noop_app.TASK, noop_app.QUEUE, tag=tag, what="no-op")
    stamps = run.out / f"{tag}-{kind}.stamps"
    env = {**_clean_env(), "BENCH_BROKER_URL": url, "BENCH_STAMP_FILE": str(stamps)}
    worker = run.start("bench.noop_app", [env], ["-P", "prefork", "-c", "2"], f"noop-{kind}")

    def done() -> bool:
        return stamps.exists() and stamps.read_bytes().count(b"\n") >= n

    try:
        load.wait_for(done, run.deadline.budget("no-op"), f"{n} no-op tasks", worker)
    finally:
        rss = run.stop(worker)
    times = [float(line) for line in stamps.read_text().split()]
    return {
        "events_per_s": round(load.rate(times), 1),
        "pool": "prefork c=2",
        "rss_mb": rss,
        **run.cpu(worker, times),
    }


def run_naive(run: Run, kind: str, url: str) -> dict[str, Any]:
    from bench import naive_app  # noqa: PLC0415  reads BENCH_* only when a phase needs it

    n, tag = run.args.events, f"naive{uuid.uuid4().hex[:6]}"
    emulator = run.emulator
    app = naive_app.make_app(url, emulator.gateway_url)
    _prepublish(run, app, naive_app.TASK, naive_app.QUEUE, tag=tag, what="naive")
    emulator.reset()
    env = {
        **_clean_env(),
        "BENCH_BROKER_URL": url,
        "BENCH_GATEWAY_URL": emulator.gateway_url,
    }
    pool = ["-P", "threads", "-c", str(run.args.naive_concurrency)]
    worker = run.start("bench.naive_app", [env], pool, f"naive-{kind}")
    try:
        budget = run.deadline.budget("naive")
        waited = load.wait_for(
            lambda: load.queue_length(url, naive_app.QUEUE) == 0, budget, "naive drain", worker
        )
        load.wait_for(
            lambda: len(load.phase_calls(emulator.calls(), tag)) >= n,
            max(1.0, budget - waited),
            f"{n} naive deliveries",
            worker,
            interval=0.5,
        )
    finally:
        rss = run.stop(worker)
    calls = load.check_exactly_once(load.phase_calls(emulator.calls(), tag), n)
    emulator.reset()
    times = load.answered_at(calls, emulator.delay_ms)
    label = f"threads c={run.args.naive_concurrency}"
    return {
        "events_per_s": round(load.rate(times), 1),
        "pool": label,
        "rss_mb": rss,
        **run.cpu(worker, times),
    }


def run_ours(
    run: Run,
    kind: str,
    url: str,
    config: Config,
    *,
    latency: bool = True,
    store: PrivateStore | None = None,
) -> dict[str, Any]:
    """The single-event worker on a pre-published backlog; with ``store``, the state-store
    features on (that Redis as ``TOTANGO_STATE_URL``), else off."""
    phase = "ours" if store is None else "store"
    n, tag = run.args.events, f"{phase}{uuid.uuid4().hex[:6]}"
    emulator = run.emulator
    envs, ports = _worker_envs(run, url, config, f"{phase}-{kind}")
    if store is not None:
        envs = [
            {
                **env,
                "TOTANGO_DEDUP": "true",
                "TOTANGO_NEWEST_WINS": "true",
                "TOTANGO_BREAKER": "true",
                "TOTANGO_STATE_URL": store.url,
            }
            for env in envs
        ]
    producer = _publish_events(run, url, envs[0], tag)
    emulator.reset()
    worker = _start_ours(run, envs, config, f"{phase}-{tag}-{kind}", QUEUE)
    result: dict[str, Any] = {}
    spy = _spy(run, worker, f"{phase}-{kind}")
    try:
        load.drained_then_delivered(
            url, QUEUE, ports, n, timeout=run.deadline.budget(phase), worker=worker
        )
        if spy is not None:
            result["profile"] = str(spy.stop())
        calls = load.check_exactly_once(_gateway_calls(run, tag, n, worker), n)
        if store is not None:
            # Round trips the worker made to the store per event (read before the SCAN).
            result["store_round_trips"] = round(store.reads() / n, 2)
            result["recorded"] = _check_recorded(store, n)
        times = load.answered_at(calls, emulator.delay_ms)
        result["events_per_s"] = round(load.rate(times), 1)
        emulator.reset()
        if latency:
            # At half the rate the first round reached, unless --latency-rate says.
            per_s = run.args.latency_rate or run.paces.setdefault(
                kind, ratios.latency_rate(result["events_per_s"], 200.0)
            )
            result.update(_latency(run, producer, ports, n, worker, per_s=per_s))
    finally:
        result["rss_mb"] = run.stop(worker)
        result["processes"] = config.processes
        producer.app.close()
    if "events_per_s" in result:
        result.update(run.cpu(worker, times))
    return result


def run_store(run: Run, kind: str, url: str, config: Config) -> dict[str, Any]:
    """ours with the state-store features on, on the bench's private redis-server."""
    return run_ours(run, kind, url, config, latency=False, store=run.state_store())


def _check_recorded(store: PrivateStore, n: int) -> int:
    """Every delivered event left its record: the features ran on each event's id (the one
    the producer API stamped), or the phase measured nothing of them."""
    recorded = store.recorded()
    if recorded < n:
        raise BenchError(f"the state store holds {recorded} delivered ids for {n} events")
    return recorded


def _publish_events(run: Run, url: str, env: dict[str, str], tag: str) -> Producer:
    """The single-event backlog: ``--events`` events through the producer API, all queued
    on ``totango`` before a worker starts. ``Producer.prepare`` and ``enqueue`` stamp each
    event as every producer app's are (an event id, also the task id, and the enqueue
    time), so the worker's per-event work on them, the store's included, is the real one."""
    n = run.args.events
    producer = Producer(app=create_app(Settings.from_env(env)))
    prepared = [producer.prepare(TRACK_ACTIVITY, **load.event_kwargs(tag, i)) for i in range(n)]
    # A few publishers at once: each publish waits for the broker's confirm, and one at a
    # time the backlog took longer than the phase it feeds.
    with ThreadPoolExecutor(PUBLISHERS, thread_name_prefix="bench-publish") as publishers:
        for _ in publishers.map(lambda p: p.enqueue(), prepared):
            pass
    load.wait_for(
        lambda: load.queue_length(url, QUEUE) >= n, run.deadline.budget("publish"), "backlog"
    )
    return producer


def run_sameconf(
    run: Run, kind: str, url: str, config: Config, *, wait: float = 0.0
) -> dict[str, Any]:
    """The no-op task in the worker's own configuration (bench/sameconf_app.py), on the
    same messages as ours, consumed as production does (``-Q totango``); with ``wait``, the
    task first sleeps that many seconds (the waiting floor)."""
    phase = "waiting" if wait else "sameconf"
    n, tag = run.args.events, f"{phase[:4]}{uuid.uuid4().hex[:6]}"
    envs, _ports = _worker_envs(run, url, config, f"{phase}-{kind}")
    stamps = run.out / f"{tag}-{kind}.stamps"
    envs = [{**env, "BENCH_STAMP_FILE": str(stamps), WAIT_VARIABLE: str(wait)} for env in envs]
    _publish_events(run, url, envs[0], tag).app.close()
    args = [f"--loglevel={config.loglevel}", "-Q", QUEUE]
    worker = run.start("bench.sameconf_app", envs, args, f"{phase}-{tag}-{kind}")
    spy = _spy(run, worker, f"{phase}-{kind}") if not wait else None

    def done() -> bool:
        return stamps.exists() and stamps.read_bytes().count(b"\n") >= n

    try:
        load.wait_for(done, run.deadline.budget("same-config no-op"), f"{n} no-op tasks", worker)
        if spy is not None:
            spy.stop()
    finally:
        rss = run.stop(worker)
    # A message whose ack had not reached the broker comes back: not ours to deliver.
    load.purge(url, QUEUE)
    times = [float(line) for line in stamps.read_text().split()]
    return {
        "events_per_s": round(load.rate(times), 1),
        "pool": config.label,
        "rss_mb": rss,
        **run.cpu(worker, times),
    }


def run_http(run: Run, kind: str, _url: str, config: Config) -> dict[str, Any]:
    """The bare HTTP loop (bench/http_loop.py): ``--events`` calls from as many threads as
    the worker's pool, over one urllib3 pool, to the same emulator; no broker."""
    n, tag = run.args.events, f"http{uuid.uuid4().hex[:6]}"
    emulator = run.emulator
    emulator.reset()
    args = ["--url", emulator.gateway_url, "--calls", str(n)]
    args += ["--threads", str(config.concurrency), "--tag", tag]
    loop = run.start("", [_clean_env()], args, f"http-{tag}-{kind}", module="bench.http_loop")
    try:
        load.wait_for(loop.finished, run.deadline.budget("bare HTTP"), f"{n} bare calls")
    finally:
        rss = run.stop(loop)
    calls = load.check_exactly_once(load.phase_calls(emulator.calls(), tag), n)
    emulator.reset()
    times = load.answered_at(calls, emulator.delay_ms)
    return {
        "events_per_s": round(load.rate(times), 1),
        "pool": f"{config.concurrency} threads, one urllib3 pool",
        "rss_mb": rss,
        **run.cpu(loop, times),
    }


def _spy(run: Run, worker: Worker, name: str) -> Any:
    """With ``--profile``, py-spy on the worker from the moment it consumes (its start-up's
    imports are no per-event cost), written to ``profile-<name>.txt``."""
    if not run.args.profile:
        return None
    from bench.profile import Recorder  # noqa: PLC0415  py-spy only when profiling

    load.wait_for(worker.ready, run.deadline.budget("worker ready"), "ready", worker, 0.05)
    return Recorder(worker.procs[0].pid, run.out / f"profile-{name}.txt")


def _latency(
    run: Run, producer: Producer, ports: list[int], already: int, worker: Worker, *, per_s: float
) -> dict[str, Any]:
    """Events published at a steady rate to the running worker: enqueue to the answer."""
    m, tag = run.args.latency_events, f"lat{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    for i in range(m):
        pause = started + i / per_s - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        producer.track_activity(**load.event_kwargs(tag, i, stamp=time.time()))
    load.wait_for(
        lambda: load.delivered_counter(ports) >= already + m,
        run.deadline.budget("latency"),
        f"{m} paced deliveries",
        worker,
    )
    calls = load.check_exactly_once(_gateway_calls(run, tag, m, worker), m)
    run.emulator.reset()
    values = load.latencies_ms(calls, run.emulator.delay_ms)
    return {
        "latency_rate": per_s,
        "p50_ms": round(load.percentile(values, 50), 1),
        "p99_ms": round(load.percentile(values, 99), 1),
    }


def run_batch(run: Run, kind: str, url: str, config: Config) -> dict[str, Any]:
    b, tag = run.args.batch_events, f"batch{uuid.uuid4().hex[:6]}"
    emulator = run.emulator
    envs, ports = _worker_envs(run, url, config, f"batch-{kind}")
    producer = Producer(app=create_app(Settings.from_env(envs[0])))
    prepared = [producer.prepare(TRACK_ACTIVITY, **load.event_kwargs(tag, i)) for i in range(b)]
    messages = math.ceil(b / MAX_BATCH_EVENTS)
    emulator.reset()
    # The workers first, then the batches: a backlog of ~100 heavy messages published before
    # they start goes to whichever process connects first (prefetch holds them all), so
    # with several processes one would do the work and the others wait. Pods that are
    # already running when the traffic comes, as in production, share it.
    worker = _start_ours(run, envs, config, f"batch-{tag}-{kind}", BATCH_QUEUE)
    try:
        load.wait_for(worker.ready, run.deadline.budget("workers ready"), "ready", worker)
        producer.send_batch(prepared)
        producer.app.close()
        budget = run.deadline.budget("batch")
        load.drained_then_delivered(url, BATCH_QUEUE, ports, b, timeout=budget, worker=worker)
        calls = load.check_exactly_once(_gateway_calls(run, tag, b, worker), b)
    finally:
        rss = run.stop(worker)
    emulator.reset()
    times = load.answered_at(calls, emulator.delay_ms)
    return {
        "events_per_s": round(load.rate(times), 1),
        "messages": messages,
        "rss_mb": rss,
        "processes": config.processes,
        **run.cpu(worker, times),
    }


def _gateway_calls(run: Run, tag: str, n: int, worker: Worker) -> list[dict[str, Any]]:
    """The phase's calls, once the gateway has ``n`` answered 200. The workers' delivered
    counter is only the cheap signal to start looking (polling the gateway's whole call list
    costs it CPU while it serves); the gateway's record is what counts."""
    found: list[dict[str, Any]] = []

    def enough() -> bool:
        found[:] = load.phase_calls(run.emulator.calls(), tag)
        return sum(1 for c in found if c["status"] == 200) >= n

    load.wait_for(enough, min(30.0, run.deadline.budget("gateway record")), "gateway", worker, 1.0)
    time.sleep(0.5)  # a late duplicate would show now
    return load.phase_calls(run.emulator.calls(), tag)


def _start_ours(
    run: Run, envs: list[dict[str, str]], config: Config, name: str, queue: str
) -> Worker:
    # The production command (ops/base/worker-deployment.yaml, worker-batch-deployment.yaml);
    # a sweep with Celery overrides goes through bench.tuned_app, which builds the same app
    # and updates it.
    app = "bench.tuned_app" if config.conf else "worker.app"
    return run.start(app, envs, [f"--loglevel={config.loglevel}", "-Q", queue], name)


def _worker_envs(
    run: Run, url: str, config: Config, name: str
) -> tuple[list[dict[str, str]], list[int]]:
    """One environment per worker process, each with a metrics port of its own."""
    envs, ports = [], []
    for copy in range(config.processes):
        port = free_port()
        envs.append(
            {
                **_clean_env(),
                "TOTANGO_BROKER_URL": url,
                "TOTANGO_GATEWAY_URL": run.emulator.gateway_url,
                "TOTANGO_SERVICE_ID": load.SERVICE_ID,
                "TOTANGO_POOL": config.pool,
                "TOTANGO_CONCURRENCY": str(config.concurrency),
                "TOTANGO_PREFETCH_MULTIPLIER": str(config.prefetch),
                "TOTANGO_METRICS_PORT": str(port),
                "TOTANGO_HEARTBEAT_FILE": str(run.out / f"{name}-{copy}.heartbeat"),
                "TOTANGO_LOG_LEVEL": config.loglevel,
                # The state-store features are measured on their own (the store phase): off
                # here on both brokers, where Redis would otherwise be its own store.
                "TOTANGO_DEDUP": "false",
                "TOTANGO_NEWEST_WINS": "false",
                "TOTANGO_BREAKER": "false",
                "BENCH_CONF": json.dumps(config.conf),
            }
        )
        if config.pool == "prefork":  # each child counts in files the main process serves
            envs[-1]["PROMETHEUS_MULTIPROC_DIR"] = str(run.out / f"prometheus-{name}-{copy}")
        ports.append(port)
    return envs, ports


def _clean_env() -> dict[str, str]:
    """This environment without anything that would point a worker elsewhere."""
    drop = ("TOTANGO_", "SENTRY_", "BENCH_", "PROMETHEUS_MULTIPROC_DIR", "CELERY_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONPATH"] = str(ROOT)
    return env


# --- a whole run --------------------------------------------------------------------------


def _phase(run: Run, name: str, results: dict[str, Any], fn: Any, *args: Any) -> None:
    run.log(f"{name} ...")
    try:
        results[name] = fn(run, *args)
    except BenchError as exc:
        run.log(f"{name} FAILED: {exc}")
        results[name] = {"error": str(exc).splitlines()[0]}
    else:
        run.log(f"{name}: {results[name]}")


PHASES = ("noop", "sameconf", "waiting", "http", "naive", "ours", "store", "batch")


def bench_broker(run: Run, kind: str, config: Config, batch: Config) -> dict[str, Any]:
    """Every phase ``--rounds`` times, interleaved, on one isolated broker. Each phase keeps
    its best round: noise from other load on the machine only ever slows a phase down, and
    every phase gets the same number of tries."""
    phases = [p for p in PHASES if p in run.args.phases.split(",")]
    tries: dict[str, list[dict[str, Any]]] = {p: [] for p in phases}
    with broker(kind) as url:
        run.log(f"{kind}: {url}")
        for _ in range(run.args.rounds):
            for phase in phases:
                results: dict[str, Any] = {}
                if phase == "noop":
                    _phase(run, phase, results, run_noop, kind, url)
                elif phase == "sameconf":
                    _phase(run, phase, results, run_sameconf, kind, url, config)
                elif phase == "waiting":
                    wait = run.args.delay_ms / 1000
                    _phase(run, phase, results, _waiting, kind, url, config, wait)
                elif phase == "http":
                    _phase(run, phase, results, run_http, kind, url, config)
                elif phase == "naive":
                    _phase(run, phase, results, run_naive, kind, url)
                elif phase == "ours":
                    _phase(run, phase, results, run_ours, kind, url, config)
                elif phase == "store":
                    _phase(run, phase, results, run_store, kind, url, config)
                else:
                    _phase(run, phase, results, run_batch, kind, url, batch)
                tries[phase].append(results[phase])
        pairs = _store_pairs(run, kind, url, config, tries)
    best = {phase: best_round(found) for phase, found in tries.items()}
    if pairs:
        best["store"] = best_round([store for _, store in pairs])
        best["store"].update(store_baseline(pairs))
    summary = summarize(best, delay_ms=run.args.delay_ms)
    summary["rounds"] = {p: [t.get("events_per_s") for t in found] for p, found in tries.items()}
    return summary


Pair = tuple[dict[str, Any], dict[str, Any]]


def _store_pairs(
    run: Run, kind: str, url: str, config: Config, tries: dict[str, list[dict[str, Any]]]
) -> list[Pair]:
    """The (ours, store) rounds that measure the state store's cost: each round's pair,
    then more pairs, ours straight before the store, until there are ``--store-pairs``.
    The extra ours rounds count only as the store's baseline, so that every phase's own
    figures still come from ``--rounds`` tries. Empty unless both phases run."""
    if "ours" not in tries or "store" not in tries:
        return []
    pairs = list(zip(tries["ours"], tries["store"], strict=True))
    while len(pairs) < run.args.store_pairs:
        results: dict[str, Any] = {}
        _phase(run, "ours", results, _ours_only, kind, url, config)
        _phase(run, "store", results, run_store, kind, url, config)
        pairs.append((results["ours"], results["store"]))
    return pairs


def store_baseline(pairs: list[Pair]) -> dict[str, Any]:
    """The store's baseline over every pair: the least CPU per event of ours with the
    features off (noise only ever adds to it, as in ``best_round``), and each pair's own
    difference as a share of its ours, to show how far one pair can be from another."""
    cpu = [(ours.get("worker_cpu_ms"), store.get("worker_cpu_ms")) for ours, store in pairs]
    off = [o for o, _ in cpu if o is not None]
    shares = [
        ratios.state_store_cost(on, off_cpu)[1]
        for off_cpu, on in cpu
        if off_cpu is not None and on is not None
    ]
    return {"baseline_cpu_ms": min(off) if off else None, "pair_shares": shares}


def best_round(tries: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the most events/s, with the latency of the round with the lowest p99,
    the lowest CPU per event and the highest RSS of all rounds; the first error when no round
    finished. Other load on the machine only ever slows a phase down, delays its events and
    adds to its CPU per event (more context switches, colder caches), never the other way."""
    done = [t for t in tries if "events_per_s" in t]
    if not done:
        return tries[0]
    best = dict(max(done, key=lambda t: t["events_per_s"]))
    paced = [t for t in done if t.get("p99_ms") is not None]
    if paced:
        quickest = min(paced, key=lambda t: t["p99_ms"])
        best.update({k: quickest[k] for k in ("p50_ms", "p99_ms", "latency_rate") if k in quickest})
    best["rss_mb"] = max(t.get("rss_mb") or 0 for t in done)
    cpu = [t["worker_cpu_ms"] for t in done if t.get("worker_cpu_ms") is not None]
    if cpu:
        best["worker_cpu_ms"] = min(cpu)
    return best


def sweep_broker(run: Run, kind: str, configs: list[Config]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with broker(kind) as url:
        run.log(f"{kind}: {url}")
        _phase(run, "noop", results, run_noop, kind, url)
        for config in configs:
            _phase(run, f"ours {config.label}", results, _ours_only, kind, url, config)
            _phase(run, f"batch {config.label}", results, run_batch, kind, url, config)
    return results


def _waiting(run: Run, kind: str, url: str, config: Config, wait: float) -> dict[str, Any]:
    return run_sameconf(run, kind, url, config, wait=wait)


def _ours_only(run: Run, kind: str, url: str, config: Config) -> dict[str, Any]:
    return run_ours(run, kind, url, config, latency=False)


def summarize(results: dict[str, Any], *, delay_ms: float) -> dict[str, Any]:
    """One broker's figures, the ratios to the floors and each target's verdict."""
    values = ratios.ratios(results, delay_ms=delay_ms)
    ours = results.get("ours", {})
    return {
        "events_per_s": {p: r.get("events_per_s") for p, r in results.items()},
        "cpu_ms_per_event": {p: r.get("worker_cpu_ms") for p, r in results.items()},
        "gateway_cpu_ms_per_event": {
            p: r.get("gateway_cpu_ms") for p, r in results.items() if p not in ("noop", "sameconf")
        },
        "rss_mb": {p: r.get("rss_mb") for p, r in results.items()},
        "p50_ms": ours.get("p50_ms"),
        "p99_ms": ours.get("p99_ms"),
        "latency_rate": ours.get("latency_rate"),
        "ratios": values,
        "targets": {k: ratios.verdict_text(v) for k, v in ratios.verdicts(values).items()},
        "state_store": {
            "cost_ms": values.get("state_store_cost_ms"),
            "share": values.get("state_store_cost_share"),
            "pair_shares": results.get("store", {}).get("pair_shares"),
            "text": report.state_store_line(values, results.get("store", {}).get("pair_shares")),
        },
        "errors": {p: r["error"] for p, r in results.items() if "error" in r},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--delay-ms", type=float, default=50.0, help="gateway emulator delay (default 50)")
    add("--events", type=int, default=6000, help="events per single-event phase (6000)")
    add("--batch-events", type=int, default=10000, help="events in the batch phase (10000)")
    add("--latency-events", type=int, default=1000, help="paced events for latency (1000)")
    add("--latency-rate", type=float, default=0.0,
        help="paced events per second (0: half the rate ours just reached)")  # fmt: skip
    add("--naive-concurrency", type=int, default=32, help="naive relay threads (32)")
    add("--brokers", default="redis,rabbitmq", help="comma-separated: redis, rabbitmq")
    add("--config", default=f"{RECOMMENDED_POOL}:{RECOMMENDED_CONCURRENCY}:{RECOMMENDED_PREFETCH}",
        help="the worker's pool:concurrency:prefetch[:processes[:loglevel]]")  # fmt: skip
    add("--batch-config", default=RECOMMENDED_BATCH,
        help=f"the batch worker's settings, the same way ({RECOMMENDED_BATCH})")  # fmt: skip
    add("--phases", default=",".join(PHASES), help=f"a subset of {','.join(PHASES)}")
    add("--sweep", default="", help="compare settings instead, e.g. threads:32:2,threads:64:2")
    add("--conf", action="append", default=[], help="a Celery override KEY=JSON (sweep)")
    add("--rounds", type=int, default=2, help="tries of each phase; the best counts (2)")
    add("--store-pairs", type=int, default=4,
        help="rounds of ours and store, one after the other, for the state store's cost; "
        "those beyond --rounds count only for it (4)")  # fmt: skip
    add("--as-configured", action="store_true",
        help="run worker.app exactly as configured, without RECOMMENDED_CONF")  # fmt: skip
    add("--time-limit", type=float, default=900.0, help="seconds for the whole run (900)")
    add("--plot", default=None,
        help=f"where to write the PNG plot ({PLOT.relative_to(ROOT)}; quick: the run's "
        "folder; '' for none)")  # fmt: skip
    add("--profile", action="store_true",
        help="py-spy --gil on the same-config no-op and on the worker draining the "
        "single-event backlog, without and with the state store, once per broker (its "
        "figures are not for the docs)")  # fmt: skip
    add("--quick", action="store_true",
        help="for development: 1 round, 1000 events, 3000 batch events, 300 paced; the "
        "options given still win")  # fmt: skip
    args = parser.parse_args(argv)
    if args.profile:
        args.phases, args.rounds, args.store_pairs, args.plot = "sameconf,ours,store", 1, 1, ""
        if args.events == parser.get_default("events"):
            args.events = PROFILE_EVENTS
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    caps = {
        "events": 100_000,
        "batch_events": 100_000,
        "latency_events": 20_000,
        "rounds": 5,
        "store_pairs": 8,
    }
    for name, cap in caps.items():
        if not 1 <= getattr(args, name) <= cap:
            parser.error(f"--{name.replace('_', '-')} must be between 1 and {cap}")
    if not 0 <= args.latency_rate <= 5000 or not 0 <= args.delay_ms <= 5000:
        parser.error("--latency-rate must be 0-5000 and --delay-ms 0-5000")
    return args


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _run(args: argparse.Namespace) -> Iterator[Run]:
    out = ROOT / ".bench" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    processes = Processes()
    try:
        emulator = Emulator(args.delay_ms, out / "emulator.log")
        processes.add(emulator)
        yield Run(args, emulator, processes, Deadline(args.time_limit), out)
    finally:
        processes.close()


def _plot_title(args: argparse.Namespace, config: Config, batch: Config) -> str:
    day = time.strftime("%Y-%m-%d")
    return (
        f"make bench {day}: gateway {args.delay_ms:g} ms, {os.cpu_count()} cores, "
        f"ours {config.label}, batch {batch.label}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Also SIGINT: a shell without job control starts a background job with it ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    kinds = [k.strip() for k in args.brokers.split(",") if k.strip()]
    if not set(kinds) <= {"redis", "rabbitmq"}:
        print("--brokers takes redis and/or rabbitmq", file=sys.stderr)
        return 2
    conf = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.conf)}
    conf = ({} if args.as_configured else RECOMMENDED_CONF) | conf
    started = time.monotonic()
    with _run(args) as run:
        if args.sweep:
            configs = [Config.parse(text, conf) for text in args.sweep.split(",")]
            swept = {kind: sweep_broker(run, kind, configs) for kind in kinds}
            print(report.sweep_table(swept))
            print(json.dumps({"sweep": swept, "delay_ms": args.delay_ms, "events": args.events}))
            return 0
        config = Config.parse(args.config, conf)
        batch = Config.parse(args.batch_config, conf)
        results = {kind: bench_broker(run, kind, config, batch) for kind in kinds}
        out = run.out
    summary = {
        "bench": "totango-worker",
        "delay_ms": args.delay_ms,
        "events": args.events,
        "batch_events": args.batch_events,
        "cores": os.cpu_count(),
        "ours": asdict(config) | {"label": config.label},
        "batch": asdict(batch) | {"label": batch.label},
        "naive": f"threads c={args.naive_concurrency}, one requests.get per task",
        "noop": "prefork c=2, acks_late",
        "sameconf": f"worker.application.config, {config.label}, -Q totango, a no-op task",
        "waiting": f"the same no-op, sleeping {args.delay_ms:g} ms in its pool thread first",
        "http": f"{config.concurrency} threads, one urllib3 keep-alive pool, no queue",
        "store": "ours with TOTANGO_STATE_URL = a private redis-server (no persistence); "
        "ours, sameconf and batch run with TOTANGO_DEDUP=false",
        "method": "steady rate and CPU between 10 % and 90 % of the completions",
        "seconds": round(time.monotonic() - started),
        "results": results,
    }
    print(
        f"\ngateway {args.delay_ms:g} ms, {args.events} events per phase, "
        f"ours = {config.label}, batch = {batch.label}, {summary['seconds']} s"
    )
    print(report.table(results))
    print()
    print(report.cpu_table(results))
    print()
    print(report.targets_table(results))
    print()
    print(report.state_store_lines(results))
    print(report.waiting_lines(results, args.delay_ms))
    if args.profile:
        from bench import profile  # noqa: PLC0415  py-spy only when profiling

        profiled = ("sameconf", "ours", "store")
        for name in (f"{phase}-{kind}" for kind in kinds for phase in profiled):
            print(f"\n{name}: " + profile.summary(out / f"profile-{name}.txt"))
    plot = Path(args.plot) if args.plot else (out / "bench.png" if args.quick else PLOT)
    if args.plot != "":
        from bench import plot as plotting  # noqa: PLC0415  matplotlib only when plotting

        plotting.write(results, plot, title=_plot_title(args, config, batch))
        print(f"plot: {plot}")
    (out / "result.json").write_text(json.dumps(summary, sort_keys=True, indent=1))
    print(json.dumps(summary, sort_keys=True))
    # A missed target is a result to read, not a failure; a phase that could not run is.
    return 1 if any(r["errors"] for r in results.values()) else 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt as interrupted:  # every process, vhost and database is gone now
        print(f"bench interrupted ({interrupted}); cleaned up", file=sys.stderr)
        raise SystemExit(130) from None
