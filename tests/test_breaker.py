"""The fleet's breaker: its scripts on a real Redis (one opening and one closing however
many workers report at once, one probe lease per interval, cooldowns, failing open), and a
real worker process in a gateway outage on RabbitMQ and on Redis: it stops taking events,
probes, defers without spending retries, and delivers everything once the gateway is back.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from subprocess import Popen
from typing import TypeVar

import pytest

from tests.brokers import redis_database
from tests.conftest import drain_dead_letters
from tests.faults.processes import free_port
from tests.workers import wait_until
from totango_emulator import GatewayEmulator
from worker.application import TotangoCelery
from worker.breaker import FleetBreaker, breaker_key
from worker.circuit import Circuit
from worker.client import Producer
from worker.gateway import Answer
from worker.outage import Admit
from worker.settings import Settings

GATEWAY = "https://sdr.totango.com/pixel.gif"
T = TypeVar("T")


@pytest.fixture
def breaker_url() -> Iterator[str]:
    with redis_database() as url:
        yield url


@pytest.fixture
def fleet(breaker_url: str) -> Iterator[FleetBreaker]:
    store = FleetBreaker(breaker_url)
    yield store
    store.close()


def at_once(workers: int, call: Callable[[], T]) -> list[T]:
    """``call`` from ``workers`` threads released together (as from a fleet); the results
    are gathered in this thread, so a failure in one of them fails the test."""
    start = threading.Barrier(workers)

    def run() -> T:
        start.wait()
        return call()

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run) for _ in range(workers)]
        return [future.result() for future in futures]


def answer(status: str, retry_after: str | None = None, reset: str | None = None) -> Answer:
    return Answer(status, retry_after, "", 0.01, "GET", rate_limit_reset=reset)


def test_the_threshold_opens_it_exactly_once_across_concurrent_workers(
    fleet: FleetBreaker,
) -> None:
    """60 failures reported at once from 12 threads (as from a fleet) open the breaker
    once: exactly one report says it opened it."""
    readings = at_once(
        12, lambda: [fleet.failed(GATEWAY, threshold=20, cooldown=None) for _ in range(5)]
    )
    flags = [r.flag for batch in readings for r in batch if r is not None]
    assert len(flags) == 60, "every report reached the store"
    assert flags.count("1") == 1
    reading = fleet.read(GATEWAY)
    assert reading is not None
    assert reading.breaker.is_open
    assert reading.breaker.failures == 60


def test_below_the_threshold_a_success_resets_the_count(fleet: FleetBreaker) -> None:
    """19 failures, a 200, 19 more: never 20 in a row, never open."""
    for _ in range(19):
        fleet.failed(GATEWAY, 20, None)
    closed = fleet.succeeded(GATEWAY)
    assert closed is not None
    assert closed.flag == "", "nothing to close"
    for _ in range(19):
        reading = fleet.failed(GATEWAY, 20, None)
        assert reading is not None
        assert not reading.breaker.is_open
    assert reading.breaker.failures == 19


def test_a_success_closes_it_once_and_returns_when_it_opened(fleet: FleetBreaker) -> None:
    """The call that closes an open breaker learns the opening time (for the outage's
    duration); the next success closes nothing."""
    for _ in range(3):
        opened = fleet.failed(GATEWAY, 3, None)
    assert opened is not None
    assert opened.breaker.opened_at is not None
    first = fleet.succeeded(GATEWAY)
    second = fleet.succeeded(GATEWAY)
    assert first is not None
    assert float(first.flag) == opened.breaker.opened_at
    assert second is not None
    assert second.flag == ""
    assert not first.breaker.is_open


def test_a_retry_after_opens_a_cooldown_that_a_success_does_not_cut_short(
    fleet: FleetBreaker,
) -> None:
    """One 429 with Retry-After 30 opens the breaker at once for the fleet; a call in
    flight that comes back 200 during the cooldown leaves it open; no probe is leased."""
    reading = fleet.failed(GATEWAY, threshold=20, cooldown=30)
    assert reading is not None
    assert reading.flag == "1"
    assert reading.breaker.until == pytest.approx(reading.now + 30, abs=0.01)
    still = fleet.succeeded(GATEWAY)
    assert still is not None
    assert still.breaker.is_open
    assert still.flag == ""
    lease = fleet.lease_probe(GATEWAY, interval=0.5)
    assert lease is not None
    assert lease.flag == "0"


def test_one_probe_lease_per_interval_across_workers(fleet: FleetBreaker) -> None:
    """While open, of 10 workers asking at once for the lease after the interval, one
    gets it; none gets one before the interval has passed again."""
    for _ in range(2):
        fleet.failed(GATEWAY, 2, None)
    early = fleet.lease_probe(GATEWAY, interval=0.5)
    assert early is not None
    assert early.flag == "0", "the first probe comes an interval after"
    time.sleep(0.55)
    readings = at_once(10, lambda: fleet.lease_probe(GATEWAY, interval=0.5))
    results = [r.flag for r in readings if r is not None]
    assert len(results) == 10, "every worker's request reached the store"
    assert results.count("1") == 1


def test_the_breaker_key_never_holds_the_gateway_token() -> None:
    """A gateway URL's query can carry a token: the store's key names host and path only,
    and two URLs differing only in their query are two breakers."""
    a = breaker_key("https://sdr.totango.com/pixel.gif?api-token=secret1")
    b = breaker_key("https://sdr.totango.com/pixel.gif?api-token=secret2")
    assert "secret" not in a
    assert a.startswith("totango-worker:breaker:sdr.totango.com/pixel.gif:")
    assert a != b


def test_an_unreachable_store_reads_closed_and_sends() -> None:
    """Fail open: with nothing listening on the store's port, every call is admitted, a
    failure opens nothing, and each miss is counted as a state error."""
    from prometheus_client import REGISTRY  # noqa: PLC0415

    def errors() -> float:
        return REGISTRY.get_sample_value("totango_state_errors_total", {"op": "breaker"}) or 0.0

    settings = Settings.from_env({"TOTANGO_STATE_URL": f"redis://127.0.0.1:{free_port()}/0"})
    circuit = Circuit(settings, FleetBreaker(str(settings.state_store_url)))
    before = errors()
    try:
        assert circuit.admit(GATEWAY) == (Admit.SEND, 0.0)
        assert circuit.report(GATEWAY, answer("503")) is False
        assert circuit.admit(GATEWAY) == (Admit.SEND, 0.0)
    finally:
        circuit.close()
    assert errors() >= before + 2


def test_a_circuit_defers_while_open_and_probes_once_due(breaker_url: str) -> None:
    """Two processes' circuits on one store: once one opens the breaker, the other's calls
    are deferred (whole seconds, from the next probe); after the interval exactly one of
    them probes; the probe's 200 closes it for both."""
    settings = Settings.from_env(
        {
            "TOTANGO_STATE_URL": breaker_url,
            "TOTANGO_BREAKER_THRESHOLD": "3",
            "TOTANGO_BREAKER_PROBE_INTERVAL": "1",
        }
    )
    one = Circuit(settings, FleetBreaker(breaker_url))
    two = Circuit(settings, FleetBreaker(breaker_url))
    try:
        assert [one.report(GATEWAY, answer("503")) for _ in range(3)] == [False, False, True]
        time.sleep(0.6)  # the other process reads the breaker again (REFRESH)
        kind, delay = two.admit(GATEWAY)
        assert kind is Admit.DEFER
        assert delay >= 1
        assert delay == int(delay)
        time.sleep(1.0)
        kinds = [one.admit(GATEWAY)[0], two.admit(GATEWAY)[0]]
        assert sorted(k.value for k in kinds) == ["defer", "probe"]
        prober = one if kinds[0] is Admit.PROBE else two
        assert prober.report(GATEWAY, answer("200")) is False
        time.sleep(0.6)
        assert one.admit(GATEWAY) == (Admit.SEND, 0.0)
        assert two.admit(GATEWAY) == (Admit.SEND, 0.0)
    finally:
        one.close()
        two.close()


