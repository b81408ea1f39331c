"""``make demo``: the whole flow on one machine, with no server to install or start.

An embedded broker (kombu's filesystem transport), the project's gateway emulator on
loopback, and a real worker process. It sends sample events of every kind, one invalid
event and one event the emulator fails twice, then reports what happened.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from totango_emulator import GatewayEmulator
from worker.application import create_app
from worker.client import Producer
from worker.deadletter import browse
from worker.errors import InvalidEvent
from worker.events import TRACK_ACTIVITY, UPDATE_ACCOUNT, UPDATE_USER
from worker.settings import Settings

DEMO_DIR = Path(".demo")
DEADLINE = 45.0
SAMPLES: list[tuple[str, dict[str, object]]] = [
    (
        TRACK_ACTIVITY,
        {
            "account_id": "acme",
            "user_id": "jane@acme.example",
            "activity": "Login",
            "module": "App",
            "account_name": "ACME Inc.",
        },
    ),
    (
        TRACK_ACTIVITY,
        {
            "account_id": "a&b=c #1",
            "user_id": "joe+ops@acme.example",
            "activity": "Export report",
            "module": "Reports",
            "user_attributes": {"role": "admin", "Contact": True},
        },
    ),
    (
        UPDATE_ACCOUNT,
        {
            "account_id": "acme",
            "attributes": {
                "Contract Value": 1200.5,
                "Create Date": "2026-01-31",
                "Account Type": "Demo",
            },
        },
    ),
    (
        UPDATE_ACCOUNT,
        {
            "account_id": "globex",
            "writeback": True,
            "attributes": {"Success Manager": "Ana", "Renewal": None},
        },
    ),
    (
        UPDATE_USER,
        {
            "account_id": "acme",
            "user_id": "jane@acme.example",
            "attributes": {"Key Contact": "yes", "Title": "CTO"},
            "account_attributes": {"Region": "EMEA"},
        },
    ),
]
FLAKY = (
    TRACK_ACTIVITY,
    {
        "account_id": "acme",
        "user_id": "flaky@acme.example",
        "activity": "Flaky call",
        "module": "App",
    },
)
INVALID = (UPDATE_ACCOUNT, {"account_id": "acme", "attributes": {"Contract Value": "$1,200"}})


def run_demo() -> int:
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    (DEMO_DIR / "broker").mkdir(parents=True)
    with GatewayEmulator() as gateway:
        gateway.add_rule({"sdr_a": "Flaky call"}, [503, 503])
        env = {
            **os.environ,
            "TOTANGO_BROKER_URL": "filesystem://",
            "TOTANGO_FILESYSTEM_DIR": str(DEMO_DIR / "broker"),
            "TOTANGO_GATEWAY_URL": f"{gateway.url}/pixel.gif",
            "TOTANGO_SERVICE_ID": "SP-1234-56",
            "TOTANGO_MAX_RETRIES": "3",
            "TOTANGO_RETRY_BACKOFF_BASE": "1",
            "TOTANGO_RETRY_BACKOFF_MAX": "2",
            "TOTANGO_METRICS_PORT": "0",
            "TOTANGO_HEARTBEAT_FILE": str(DEMO_DIR / "heartbeat"),
            "TOTANGO_CONCURRENCY": "4",
        }
        app = create_app(Settings.from_env(env))
        producer = Producer(app=app)
        print(f"gateway emulator on {gateway.url}; embedded broker in {DEMO_DIR / 'broker'}")
        sent = [producer.prepare(task, **kwargs).enqueue() for task, kwargs in SAMPLES]
        sent.append(producer.prepare(FLAKY[0], **FLAKY[1]).enqueue())
        try:
            producer.prepare(INVALID[0], **INVALID[1])
        except InvalidEvent as exc:
            print(f"the producer API refused an invalid event at once: {exc}")
        # A producer that skips validation (another language, say) sends it anyway:
        app.send_task(INVALID[0], kwargs=INVALID[1])
        print(f"enqueued {len(sent) + 1} events; starting a worker")
        log_path = DEMO_DIR / "worker.log"
        with log_path.open("wb") as log:
            worker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "worker.app",
                    "worker",
                    "--loglevel",
                    "INFO",
                    "--without-mingle",
                    "--without-gossip",
                    "--without-heartbeat",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            dead = _wait(gateway, app, len(sent))
        finally:
            worker.terminate()
            worker.wait(30)
        app.close()
        return _report(gateway, dead, len(sent), log_path)


def _wait(gateway: GatewayEmulator, app: object, expected: int) -> list[str]:
    """Wait for every valid event at the gateway and the invalid one in the dead letters."""
    deadline = time.monotonic() + DEADLINE
    dead: dict[str, str] = {}
    while time.monotonic() < deadline:
        dead.update((e.id, e.reason) for e in browse(app))  # type: ignore[arg-type]
        if len(gateway.delivered()) >= expected and dead:
            break
        time.sleep(0.2)
    return list(dead.values())


def _report(gateway: GatewayEmulator, dead: list[str], expected: int, log_path: Path) -> int:
    calls = gateway.calls()
    delivered = [c for c in calls if c.status == 200]
    print("\ncalls received by the gateway emulator:")
    for call in calls:
        print(f"  {call.status}  {call.method} {call.raw}")
    statuses = Counter(str(c.status) for c in calls if c.status != 200)
    print("\nreport")
    print(f"  delivered      {len(delivered)} of {expected} valid events")
    print(f"  retried        {sum(statuses.values())} failed attempts {dict(statuses)}")
    print(f"  dead-lettered  {len(dead)} {dict(Counter(dead))}")
    print(f"  worker log     {log_path}")
    ok = len(delivered) == expected and dead == ["invalid:Contract Value"]
    print("\ndemo " + ("passed" if ok else "did NOT go as expected"))
    return 0 if ok else 1
