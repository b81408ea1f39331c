"""The message contract seen from a producer that does not import this package.

A producer in another code base knows only the queue, the task names and their keyword
arguments. ``PRODUCER_CONFIG`` below is the configuration the README documents, verbatim; the
tests run it in a separate interpreter that imports only celery and kombu, and check that
the real worker delivers exactly the documented parameters.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest
from amqp.exceptions import PreconditionFailed
from celery import Celery
from kombu import Exchange, Queue

from totango_emulator import Call, GatewayEmulator
from worker.contract import RABBITMQ_QUEUE_ARGUMENTS
from worker.topology import batch_queue, task_queue

Env = dict[str, str]
StartWorker = Callable[..., AbstractContextManager[Popen[bytes]]]

DELIVERY_TIMEOUT = 20.0
PRODUCER_TIMEOUT = 60.0
DEFAULT_SERVICE_ID = "SP-1234-56"  # what tests.workers.worker_env sets

# The producer configuration is the README's own code block, run as it is written there.
README = Path(__file__).resolve().parent.parent / "README.md"
_CONFIG_RE = re.compile(
    r"<!-- producer-config:start -->\s*```python\n(.*?)```\s*<!-- producer-config:end -->", re.S
)


def _readme_config() -> str:
    found = _CONFIG_RE.search(README.read_text(encoding="utf-8"))
    assert found, "README.md lost its producer-config block"
    return found.group(1)


PRODUCER_CONFIG = _readme_config()

#: Runs after PRODUCER_CONFIG in the producer's own interpreter: publish every event by task
#: name with keyword arguments only, then prove that no module of this package was loaded.
PRODUCER_DRIVER = """

def main() -> None:
    import json
    import sys

    broker_url, events_path, style = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(events_path, encoding="utf-8") as f:
        events = json.load(f)[style]
    app = producer(broker_url)
    singles, batched = events["single"], events["batch"]
    batch = {"events": [{"task": e["task"], "kwargs": e["kwargs"]} for e in batched]}
    declare = {} if style == "declaring" else {"declare": []}
    try:
        for event in singles:
            app.send_task(event["task"], kwargs=event["kwargs"], queue="totango", **declare)
        app.send_task("totango.track_batch", kwargs=batch, queue="totango.batch", **declare)
    finally:
        app.close()
    ours = sorted(m for m in sys.modules if m == "worker" or m.startswith("worker."))
    assert not ours, ours
    print("published", len(singles) + len(batched))


main()
"""


def documented_events(style: str) -> list[dict[str, Any]]:
    """One event of each kind, and the parameters the API document says it becomes."""
    account = f"{style} a&b=c #1 + ünï"
    return [
        {
            "task": "totango.track_activity",
            "kwargs": {
                "account_id": account,
                "user_id": "jo+test@exämple.com",
                "activity": "Log in",
                "module": "App & Co",
                "account_name": "ACME Ünïcode",
                "account_attributes": {"Account Type": "Demo", "gone": None},
                "user_attributes": {"Contact": True, "role": "admin"},
            },
            "params": [
                ["sdr_s", DEFAULT_SERVICE_ID],
                ["sdr_o", account],
                ["sdr_u", "jo+test@exämple.com"],
                ["sdr_a", "Log in"],
                ["sdr_m", "App & Co"],
                ["sdr_o.account_name", "ACME Ünïcode"],
                ["sdr_o.Account Type", "Demo"],
                ["sdr_u.Contact", "yes"],
                ["sdr_u.role", "admin"],
            ],
        },
        {
            "task": "totango.update_account",
            "kwargs": {
                "account_id": f"{style}-account",
                "attributes": {"Contract Value": 1200, "Create Date": "2026-01-31"},
                "account_name": "Two & Co",
                "writeback": True,
                "service_id": "SP-77-1",
                "event_id": f"{style}-event-2",
            },
            "params": [
                ["sdr_s", "SP-77-1"],
                ["sdr_o", f"{style}-account"],
                ["sdr_o.account_name", "Two & Co"],
                ["sdr_o.Contract Value", "1200"],
                ["sdr_o.Create Date", "2026-01-31"],
                ["enableWriteback", "true"],
            ],
        },
        {
            "task": "totango.update_user",
            "kwargs": {
                "account_id": f"{style}-user",
                "user_id": "user 3",
                "attributes": {"Key Contact": False, "title": "Boss"},
                "account_attributes": {"parent_id": account},
            },
            "params": [
                ["sdr_s", DEFAULT_SERVICE_ID],
                ["sdr_o", f"{style}-user"],
                ["sdr_u", "user 3"],
                ["sdr_o.parent_id", account],
                ["sdr_u.Key Contact", "no"],
                ["sdr_u.title", "Boss"],
            ],
        },
    ]


def batched_events(style: str) -> list[dict[str, Any]]:
    """Two activities that the producer publishes in one ``totango.track_batch`` message."""
    return [
        {
            "task": "totango.track_activity",
            "kwargs": {
                "account_id": f"{style}-batched-{n}",
                "user_id": f"user {n}",
                "activity": "Export",
                "module": "Reports",
            },
            "params": [
                ["sdr_s", DEFAULT_SERVICE_ID],
                ["sdr_o", f"{style}-batched-{n}"],
                ["sdr_u", f"user {n}"],
                ["sdr_a", "Export"],
                ["sdr_m", "Reports"],
            ],
        }
        for n in (1, 2)
    ]


def producer_env() -> dict[str, str]:
    """The producer's environment: nothing of the worker's settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("TOTANGO_", "SENTRY_"))}


