"""Redis has no delivery limit: the worker counts the deliveries of each message itself.

On RabbitMQ the quorum queue's ``x-delivery-limit`` dead-letters a message that kills the
whole worker every time it is taken. On Redis such a message would come back after every
``visibility_timeout`` forever, so each delivery of a message (task id and retry number) is
counted in Redis, and past ``DELIVERY_LIMIT`` it goes to the dead-letter queue instead.
"""

from __future__ import annotations

import os
import threading

import redis

_lock = threading.Lock()
_client: redis.Redis | None = None
_client_pid = 0

KEY_PREFIX = "totango-worker:deliveries:"


def count_delivery(broker_url: str, task_id: str, retries: int, ttl: float) -> int:
    """Count one more delivery of this message; returns how many there have been."""
    key = f"{KEY_PREFIX}{task_id}:{retries}"
    pipe = _redis(broker_url).pipeline()
    pipe.incr(key)
    pipe.expire(key, max(1, int(ttl)))
    count, _ = pipe.execute()
    return int(count)


def _redis(broker_url: str) -> redis.Redis:
    global _client, _client_pid  # noqa: PLW0603  one client per process, made after a fork
    with _lock:
        if _client is None or _client_pid != os.getpid():
            _client = redis.Redis.from_url(broker_url, socket_timeout=10)
            _client_pid = os.getpid()
        return _client
