"""Processes a fault test owns and breaks: a real worker it can kill -9, SIGTERM and restart,
and a private redis-server it can kill and start again on the same port and data folder."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import redis

from tests.workers import tail

START_TIMEOUT = 60.0


def _children_of(pid: int) -> list[int]:
    """Direct children of ``pid``, read from /proc (no psutil needed)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name sits in parentheses and may hold spaces: split after it.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


class Worker:
    """One real ``celery -A worker.app worker``, in a process group of its own so that a
    kill -9 reaches the main process and every pool process at once."""

    def __init__(
        self, env: Mapping[str, str], log_path: Path, name: str, args: tuple[str, ...] = ()
    ) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.name = name
        self.args = args  # more celery worker options, such as ("-Q", "totango.batch")
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.ready_at = 0.0

    @property
    def heartbeat(self) -> Path:
        return Path(self.env["TOTANGO_HEARTBEAT_FILE"])

    def start(self) -> None:
        """Start it and wait until its consumer is connected (the heartbeat file exists)."""
        self.heartbeat.unlink(missing_ok=True)  # a killed worker leaves its file behind
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start {self.starts} at {time.time():.3f} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "celery", "-A", "worker.app", "worker",
                    "--loglevel", self.env.get("TOTANGO_LOG_LEVEL", "INFO"),
                    "--without-mingle", "--without-gossip",
                    "-n", f"{self.name}-{os.getpid()}-{self.starts}@%h", *self.args,
                ],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while not self.heartbeat.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker not ready in {START_TIMEOUT}s:\n{self.tail()}")
            time.sleep(0.05)
        self.ready_at = time.time()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pool_pids(self) -> list[int]:
        """The pool processes (prefork children) of the running main process."""
        return _children_of(self.proc.pid) if self.alive and self.proc else []

    def kill_all(self) -> None:
        """kill -9 the main process and every child at once, as an OOM kill of the pod."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def kill_child(self) -> int | None:
        """kill -9 one pool process; the main process survives and replaces it."""
        children = self.pool_pids()
        if not children:
            return None
        victim = children[0]
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
        return victim

    def terminate(self, timeout: float) -> float:
        """SIGTERM, as when a pod is evicted; returns how long the worker took to exit."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        finally:
            self.stop()
        return time.monotonic() - started

    def stop(self) -> None:
        """Stop what is left of it, politely first; no process of the group survives."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # pool processes orphaned by a kill
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivateRedis:
    """A redis-server of the test's own on a free loopback port.

    Persistence is on (``appendonly yes``, ``appendfsync always``): every write is on disk
    before Redis answers it, so a publish that Redis acknowledged survives a kill -9 of
    Redis. Without persistence a restart empties Redis, and losing the queue then is the
    operator's choice, not the worker's fault.
    """

    def __init__(self, directory: Path, *, persistent: bool = True) -> None:
        self.directory = directory
        #: ``False``: no AOF and no snapshot, as a state store (``--save '' --appendonly no``),
        #: so a restart starts empty.
        self.persistent = persistent
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", *self._persistence(),
                "--dir", str(self.directory), "--daemonize", "no",
                "--logfile", str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = tail(self.directory / "redis.log")
                    raise RuntimeError(f"private redis-server did not start:\n{log}")
                time.sleep(0.05)
        finally:
            client.close()

    def _persistence(self) -> list[str]:
        if not self.persistent:
            return ["--appendonly", "no"]
        return ["--appendonly", "yes", "--appendfsync", "always"]

    def kill(self) -> None:
        """kill -9: no shutdown save, only what the append-only file already holds."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, down_seconds: float) -> None:
        self.kill()
        time.sleep(down_seconds)
        self.restarts += 1
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)
