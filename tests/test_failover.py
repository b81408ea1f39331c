"""A failover list in ``TOTANGO_BROKER_URL`` (kombu's ``;`` syntax) works end to end: the
producer API and a real worker both skip a dead first entry and use the next one."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from subprocess import Popen
from urllib.parse import urlsplit

import pytest

from tests.faults.processes import free_port
from totango_emulator import GatewayEmulator
from worker.client import Producer

DELIVERY_TIMEOUT = 30.0
EVENTS = 5


def dead_entry(url: str) -> str:
    """The same URL (credentials and vhost kept) on a loopback port nothing listens on."""
    parts = urlsplit(url)
    credentials = parts.netloc.rsplit("@", 1)[0]
    return parts._replace(netloc=f"{credentials}@127.0.0.1:{free_port()}").geturl()


@pytest.mark.integration
@pytest.mark.parametrize("broker_url", ["rabbitmq"], indirect=True)
def test_producer_and_worker_fail_over_past_a_dead_first_entry(
    broker_url: str,
    *,
    env_for: Callable[..., dict[str, str]],
    producer_for: Callable[[dict[str, str]], Producer],
    start_worker: Callable[..., AbstractContextManager[Popen[bytes]]],
    gateway: GatewayEmulator,
    worker_log: Path,
) -> None:
    """With ``TOTANGO_BROKER_URL=<closed port>;<the machine's broker>``, events published
    through the producer API are taken by the broker (publisher confirms) although the first
    entry refuses connections, and a worker given the same list consumes and delivers each
    of them once."""
    failover = f"{dead_entry(broker_url)};{broker_url}"
    env = env_for(TOTANGO_BROKER_URL=failover)
    producer = producer_for(env)
    assert producer.settings.broker_url == failover
    ids = [
        producer.track_activity(
            account_id="acct-failover", user_id=f"user-{n}", activity="Login", module="Failover"
        )
        for n in range(EVENTS)
    ]
    with start_worker(env):
        gateway.wait_for(EVENTS, timeout=DELIVERY_TIMEOUT)
        time.sleep(0.5)  # a duplicate would show up here
    users = sorted(dict(call.params)["sdr_u"] for call in gateway.delivered())
    assert users == [f"user-{n}" for n in range(EVENTS)]
    assert len(set(ids)) == EVENTS
    real = urlsplit(broker_url)
    assert f"Connected to amqp://guest:**@{real.hostname}:{real.port}/" in worker_log.read_text()
