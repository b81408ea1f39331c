"""A 3-node RabbitMQ cluster of the suite's own (``cluster.py``) loses nodes under a running
worker: the node it is connected to is killed, all three are restarted one at a time, one is
cut off from the worker through the suite's TCP proxy, and two of three go down at once.
Worker and producer are given all three nodes as one failover list
(``TOTANGO_BROKER_URL=amqp://...:P1/v;amqp://...:P2/v;amqp://...:P3/v``).

Duplicates: each fault may redeliver what the worker held unacknowledged (``IN_FLIGHT``),
and, when the node that dies is the queue's leader, the acknowledgements it had taken but not
yet committed to a majority (the worker's window moved on, so at most another
``IN_FLIGHT``); on the producer's side, one publish of the producer thread whose confirm
never came (sent again, same event id) and one that kombu publishes again on reconnecting.
The bound is faults x (2 x IN_FLIGHT + 2).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.accounting import DELIVER, Row
from tests.faults.cluster import Cluster, Node, cluster
from tests.faults.harness import (
    IN_FLIGHT,
    Run,
    activity,
    assert_nothing_lost,
    delivered_keys,
    probe_delivery,
    sending,
)
from tests.faults.processes import Worker
from tests.faults.proxy import TcpProxy
from tests.workers import wait_until
from totango_emulator import GatewayEmulator
from worker.client import Producer

#: Each row waits on bounded conditions only; on a loaded 2-core machine a row with node
#: restarts (each CLI call starts an Erlang VM) has taken up to ~5 minutes.
pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

BROKER = "rabbitmq (3-node cluster)"
#: What one fault may duplicate: the worker's unacknowledged messages, as many whose
#: acknowledgement the dying leader had not committed, the producer's in-doubt publish and
#: kombu's own republish on reconnecting (module docstring).
PER_FAULT = 2 * IN_FLIGHT + 2
#: Two of three down: two threads publish (the producer thread and the test's refused
#: publish), each with its in-doubt publish and kombu's republish.
MAJORITY_BOUND = PER_FAULT + 2
EVENTS = 1500
RATE = 150.0  # events per second, from a producer thread on the same failover list
#: A publish refused while nodes are down is tried again (same event id) for this long.
GIVE_UP_AFTER = 120.0
SETTLE_TIMEOUT = 90.0
#: Enough events (70 s) for the three restarts (about 15 s each, after a quarter of the
#: events) to happen while they still flow.
ROLLING_EVENTS = 10500
#: How long a worker may take to deliver again after a failover. Celery's delayed-delivery
#: step sets itself up again on every URL of the failover list at each reconnect, and
#: retries a dead one for ~17 s (1 + 3 + 5 s of sleeps) before the consumer starts; after
#: a cut, the event loop may drop the new connection once more (two rounds, ~35 s).
FAILOVER_TIMEOUT = 90.0

CONNECTED_RE = re.compile(r"Connected to amqp://guest:\*\*@127\.0\.0\.1:(\d+)/")


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The cluster, started once for this module and stopped after it, whatever happens."""
    with cluster(tmp_path_factory.mktemp("cluster")) as started:
        yield started


@pytest.fixture
def vhost(nodes: Cluster) -> Iterator[str]:
    """A vhost of the test's own on the cluster; the cluster is whole before the test."""
    for node in nodes.nodes:
        if not node.alive:
            nodes.start_node(node)
    nodes.wait_running()
    with nodes.vhost() as name:
        yield name


@pytest.fixture
def crun(
    nodes: Cluster, vhost: str, gateway: GatewayEmulator, tmp_path: Path, results: list[Row]
) -> Iterator[Run]:
    scenario = Run(BROKER, nodes.failover_url(vhost), gateway, tmp_path, results)
    try:
        yield scenario
    finally:
        scenario.close()


def connected_node(nodes: Cluster, worker: Worker) -> Node:
    """The node the worker's consumer connected to last (its log says so)."""
    ports = CONNECTED_RE.findall(worker.log_path.read_text(errors="replace"))
    assert ports, worker.tail()
    return next(n for n in nodes.nodes if n.port == int(ports[-1]))


def until_delivered(run: Run, count: int) -> None:
    wait_until(lambda: len(run.gateway.delivered()) >= count, 60, f"{count} deliveries")