def test_a_per_event_refusal_never_opens_it(breaker_url: str) -> None:
    """Fifty 400s (one bad payload after another) leave the breaker closed and uncounted."""
    settings = Settings.from_env(
        {"TOTANGO_STATE_URL": breaker_url, "TOTANGO_BREAKER_THRESHOLD": "3"}
    )
    circuit = Circuit(settings, FleetBreaker(breaker_url))
    try:
        assert not any(circuit.report(GATEWAY, answer("400")) for _ in range(50))
        reading = circuit.store.read(GATEWAY)
        assert reading is not None
        assert reading.breaker.failures == 0
    finally:
        circuit.close()


# --- a real worker in an outage ------------------------------------------------------------

EVENTS = 40
PROBE_INTERVAL = 1.0
#: The test worker's retry span: 2 retries, backoff 0.2..1 s (tests/workers.worker_env).
RETRY_SPAN = 2.0
OUTAGE = 10.0


@pytest.fixture
def breaker_env(
    broker_url: str, env_for: Callable[..., dict[str, str]]
) -> Iterator[dict[str, str]]:
    """The breaker on, with a threshold of 5 and a probe a second; its store the Redis
    broker itself, or on RabbitMQ a Redis database of the test's own."""
    extra = {
        "TOTANGO_BREAKER": "true",
        "TOTANGO_BREAKER_THRESHOLD": "5",
        "TOTANGO_BREAKER_PROBE_INTERVAL": str(PROBE_INTERVAL),
    }
    with ExitStack() as stack:
        if not broker_url.startswith("redis"):
            extra["TOTANGO_STATE_URL"] = stack.enter_context(redis_database())
        yield env_for(**extra)


