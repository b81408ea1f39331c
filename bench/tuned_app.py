"""The worker's own app with Celery settings overridden from ``BENCH_CONF`` (JSON), for
``bench/run.py`` to measure a proposed change to worker/app.py before it is made. The key
``bench_whatif`` is not a Celery setting: ``"urllib3"`` swaps the gateway's HTTP client
(``bench/whatif.py``)."""

from __future__ import annotations

import json
import os

from worker.app import create_app

_conf = json.loads(os.environ.get("BENCH_CONF") or "{}")
if _conf.pop("bench_whatif", None) == "urllib3":
    from bench import whatif

    whatif.install()

app = create_app()
app.conf.update(_conf)
