"""The broker goes away under a running worker: every connection through a TCP proxy of the
test's own is cut and restored; a private redis-server is killed and restarted; and one
answer of Redis is lost at the worst moment. On RabbitMQ and on Redis."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.brokers import broker
from tests.faults.accounting import Row
from tests.faults.harness import (
    IN_FLIGHT,
    PROMISED_RECOVERY,
    Run,
    assert_nothing_lost,
    delivered_keys,
    host_port,
    probe_delivery,
    queued_keys,
    reserved_keys,
    send,
    sending,
    via,
)
from tests.faults.processes import PrivateRedis
from tests.faults.proxy import TcpProxy
from tests.workers import wait_until
from totango_emulator import GatewayEmulator
from worker.client import Producer
from worker.contract import QUEUE

pytestmark = pytest.mark.faults

# --- 2. broker cut -------------------------------------------------------------------------

CUT_EVENTS = 1200
CUT_RATE = 200.0  # events per second: the producer keeps sending, straight to the broker
CUTS = 2
CUT_SECONDS = 3.0


def test_broker_connection_cut_mid_run_and_restored(run: Run) -> None:
    """The worker reaches its broker through a TCP proxy of the test's own. Twice while
    events flow, every connection through it is reset and new ones refused for 3 s, then
    let through again: the worker reconnects by itself and delivers again each time, and
    every event ends delivered or dead-lettered, with duplicates within what was in flight
    at the cuts."""
    host, port = host_port(run.broker_url)
    with TcpProxy(host, port) as proxy:
        worker = run.worker(run.env(via(run.broker_url, proxy.port)), "cut")
        worker.start()
        app = run.app()
        ledger = run.ledger("2 broker cut: TCP proxy")
        reconnects = []
        producer_api = Producer(app=app)
        with sending(producer_api, ledger, CUT_EVENTS, CUT_RATE) as producer:
            for n in range(1, CUTS + 1):
                mark = n * CUT_EVENTS // (CUTS + 2)
                wait_until(lambda m=mark: len(run.gateway.delivered()) >= m, 60, "deliveries")
                assert proxy.cut() > 0
                time.sleep(CUT_SECONDS)
                proxy.restore()
                reconnects.append(probe_delivery(producer_api, ledger, run.gateway))
        assert producer.error is None, producer.error
        tally = run.settle(ledger, app, timeout=PROMISED_RECOVERY + 30, worker=worker)
    bound = CUTS * IN_FLIGHT
    recovery = "a new event delivered " + ", ".join(f"{s:.1f}" for s in reconnects) + " s after"
    row = run.record(ledger.row(tally, duplicate_bound=bound, recovery=recovery))
    assert worker.alive, worker.tail()
    assert row.duplicates <= bound
    assert row.dead_lettered == 0, f"a broker cut is no reason to dead-letter: {row.reasons}"
    assert_nothing_lost(run, tally, row)


RESTARTS = 2
REDIS_DOWN_SECONDS = 2.0
RESTART_EVENTS = 1000
RESTART_RATE = 150.0


def test_private_redis_server_killed_and_restarted_mid_run(
    gateway: GatewayEmulator, tmp_path: Path, results: list[Row]
) -> None:
    """Redis only: the worker and the producer use a redis-server of the test's own, with
    ``appendonly yes`` and ``appendfsync always`` so that what Redis acknowledged survives
    it. Twice while events flow, that server is killed with SIGKILL and started again 2 s
    later on the same port and data: the producer retries what Redis refused, the worker
    reconnects, and every event ends delivered or dead-lettered."""
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    run = Run("redis (private, AOF)", server.url, gateway, tmp_path, results)
    try:
        worker = run.worker(run.env(), "redis-restart")
        worker.start()
        app = run.app()
        ledger = run.ledger("2 broker restart: redis-server kill -9")
        reconnects = []
        producer_api = Producer(app=app)
        with sending(producer_api, ledger, RESTART_EVENTS, RESTART_RATE) as producer:
            for n in range(1, RESTARTS + 1):
                mark = n * RESTART_EVENTS // (RESTARTS + 2)
                wait_until(lambda m=mark: len(gateway.delivered()) >= m, 60, "deliveries")
                server.restart(REDIS_DOWN_SECONDS)
                reconnects.append(probe_delivery(producer_api, ledger, gateway))
        assert producer.error is None, producer.error
        tally = run.settle(ledger, app, timeout=PROMISED_RECOVERY + 30, worker=worker)
        bound = RESTARTS * IN_FLIGHT
        recovery = "a new event delivered " + ", ".join(f"{s:.1f}" for s in reconnects) + " s after"
        note = f"{producer.failed_attempts} publishes refused while down, then retried"
        row = run.record(ledger.row(tally, duplicate_bound=bound, recovery=recovery, note=note))
        assert worker.alive, worker.tail()
        assert row.duplicates <= bound
        assert row.dead_lettered == 0, f"a restart is no reason to dead-letter: {row.reasons}"
        assert_nothing_lost(run, tally, row)
    finally:
        run.close()
        server.kill()


#: The answers that hand a worker a message it has just taken off the list: kombu's reply to
#: ``BRPOP totango`` (an array of the list's name and the message), and the reply of the
#: worker's fetch script (an array of the list's index and the message). The worker's
#: ``BLMOVE`` wake-up answers a bare string and takes nothing, so it is let through.
TAKE_REPLIES = (
    b"*2\r\n$" + str(len(QUEUE)).encode() + b"\r\n" + QUEUE.encode() + b"\r\n",
    b"*2\r\n:1\r\n$",
)


def test_redis_a_fetch_lost_in_transit_leaves_the_message_somewhere(
    gateway: GatewayEmulator, tmp_path: Path, results: list[Row]
) -> None:
    """Redis only, a fault at one precise moment: Redis has taken a message off the list for
    the worker and answered with it, and the connection dies before the answer arrives (the
    proxy drops it and resets the connection). The message must still be somewhere it can
    come back from: on the list, or reserved in the unacked hash, or delivered. kombu's own
    transport fails this (BRPOP, then a separate write to unacked: celery/celery#7950,
    celery/kombu#305); worker/redis_transport.py takes and reserves in one Lua script."""
    with broker("redis") as url, TcpProxy(*host_port(url)) as proxy:
        run = Run("redis", url, gateway, tmp_path, results)
        try:
            worker = run.worker(run.env(via(url, proxy.port)), "brpop")
            worker.start()
            app = run.app()
            ledger = run.ledger("2 broker cut: the fetch's answer lost")
            proxy.drop_reply = lambda data: data.startswith(TAKE_REPLIES)
            (key,) = send(Producer(app=app), ledger, 1)
            wait_until(lambda: proxy.dropped_replies, 10, "a fetch's answer to drop")
            dropped_at = time.monotonic()
            proxy.drop_reply = None
            time.sleep(3.0)  # the worker reconnects and goes on fetching
            somewhere = queued_keys(url) | reserved_keys(url) | delivered_keys(gateway)
            assert key in somewhere, "taken off the list, never reserved, never delivered"
            # Reserved for a worker that never heard of it: back after the visibility timeout.
            tally = run.settle(ledger, app, timeout=PROMISED_RECOVERY + 10, worker=worker)
            back = time.monotonic() - dropped_at
            row = run.record(
                ledger.row(
                    tally,
                    recovery=f"delivered {back:.1f} s after",
                    note="the answer to one fetch dropped in transit",
                )
            )
            assert_nothing_lost(run, tally, row)
            promised = f"back after {back:.1f} s; promised {PROMISED_RECOVERY:g} s"
            assert back <= PROMISED_RECOVERY, promised
        finally:
            run.close()