@pytest.mark.integration
def test_a_worker_waits_out_an_outage_five_times_its_retry_span(
    breaker_env: dict[str, str],
    app_for: Callable[[dict[str, str]], TotangoCelery],
    start_worker: Callable[..., AbstractContextManager[Popen[bytes]]],
    gateway: GatewayEmulator,
    worker_log: Path,
) -> None:
    """40 events into a 503 outage of 10 s, five times the worker's 2 s retry span: the
    breaker opens (one log line), the worker stops calling but for about one probe a
    second, nothing is dead-lettered, and once the gateway is back every event is
    delivered and the end of the outage is logged once, with its duration."""
    tag = uuid.uuid4().hex[:8]
    app = app_for(breaker_env)
    producer = Producer(app=app)
    gateway.set_outage(503)
    with start_worker(breaker_env):
        started = time.time()
        for n in range(EVENTS):
            producer.track_activity(
                account_id="acme", user_id=f"{tag}-{n}", activity="Login", module="App"
            )
        wait_until(
            lambda: "gateway outage started" in worker_log.read_text(errors="replace"),
            20,
            "the breaker to open",
            worker_log,
        )
        opened = time.time()
        time.sleep(max(0.0, started + OUTAGE - time.time()))
        quiet_from = opened + 2.0  # calls in flight at the opening have come back
        during = [c for c in gateway.calls() if c.received_at >= quiet_from]
        gateway.set_outage(None)
        ended = time.time()
        wait_until(
            lambda: len({dict(c.params)["sdr_u"] for c in gateway.delivered()}) == EVENTS,
            60,
            "every event delivered after the outage",
            worker_log,
        )
        wait_until(
            lambda: "gateway outage ended" in worker_log.read_text(errors="replace"),
            10,
            "the end of the outage logged",
            worker_log,
        )
    log = worker_log.read_text(errors="replace")
    probes_allowed = (ended - quiet_from) / PROBE_INTERVAL + 2
    assert len(during) <= probes_allowed, (
        f"{len(during)} calls in {ended - quiet_from:.1f}s of open breaker; "
        f"probes only: at most {probes_allowed:.0f}"
    )
    assert log.count("gateway outage started") == 1
    assert log.count("gateway outage ended") == 1
    assert re.search(r"gateway outage ended gateway=\S+ after \d+\.\ds", log)
    assert drain_dead_letters(app) == []


@pytest.mark.integration
def test_a_batch_that_finds_the_breaker_open_goes_back_whole_then_probes(
    breaker_env: dict[str, str],
    app_for: Callable[[dict[str, str]], TotangoCelery],
    start_worker: Callable[..., AbstractContextManager[Popen[bytes]]],
    gateway: GatewayEmulator,
    worker_log: Path,
) -> None:
    """The breaker is open (as another worker of the fleet left it) when a batch of 5
    arrives: the batch goes back whole, unsent, and comes back; once a probe is due it is
    sent as the probe, its 200s close the breaker, and each event reaches the gateway once."""
    store = FleetBreaker(breaker_env.get("TOTANGO_STATE_URL") or breaker_env["TOTANGO_BROKER_URL"])
    url = breaker_env["TOTANGO_GATEWAY_URL"]
    try:
        for _ in range(5):
            opened = store.failed(url, threshold=5, cooldown=None)
        assert opened is not None
        assert opened.breaker.is_open
    finally:
        store.close()
    tag = uuid.uuid4().hex[:8]
    producer = Producer(app=app_for(breaker_env))
    with start_worker(breaker_env, "-Q", "totango.batch"):
        producer.send_batch(
            [
                producer.prepare(
                    "totango.track_activity",
                    account_id="acme",
                    user_id=f"{tag}-{n}",
                    activity="Login",
                    module="App",
                )
                for n in range(5)
            ]
        )
        wait_until(
            lambda: "deferred" in worker_log.read_text(errors="replace"),
            20,
            "the batch put back",
            worker_log,
        )
        wait_until(
            lambda: len(gateway.delivered()) >= 5, 30, "the batch sent as the probe", worker_log
        )
        wait_until(
            lambda: "gateway outage ended" in worker_log.read_text(errors="replace"),
            10,
            "the probe closing the breaker",
            worker_log,
        )
    users = [dict(c.params)["sdr_u"] for c in gateway.calls()]
    assert sorted(users) == sorted(f"{tag}-{n}" for n in range(5)), "each event once"
