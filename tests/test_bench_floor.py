"""The bench's same-configuration floor (bench/sameconf_app.py) is the worker's own Celery
configuration with a no-op task: every setting the worker's app takes, the floor's app
takes too, with the same value. Built from settings alone; no broker is reached."""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Any

import pytest

from tests.workers import worker_env
from worker.application import config, create_app, worker_config
from worker.consumer import DeclareQueues
from worker.settings import Settings

URLS = {
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/floor-check",
    "redis": "redis://127.0.0.1:6379/15",
}


@pytest.mark.parametrize("kind", sorted(URLS))
def test_the_floor_app_has_every_setting_of_the_worker_app(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pool, concurrency, prefetch, task events, acks_late, the consumer class and the Redis
    transport among them: a floor without them measured a prefork no-op without task events
    instead (the bug this test guards against)."""
    env = worker_env(URLS[kind], "http://127.0.0.1:9/pixel.gif", tmp_path, TOTANGO_POOL="threads")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env(env)
    # Imported here, not at the top: the module builds its app from the environment when
    # it is imported, and the environment is only set above.
    floor_module: Any = importlib.import_module("bench.sameconf_app")
    floor = floor_module.make_app(settings)
    worker = create_app(settings)
    keys = {**config(settings), **worker_config(settings)}
    differing = {
        k: (floor.conf[k], worker.conf[k]) for k in keys if floor.conf[k] != worker.conf[k]
    }
    assert differing == {}
    assert floor.conf.worker_pool == "threads"
    assert floor.conf.worker_send_task_events is True
    assert floor.conf.worker_consumer == "worker.consumer:RelayConsumer"
    assert DeclareQueues in floor.steps["consumer"]


def test_the_waiting_floor_only_sleeps_before_its_stamp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``BENCH_NOOP_WAIT_S`` the no-op holds its thread that long, then stamps its end;
    without it, it stamps at once. The stamp is the phase's completion, so it must come
    after the wait, not before."""
    from bench.procs import WAIT_VARIABLE  # noqa: PLC0415  next to the module it configures

    env = worker_env(URLS["redis"], "http://127.0.0.1:9/pixel.gif", tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    floor_module: Any = importlib.import_module("bench.sameconf_app")
    stamps = tmp_path / "stamps"  # one file: a process opens its stamp file once
    monkeypatch.setenv("BENCH_STAMP_FILE", str(stamps))
    for count, wait in enumerate((0.2, 0.0), 1):
        monkeypatch.setenv(WAIT_VARIABLE, str(wait))
        task = floor_module.make_app(Settings.from_env(env)).tasks["totango.track_activity"]
        began = time.time()
        task.run()
        lines = stamps.read_text().split()
        assert len(lines) == count
        stamped = float(lines[-1])
        if wait:
            assert stamped - began >= wait
        else:
            assert stamped - began < 0.2