def delivered_params(calls: list[Call]) -> dict[str, list[list[str]]]:
    """Delivered calls by account id, each as its sorted decoded parameter list."""
    return {
        dict(call.params)["sdr_o"]: sorted([list(pair) for pair in call.params])
        for call in calls
        if call.status == 200
    }


@pytest.fixture
def worker(env_for: Callable[..., Env], start_worker: StartWorker) -> Iterator[Popen[bytes]]:
    """A real worker; it declares the topology when it starts."""
    with start_worker(env_for()) as proc:
        yield proc


def run_producer(broker_url: str, tmp_path: Path, style: str) -> None:
    """Run the README's producer in an interpreter of its own, in an empty directory."""
    run = subprocess.run(
        [sys.executable, "producer.py", broker_url, "events.json", style],
        cwd=tmp_path,
        env=producer_env(),
        capture_output=True,
        text=True,
        timeout=PRODUCER_TIMEOUT,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "published 5" in run.stdout, run.stdout + run.stderr


def test_the_queues_celery_declares_by_default_are_the_ones_the_worker_declares() -> None:
    """A Celery app with its defaults, sending to ``totango`` or ``totango.batch`` by name,
    declares each queue as the worker does (durable, no arguments), so RabbitMQ finds the
    declarations equivalent; the exchange it declares for ``totango`` is the worker's own
    (direct, durable). For ``totango.batch`` Celery binds the queue to an exchange of that
    name as well, which takes nothing from the worker's binding."""
    app = Celery(broker="memory://", set_as_current=False)
    try:
        for declared in (task_queue("rabbitmq"), batch_queue("rabbitmq")):
            stock = app.amqp.queues[declared.name]  # Celery creates the missing queue here
            assert declared.exchange is not None
            assert stock.exchange is not None
            assert (stock.name, stock.routing_key) == (declared.name, declared.routing_key)
            assert (stock.durable, stock.auto_delete, stock.exclusive) == (True, False, False)
            assert (declared.durable, declared.auto_delete, declared.exclusive) == (
                True,
                False,
                False,
            )
            assert not stock.queue_arguments
            assert not declared.queue_arguments
            assert stock.exchange.type == declared.exchange.type == "direct"
        worker_exchange = task_queue("rabbitmq").exchange
        stock_exchange = app.amqp.queues["totango"].exchange
        assert worker_exchange is not None
        assert stock_exchange is not None
        assert (stock_exchange.name, stock_exchange.durable) == (worker_exchange.name, True)
    finally:
        app.close()


@pytest.mark.integration
def test_a_producer_that_does_not_import_the_package_is_delivered(
    broker_url: str,
    env_for: Callable[..., Env],
    start_worker: StartWorker,
    gateway: GatewayEmulator,
    tmp_path: Path,
) -> None:
    """The README's producer configuration, run in its own interpreter that imports only
    celery and kombu, publishes every task kind by name with keyword arguments only, and a
    ``totango.track_batch`` of two events to the batch queue. The
    declaring producer may publish before any worker has started; the plain producer
    (``queue="totango", declare=[]``) declares nothing. The real worker delivers each event
    once with exactly the documented parameters, also after a retry (the worker republishes
    a foreign message correctly)."""
    events = {
        style: {"single": documented_events(style), "batch": batched_events(style)}
        for style in ("declaring", "plain")
    }
    (tmp_path / "producer.py").write_text(PRODUCER_CONFIG + PRODUCER_DRIVER, encoding="utf-8")
    (tmp_path / "events.json").write_text(json.dumps(events), encoding="utf-8")
    gateway.add_rule({"sdr_o": "declaring-account"}, [503])
    gateway.add_rule({"sdr_o": "plain-account"}, [503])

    run_producer(broker_url, tmp_path, "declaring")  # no worker yet: the producer declares
    with start_worker(env_for()):
        run_producer(broker_url, tmp_path, "plain")
        expected = {
            dict(map(tuple, event["params"]))["sdr_o"]: sorted(event["params"])
            for style in events.values()
            for event in style["single"] + style["batch"]
        }
        gateway.wait_for(len(expected), timeout=DELIVERY_TIMEOUT)
        time.sleep(0.5)  # a duplicate would show up here
    assert delivered_params(gateway.calls()) == expected
    assert len(gateway.delivered()) == len(expected)
    assert len(gateway.calls()) == len(expected) + 2  # plus the two 503 answers


@pytest.mark.integration
@pytest.mark.parametrize("broker_url", ["rabbitmq"], indirect=True)
@pytest.mark.usefixtures("worker")
def test_declaring_the_queue_in_the_other_design_is_refused(broker_url: str) -> None:
    """The queue's declaration is part of the contract: once the worker has declared
    ``totango`` in the plain design, a producer declaring it in the quorum design (a topic
    exchange and the quorum arguments) fails with PRECONDITION_FAILED instead of
    publishing."""
    app = Celery("careless-producer", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_queues=[
            Queue(
                "totango",
                Exchange("totango", type="topic"),
                routing_key="totango",
                queue_arguments=RABBITMQ_QUEUE_ARGUMENTS,
            )
        ],
        task_default_queue="totango",
        task_serializer="json",
        broker_transport_options={"confirm_publish": True},
    )
    try:
        with pytest.raises(PreconditionFailed, match="PRECONDITION_FAILED"):
            app.send_task(
                "totango.update_account",
                kwargs={"account_id": "acme", "attributes": {"plan": "gold"}},
            )
    finally:
        app.close()
