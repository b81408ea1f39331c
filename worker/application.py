"""Create the Celery app: queues, serializer, delivery guarantees and broker limits.

``celery -A worker.app worker`` loads ``worker/app.py``, which calls ``create_app()`` with
the settings of the environment. Tests and the demo call ``create_app(settings)``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from worker import batch, signals, tasks
from worker.consumer import DeclareQueues, Heartbeat
from worker.contract import BATCH_QUEUE, QUEUE, ROUTING_KEY, TRACK_BATCH
from worker.gateway import Gateway
from worker.process_local import PerProcess
from worker.relay import TotangoCelery
from worker.settings import Settings
from worker.state import StateStore
from worker.topology import batch_queue, exchange_for, task_queue


def create_app(settings: Settings | None = None) -> TotangoCelery:
    settings = settings or Settings.from_env()
    app = TotangoCelery("totango_worker", broker=settings.broker_url, set_as_current=False)
    app.settings = settings
    app.gateway = PerProcess(partial(Gateway, settings))
    app.batch_executor = PerProcess(partial(batch.new_executor, settings))
    app.state_store = (
        PerProcess(partial(StateStore.for_settings, settings)) if settings.dedup_on else None
    )
    app.conf.update(config(settings))
    app.steps["consumer"].add(DeclareQueues)
    app.steps["consumer"].add(Heartbeat)
    tasks.register(app)
    batch.register(app)  # totango.track_batch: many events in one message
    signals.connect()
    return app


def config(settings: Settings) -> dict[str, Any]:
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
        # At least once: a message is acknowledged only after the call's outcome is settled
        # (delivered, retry published, or dead letter published). A child killed mid-call
        # (OOM, SIGKILL) gets its task retried through the normal retry budget
        # (task_retry_on_worker_lost, Celery 5.7) rather than requeued forever (celery#9082);
        # when the budget is spent, task_failure dead-letters it with reason worker_lost.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_retry_on_worker_lost": True,
        # A hard limit well past the longest call, so a wedged call cannot hold a slot forever.
        "task_time_limit": int(settings.connect_timeout + settings.read_timeout) + 30,
        # Prefetch: each slot holds at most this many unacknowledged messages beyond the one
        # it runs. Low, because a crashed worker's prefetched messages wait for redelivery
        # (on Redis until visibility_timeout); 2 keeps the threads busy between round trips.
        "worker_prefetch_multiplier": settings.prefetch_multiplier,
        "worker_pool": settings.pool,
        "worker_concurrency": settings.concurrency,
        "worker_hijack_root_logger": False,
        "worker_consumer": "worker.consumer:RelayConsumer",
        # Flower's task views need them; on Redis they are about a quarter of a single
        # event's CPU (docs/benchmarks.md), so a deployment without Flower may turn them off.
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": False,
        # Celery 5.5 soft shutdown: on SIGTERM, in-flight calls get this long to finish
        # before the cold shutdown requeues what is left. Longer than one full call.
        "worker_soft_shutdown_timeout": settings.soft_shutdown_timeout,
        "worker_enable_soft_shutdown_on_idle": False,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": transport_options(settings),
        # On Redis, a transport whose fetch reserves the message in the same atomic step
        # (worker/redis_transport.py); kombu's own loses a message killed between the two.
        "broker_transport": "worker.redis_transport:Transport" if kind == "redis" else None,
        "broker_pool_limit": max(10, settings.concurrency),
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # The filesystem transport has no broadcast between processes.
        "worker_enable_remote_control": kind != "embedded",
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


__all__ = ["TotangoCelery", "config", "create_app", "transport_options"]
