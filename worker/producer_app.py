"""The producer's Celery app: serializer, queues, routes and broker options, and no tasks.

``worker.client`` publishes with it; ``worker.application.create_app`` builds the worker's
app on the same configuration. It needs celery and kombu only (and redis for a Redis broker
URL): nothing of the worker's runtime (the HTTP pool, metrics, Sentry, the Redis fetch).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from worker.contract import BATCH_QUEUE, QUEUE, ROUTING_KEY, TRACK_BATCH
from worker.settings import Settings
from worker.topology import Topology, batch_queue, discover, exchange_for, task_queue


class ProducerCelery(Celery):
    """A Celery app that carries the settings it was made from."""

    settings: Settings


def producer_app(settings: Settings) -> ProducerCelery:
    """A Celery app that publishes the contract's tasks by name; it registers none."""
    app = ProducerCelery("totango_producer", broker=settings.broker_url, set_as_current=False)
    app.settings = settings
    app.conf.update(config(settings))
    return app


def adopt_broker_topology(app: Celery, broker_kind: str) -> Topology:
    """Publish to the work queues in the design the broker holds (``topology.discover``):
    Celery declares the queue it routes to on each connection, and a declaration in the
    other design would be refused. Creates the plain design if nothing exists yet."""
    with app.connection_for_write() as connection:
        topology = discover(connection, broker_kind)
    topology.apply_to(app)
    return topology


def config(settings: Settings) -> dict[str, Any]:
    """The configuration a producer and a worker share (the worker adds
    ``application.worker_config``)."""
    kind = settings.broker_kind
    return {
        # JSON only: a producer in any language can publish, and pickle is refused.
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "result_accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        # A worker consumes both queues unless started with -Q (production runs one
        # Deployment per queue: ops/base/worker-deployment.yaml, worker-batch-deployment.yaml).
        "task_queues": [task_queue(kind), batch_queue(kind)],
        "task_default_queue": QUEUE,
        "task_default_exchange": exchange_for(kind).name,
        "task_default_exchange_type": exchange_for(kind).type,
        "task_default_routing_key": ROUTING_KEY,
        "task_create_missing_queues": False,
        # An exact task name wins over the pattern: batches to their own queue.
        "task_routes": {
            TRACK_BATCH: {"queue": BATCH_QUEUE},
            "totango.*": {"queue": QUEUE},
        },
        "task_send_sent_event": False,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": transport_options(settings),
        "broker_pool_limit": max(10, settings.concurrency),
    }


def transport_options(settings: Settings) -> dict[str, Any]:
    kind = settings.broker_kind
    if kind == "rabbitmq":
        # Publisher confirms: a publish returns only once the broker has the message, so a
        # retry or a dead letter is never acknowledged away before it exists (celery#5410).
        return {"confirm_publish": True}
    if kind == "redis":
        return {
            # A reserved message comes back after this long. Every retry countdown is held
            # reserved until it is due, so Settings.check_delays keeps the longest countdown
            # under half of it; otherwise the retry would run twice.
            "visibility_timeout": settings.visibility_timeout,
            # Room for every worker thread plus the consumer and the publisher; too few
            # gives "Too many connections" under load.
            "max_connections": settings.concurrency * 2 + 10,
            "socket_timeout": 30,
            "socket_connect_timeout": 10,
            "health_check_interval": 25,
            # kombu looks for expired reservations every interval but scans only every
            # throttle-th look: with its defaults a crashed worker's messages came back ~100 s
            # after the visibility timeout. Look often, scan every time.
            "unacked_restore_interval": min(10.0, max(1.0, settings.visibility_timeout / 10)),
            "unacked_restore_throttle": 1,
        }
    if kind == "embedded":
        # The demo's broker: kombu's filesystem transport needs no server and no extra
        # package; each message is a file, polled often so the demo stays quick.
        return {
            "data_folder_in": settings.filesystem_dir,
            "data_folder_out": settings.filesystem_dir,
            "control_folder": f"{settings.filesystem_dir}/control",
            "polling_interval": 0.1,
        }
    return {}
