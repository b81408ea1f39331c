"""Per-test isolation on the machine's shared brokers: a RabbitMQ vhost or a Redis database
of the test's own, made before it and removed after it."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import redis

from worker.contract import BATCH_QUEUE, QUEUE
from worker.topology import batch_queue, task_queue

if TYPE_CHECKING:
    from worker.application import TotangoCelery

RABBITMQ_HOST = os.environ.get("TEST_RABBITMQ_HOST", "127.0.0.1:5672")
REDIS_HOST = os.environ.get("TEST_REDIS_HOST", "127.0.0.1:6379")
#: Redis database 0 holds the locks that hand databases 1-15 out to concurrent test runs.
REDIS_DATABASES = range(1, 16)
LOCK_SECONDS = 900


def _rabbitmqctl(*args: str) -> None:
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    subprocess.run([ctl, "-q", *args], check=True, capture_output=True, timeout=60)


@contextmanager
def rabbitmq_vhost() -> Iterator[str]:
    """A fresh vhost for one test, deleted afterwards with everything in it."""
    vhost = f"totango-test-{uuid.uuid4().hex[:12]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{RABBITMQ_HOST}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


@contextmanager
def redis_database() -> Iterator[str]:
    """A Redis database number claimed for one test, flushed before and after it."""
    locks = redis.Redis.from_url(f"redis://{REDIS_HOST}/0")
    token = uuid.uuid4().hex
    try:
        for db in REDIS_DATABASES:
            key = f"totango-worker-tests:db:{db}"
            if locks.set(key, token, nx=True, ex=LOCK_SECONDS):
                break
        else:
            raise RuntimeError("every Redis test database (1-15) is taken by other test runs")
        client = redis.Redis.from_url(f"redis://{REDIS_HOST}/{db}")
        try:
            client.flushdb()
            yield f"redis://{REDIS_HOST}/{db}"
        finally:
            client.flushdb()
            client.close()
            if locks.get(key) == token.encode():
                locks.delete(key)
    finally:
        locks.close()


@contextmanager
def broker(kind: str) -> Iterator[str]:
    if kind == "rabbitmq":
        with rabbitmq_vhost() as url:
            yield url
    else:
        with redis_database() as url:
            yield url


def queue_length(app: TotangoCelery, name: str = QUEUE) -> int:
    """How many messages wait ready on ``totango`` or ``totango.batch``, as the broker counts
    them (reserved ones not included; the declaration repeats the worker's own, so it
    changes nothing)."""
    declare = {QUEUE: task_queue, BATCH_QUEUE: batch_queue}[name]
    with app.connection_for_write() as connection:
        channel: Any = connection.channel()
        try:
            queue = declare(app.settings.broker_kind)(channel)
            # kombu types the answer ``str | None`` (its name, under nowait); waited for, it
            # is the broker's declare-ok with the count
            declared: Any = queue.queue_declare()
            return int(declared.message_count)
        finally:
            channel.close()
