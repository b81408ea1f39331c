"""Flower, the real process, against the real broker while a real worker relays events:
what its HTTP API shows behind basic auth, and what it serves without any."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest

from tests.workers import stop, tail, wait_until
from totango_emulator import GatewayEmulator
from worker.application import TotangoCelery
from worker.client import Producer
from worker.contract import BATCH_QUEUE, QUEUE
from worker.events import TRACK_ACTIVITY, UPDATE_ACCOUNT

pytestmark = pytest.mark.integration

EnvFor = Callable[..., dict[str, str]]
StartWorker = Callable[..., AbstractContextManager[Popen[bytes]]]
AppFor = Callable[[dict[str, str]], TotangoCelery]

USER, PASSWORD = "user", "pass"
#: Bounds on every wait: Flower's start, and what it learns from events and inspect replies.
START_TIMEOUT = 30.0
SEEN_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def call(
    port: int, path: str, *, password: str | None = PASSWORD, method: str = "GET"
) -> tuple[int, bytes]:
    """One request to Flower, with basic auth unless ``password`` is None: status and body."""
    headers = {}
    if password is not None:
        token = base64.b64encode(f"{USER}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    data = b"" if method == "POST" else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers=headers, method=method
    )
    try:
        # S310: the URL is built right here, http on loopback only.
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
            return int(answer.status), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def get(port: int, path: str, *, auth: bool = True) -> tuple[int, bytes]:
    return call(port, path, password=PASSWORD if auth else None)


def get_json(port: int, path: str) -> Any:
    status, body = get(port, path)
    assert status == 200, (path, status, body[:200])
    return json.loads(body)


@contextmanager
def running_flower(env: dict[str, str], port: int, log_path: Path) -> Iterator[Popen[bytes]]:
    """``celery -A worker.app flower`` on loopback, ready once /healthcheck answers."""
    flower_env = {
        **env,
        "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}",
        "FLOWER_PERSISTENT": "False",
        "FLOWER_PURGE_OFFLINE_WORKERS": "300",
        "FLOWER_READ_ONLY": "True",
    }
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.app", "flower",
             f"--port={port}", "--address=127.0.0.1"],
            env=flower_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"flower exited with {proc.returncode}:\n{tail(log_path)}")
            try:
                if get(port, "/healthcheck", auth=False)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"flower not ready in {START_TIMEOUT}s:\n{tail(log_path)}")
            time.sleep(0.2)
        yield proc
    finally:
        stop(proc)


def inspected_worker(port: int, worker: str) -> dict[str, Any] | None:
    """The worker's inspect replies (queues, registered tasks) once Flower has them both."""
    info: dict[str, Any] = get_json(port, "/api/workers?refresh=1").get(worker, {})
    return info if {"active_queues", "registered"} <= set(info) else None


def task_states(port: int, task_ids: list[str]) -> dict[str, dict[str, Any]] | None:
    """Flower's view of these tasks, once it has heard of every one of them."""
    tasks: dict[str, dict[str, Any]] = get_json(port, "/api/tasks")
    return {i: tasks[i] for i in task_ids} if set(task_ids) <= set(tasks) else None


def test_flower_shows_the_worker_and_its_relayed_tasks_behind_basic_auth(
    *,
    env_for: EnvFor,
    start_worker: StartWorker,
    app_for: AppFor,
    gateway: GatewayEmulator,
    tmp_path: Path,
) -> None:
    """A real Flower (basic auth, read-only) next to a worker started as the tests start it,
    ``--without-mingle --without-gossip``: neither is needed. Flower sees the worker online
    from its events and, through an inspect broadcast (remote control), its two queues
    (``totango`` and ``totango.batch``, as it runs without ``-Q``) and registered tasks; it
    lists the relayed ``totango.*`` tasks by name, SUCCESS in the end,
    the one answered 503 with its retry recorded (its task-retried event: a retry time, one
    retry and the exception; the RETRY state itself is transient, replaced when the retry is
    received, so a poll may miss it on a loaded machine). The API
    answers 401 without credentials or with a wrong password; read-only mode refuses with 403
    a pool change and a task sent through Flower; /healthcheck and /metrics answer without
    any auth."""
    env = env_for()
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # Flower is one process: plain metrics
    port = free_port()
    log = tmp_path / "flower.log"
    with running_flower(env, port, log), start_worker(env):
        online = wait_until(
            lambda: get_json(port, "/api/workers?status=1"),
            SEEN_TIMEOUT,
            "worker events",
            log,
            interval=0.2,
        )
        (worker,) = online
        assert online == {worker: True}
        # Each refresh is one inspect broadcast, and a reply can miss its 1 s timeout.
        inspected = wait_until(
            lambda: inspected_worker(port, worker),
            SEEN_TIMEOUT,
            "inspect replies",
            log,
            interval=0.2,
        )
        consumed = sorted(q["name"] for q in inspected["active_queues"])
        assert consumed == sorted([QUEUE, BATCH_QUEUE])  # no -Q: single events and batches
        assert {TRACK_ACTIVITY, UPDATE_ACCOUNT} <= set(inspected["registered"])

        producer = Producer(app=app_for(env))
        gateway.add_rule({"sdr_o": "acct-retry"}, [503], retry_after="5")
        retried = producer.track_activity(
            account_id="acct-retry", user_id="u1", activity="Login", module="App"
        )
        plain = [
            producer.track_activity(
                account_id="acct-1", user_id="u1", activity="Login", module="App"
            ),
            producer.update_account(account_id="acct-2", attributes={"Plan": "Gold"}),
        ]

        def settled() -> dict[str, dict[str, Any]] | None:
            tasks = task_states(port, [retried, *plain])
            if tasks is not None and all(t["state"] == "SUCCESS" for t in tasks.values()):
                return tasks
            return None

        tasks = wait_until(settled, SEEN_TIMEOUT, "every task to succeed", log, interval=0.2)
        assert {i: (t["name"], t["worker"]) for i, t in tasks.items()} == {
            retried: (TRACK_ACTIVITY, worker),
            plain[0]: (TRACK_ACTIVITY, worker),
            plain[1]: (UPDATE_ACCOUNT, worker),
        }
        assert [tasks[i]["retries"] for i in (retried, *plain)] == [1, 0, 0]
        assert tasks[retried]["retried"] is not None
        assert "DeliveryFailed('gateway answered 503')" in tasks[retried]["exception"]
        assert all(tasks[i]["retried"] is None for i in plain)

        for path in ("/api/workers", "/api/tasks", "/"):
            assert get(port, path, auth=False)[0] == 401, path
        assert call(port, "/api/workers", password="not-" + PASSWORD)[0] == 401
        for control in (
            f"/api/worker/pool/grow/{worker}?n=1",
            f"/api/task/send-task/{TRACK_ACTIVITY}",
        ):
            refused = call(port, control, method="POST")
            assert refused[0] == 403, refused
            assert b"Read only mode is enabled" in refused[1]

        assert get(port, "/healthcheck", auth=False) == (200, b"OK")
        status, metrics = get(port, "/metrics", auth=False)
        assert status == 200
        retried_events = (
            f'flower_events_total{{task="{TRACK_ACTIVITY}",type="task-retried",'
            f'worker="{worker}"}} 1.0'
        )
        assert retried_events in metrics.decode(), metrics.decode()[-2000:]
