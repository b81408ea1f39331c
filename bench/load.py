"""What a bench phase publishes and reads back: event arguments, queue lengths, the worker's
delivered counter, and events/s and latency from the gateway's recorded calls."""

from __future__ import annotations

import math
import re
import statistics
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import redis
from kombu import Connection

from bench.procs import BenchError, Worker
from bench.ratios import steady_window

SERVICE_ID = "SP-1234-56"
STAMP_ATTRIBUTE = "bench_t"
_DELIVERED_RE = re.compile(r"^totango_events_delivered_total\{[^}]*\} ([0-9.e+]+)$", re.M)


def event_kwargs(tag: str, index: int, stamp: float | None = None) -> dict[str, Any]:
    """One activity, told apart by its user id; ``stamp`` is its enqueue time."""
    attributes = {"plan": "pro", STAMP_ATTRIBUTE: f"{stamp if stamp else time.time():.6f}"}
    return {
        "account_id": f"acct-{index % 100}",
        "user_id": f"{tag}-{index}",
        "activity": "Login",
        "module": "App",
        "user_attributes": attributes,
    }


def queue_length(broker_url: str, queue: str) -> int:
    """Messages ready in a queue (RabbitMQ does not count the unacknowledged ones)."""
    if broker_url.startswith("redis"):
        client = redis.Redis.from_url(broker_url)
        try:
            return int(client.llen(queue))
        finally:
            client.close()
    with Connection(broker_url, connect_timeout=10) as connection:
        channel: Any = connection.channel()
        try:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
        finally:
            channel.close()


def wait_for(
    probe: Callable[[], bool],
    timeout: float,
    what: str,
    worker: Worker | None = None,
    interval: float = 0.2,
) -> float:
    """Poll ``probe`` until it holds; return the seconds waited, or raise ``BenchError``."""
    started = time.monotonic()
    deadline = started + timeout
    while not probe():
        if worker is not None:
            worker.check_alive()
        if time.monotonic() >= deadline:
            tail = f"\n--- worker log ---\n{worker.tail()}" if worker else ""
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")
        time.sleep(interval)
    return time.monotonic() - started


def drained_then_delivered(
    broker_url: str, queue: str, ports: list[int], n: float, *, timeout: float, worker: Worker
) -> None:
    """Wait for ``n`` deliveries without loading the worker while it works: first the queue
    empties (a question to the broker), then the workers' delivered counter reaches ``n``.
    A scrape of /metrics costs the worker CPU, and polled every 200 ms throughout a phase it
    took several percent of the worker's time in a profile."""
    waited = wait_for(lambda: queue_length(broker_url, queue) == 0, timeout, "drain", worker)
    wait_for(
        lambda: delivered_counter(ports) >= n,
        max(1.0, timeout - waited),
        f"{n:g} deliveries",
        worker,
        interval=0.5,
    )


def delivered_counter(ports: list[int]) -> float:
    """The workers' ``totango_events_delivered_total``, summed over tasks and processes; a
    process that does not serve its metrics yet counts 0."""
    total = 0.0
    for port in ports:
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as answer:
                text = answer.read().decode()
        except OSError:
            continue
        total += sum(float(value) for value in _DELIVERED_RE.findall(text))
    return total


def params_of(call: dict[str, Any]) -> dict[str, str]:
    return dict(call["params"])


def phase_calls(calls: list[dict[str, Any]], tag: str) -> list[dict[str, Any]]:
    """The calls of one phase: its user ids start with ``tag-``."""
    prefix = f"{tag}-"
    return [c for c in calls if params_of(c).get("sdr_u", "").startswith(prefix)]


def check_exactly_once(calls: list[dict[str, Any]], expected: int) -> list[dict[str, Any]]:
    """The delivered calls; a missing, failed or duplicate delivery is an error, not a figure."""
    delivered = [c for c in calls if c["status"] == 200]
    users = {params_of(c)["sdr_u"] for c in delivered}
    if len(delivered) != expected or len(users) != expected:
        raise BenchError(
            f"expected {expected} events delivered once each; got {len(delivered)} 200s "
            f"for {len(users)} distinct events out of {len(calls)} calls"
        )
    return delivered


def rate(times: list[float]) -> float:
    """Events/s in the steady window, between 10 % and 90 % of the completions."""
    return steady_window(times).rate


def answered_at(calls: list[dict[str, Any]], delay_ms: float) -> list[float]:
    """When the gateway answered each call: it stamps a call on arrival and answers
    ``delay_ms`` later. The CPU window is then the one in which the worker settled them."""
    return [c["received_at"] + delay_ms / 1000 for c in calls]


def purge(broker_url: str, queue: str) -> None:
    """Empty a queue of what a stopped phase left in it (a message handed back unacked)."""
    if broker_url.startswith("redis"):
        client = redis.Redis.from_url(broker_url)
        try:
            client.delete(queue)
        finally:
            client.close()
        return
    with Connection(broker_url, connect_timeout=10) as connection:
        channel: Any = connection.channel()
        try:
            channel.queue_purge(queue)
        finally:
            channel.close()


def latencies_ms(calls: list[dict[str, Any]], delay_ms: float) -> list[float]:
    """Enqueue to the gateway's answer: the emulator stamps a call on arrival and answers
    ``delay_ms`` later."""
    out = []
    for call in calls:
        stamp = params_of(call).get(f"sdr_u.{STAMP_ATTRIBUTE}")
        if stamp is not None:
            out.append((call["received_at"] - float(stamp)) * 1000 + delay_ms)
    return out


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(0, math.ceil(pct / 100 * len(ordered)) - 1)
    return ordered[rank]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan
