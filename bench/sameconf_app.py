"""Floor (c): a no-op task in the worker's own configuration, the floor of Celery's cost
per message for the worker as production runs it.

The app takes every Celery setting the worker takes, ``worker.application.config`` and
``worker_config`` (so it cannot drift from the worker's; tests/test_bench_floor.py compares
the two apps' settings): the quorum queue on RabbitMQ, the worker's Redis transport, the
threads pool at ``TOTANGO_CONCURRENCY``, ``TOTANGO_PREFETCH_MULTIPLIER``, task events on,
``acks_late``, the worker's consumer class; it declares the queues as the worker does, and
logs as the worker does (``observability.configure_logging``: Celery's per-task INFO lines
quieted), so the floor writes no log line the worker does not write.
It registers one task under the worker's task name, ``totango.track_activity``, that only
stamps its completion (``bench.noop_app``), so it consumes the very messages the worker's
producer publishes. Run as ``celery -A bench.sameconf_app worker -Q totango``; nothing of the
relay runs: no event parsing, no gateway call, no metrics, no log line, no signal handler.

With ``BENCH_NOOP_WAIT_S`` set (the bench's *waiting* phase), the task first sleeps that
long, the gateway's delay: the floor of any task that holds its pool thread while its call
is in flight. The sleep releases the GIL and the thread takes it back when it ends, as a
sending thread does when its call's answer comes; nothing else is added.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery, signals

from bench.noop_app import _stamp
from bench.procs import WAIT_VARIABLE
from worker import observability
from worker.application import config, worker_config
from worker.consumer import DeclareQueues
from worker.contract import TRACK_ACTIVITY
from worker.settings import Settings


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings.from_env()
    app = Celery("bench_sameconf", broker=settings.broker_url, set_as_current=False)
    app.settings = settings  # type: ignore[attr-defined]  # the consumer's dead letters read it
    app.conf.update(config(settings))
    app.conf.update(worker_config(settings))
    app.steps["consumer"].add(DeclareQueues)

    def configure_logging(**_: Any) -> None:
        observability.configure_logging(settings.log_level)

    # Where the worker's own celeryd_init handler does it (worker/signals.py).
    signals.celeryd_init.connect(configure_logging, weak=False)

    wait = float(os.environ.get(WAIT_VARIABLE) or 0)

    @app.task(name=TRACK_ACTIVITY, typing=False, shared=False)  # not in apps built later
    def noop(*_args: Any, **_kwargs: Any) -> None:
        if wait:
            time.sleep(wait)
        _stamp()

    return app


app = make_app()
