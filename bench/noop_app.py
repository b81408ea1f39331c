"""Baseline (a): a Celery task that does nothing, with ``acks_late``: the ceiling for one
message per event on a broker. Run as ``celery -A bench.noop_app worker -P prefork -c 2``.

Plain Celery defaults otherwise (a classic durable queue on RabbitMQ, prefetch 4, no task
events), so the ceiling is not lowered to flatter the worker. The only work is one
``os.write`` of a timestamp per task to ``BENCH_STAMP_FILE``: the bench needs to see when
tasks complete, and a few microseconds do not move a ceiling of ~1.5 ms per task.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

QUEUE = "bench_noop"
TASK = "bench.noop"


def baseline_app(name: str, broker_url: str, queue: str) -> Celery:
    """A plain Celery app as both baselines have it: JSON, no results, ``acks_late``."""
    app = Celery(name, broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_default_queue=queue,
        worker_hijack_root_logger=False,
    )
    return app


def make_app(broker_url: str) -> Celery:
    app = baseline_app("bench_noop", broker_url, QUEUE)

    @app.task(name=TASK, shared=False)  # not in apps built later
    def noop(**_kwargs: Any) -> None:
        _stamp()

    return app


_fd: tuple[int, int] | None = None  # (pid, fd): opened again after a fork


def _stamp() -> None:
    global _fd  # noqa: PLW0603  one descriptor per process
    path = os.environ.get("BENCH_STAMP_FILE")
    if not path:
        return
    if _fd is None or _fd[0] != os.getpid():
        _fd = (os.getpid(), os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
    os.write(_fd[1], f"{time.time():.6f}\n".encode())


app = make_app(os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"))
