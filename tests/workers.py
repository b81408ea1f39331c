"""Start and stop real worker processes (``celery -A worker.app worker``) for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

START_TIMEOUT = 60.0


def worker_env(broker_url: str, gateway_url: str, tmp: Path, **extra: str) -> dict[str, str]:
    """Settings for a test worker: fast retries, no metrics port, a private heartbeat file,
    the outage breaker off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOTANGO_", "SENTRY_"))}
    env.update(
        {
            "TOTANGO_BROKER_URL": broker_url,
            "TOTANGO_GATEWAY_URL": gateway_url,
            "TOTANGO_SERVICE_ID": "SP-1234-56",
            "TOTANGO_MAX_RETRIES": "2",
            "TOTANGO_RETRY_BACKOFF_BASE": "0.2",
            "TOTANGO_RETRY_BACKOFF_MAX": "1",
            "TOTANGO_RETRY_AFTER_MAX": "5",
            "TOTANGO_CONNECT_TIMEOUT": "1",
            "TOTANGO_READ_TIMEOUT": "2",
            "TOTANGO_METRICS_PORT": "0",
            "TOTANGO_CONCURRENCY": "4",
            "TOTANGO_HEARTBEAT_FILE": str(tmp / "heartbeat"),
            "TOTANGO_LOG_LEVEL": "INFO",
            # Off unless a test turns it on: on Redis the broker is the store, and a test
            # that makes the gateway fail on purpose would open it (tests/test_breaker.py).
            "TOTANGO_BREAKER": "false",
        }
    )
    env.update(extra)
    return env


@contextmanager
def running_worker(
    env: Mapping[str, str], log_path: Path, args: tuple[str, ...] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    """A real worker process; ready once its heartbeat file exists (consumer connected)."""
    heartbeat = Path(env["TOTANGO_HEARTBEAT_FILE"])
    heartbeat.unlink(missing_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.app",
                "worker",
                "--loglevel",
                env.get("TOTANGO_LOG_LEVEL", "INFO"),
                "--without-mingle",
                "--without-gossip",
                "-n",
                f"test-{os.getpid()}-{time.monotonic_ns()}@%h",
                *args,
            ],
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not heartbeat.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}:\n{tail(log_path)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker not ready in {START_TIMEOUT}s:\n{tail(log_path)}")
            time.sleep(0.1)
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_until(
    probe: Callable[[], Any],
    timeout: float,
    what: str,
    log: Path | None = None,
    interval: float = 0.05,
) -> Any:
    """Poll ``probe`` until it returns something truthy, and return that; fail the test
    after ``timeout`` seconds, with the end of the worker's log if there is one."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() >= deadline:
            end = f"\n--- worker log ---\n{tail(log, 40)}" if log else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what}{end}")
        time.sleep(interval)
