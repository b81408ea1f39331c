"""The bench's same-configuration floor (bench/sameconf_app.py) is the worker's own Celery
configuration with a no-op task: every setting the worker's app takes, the floor's app
takes too, with the same value. Built from settings alone; no broker is reached."""

from __future__ import annotations

import importlib
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
