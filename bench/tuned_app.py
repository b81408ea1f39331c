"""The worker's own app with Celery settings overridden from ``BENCH_CONF`` (JSON), for
``bench/run.py`` to measure a proposed change to worker/application.py before it is made."""

from __future__ import annotations

import json
import os

from worker.application import create_app

app = create_app()
app.conf.update(json.loads(os.environ.get("BENCH_CONF") or "{}"))
