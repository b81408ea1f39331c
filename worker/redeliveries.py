"""Redis has no delivery limit: the worker counts the deliveries of each message itself.

On RabbitMQ the quorum queue's ``x-delivery-limit`` dead-letters a message that kills the
whole worker every time it is taken. On Redis such a message would come back after every
``visibility_timeout`` forever, so each redelivery of a message (task id and retry number)
is counted in Redis, and past ``contract.DELIVERY_LIMIT`` deliveries it goes to the dead-letter
queue instead. A first delivery is not counted (``tasks._over_delivery_limit``): kombu marks
every message it restores from ``unacked`` as redelivered, so only those cost a round trip.
"""

from __future__ import annotations

import logging
import threading

import redis

from worker.process_local import PerProcess

log = logging.getLogger(__name__)
#: One client per broker URL in each process (made again after a fork).
_clients: PerProcess[dict[str, redis.Redis]] = PerProcess(dict)
_clients_lock = threading.Lock()

KEY_PREFIX = "totango-worker:deliveries:"


def count_delivery(
    broker_url: str, task_id: str, retries: int, ttl: float, *, deferrals: int = 0
) -> int:
    """Count one more delivery of this message; returns how many there have been, or 0
    if Redis cannot be reached. A copy put back in an outage (``deferrals``) is a message
    of its own, counted apart.

    The count guards against a message that kills the worker every time; it is no reason
    to fail an event. With Redis cut or restarting, the call goes ahead uncounted (and if
    its ack is lost as well, the message comes back from Redis and is counted then).
    """
    key = f"{KEY_PREFIX}{task_id}:{retries}" + (f".{deferrals}" if deferrals else "")
    try:
        pipe = _redis(broker_url).pipeline(transaction=False)  # one round trip, no MULTI
        pipe.incr(key)
        pipe.expire(key, max(1, int(ttl)))
        count, _ = pipe.execute()
    except redis.RedisError as exc:
        log.warning("could not count the deliveries of %s (%s); going ahead", task_id, exc)
        return 0
    return int(count)


def _redis(broker_url: str) -> redis.Redis:
    clients = _clients.get()
    client = clients.get(broker_url)
    if client is None:
        with _clients_lock:
            client = clients.setdefault(
                broker_url, redis.Redis.from_url(broker_url, socket_timeout=10)
            )
    return client
