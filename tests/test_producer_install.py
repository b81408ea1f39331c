"""``pip install totango-worker``, no extras: the producer alone, in a fresh virtualenv.

The wheel of this checkout is installed with the producer's locked dependencies
(``requirements-producer.lock``) into a new venv; there it validates and publishes with
``worker.client`` to both brokers without the worker's runtime (pycurl, prometheus-client,
sentry-sdk, the worker's Redis transport), and a real worker delivers what it published.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from subprocess import Popen

import pytest

from tests.test_producer_contract import producer_env
from tests.test_stock_producers import delivered_accounts
from totango_emulator import GatewayEmulator

Env = dict[str, str]
StartWorker = Callable[..., AbstractContextManager[Popen[bytes]]]

REPO = Path(__file__).resolve().parent.parent
INSTALL_TIMEOUT = 600.0
RUN_TIMEOUT = 60.0
DELIVERY_TIMEOUT = 20.0
#: The worker's runtime: none of it may be installed, or imported, by the producer.
WORKER_RUNTIME = ("pycurl", "urllib3", "certifi", "prometheus_client", "sentry_sdk")

#: Runs in the producer's venv: validate and enqueue two events, then list what got imported.
PRODUCER = """
import sys

from worker import client
from worker.settings import Settings

producer = client.Producer(Settings.from_env({"TOTANGO_BROKER_URL": sys.argv[1]}))
ids = [
    producer.track_activity(
        account_id=f"installed-{n}", user_id=f"user-{n}", activity="Login", module="App"
    )
    for n in range(2)
]
runtime = {"pycurl", "urllib3", "certifi", "prometheus_client", "sentry_sdk"}
ours = {"worker.application", "worker.tasks", "worker.gateway", "worker.metrics",
        "worker.observability", "worker.redis_transport", "worker.relay"}
loaded = sorted(m for m in sys.modules if m.split(".")[0] in runtime or m in ours)
assert not loaded, loaded
print("published", len(ids))
"""


def _run(*args: str | Path, cwd: Path | None = None) -> str:
    run = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=producer_env(),
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        check=False,
    )
    assert run.returncode == 0, f"{args}:\n{run.stdout}\n{run.stderr}"
    return run.stdout


@pytest.fixture(scope="session")
def producer_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel of this checkout and the producer's locked
    dependencies only; ``pip check`` finds every requirement of the package met."""
    root = tmp_path_factory.mktemp("producer-install")
    source = root / "source"  # a copy: setuptools builds in the tree it is given
    for name in ("pyproject.toml", "README.md"):
        source.mkdir(exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    for package in ("worker", "totango_emulator"):
        shutil.copytree(
            REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", root / "dist", source)
    (wheel,) = (root / "dist").glob("totango_worker-*.whl")
    venv = root / "venv"
    _run(sys.executable, "-m", "venv", venv)
    pip = venv / "bin" / "pip"
    _run(pip, "install", "--quiet", "--require-hashes", "-r", REPO / "requirements-producer.lock")
    _run(pip, "install", "--quiet", "--no-deps", wheel)
    _run(pip, "check")
    return venv / "bin" / "python"


def test_the_producer_install_holds_none_of_the_worker_runtime(producer_python: Path) -> None:
    """Without the worker extra, none of the worker's runtime packages is installed, and the
    worker's app cannot even be imported there: the split is real, not a convention."""
    probe = (
        "import importlib.util, json; "
        f"print(json.dumps([m for m in {list(WORKER_RUNTIME)!r} "
        "if importlib.util.find_spec(m)]))"
    )
    assert _run(producer_python, "-c", probe).strip() == "[]"
    failed = subprocess.run(
        [str(producer_python), "-c", "import worker.application"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert failed.returncode != 0
    assert "ModuleNotFoundError" in failed.stderr


def test_the_image_lock_holds_the_worker_extra() -> None:
    """``requirements.lock`` (what the image installs) pins every package of the worker
    extra, and the producer lock pins none of the worker's runtime (redis is in both: kombu's
    Redis transport needs it to publish to a redis:// URL)."""
    extra = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"
    ]["worker"]
    names = {re.split(r"[<>=\[; ]", requirement, maxsplit=1)[0].lower() for requirement in extra}
    assert names == {"pycurl", "certifi", "sentry-sdk", "prometheus-client", "redis", "hiredis"}

    def pinned(lock: str) -> set[str]:
        text = (REPO / lock).read_text(encoding="utf-8")
        return {m.group(1).lower() for m in re.finditer(r"^([A-Za-z0-9_.-]+)==", text, re.M)}

    assert names <= pinned("requirements.lock")
    assert names <= pinned("requirements-dev.lock")
    assert not (names - {"redis"}) & pinned("requirements-producer.lock")
    assert "redis" in pinned("requirements-producer.lock")


@pytest.mark.integration
def test_the_producer_install_publishes_and_a_worker_delivers(
    broker_url: str,
    env_for: Callable[..., Env],
    start_worker: StartWorker,
    gateway: GatewayEmulator,
    producer_python: Path,
) -> None:
    """From the producer-only venv, ``worker.client`` validates and enqueues two events
    before any worker has started, loading none of the worker's runtime; the real worker
    then delivers both."""
    env = env_for()
    tmp_path = Path(env["TOTANGO_HEARTBEAT_FILE"]).parent
    (tmp_path / "produce.py").write_text(PRODUCER, encoding="utf-8")
    out = _run(producer_python, "produce.py", broker_url, cwd=tmp_path)
    assert "published 2" in out
    with start_worker(env):
        gateway.wait_for(2, timeout=DELIVERY_TIMEOUT)
    assert delivered_accounts(gateway) == ["installed-0", "installed-1"]
