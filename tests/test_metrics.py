"""Prometheus metrics scraped from real workers over HTTP, on a real broker, relaying to the
gateway emulator: exact counts summed over prefork children through prometheus_client's
multiprocess directory, the default registry under the threads pool, a clean start over a
previous run's files, live gauges of dead children dropped, and an unusable directory
refused at start."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from tests.workers import tail
from totango_emulator import GatewayEmulator
from worker.application import TotangoCelery
from worker.client import Producer
from worker.contract import ENQUEUED_AT_HEADER
from worker.events import TRACK_ACTIVITY, UPDATE_ACCOUNT, UPDATE_USER

pytestmark = pytest.mark.integration

EnvFor = Callable[..., dict[str, str]]
StartWorker = Callable[..., AbstractContextManager[Popen[bytes]]]
AppFor = Callable[[dict[str, str]], TotangoCelery]
#: One sample: its name and its labels.
Key = tuple[str, frozenset[tuple[str, str]]]

#: Bound on every wait for counts (the retries back off 0.2 s to 1 s).
COUNTS_TIMEOUT = 30.0
#: How long the counts must then stay the same: nothing counted twice, nothing late.
SETTLE_SECONDS = 1.0

DELIVERED = "totango_events_delivered_total"
RETRIED = "totango_events_retried_total"
DEAD_LETTERED = "totango_events_dead_lettered_total"
RESPONSES = "totango_gateway_responses_total"
LATENCY_COUNT = "totango_gateway_latency_seconds_count"
IN_FLIGHT = "totango_gateway_in_flight"
QUEUE_WAIT_COUNT = "totango_queue_wait_seconds_count"

#: Only first attempts record a queue wait: ``Task.retry(headers={...})`` in worker/tasks.py
#: replaces the message's custom headers, so a retry has lost ``totango_enqueued_at``.
FIRST_ATTEMPTS_ONLY = True

#: For what the broker cannot change (process bookkeeping in the multiprocess directory):
#: one broker keeps this file under a minute.
ONE_BROKER = pytest.mark.parametrize("broker_url", ["rabbitmq"], indirect=True)

VALID_KINDS = (TRACK_ACTIVITY, UPDATE_ACCOUNT, UPDATE_USER)
_NO_ACCOUNT = {"account_id": "", "user_id": "u1", "activity": "Login", "module": "App"}
#: Messages no validation lets through, published raw, and the reason each is dead-lettered.
INVALID: tuple[tuple[str, dict[str, Any], str], ...] = (
    (TRACK_ACTIVITY, _NO_ACCOUNT, "invalid:account_id"),
    (UPDATE_ACCOUNT, {"account_id": "no-attributes"}, "invalid:attributes"),
)


def key(name: str, **labels: str) -> Key:
    return name, frozenset(labels.items())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def scrape(port: int) -> dict[Key, float] | None:
    """Every sample on the worker's /metrics, or None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def wait_counts(
    port: int, expected: Mapping[Key, float], log: Path, *, settle: float = SETTLE_SECONDS
) -> dict[Key, float]:
    """Scrape until every expected sample has its value, then check they stay put."""
    deadline = time.monotonic() + COUNTS_TIMEOUT
    samples: dict[Key, float] | None = None
    while time.monotonic() < deadline:
        samples = scrape(port)
        if samples is not None and all(samples.get(k) == v for k, v in expected.items()):
            time.sleep(settle)
            samples = scrape(port)
            assert samples is not None
            assert {k: samples.get(k) for k in expected} == dict(expected)
            return samples
        time.sleep(0.1)
    got = {k: (samples or {}).get(k) for k in expected}
    wrong = {k: (got[k], v) for k, v in expected.items() if got[k] != v}
    pytest.fail(f"(got, expected) after {COUNTS_TIMEOUT}s: {wrong}\n{tail(log)}")


def family(samples: Mapping[Key, float], name: str) -> dict[frozenset[tuple[str, str]], float]:
    """The non-zero samples of one name, by labels: to prove no unexpected label appears."""
    return {labels: v for (n, labels), v in samples.items() if n == name and v}


