"""A producer in another language: celery-node 0.5.9, the Node client, installed from
``tests/node/package-lock.json`` with ``npm ci``.

celery-node's ``sendTask`` asserts the queue it publishes to as a plain durable queue with no
arguments, then publishes through the default exchange. Against the worker's queue that must
succeed, before and after the worker has declared it, on both brokers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest

from tests.test_producer_contract import producer_env
from tests.test_stock_producers import activities, delivered_accounts
from totango_emulator import GatewayEmulator

Env = dict[str, str]
StartWorker = Callable[..., AbstractContextManager[Popen[bytes]]]

NODE_DIR = Path(__file__).resolve().parent / "node"
DELIVERY_TIMEOUT = 20.0
NPM_TIMEOUT = 300.0
NODE_TIMEOUT = 60.0


@pytest.fixture(scope="session")
def node_producer() -> Path:
    """celery-node installed exactly as locked (``npm ci``). No npm or node fails the test:
    a producer path that is not tested is not known to work."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        pytest.fail("npm and node are needed for the celery-node producer test (Node 20)")
    installed = NODE_DIR / "node_modules" / "celery-node" / "package.json"
    lock = NODE_DIR / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        run = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT,
            check=False,
        )
        assert run.returncode == 0, run.stdout + run.stderr
    version = json.loads(installed.read_text(encoding="utf-8"))["version"]
    assert version == "0.5.9", version
    return NODE_DIR / "produce.js"


def run_node(script: Path, broker_url: str, tmp_path: Path, events: list[dict[str, Any]]) -> None:
    events_path = tmp_path / f"node-{events[0]['kwargs']['account_id']}.json"
    events_path.write_text(json.dumps(events), encoding="utf-8")
    run = subprocess.run(
        [str(shutil.which("node")), str(script), broker_url, str(events_path)],
        cwd=tmp_path,
        env=producer_env(),
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"published {len(events)}" in run.stdout, run.stdout + run.stderr


@pytest.mark.integration
def test_celery_node_publishes_before_and_after_the_worker_and_is_delivered(
    broker_url: str,
    env_for: Callable[..., Env],
    start_worker: StartWorker,
    gateway: GatewayEmulator,
    node_producer: Path,
) -> None:
    """celery-node's ``sendTask("totango.track_activity", [], {...})`` to the queue
    ``totango``: two events before any worker has started (celery-node declares the queue),
    three once the worker has declared it (celery-node's plain declaration must be
    equivalent to the worker's). A real worker delivers all five to the gateway."""
    env = env_for()
    tmp_path = Path(env["TOTANGO_HEARTBEAT_FILE"]).parent
    before, after = activities("node-before", 2), activities("node-after", 3)
    run_node(node_producer, broker_url, tmp_path, before)
    with start_worker(env):
        run_node(node_producer, broker_url, tmp_path, after)
        gateway.wait_for(len(before) + len(after), timeout=DELIVERY_TIMEOUT)
    assert delivered_accounts(gateway) == sorted(e["kwargs"]["account_id"] for e in before + after)
