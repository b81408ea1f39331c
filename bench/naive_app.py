"""Baseline (b): the naive relay, one ``requests.get`` per task and nothing else: no pooled
session, no retry policy, no dead letters. ``acks_late`` like the worker.

Run as ``celery -A bench.naive_app worker -P threads -c 32`` (the issue's pool for a 50 ms
gateway; prefork c=2 would cap it at 2 / RTT = 40 events/s).
"""

from __future__ import annotations

import os
from typing import Any

import requests
from celery import Celery

from bench.noop_app import baseline_app

QUEUE = "bench_naive"
TASK = "bench.naive_relay"


def make_app(broker_url: str, gateway_url: str) -> Celery:
    app = baseline_app("bench_naive", broker_url, QUEUE)

    @app.task(name=TASK, shared=False)  # not in apps built later
    def relay(**kwargs: Any) -> None:
        params = {
            "sdr_s": kwargs.get("service_id") or "SP-1234-56",
            "sdr_o": kwargs["account_id"],
            "sdr_u": kwargs["user_id"],
            "sdr_a": kwargs["activity"],
            "sdr_m": kwargs["module"],
        }
        for name, value in (kwargs.get("user_attributes") or {}).items():
            params[f"sdr_u.{name}"] = value
        response = requests.get(gateway_url, params=params, timeout=(3.05, 10))
        response.raise_for_status()

    return app


app = make_app(
    os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    os.environ.get("BENCH_GATEWAY_URL", "http://127.0.0.1:8080/pixel.gif"),
)
