"""Producers with Celery's defaults, before or after the worker, and the two queue designs.

A stock Celery app (``Celery(broker=...)``, nothing else) publishing with
``send_task(..., queue="totango")`` declares a direct exchange ``totango`` and a plain
durable queue ``totango``. The worker must never die over that declaration, and the events
published that way must never be stranded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest
from amqp.exceptions import PreconditionFailed
from celery import Celery
from kombu import Connection, Queue
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from tests.brokers import RABBITMQ_HOST, _rabbitmqctl
from tests.test_producer_contract import producer_env
from totango_emulator import GatewayEmulator
from worker.contract import MISSING_GUARANTEES, PLAIN, QUEUE

Env = dict[str, str]
StartWorker = Callable[..., AbstractContextManager[Popen[bytes]]]

DELIVERY_TIMEOUT = 20.0
COMMAND_TIMEOUT = 60.0

#: The producer a team writes first: Celery's defaults, nothing of this package.
STOCK_PRODUCER = """
import json
import sys

from celery import Celery

app = Celery(broker=sys.argv[1])
with open(sys.argv[2], encoding="utf-8") as f:
    events = json.load(f)
for event in events:
    app.send_task(event["task"], kwargs=event["kwargs"], queue="totango")
app.close()
print("published", len(events))
"""


def activities(prefix: str, count: int) -> list[dict[str, Any]]:
    return [
        {
            "task": "totango.track_activity",
            "kwargs": {
                "account_id": f"{prefix}-{n}",
                "user_id": f"user-{n}@example.com",
                "activity": "Login",
                "module": "App",
            },
        }
        for n in range(count)
    ]


def run_stock_producer(broker_url: str, tmp_path: Path, events: list[dict[str, Any]]) -> None:
    """Run the stock producer in an interpreter of its own, in an empty directory."""
    (tmp_path / "stock.py").write_text(STOCK_PRODUCER, encoding="utf-8")
    (tmp_path / "stock.json").write_text(json.dumps(events), encoding="utf-8")
    run = subprocess.run(
        [sys.executable, "stock.py", broker_url, "stock.json"],
        cwd=tmp_path,
        env=producer_env(),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"published {len(events)}" in run.stdout


def run_cli(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def delivered_accounts(gateway: GatewayEmulator) -> list[str]:
    return sorted(dict(call.params)["sdr_o"] for call in gateway.delivered())


def missing_guarantees(metrics_dir: Path) -> set[tuple[str, str, str]]:
    """The (queue, design, guarantee) series of totango_queue_guarantee_missing set to 1."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    return {
        (s.labels["queue"], s.labels["design"], s.labels["guarantee"])
        for metric in registry.collect()
        if metric.name == "totango_queue_guarantee_missing"
        for s in metric.samples
        if s.value == 1
    }


