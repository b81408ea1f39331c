"""The command line's pure parts and the health check, and the producer API's promise that
importing it starts nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from worker.cli import parse_since, reason_matches


def health(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TOTANGO_")}
    environ.update({"TOTANGO_HEARTBEAT_FILE": str(tmp_path / "hb"), **env})
    return subprocess.run(
        [sys.executable, "-m", "worker", "health", *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_health_fails_without_a_heartbeat_file(tmp_path: Path) -> None:
    """No file means the consumer never connected: not ready, not live."""
    assert health(tmp_path).returncode == 1
    assert health(tmp_path, "--ready").returncode == 1


def test_health_passes_on_a_fresh_heartbeat(tmp_path: Path) -> None:
    """A file touched just now is healthy and ready."""
    (tmp_path / "hb").touch()
    assert health(tmp_path).returncode == 0
    assert health(tmp_path, "--ready").returncode == 0


def test_health_fails_on_a_stale_heartbeat_but_stays_ready(tmp_path: Path) -> None:
    """A heartbeat older than the limit fails liveness; readiness only needs the file."""
    beat = tmp_path / "hb"
    beat.touch()
    old = time.time() - 120
    os.utime(beat, (old, old))
    stale = health(tmp_path, TOTANGO_HEARTBEAT_MAX_AGE="60")
    assert stale.returncode == 1
    assert "(limit 60s)" in stale.stderr
    assert health(tmp_path, "--max-age", "300").returncode == 0
    assert health(tmp_path, "--ready").returncode == 0


def test_a_bad_setting_is_reported_by_name(tmp_path: Path) -> None:
    """The CLI names a wrong variable instead of printing a traceback."""
    result = health(tmp_path, TOTANGO_REGION="mars")
    assert result.returncode == 2
    assert "TOTANGO_REGION" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("reason", "wanted", "expected"),
    [
        ("exhausted:503", None, True),
        ("exhausted:503", "exhausted:503", True),
        ("exhausted:503", "exhausted", True),
        ("exhausted:503", "exhausted:429", False),
        ("invalid:Contract Value", "exhausted", False),
        ("undecodable", "undecodable", True),
        ("exhausted_other", "exhausted", False),
    ],
)
def test_reason_filter(reason: str, wanted: str | None, expected: bool) -> None:
    """--reason matches a code exactly, or every code under a prefix without a colon."""
    assert reason_matches(reason, wanted) is expected


def test_since_accepts_relative_and_iso_times() -> None:
    """--since takes 30m/2h/1d relative to now, or an ISO time (naive means UTC)."""
    now = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)
    assert parse_since("30m", now) == datetime(2026, 1, 2, 11, 30, tzinfo=UTC)
    assert parse_since("2h", now) == datetime(2026, 1, 2, 10, 0, tzinfo=UTC)
    assert parse_since("1d", now) == datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert parse_since("2026-01-01T00:00:00") == datetime(2026, 1, 1, tzinfo=UTC)
    with pytest.raises(SystemExit, match="--since"):
        parse_since("yesterday", now)


def test_importing_the_producer_api_starts_nothing() -> None:
    """``import worker.client`` loads no Celery, kombu or HTTP client, opens no socket and
    starts no thread: it is safe at the top of a web app's module."""
    code = (
        "import socket, sys, threading\n"
        "opened = []\n"
        "real = socket.socket.connect\n"
        "socket.socket.connect = lambda self, *a: opened.append(a) or real(self, *a)\n"
        "import worker.client\n"
        "heavy = ('celery', 'kombu', 'pycurl', 'urllib3', 'requests', 'worker.app',\n"
        "         'worker.application')\n"
        "loaded = [m for m in heavy if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "assert not opened, opened\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