def relay_mix(
    app: TotangoCelery, gateway: GatewayEmulator, *, plain: int, retried: int, invalid: int
) -> dict[Key, float]:
    """Enqueue events, ``retried`` of them answered 503 once then 200, plus ``invalid`` raw
    messages; all stamped with the enqueue time. Returns the samples that must follow."""
    producer = Producer(app=app)
    delivered: Counter[str] = Counter()
    retries: Counter[str] = Counter()
    for n in range(plain + retried):
        task = VALID_KINDS[n % len(VALID_KINDS)]
        account = f"acct-{n}-{uuid.uuid4().hex[:6]}"
        if n >= plain:
            gateway.add_rule({"sdr_o": account}, [503])
            retries[task] += 1
        delivered[task] += 1
        producer.prepare(task, **valid_kwargs(task, account)).enqueue()
    dead: Counter[tuple[str, str]] = Counter()
    for n in range(invalid):
        task, kwargs, reason = INVALID[n % len(INVALID)]
        app.send_task(task, kwargs=kwargs, headers={ENQUEUED_AT_HEADER: time.time()})
        dead[task, reason] += 1
    calls = plain + 2 * retried
    return {
        **{key(DELIVERED, task=t): float(c) for t, c in delivered.items()},
        **{key(RETRIED, task=t, reason="503"): float(c) for t, c in retries.items()},
        **{key(DEAD_LETTERED, task=t, reason=r): float(c) for (t, r), c in dead.items()},
        key(RESPONSES, status="200"): float(plain + retried),
        **({key(RESPONSES, status="503"): float(retried)} if retried else {}),
        key(LATENCY_COUNT, method="GET"): float(calls),
        key(IN_FLIGHT): 0.0,
    }


def valid_kwargs(task: str, account: str) -> dict[str, Any]:
    if task == TRACK_ACTIVITY:
        return {"account_id": account, "user_id": "u1", "activity": "Login", "module": "App"}
    if task == UPDATE_ACCOUNT:
        return {"account_id": account, "attributes": {"Plan": "Gold"}}
    return {"account_id": account, "user_id": "u1", "attributes": {"title": "Boss"}}


def db_pids(directory: Path, prefix: str) -> set[int]:
    """The pids that have a ``<prefix>_<pid>.db`` file in the multiprocess directory."""
    return {int(f.stem.rsplit("_", 1)[1]) for f in directory.glob(f"{prefix}_*.db")}


def in_flight_of(directory: Path, pid: int) -> float:
    """What one process's own file says its in-flight gauge is."""
    path = directory / f"gauge_livesum_{pid}.db"
    values = MmapedDict.read_all_values_from_file(str(path)) if path.exists() else []
    return sum(value for _, value, _, _ in values)


# --- prefork: the multiprocess directory -------------------------------------------------


def test_prefork_counts_are_exact_sums_over_every_child(
    env_for: EnvFor,
    start_worker: StartWorker,
    app_for: AppFor,
    gateway: GatewayEmulator,
    tmp_path: Path,
) -> None:
    """Under the prefork pool (2 children), /metrics gives exact totals summed over both
    children: 20 messages (12 delivered at once, 4 answered 503 once and then delivered, 4
    invalid and dead-lettered) make delivered, retried and dead-lettered counts by task and
    reason, responses by status, a latency histogram with one observation per gateway call
    (as many as the gateway saw), one queue-wait observation per started attempt, and an
    in-flight gauge back at 0. The multiprocess directory, missing at start, is created;
    each child wrote its own files; and each child drops its live gauge when it exits."""
    prom = tmp_path / "prom" / "multiproc"
    port = free_port()
    env = env_for(
        TOTANGO_POOL="prefork",
        TOTANGO_CONCURRENCY="2",
        TOTANGO_METRICS_PORT=str(port),
        PROMETHEUS_MULTIPROC_DIR=str(prom),
    )
    gateway.set_delay(0.05)  # both children get work
    log = tmp_path / "worker.log"
    with start_worker(env) as proc:
        expected = relay_mix(app_for(env), gateway, plain=12, retried=4, invalid=4)
        # One queue wait per started attempt that carries the enqueue stamp.
        expected[key(QUEUE_WAIT_COUNT)] = 20.0 if FIRST_ATTEMPTS_ONLY else 24.0
        samples = wait_counts(port, expected, log)
        assert len(gateway.calls()) == 20
        for name in (DELIVERED, RETRIED, DEAD_LETTERED, RESPONSES):
            assert sum(family(samples, name).values()) == sum(
                v for (n, _), v in expected.items() if n == name
            ), name
        children = db_pids(prom, "counter") - {proc.pid}
        assert len(children) == 2, sorted(p.name for p in prom.iterdir())
        assert db_pids(prom, "gauge_livesum") >= children
    # Stopped: each child marked itself dead on its way out (worker_process_shutdown).
    assert not db_pids(prom, "gauge_livesum") & children, sorted(p.name for p in prom.iterdir())
    assert db_pids(prom, "counter") >= children  # counters of exited children still count


