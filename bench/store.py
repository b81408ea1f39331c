"""The state-store phase's Redis: a redis-server of the bench's own on a free loopback port,
so that the store's cost is measured on a server nothing else loads (the shared Redis of
the machine serves every test run). No persistence, as the deployments run the store."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from bench.procs import BenchError, stop_group
from worker.state import KEY_PREFIX

#: Seconds the server may take to answer its first PING.
START_TIMEOUT = 20.0


class PrivateStore:
    """``redis-server --save '' --appendonly no`` on a free port, in a session of its own;
    stopped by its process group (``close``) on any exit of the run."""

    def __init__(self, directory: Path, port: int) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise BenchError("the state-store phase needs redis-server on PATH")
        directory.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.log_path = directory / "redis.log"
        self.proc = subprocess.Popen(  # noqa: S603  the installed redis-server, our arguments
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(directory), "--daemonize", "no",
             "--logfile", str(self.log_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        with self.client() as client:
            while True:
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise BenchError(f"private redis-server did not start on port {port}")
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_connect_timeout=1)

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
        stop_group(self.proc, 5)
