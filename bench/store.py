"""The state-store phase's Redis: a redis-server of the bench's own on a free loopback port,
so that the store's cost is measured on a server nothing else loads (the shared Redis of
the machine serves every test run). No persistence, as the deployments run the store.

The server is the fault suite's ``PrivateRedis`` (``persistent=False``); this adds what
the bench reads from it."""

from __future__ import annotations

import shutil
from pathlib import Path

import redis

from bench.procs import BenchError
from tests.faults.processes import PrivateRedis
from worker.state import KEY_PREFIX


class PrivateStore:
    """``redis-server --save '' --appendonly no`` on a free port, in a session of its own;
    stopped (``close``) on any exit of the run."""

    def __init__(self, directory: Path) -> None:
        if shutil.which("redis-server") is None:
            raise BenchError("the state-store phase needs redis-server on PATH")
        self.server = PrivateRedis(directory, persistent=False)
        try:
            self.server.start()
        except RuntimeError as error:
            self.server.kill()
            raise BenchError(str(error)) from error

    @property
    def url(self) -> str:
        return self.server.url

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.server.port, socket_connect_timeout=1)

    def flush(self) -> None:
        """Start a phase on an empty store, as every round does."""
        with self.client() as client:
            client.flushall()
            client.config_resetstat()

    def reads(self) -> int:
        """Read events the store processed since the last ``flush``: about one per round
        trip of a client (a pipeline arrives in one read, unless it is large)."""
        with self.client() as client:
            return int(client.info("stats")["total_reads_processed"])

    def recorded(self) -> int:
        """How many delivered ids the store holds (SCAN of the worker's key prefix)."""
        with self.client() as client:
            return sum(1 for _ in client.scan_iter(match=f"{KEY_PREFIX}*", count=1000))

    def close(self) -> None:
        """kill -9: the store keeps nothing to save."""
        self.server.kill()