@ONE_BROKER
def test_a_killed_childs_in_flight_call_is_dropped_from_the_gauge(
    env_for: EnvFor,
    start_worker: StartWorker,
    app_for: AppFor,
    gateway: GatewayEmulator,
    tmp_path: Path,
) -> None:
    """A prefork child SIGKILLed in the middle of a gateway call cannot mark itself dead;
    a scrape drops its live gauge anyway, so ``totango_gateway_in_flight`` goes from 1 back
    to 0 instead of staying at 1 until the worker restarts."""
    prom = tmp_path / "prom"
    port = free_port()
    env = env_for(
        TOTANGO_POOL="prefork",
        TOTANGO_CONCURRENCY="2",
        TOTANGO_METRICS_PORT=str(port),
        PROMETHEUS_MULTIPROC_DIR=str(prom),
        TOTANGO_READ_TIMEOUT="30",  # the call must still be running when its child dies
    )
    gateway.set_delay(30.0)
    log = tmp_path / "worker.log"
    with start_worker(env) as proc:
        Producer(app=app_for(env)).track_activity(
            account_id="acct-killed", user_id="u1", activity="Login", module="App"
        )
        wait_counts(port, {key(IN_FLIGHT): 1.0}, log, settle=0)
        busy = [p for p in db_pids(prom, "gauge_livesum") - {proc.pid} if in_flight_of(prom, p)]
        assert len(busy) == 1, busy
        os.kill(busy[0], signal.SIGKILL)
        wait_counts(port, {key(IN_FLIGHT): 0.0}, log)
        assert busy[0] not in db_pids(prom, "gauge_livesum")


# --- threads: one process ----------------------------------------------------------------


def test_threads_pool_without_a_multiprocess_dir_serves_the_default_registry(
    env_for: EnvFor,
    start_worker: StartWorker,
    app_for: AppFor,
    gateway: GatewayEmulator,
    tmp_path: Path,
) -> None:
    """Under the threads pool with no PROMETHEUS_MULTIPROC_DIR, /metrics serves the default
    registry (the process and platform collectors are there) with the same exact counts:
    delivered, retried, dead-lettered, responses, latency count and in-flight 0."""
    port = free_port()
    env = env_for(TOTANGO_POOL="threads", TOTANGO_METRICS_PORT=str(port))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with start_worker(env):
        expected = relay_mix(app_for(env), gateway, plain=3, retried=2, invalid=2)
        expected[key(QUEUE_WAIT_COUNT)] = 7.0 if FIRST_ATTEMPTS_ONLY else 9.0
        samples = wait_counts(port, expected, tmp_path / "worker.log")
    assert any(name == "python_info" for name, _ in samples)
    assert sum(family(samples, DELIVERED).values()) == 5.0


@ONE_BROKER
def test_a_previous_runs_files_do_not_inflate_the_counts_after_a_restart(
    env_for: EnvFor,
    start_worker: StartWorker,
    app_for: AppFor,
    gateway: GatewayEmulator,
    tmp_path: Path,
) -> None:
    """Files a previous run left in the multiprocess directory (1000 deliveries, 5 calls in
    flight) are removed when the worker starts, so after the restart the counts are this
    run's only. Threads pool with the directory set: the image's default combination."""
    prom = tmp_path / "prom"
    prom.mkdir()
    previous_run = (
        "from worker import metrics as o; m = o.metrics(); "
        f"m.delivered.labels(task={TRACK_ACTIVITY!r}).inc(1000); m.in_flight.inc(5); "
        "m.queue_wait.observe(1.0)"
    )
    subprocess.run(
        [sys.executable, "-c", previous_run],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom)},
        check=True,
        timeout=60,
    )
    stale = sorted(p.name for p in prom.glob("*.db"))
    assert stale, "the previous run left no files"

    port = free_port()
    env = env_for(
        TOTANGO_POOL="threads",
        TOTANGO_METRICS_PORT=str(port),
        PROMETHEUS_MULTIPROC_DIR=str(prom),
    )
    with start_worker(env):
        expected = relay_mix(app_for(env), gateway, plain=2, retried=0, invalid=0)
        expected[key(QUEUE_WAIT_COUNT)] = 2.0
        wait_counts(port, expected, tmp_path / "worker.log")
        assert not set(stale) & {p.name for p in prom.glob("*.db")}


@ONE_BROKER
def test_a_multiprocess_dir_that_cannot_be_made_stops_the_worker_at_start(
    env_for: EnvFor, start_worker: StartWorker, tmp_path: Path
) -> None:
    """A PROMETHEUS_MULTIPROC_DIR that cannot be created (here, under a file) stops the
    worker at start with exit status 2 and the reason, instead of failing every task."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = env_for(PROMETHEUS_MULTIPROC_DIR=str(blocker / "prom"))
    with pytest.raises(RuntimeError, match="exited with 2") as failed, start_worker(env):
        pass
    assert "PROMETHEUS_MULTIPROC_DIR unusable" in str(failed.value)