def seconds(values: list[float]) -> str:
    return ", ".join(f"{s:.1f}" for s in values)


def test_cluster_sigkill_of_the_workers_node(nodes: Cluster, crun: Run) -> None:
    """While events flow, the node the worker is connected to is killed with SIGKILL (and
    with it, on this cluster, the queue's first leader). The worker fails over to the next
    node of its list and delivers again, the producer's refused publishes are sent again,
    the killed node comes back and rejoins; every event is delivered, none lost, duplicates
    within one fault's bound."""
    worker = crun.worker(crun.env(), "cluster-kill")
    worker.start()
    app = crun.app()
    producer = Producer(app=app)
    ledger = crun.ledger("7 cluster: SIGKILL of the worker's node")
    with sending(producer, ledger, EVENTS, RATE, GIVE_UP_AFTER) as background:
        until_delivered(crun, EVENTS // 4)
        victim = connected_node(nodes, worker)
        nodes.kill(victim)
        back = probe_delivery(producer, ledger, crun.gateway, FAILOVER_TIMEOUT)
        nodes.start_node(victim)
    assert background.error is None, background.error
    tally = crun.settle(ledger, app, SETTLE_TIMEOUT, worker=worker)
    now_on = connected_node(nodes, worker)
    row = crun.record(
        ledger.row(
            tally,
            duplicate_bound=PER_FAULT,
            recovery=f"a new event delivered {back:.1f} s after the kill",
            note=f"killed {victim.name}; worker went on via {now_on.name}; "
            f"{background.failed_attempts} publishes refused, then retried",
        )
    )
    assert worker.alive, worker.tail()
    assert now_on is not victim
    assert row.duplicates <= PER_FAULT
    assert row.dead_lettered == 0, row.reasons
    assert_nothing_lost(crun, tally, row)


def test_cluster_rolling_restart_of_all_three_nodes(nodes: Cluster, crun: Run) -> None:
    """While events flow, each node in turn is stopped cleanly and started again, as a
    rolling upgrade does: the next node is stopped only once no quorum queue depends on it
    (``rabbitmq-queues check_if_node_is_quorum_critical``). The worker follows the cluster
    along its failover list; every event is delivered, duplicates within three faults'
    bound."""
    worker = crun.worker(crun.env(), "cluster-rolling")
    worker.start()
    app = crun.app()
    producer = Producer(app=app)
    ledger = crun.ledger("7 cluster: rolling restart, 3 nodes")
    probes = []
    restarted_at = []
    with sending(producer, ledger, ROLLING_EVENTS, RATE, GIVE_UP_AFTER) as background:
        started = time.monotonic()
        until_delivered(crun, EVENTS // 4)
        for node in nodes.nodes:
            wait_until(lambda n=node: nodes.quorum_safe_to_stop(n), 60, f"{node.name} safe to stop")
            nodes.stop(node)
            nodes.start_node(node)
            nodes.wait_running(node)
            restarted_at.append(time.monotonic() - started)
            probes.append(probe_delivery(producer, ledger, crun.gateway, FAILOVER_TIMEOUT))
    assert background.error is None, background.error
    tally = crun.settle(ledger, app, SETTLE_TIMEOUT, worker=worker)
    bound = len(nodes.nodes) * PER_FAULT
    row = crun.record(
        ledger.row(
            tally,
            duplicate_bound=bound,
            recovery=f"a new event delivered {seconds(probes)} s after each restart",
            note=f"nodes back at {seconds(restarted_at)} s of a "
            f"{ROLLING_EVENTS / RATE:.0f} s run; {background.failed_attempts} publishes "
            "refused, then retried",
        )
    )
    assert worker.alive, worker.tail()
    assert row.duplicates <= bound
    assert row.dead_lettered == 0, row.reasons
    assert_nothing_lost(crun, tally, row)


CUT_SECONDS = 5.0


def test_cluster_one_node_cut_off_through_the_proxy_then_healed(
    nodes: Cluster, vhost: str, crun: Run
) -> None:
    """The worker reaches the first node through the suite's TCP proxy (the others
    directly). While events flow, every connection through the proxy is reset and new ones
    refused: the worker fails over to the next node and delivers while the node is still
    cut off; then the cut is healed. Every event is delivered, duplicates within one
    fault's bound."""
    first, *others = nodes.nodes
    with TcpProxy("127.0.0.1", first.port) as proxy:
        ports = [proxy.port, *(n.port for n in others)]
        worker = crun.worker(crun.env(nodes.failover_url(vhost, ports)), "cluster-cut")
        worker.start()
        app = crun.app()
        producer = Producer(app=app)
        ledger = crun.ledger("7 cluster: one node cut off (proxy), healed")
        with sending(producer, ledger, EVENTS, RATE, GIVE_UP_AFTER) as background:
            until_delivered(crun, EVENTS // 4)
            assert proxy.open_connections > 0, "the worker is not on the first node"
            cut = proxy.cut()
            started = time.monotonic()
            # Restored only after this: the worker delivers while its first node is cut off.
            during = probe_delivery(producer, ledger, crun.gateway, FAILOVER_TIMEOUT)
            time.sleep(max(0.0, CUT_SECONDS - (time.monotonic() - started)))
            proxy.restore()
        assert background.error is None, background.error
        tally = crun.settle(ledger, app, SETTLE_TIMEOUT, worker=worker)
    row = crun.record(
        ledger.row(
            tally,
            duplicate_bound=PER_FAULT,
            recovery=f"a new event delivered {during:.1f} s after the cut, node still cut off",
            note=f"{cut} connection(s) cut; {proxy.refused} reconnects refused while cut",
        )
    )
    assert cut > 0
    assert worker.alive, worker.tail()
    assert row.duplicates <= PER_FAULT
    assert row.dead_lettered == 0, row.reasons
    assert_nothing_lost(crun, tally, row)


def test_cluster_two_of_three_nodes_down_refuses_then_resumes(nodes: Cluster, crun: Run) -> None:
    """Two of three nodes are killed while events flow: the quorum queues have no majority
    and the last node pauses itself (``pause_minority``), so a publish through the producer
    API raises an error the producer sees, never a silent drop. The worker waits, alive,
    and delivers again once a second node is back (a majority); the refused event, sent
    again with the same id, and everything published before and after is delivered."""
    worker = crun.worker(crun.env(), "cluster-majority")
    worker.start()
    app = crun.app()
    producer = Producer(app=app)
    ledger = crun.ledger("7 cluster: 2 of 3 nodes down, majority back")
    with sending(producer, ledger, EVENTS, RATE / 2, GIVE_UP_AFTER) as background:
        until_delivered(crun, EVENTS // 8)
        keep = connected_node(nodes, worker)
        down = [n for n in nodes.nodes if n is not keep]
        for node in down:
            nodes.kill(node)
        lost_majority = time.time()
        refused_key = ledger.key(DELIVER)
        with pytest.raises(Exception) as refused:  # noqa: PT011  any error, as long as it is raised
            producer.track_activity(**activity(refused_key))
        wait_until(lambda: background.failed_attempts > 0, 30, "the producer thread refused")
        assert worker.alive, worker.tail()
        nodes.start_node(down[0])
        majority_back = time.time()
        resend_started = time.time()
        sent_again = False
        while not sent_again and time.time() - resend_started < FAILOVER_TIMEOUT:
            try:
                producer.track_activity(**activity(refused_key))
                sent_again = True
            except Exception:  # noqa: BLE001  still refused: the majority is settling
                time.sleep(0.5)
        back = probe_delivery(producer, ledger, crun.gateway, FAILOVER_TIMEOUT)
        nodes.start_node(down[1])
    assert sent_again, "the refused event could not be sent again once the majority was back"
    assert background.error is None, background.error
    tally = crun.settle(ledger, app, SETTLE_TIMEOUT, worker=worker)
    outage = majority_back - lost_majority
    row = crun.record(
        ledger.row(
            tally,
            duplicate_bound=MAJORITY_BOUND,
            recovery=f"a new event delivered {back:.1f} s after a 2nd node was back",
            note=f"kept {keep.name}; without a majority for {outage:.0f} s, the producer "
            f"saw {type(refused.value).__name__}; {background.failed_attempts} publishes "
            "refused, then retried",
        )
    )
    assert refused_key in delivered_keys(crun.gateway)
    assert worker.alive, worker.tail()
    assert row.duplicates <= MAJORITY_BOUND
    assert row.dead_lettered == 0, row.reasons
    assert_nothing_lost(crun, tally, row)
