"""Fixtures of the fault suite, and the table it prints at the end of the session (also
written to ``.faults/results.md``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokers import broker
from tests.faults.accounting import Row, details, table, write_results
from tests.faults.harness import Run
from totango_emulator import GatewayEmulator

RESULTS = pytest.StashKey[list[Row]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[RESULTS] = []


@pytest.fixture
def results(request: pytest.FixtureRequest) -> list[Row]:
    return request.config.stash[RESULTS]


@pytest.fixture(params=["rabbitmq", "redis"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def broker_url(kind: str) -> Iterator[str]:
    """The test's own RabbitMQ vhost or Redis database on the shared broker."""
    with broker(kind) as url:
        yield url


@pytest.fixture
def run(
    kind: str, broker_url: str, gateway: GatewayEmulator, tmp_path: Path, results: list[Row]
) -> Iterator[Run]:
    scenario = Run(kind, broker_url, gateway, tmp_path, results)
    try:
        yield scenario
    finally:
        scenario.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    rows = terminalreporter.config.stash.get(RESULTS, [])
    if not rows:
        return
    order = {"rabbitmq": 0, "redis": 1}
    rows = sorted(rows, key=lambda r: (r.scenario, order.get(r.broker, 9)))
    terminalreporter.write_sep("=", "faults: what became of every event")
    terminalreporter.write_line(table(rows))
    notes = details(rows)
    if notes:
        terminalreporter.write_line("")
        terminalreporter.write_line(notes)
    path = Path(terminalreporter.config.rootpath) / ".faults" / "results.md"
    command = " ".join(["pytest", *terminalreporter.config.invocation_params.args])
    write_results(rows, path, command)
    terminalreporter.write_line(f"\n(also written to {path})")
