"""A 3-node RabbitMQ cluster of the suite's own, beside the machine's broker and never
touching it: its own node names, ports, data and log folders, config, empty plugin list,
Erlang cookie and EPMD.

EPMD: the nodes and ``rabbitmqctl`` use an ``epmd`` the suite starts on a free port of its
own (``ERL_EPMD_PORT``), so the machine's epmd (port 4369) never sees these node names and a
node of the machine's broker can never be reached or confused with one of ours.

Each node is the package's own ``rabbitmq-server`` script (``dpkg -L rabbitmq-server``), not
the wrapper on the PATH, which switches user and drops the environment. Every process is
started with ``PR_SET_PDEATHSIG``, so none outlives the test process, also on a kill -9 of
pytest; ``close()`` stops them on every other way out (failure, Ctrl-C).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import secrets
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.workers import tail
from worker.contract import DEAD_LETTER_EXCHANGE, DEAD_LETTER_ROUTING_KEY, DELIVERY_LIMIT

SIZE = 3
#: How long one node may take to boot (about 10-15 s on this machine, more under load).
BOOT_TIMEOUT = 120.0
CTL_TIMEOUT = 90.0
#: Ports are taken from here: a node's CLI tools use dist ports 10,000 above its own.
PORT_RANGE = (20000, 45000)

CONFIG = """\
# A node of the fault suite's own cluster.
loopback_users = none
# A minority side stops serving instead of diverging: what a production cluster runs.
cluster_partition_handling = pause_minority
disk_free_limit.absolute = 50MB
log.console = false
log.file.level = info
"""


class ClusterError(RuntimeError):
    """The suite's cluster did not start or a command on it failed; says what and shows the
    end of the node's log."""


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the test process dies (PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    os.setsid()


def rabbitmq_sbin() -> Path:
    """The package's own scripts folder, which holds ``rabbitmq-server`` and ``rabbitmqctl``."""
    try:
        listed = subprocess.run(
            ["dpkg", "-L", "rabbitmq-server"], capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        listed = glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/rabbitmq-server")
    for path in listed:
        if path.endswith("/sbin/rabbitmq-server") and "/lib/rabbitmq_server-" in path:
            return Path(path).parent
    raise ClusterError(
        "no rabbitmq-server script of the package found (dpkg -L rabbitmq-server); "
        "install the Debian package rabbitmq-server"
    )


def _free_ports(count: int) -> list[int]:
    """``count`` ports free on 127.0.0.1, each with port+10000 free too (CLI dist ports)."""
    found: list[int] = []
    rng = secrets.SystemRandom()
    for _ in range(2000):
        port = rng.randrange(*PORT_RANGE)
        if port in found or any(abs(port - p) < 12 for p in found):
            continue
        if all(_is_free(p) for p in (port, port + 10000)):
            found.append(port)
            if len(found) == count:
                return found
    raise ClusterError("no free loopback ports for the cluster")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Node:
    index: int  # 1-based, as in the node name
    name: str
    port: int
    dist_port: int
    base: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.base / "log" / f"{self.name}.log"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Cluster:
    """Three nodes on loopback, joined into one cluster; ``url()`` and ``failover_url()``
    give the AMQP URLs of one node or of all of them (kombu's ``;`` list)."""

    def __init__(self, root: Path, size: int = SIZE) -> None:
        self.root = root
        self.sbin = rabbitmq_sbin()
        self.tag = uuid.uuid4().hex[:6]
        ports = _free_ports(2 * size + 1)
        self.epmd_port = ports.pop()
        self.home = root / "home"
        self.nodes = [
            Node(
                index=n,
                name=f"totango-ci-{n}@localhost",
                port=ports[2 * (n - 1)],
                dist_port=ports[2 * (n - 1) + 1],
                base=root / f"node{n}",
            )
            for n in range(1, size + 1)
        ]
        self.epmd: subprocess.Popen[bytes] | None = None

    # --- environment -------------------------------------------------------------------

    def _common_env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_")) and k not in {"HOME", "CONF_ENV_FILE"}
        }
        env.update(
            {
                # The cookie is read from $HOME/.erlang.cookie by the nodes and rabbitmqctl.
                "HOME": str(self.home),
                "ERL_EPMD_PORT": str(self.epmd_port),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
                # Not /etc/rabbitmq/rabbitmq-env.conf: that one names the machine's node.
                "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
                "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.root / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
                "RABBITMQ_USE_LONGNAME": "false",
            }
        )
        return env

    def node_env(self, node: Node) -> dict[str, str]:
        env = self._common_env()
        env.update(
            {
                "RABBITMQ_NODENAME": node.name,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(node.port),
                "RABBITMQ_DIST_PORT": str(node.dist_port),
                "RABBITMQ_CTL_DIST_PORT_MIN": str(node.dist_port + 10000),
                "RABBITMQ_CTL_DIST_PORT_MAX": str(node.dist_port + 10010),
                "RABBITMQ_MNESIA_BASE": str(node.base / "mnesia"),
                "RABBITMQ_LOG_BASE": str(node.base / "log"),
                "RABBITMQ_PLUGINS_EXPAND_DIR": str(node.base / "plugins-expand"),
                "RABBITMQ_PID_FILE": str(node.base / "node.pid"),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
                    "-kernel inet_dist_use_interface {127,0,0,1}"
                ),
                # The script then execs the VM instead of running it in the background of a
                # shell: the VM is our own child, so PR_SET_PDEATHSIG and a kill reach it.
                # Its stdin is a pipe we never write to, closed only when we exit.
                "RABBITMQ_ALLOW_INPUT": "true",
            }
        )
        return env

    def _prepare(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(f"TOTANGOCI{secrets.token_hex(16).upper()}")
        cookie.chmod(0o400)
        (self.root / "rabbitmq-env.conf").write_text("# the fault suite's cluster: no overrides\n")
        (self.root / "rabbitmq.conf").write_text(CONFIG)
        (self.root / "enabled_plugins").write_text("[].\n")
        for node in self.nodes:
            (node.base / "log").mkdir(parents=True, exist_ok=True)

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start epmd and the three nodes, join the 2nd and 3rd to the 1st, and wait until
        all three report the same three running nodes. Raises ``ClusterError`` on failure."""
        self._prepare()
        self.epmd = subprocess.Popen(
            ["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            env=self._common_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # noqa: PLW1509  only prctl and setsid, before exec
        )
        # Spawned from this thread, never a pool's: PR_SET_PDEATHSIG fires when the thread
        # that spawned a process ends. They boot side by side; then each is awaited.
        for node in self.nodes:
            self._spawn(node)
        for node in self.nodes:
            self._await_boot(node)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
        for node in self.nodes:
            self.wait_running(node)

    def start_node(self, node: Node) -> None:
        """Start one node (again, on the same data) and wait until its app is running."""
        self._spawn(node)
        self._await_boot(node)

    def _spawn(self, node: Node) -> None:
        self._reap(node)
        with (node.base / "console.log").open("ab") as out:
            node.proc = subprocess.Popen(
                [str(self.sbin / "rabbitmq-server")],
                env=self.node_env(node),
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=node.base,
                preexec_fn=_die_with_parent,  # noqa: PLW1509  only prctl and setsid
            )

    def _await_boot(self, node: Node) -> None:
        assert node.proc is not None
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            if node.proc.poll() is not None:
                raise ClusterError(
                    f"{node.name} exited with {node.proc.returncode} while booting:\n"
                    f"{tail(node.base / 'console.log', 20)}\n{tail(node.log, 30)}"
                )
            if self._accepts(node.port):
                break
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{node.name} did not listen on {node.port} in {BOOT_TIMEOUT:g} s:\n"
                    f"{tail(node.log, 30)}"
                )
            time.sleep(0.2)
        self.ctl(node, "await_startup", "--timeout", str(int(BOOT_TIMEOUT)))

    @staticmethod
    def _accepts(port: int) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        return False

    def ctl(self, node: Node, *args: str, tool: str = "rabbitmqctl", check: bool = True) -> str:
        """Run ``rabbitmqctl`` (or ``rabbitmq-queues``...) against one node of ours."""
        try:
            done = subprocess.run(
                [str(self.sbin / tool), "-q", "-n", node.name, *args],
                env=self.node_env(node),
                capture_output=True,
                text=True,
                timeout=CTL_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{tool} {' '.join(args)} on {node.name} timed out") from None
        if check and done.returncode != 0:
            raise ClusterError(
                f"{tool} {' '.join(args)} on {node.name} failed ({done.returncode}):\n"
                f"{done.stdout}{done.stderr}\n{tail(node.log, 20)}"
            )
        return done.stdout

    def running_nodes(self, via: Node) -> set[str]:
        out = self.ctl(via, "eval", "rabbit_nodes:all_running().", check=False)
        return {n for n in (x.name for x in self.nodes) if n in out} if out else set()

    def wait_running(self, via: Node | None = None, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait until ``via`` (by default the first node) sees all three nodes running. One
        CLI call a round: each starts an Erlang VM, seconds on a loaded machine."""
        via = via or self.nodes[0]
        want = {n.name for n in self.nodes}
        deadline = time.monotonic() + timeout
        while True:
            seen = self.running_nodes(via)
            if want <= seen:
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"cluster not formed in {timeout:g} s: {via.name} sees {seen}")
            time.sleep(0.5)

    def quorum_safe_to_stop(self, node: Node) -> bool:
        """No quorum queue would lose its majority if ``node`` stopped now (its replicas
        elsewhere are online and caught up): what a rolling restart waits for."""
        done = subprocess.run(
            [str(self.sbin / "rabbitmq-queues"), "-q", "-n", node.name,
             "check_if_node_is_quorum_critical"],
            env=self.node_env(node), capture_output=True, timeout=CTL_TIMEOUT, check=False,
        )  # fmt: skip
        return done.returncode == 0

    def kill(self, node: Node) -> None:
        """SIGKILL the node's whole process group: no shutdown, connections reset."""
        if node.proc is not None and node.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGKILL)
            node.proc.wait(10)
        self._reap(node)

    @staticmethod
    def _reap(node: Node) -> None:
        """Close the pipe of a node that has exited (its stdin, kept open while it runs)."""
        if node.proc is not None and node.proc.poll() is not None and node.proc.stdin:
            node.proc.stdin.close()

    def stop(self, node: Node) -> None:
        """A clean shutdown, as a rolling restart does it."""
        if node.alive:
            # Not "shutdown": it waits until the OS pid is gone, and ours stays a zombie
            # until we reap it.
            self.ctl(node, "stop", check=False)
            try:
                assert node.proc is not None
                node.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill(node)
            self._reap(node)

    def close(self) -> None:
        for node in self.nodes:
            self.kill(node)
        if self.epmd is not None and self.epmd.poll() is None:
            self.epmd.kill()
            self.epmd.wait(10)

    # --- AMQP --------------------------------------------------------------------------

    def url(self, node: Node, vhost: str) -> str:
        return f"amqp://guest:guest@127.0.0.1:{node.port}/{vhost}"

    def failover_url(self, vhost: str, ports: list[int] | None = None) -> str:
        """All nodes as one kombu failover list (or the given ports, in that order)."""
        ports = ports or [n.port for n in self.nodes]
        return ";".join(f"amqp://guest:guest@127.0.0.1:{p}/{vhost}" for p in ports)

    @contextmanager
    def vhost(self) -> Iterator[str]:
        """A fresh vhost on the cluster for one scenario, deleted after it, set up as
        docs/producers.md recommends for a cluster (the vhost-quorum design): quorum by
        default, dead-lettering and the delivery limit by policy."""
        name = f"faults-{uuid.uuid4().hex[:8]}"
        first = self.nodes[0]
        self.ctl(first, "add_vhost", name, "--default-queue-type", "quorum")
        self.ctl(first, "set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        guarantees = {
            "dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            "dead-letter-routing-key": DEAD_LETTER_ROUTING_KEY,
            "delivery-limit": DELIVERY_LIMIT,
        }
        self.ctl(
            first,
            "set_policy",
            "-p",
            name,
            "--apply-to",
            "queues",
            "totango-guarantees",
            r"^totango(\.batch)?$",
            json.dumps(guarantees),
        )
        try:
            yield name
        finally:
            alive = [n for n in self.nodes if n.alive]
            if alive:
                self.ctl(alive[0], "delete_vhost", name, check=False)


@contextmanager
def cluster(root: Path) -> Iterator[Cluster]:
    """A started cluster, always torn down (failure, Ctrl-C, or a start that fails)."""
    instance = Cluster(root)
    try:
        instance.start()
        yield instance
    finally:
        instance.close()
