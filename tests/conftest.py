"""Shared fixtures: a loopback gateway emulator, an isolated broker, and real workers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest

from tests.brokers import broker, redis_database
from tests.faults.processes import PrivateRedis
from tests.workers import running_worker, worker_env
from totango_emulator import GatewayEmulator
from worker.application import TotangoCelery, create_app
from worker.client import Producer
from worker.settings import Settings

BROKERS = ["rabbitmq", "redis"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that takes a real broker is an integration test (``make unit`` skips them)."""
    for item in items:
        if "broker_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def gateway() -> Iterator[GatewayEmulator]:
    """A real HTTP gateway on loopback that records calls and can be told to fail."""
    with GatewayEmulator() as emulator:
        yield emulator


@pytest.fixture(params=BROKERS)
def broker_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """An isolated broker: a fresh RabbitMQ vhost, or a Redis database of the test's own."""
    with broker(request.param) as url:
        yield url


@pytest.fixture
def env_for(
    broker_url: str, gateway: GatewayEmulator, tmp_path: Path
) -> Callable[..., dict[str, str]]:
    def make(**extra: str) -> dict[str, str]:
        return worker_env(broker_url, f"{gateway.url}/pixel.gif", tmp_path, **extra)

    return make


@pytest.fixture
def worker_log(tmp_path: Path) -> Path:
    """Where ``start_worker`` writes the worker's output."""
    return tmp_path / "worker.log"


@pytest.fixture
def start_worker(worker_log: Path) -> Callable[..., AbstractContextManager[Popen[bytes]]]:
    """Start a real worker as a context manager; its output goes to ``worker_log``."""

    def start(env: dict[str, str], *args: str) -> AbstractContextManager[Popen[bytes]]:
        return running_worker(env, worker_log, args)

    return start


@pytest.fixture
def env(env_for: Callable[..., dict[str, str]]) -> dict[str, str]:
    """The default test worker's settings: MAX_RETRIES=2, backoff 0.2 s..1 s, read timeout
    2 s, 4 threads (``tests/workers.worker_env``)."""
    return env_for()


@pytest.fixture
def app(env: dict[str, str], app_for: Callable[[dict[str, str]], TotangoCelery]) -> TotangoCelery:
    return app_for(env)


@pytest.fixture
def worker(
    env: dict[str, str], start_worker: Callable[..., AbstractContextManager[Popen[bytes]]]
) -> Iterator[Popen[bytes]]:
    """One real worker for the whole test, consuming as production does (no ``-Q``)."""
    with start_worker(env) as proc:
        yield proc


@pytest.fixture
def app_for() -> Iterator[Callable[[dict[str, str]], TotangoCelery]]:
    """A producer-side app built from a worker environment; closed after the test."""
    apps: list[TotangoCelery] = []

    def make(env: dict[str, str]) -> TotangoCelery:
        app = create_app(Settings.from_env(env))
        apps.append(app)
        return app

    yield make
    for app in apps:
        if app.state_store is not None:
            app.state_store.get().close()
        if app.circuit is not None:
            app.circuit.get().close()
        app.close()


@pytest.fixture
def embedded_app(
    tmp_path: Path,
    gateway: GatewayEmulator,
    app_for: Callable[[dict[str, str]], TotangoCelery],
) -> Callable[..., TotangoCelery]:
    """Apps on the embedded broker (a folder of their own, no broker server) and the
    loopback emulator, for running task bodies in this process; ``VARIABLE=""`` removes a
    setting, any other keyword sets it."""

    def make(**extra: str) -> TotangoCelery:
        folder = tmp_path / f"broker-{len(list(tmp_path.glob('broker-*')))}"
        (folder / "control").mkdir(parents=True)
        env = {
            "TOTANGO_BROKER_URL": "filesystem://",
            "TOTANGO_FILESYSTEM_DIR": str(folder),
            "TOTANGO_GATEWAY_URL": f"{gateway.url}/pixel.gif",
            "TOTANGO_SERVICE_ID": "SP-1234-56",
            "TOTANGO_MAX_RETRIES": "3",
            "TOTANGO_RETRY_BACKOFF_BASE": "1",
            "TOTANGO_RETRY_BACKOFF_MAX": "4",
            "TOTANGO_METRICS_PORT": "0",
            "TOTANGO_BREAKER": "false",  # tests/test_breaker.py turns it on
            **extra,
        }
        return app_for({k: v for k, v in env.items() if v})

    return make


@pytest.fixture
def producer_for(
    app_for: Callable[[dict[str, str]], TotangoCelery],
) -> Callable[[dict[str, str]], Producer]:
    def make(env: dict[str, str]) -> Producer:
        return Producer(app=app_for(env))

    return make


def drain_dead_letters(app: TotangoCelery, timeout: float = 1.0) -> list[dict[str, Any]]:
    """Take every envelope off the dead-letter queue (for assertions)."""
    from worker.deadletter import browse  # noqa: PLC0415

    return [entry.to_dict() for entry in browse(app, timeout=timeout)]


@pytest.fixture
def store_url() -> Iterator[str]:
    """A Redis database of the test's own for the state store."""
    with redis_database() as url:
        yield url


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PrivateRedis]:
    """The state store: a redis-server of the test's own on a free port (no persistence),
    never the machine's Redis."""
    server = PrivateRedis(tmp_path / "state-store", persistent=False)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def make_app(
    embedded_app: Callable[..., TotangoCelery], store_url: str
) -> Callable[..., TotangoCelery]:
    """An app on the embedded broker whose state store is the test's Redis database."""

    def make(**extra: str) -> TotangoCelery:
        settings = {
            "TOTANGO_MAX_RETRIES": "2",
            "TOTANGO_RETRY_BACKOFF_MAX": "2",
            "TOTANGO_STATE_URL": store_url,
        }
        return embedded_app(**{**settings, **extra})

    return make
