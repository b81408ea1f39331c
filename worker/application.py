"""Create the Celery app: queues, serializer, delivery guarantees and broker limits.

``celery -A worker.app worker`` loads ``worker/app.py``, which calls ``create_app()`` with
the settings of the environment. Tests and the demo call ``create_app(settings)``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from worker import batch, signals, tasks
from worker.circuit import Circuit
from worker.consumer import DeclareQueues, Heartbeat, request_class
from worker.gateway import Gateways
from worker.pausing import OutagePause
from worker.process_local import PerProcess
from worker.producer_app import config, transport_options
from worker.relay import TotangoCelery, Vetting
from worker.settings import Settings
from worker.state import StateStore


def create_app(settings: Settings | None = None) -> TotangoCelery:
    settings = settings or Settings.from_env()
    app = TotangoCelery("totango_worker", broker=settings.broker_url, set_as_current=False)
    app.settings = settings
    app.gateway = PerProcess(partial(Gateways, settings))
    app.batch_executor = PerProcess(partial(batch.new_executor, settings))
    app.state_store = (
        PerProcess(partial(StateStore.for_settings, settings)) if settings.state_on else None
    )
    app.circuit = (
        PerProcess(partial(Circuit.for_settings, settings)) if settings.breaker_on else None
    )
    app.vetting = Vetting(app)
    app.conf.update(config(settings))
    app.conf.update(worker_config(settings))
    app.steps["consumer"].add(DeclareQueues)
    app.steps["consumer"].add(Heartbeat)
    app.steps["consumer"].add(OutagePause)  # included only when the breaker is on
    tasks.register(app)
    batch.register(app)  # totango.track_batch: many events in one message
    signals.connect()
    return app


def worker_config(settings: Settings) -> dict[str, Any]:
    """What only a worker reads, on top of the producer's ``config``."""
    kind = settings.broker_kind
    return {
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
        # Every task's request: a body decoded once, in the consumer, where the pool is
        # in-process (worker.consumer.DecodedOnce); Celery's own under prefork.
        "task_annotations": {"*": {"Request": request_class(settings)}},
        # Flower's task views need them; on Redis they are about a quarter of a single
        # event's CPU (docs/benchmarks.md), so a deployment without Flower may turn them off.
        "worker_send_task_events": settings.task_events,
        # Celery 5.5 soft shutdown: on SIGTERM, in-flight calls get this long to finish
        # before the cold shutdown requeues what is left. Longer than one full call.
        "worker_soft_shutdown_timeout": settings.soft_shutdown_timeout,
        "worker_enable_soft_shutdown_on_idle": False,
        # On Redis, a transport whose fetch reserves the message in the same atomic step
        # (worker/redis_transport.py); kombu's own loses a message killed between the two.
        # A producer publishes with kombu's own: the fetch is all that differs.
        "broker_transport": "worker.redis_transport:Transport" if kind == "redis" else None,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # Off: after a reconnect, Celery 5.5+ restores a reduced prefetch count from the
        # pool threads' acks, each calling basic_qos on the consumer's channel while the
        # consumer loop reads it; with the threads pool they deadlocked and the worker stopped
        # consuming until its next connection loss (py-spy: every ack thread and the loop in
        # Channel.basic_qos). The fault suite's broker-cut row caught it.
        "worker_enable_prefetch_count_reduction": False,
        # The filesystem transport has no broadcast between processes.
        "worker_enable_remote_control": kind != "embedded",
        # Not exclusive: after a failover to another cluster node, the node that lost the
        # worker may still hold its old connection, and redeclaring an exclusive queue then
        # fails with RESOURCE_LOCKED, which stops the worker ("Unrecoverable error").
        "control_queue_exclusive": False,
    }


__all__ = ["TotangoCelery", "config", "create_app", "transport_options", "worker_config"]
