"""``make bench-cluster``: events/s of 1, 2 and 4 worker processes against a 3-node RabbitMQ
cluster of the run's own (``tests/faults/cluster.py``), given all nodes as one failover list.

Each phase is ``bench.run``'s "ours" phase unchanged: ``--events`` events pre-published
through the producer API, then the production worker command (threads, c=128, prefetch 2,
``-Q totango``) in N processes; events/s from the gateway emulator's record, every event
checked to arrive exactly once. The machine also runs the three nodes, so only the ratios
between phases of one run mean anything. The cluster and every process are stopped on any
exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import load
from bench import run as bench
from bench.procs import BenchError
from tests.faults.cluster import Cluster, cluster
from worker.application import create_app
from worker.client import Producer
from worker.contract import QUEUE
from worker.settings import Settings

ENV = {"TOTANGO_SERVICE_ID": load.SERVICE_ID}

PROCESSES = (1, 2, 4)
#: Events published to measure what a backlog costs the queue's members in memory.
BACKLOG = 10_000


class ConnectionCount:
    """The most client connections the cluster held at once while sampling (every 2 s)."""

    def __init__(self, nodes: Cluster, vhost: str) -> None:
        self.nodes, self.vhost, self.peak = nodes, vhost, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(2.0):
            out = self.nodes.ctl(self.nodes.nodes[0], "list_connections", "vhost", check=False)
            self.peak = max(self.peak, sum(1 for line in out.split() if line == self.vhost))

    def __enter__(self) -> ConnectionCount:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def backlog_memory(nodes: Cluster, vhost: str, url: str, events: int) -> dict[str, Any]:
    """Publish ``events`` events, read the ``totango`` queue's memory on each member, purge."""
    producer = Producer(app=create_app(Settings.from_env({**ENV, "TOTANGO_BROKER_URL": url})))
    try:
        for i in range(events):
            producer.track_activity(**load.event_kwargs("mem", i))
    finally:
        producer.app.close()
    out = nodes.ctl(nodes.nodes[0], "list_queues", "-p", vhost, "name", "messages", "memory")
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == [QUEUE])
    messages, memory = int(row[1]), int(row[2])
    nodes.ctl(nodes.nodes[0], "purge_queue", "-p", vhost, QUEUE)
    return {
        "messages": messages,
        "leader_queue_memory_mb": round(memory / 2**20, 1),
        "bytes_per_message": round(memory / max(1, messages)),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__)
    add = parser.add_argument
    add("--events", type=int, default=6000, help="events per phase (6000)")
    add("--delay-ms", type=float, default=50.0, help="gateway emulator delay (50)")
    add("--processes", default=",".join(map(str, PROCESSES)), help="worker processes per phase")
    add("--time-limit", type=float, default=600.0, help="seconds for the whole run (600)")
    args = parser.parse_args(argv)
    if not 1 <= args.events <= 100_000:
        parser.error("--events must be between 1 and 100000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, bench._interrupt)
    counts = [min(8, int(p)) for p in args.processes.split(",") if p.strip()]
    # What bench.run's phases read from their arguments, for the "ours" phase alone.
    phase_args = bench.parse_args(
        ["--events", str(args.events), "--delay-ms", str(args.delay_ms),
         "--time-limit", str(args.time_limit)]
    )  # fmt: skip
    results: dict[str, Any] = {}
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="totango-bench-cluster-") as root,
        cluster(Path(root)) as nodes,
        nodes.vhost() as vhost,
        bench._run(phase_args) as run,
    ):
        url = nodes.failover_url(vhost)
        memory = backlog_memory(nodes, vhost, url, BACKLOG)
        run.log(f"backlog: {memory}")
        for count in counts:
            config = bench.Config(processes=count)
            run.log(f"{config.label} on the 3-node cluster ...")
            try:
                with ConnectionCount(nodes, vhost) as connections:
                    results[str(count)] = bench.run_ours(
                        run, "rabbitmq-cluster", url, config, latency=False
                    )
                results[str(count)]["peak_connections"] = connections.peak
            except BenchError as exc:
                results[str(count)] = {"error": str(exc)}
            run.log(f"  {results[str(count)]}")
    base = results.get("1", {}).get("events_per_s")
    print(f"\n3-node RabbitMQ cluster, gateway {args.delay_ms:g} ms, {args.events} events")
    print("| worker processes | events/s | vs 1 process | worker CPU ms/event | RSS MB "
          "| connections |")  # fmt: skip
    print("|--:|--:|--:|--:|--:|--:|")
    for label, r in results.items():
        eps = r.get("events_per_s")
        ratio = f"{eps / base:.2f}" if eps and base else "-"
        print(
            f"| {label} | {eps or r.get('error', '-')} | {ratio} "
            f"| {r.get('worker_cpu_ms', '-')} | {r.get('rss_mb', '-')} "
            f"| {r.get('peak_connections', '-')} |"
        )
    print(f"backlog of {BACKLOG} events on the queue leader: {memory}")
    summary = {"cluster": results, "backlog": memory, "seconds": round(time.monotonic() - started)}
    print(json.dumps(summary))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt as interrupted:
        print(f"bench interrupted ({interrupted}); cleaned up", file=sys.stderr)
        raise SystemExit(130) from None