@pytest.mark.integration
def test_a_stock_producer_before_any_worker_is_consumed_as_it_is_and_loudly(
    broker_url: str,
    env_for: Callable[..., Env],
    start_worker: StartWorker,
    gateway: GatewayEmulator,
    worker_log: Path,
) -> None:
    """The stock producer publishes before any worker has started, so its declaration (a
    direct exchange, a plain queue) is the one that exists. The worker starts without a
    traceback, delivers every event, and on RabbitMQ names in its log and in
    ``totango_queue_guarantee_missing`` the guarantees a plain queue lacks."""
    tmp_path = worker_log.parent
    events = activities("stock-first", 3)
    run_stock_producer(broker_url, tmp_path, events)
    metrics_dir = tmp_path / "prometheus"
    env = env_for(PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    with start_worker(env):
        gateway.wait_for(len(events), timeout=DELIVERY_TIMEOUT)
        found = missing_guarantees(metrics_dir)
    assert delivered_accounts(gateway) == sorted(e["kwargs"]["account_id"] for e in events)
    log = worker_log.read_text(errors="replace")
    assert "Traceback" not in log
    if broker_url.startswith("amqp"):
        assert "queue 'totango' is in the plain design" in log
        assert "lacks replication, delivery_limit" in log
        assert {(QUEUE, PLAIN, g) for g in MISSING_GUARANTEES[PLAIN]} <= found
    else:
        assert "lacks" not in log
        assert not found


@pytest.mark.integration
def test_a_stock_producer_after_the_worker_publishes_and_is_delivered(
    broker_url: str,
    worker: Popen[bytes],
    gateway: GatewayEmulator,
    tmp_path: Path,
) -> None:
    """The worker declares first, in the design every Celery client declares by default, so
    the stock producer's declaration is equivalent and its events are delivered."""
    assert worker.poll() is None
    events = activities("stock-after", 2)
    run_stock_producer(broker_url, tmp_path, events)
    gateway.wait_for(len(events), timeout=DELIVERY_TIMEOUT)
    assert delivered_accounts(gateway) == sorted(e["kwargs"]["account_id"] for e in events)


@pytest.mark.integration
@pytest.mark.parametrize("broker_url", ["rabbitmq"], indirect=True)
def test_stranded_plain_messages_move_to_the_quorum_design_and_are_delivered(
    broker_url: str,
    env_for: Callable[..., Env],
    start_worker: StartWorker,
    gateway: GatewayEmulator,
    worker_log: Path,
) -> None:
    """``python -m worker queues migrate --to quorum`` moves what a stock producer left in
    the plain queue into the quorum design without loss; the worker then consumes the quorum
    queue (no guarantee missing), delivers every event, also after a retry through Celery's
    native delayed delivery, and a stock producer's plain declaration is now refused: the
    price of the quorum design."""
    events = activities("migrated", 4)
    run_stock_producer(broker_url, worker_log.parent, events)
    env = env_for()
    migrated = run_cli(env, "queues", "migrate", "--to", "quorum")
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert "totango: quorum design, 4 messages moved" in migrated.stdout
    gateway.add_rule({"sdr_o": "migrated-0"}, [503])
    with start_worker(env):
        gateway.wait_for(len(events), timeout=DELIVERY_TIMEOUT)
    assert delivered_accounts(gateway) == sorted(e["kwargs"]["account_id"] for e in events)
    log = worker_log.read_text(errors="replace")
    assert "lacks" not in log
    assert "Traceback" not in log
    app = Celery(broker=broker_url, set_as_current=False)
    try:
        with pytest.raises(PreconditionFailed):
            app.send_task("totango.track_activity", kwargs=events[0]["kwargs"], queue="totango")
    finally:
        app.close()


@pytest.mark.integration
@pytest.mark.parametrize("broker_url", ["rabbitmq"], indirect=True)
def test_a_foreign_declaration_stops_the_worker_in_one_line_and_migrate_frees_its_messages(
    broker_url: str,
    env_for: Callable[..., Env],
    start_worker: StartWorker,
    gateway: GatewayEmulator,
    worker_log: Path,
) -> None:
    """A ``totango`` queue in neither design (here: a length limit) stops the worker with one
    line naming the queue and the command, and no traceback. The command moves the queue's
    messages into the plain design, and the worker then delivers them."""
    with Connection(broker_url) as connection:
        channel = connection.channel()
        queue = Queue("totango", routing_key="totango", queue_arguments={"x-max-length": 100})
        queue(channel).declare()
        producer = connection.Producer(channel)
        for event in activities("foreign", 2):
            producer.publish(
                [[], event["kwargs"], {}],
                routing_key="totango",
                serializer="json",
                headers={"task": event["task"], "id": event["kwargs"]["account_id"]},
            )
        channel.close()
    env = env_for()
    with pytest.raises(RuntimeError, match="worker exited"), start_worker(env):
        pass
    log = worker_log.read_text(errors="replace")
    assert "Traceback" not in log
    errors = [line for line in log.splitlines() if line.startswith("totango-worker: ")]
    assert len(errors) == 1, log
    assert "queue 'totango'" in errors[0]
    assert "python -m worker queues migrate" in errors[0]

    migrated = run_cli(env, "queues", "migrate", "--to", "plain")
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert "totango: plain design, 2 messages moved" in migrated.stdout
    with start_worker(env):
        gateway.wait_for(2, timeout=DELIVERY_TIMEOUT)
    assert delivered_accounts(gateway) == ["foreign-0", "foreign-1"]


#: The operator's side of the vhost-quorum design (docs/producers.md): the policy that gives
#: the work queues dead-lettering and the delivery limit without any queue argument.
GUARANTEES_POLICY = json.dumps(
    {
        "dead-letter-exchange": "totango.dlx",
        "dead-letter-routing-key": "totango.dead_letter",
        "delivery-limit": 5,
    }
)


@contextmanager
def quorum_vhost() -> Iterator[str]:
    """A vhost of the test's own whose default queue type is quorum, with the policy."""
    vhost = f"totango-test-dqt-{uuid.uuid4().hex[:12]}"
    _rabbitmqctl("add_vhost", vhost, "--default-queue-type", "quorum")
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        _rabbitmqctl(
            "set_policy", "-p", vhost, "--apply-to", "queues",
            "totango-guarantees", r"^totango(\.batch)?$", GUARANTEES_POLICY,
        )  # fmt: skip
        yield f"amqp://guest:guest@{RABBITMQ_HOST}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


@pytest.mark.integration
@pytest.mark.parametrize("broker_url", ["rabbitmq"], indirect=True)  # env_for's; replaced
def test_plain_declarations_in_a_quorum_vhost_keep_every_guarantee(
    env_for: Callable[..., Env],
    start_worker: StartWorker,
    gateway: GatewayEmulator,
    worker_log: Path,
) -> None:
    """With the vhost's default queue type set to quorum and a policy for dead-lettering and
    the delivery limit, the stock producer's plain declaration makes a quorum queue: the
    worker finds the vhost-quorum design, lacks no guarantee, and delivers what the stock
    producer published before and after it started, a retried event included."""
    with quorum_vhost() as url:
        env = {**env_for(), "TOTANGO_BROKER_URL": url}
        before, after = activities("dqt-before", 2), activities("dqt-after", 2)
        run_stock_producer(url, worker_log.parent, before)
        gateway.add_rule({"sdr_o": "dqt-after-0"}, [503])
        with start_worker(env):
            run_stock_producer(url, worker_log.parent, after)
            gateway.wait_for(len(before) + len(after), timeout=DELIVERY_TIMEOUT)
        listed = subprocess.run(
            [shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl", "-q", "list_queues",
             "-p", url.rsplit("/", 1)[1], "name", "type", "policy"],
            capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=True,
        ).stdout  # fmt: skip
    assert delivered_accounts(gateway) == sorted(e["kwargs"]["account_id"] for e in before + after)
    rows = {tuple(line.split("\t")) for line in listed.splitlines()}
    assert ("totango", "quorum", "totango-guarantees") in rows
    assert ("totango.batch", "quorum", "totango-guarantees") in rows
    log = worker_log.read_text(errors="replace")
    assert "quorum queue by the vhost's default queue type" in log
    assert "lacks" not in log
    assert "Traceback" not in log
