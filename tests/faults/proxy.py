"""A threaded TCP proxy on loopback, owned by one test: the worker reaches its broker through
it, so ``cut()`` breaks only the test's own connections and never the shared broker."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from types import TracebackType

#: How long a pump waits on a socket before it looks at its flags again.
POLL_SECONDS = 0.2
CHUNK = 65536


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a RST and anything unsent is dropped, as when a
    broker host vanishes or a NAT forgets the connection."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Pair:
    """One client connection and its upstream connection, pumped by two threads."""

    def __init__(self, proxy: TcpProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy, self.client, self.upstream = proxy, client, upstream
        self.closed = threading.Event()

    def start(self) -> None:
        for source, sink, from_server in (
            (self.client, self.upstream, False),
            (self.upstream, self.client, True),
        ):
            threading.Thread(
                target=self._pump, args=(source, sink, from_server), daemon=True
            ).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_server: bool) -> None:
        source.settimeout(POLL_SECONDS)
        while not self.closed.is_set():
            try:
                data = source.recv(CHUNK)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            if from_server and self.proxy.drop_reply is not None and self.proxy.drop_reply(data):
                # The server's answer is thrown away and the connection cut: what the server
                # did for this command (a pop, say) happened, but the client never hears it.
                self.proxy.dropped_replies += 1
                break
            try:
                sink.sendall(data)
            except OSError:
                break
        self.close()

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            _reset(self.client)
            _reset(self.upstream)
        self.proxy.forget(self)


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``target``.

    - ``cut()`` resets every open connection and refuses new ones (accepted, then reset at
      once) until ``restore()``;
    - ``drop_reply``, when set, is shown each chunk the server sends; a chunk it returns True
      for is dropped and its connection cut (a fault at one precise moment).
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.drop_reply: Callable[[bytes], bool] | None = None
        self.dropped_replies = 0
        self.accepted = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._refusing = False
        self._stopping = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self._listener.settimeout(POLL_SECONDS)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="tcp-proxy")

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._listener.close()
        self._close_all()

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def cut(self) -> int:
        """Reset every connection through the proxy and refuse new ones; returns how many
        connections were cut."""
        with self._lock:
            self._refusing = True
        return self._close_all()

    def restore(self) -> None:
        with self._lock:
            self._refusing = False

    def forget(self, pair: _Pair) -> None:
        with self._lock:
            self._pairs.discard(pair)

    def _close_all(self) -> int:
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            pair.close()
        return len(pairs)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                refusing = self._refusing
            if refusing:
                self.refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(self, client, upstream)
            with self._lock:
                refusing = self._refusing  # a cut() may have come while connecting
                if not refusing:
                    self._pairs.add(pair)
                    self.accepted += 1
            if refusing:
                _reset(client)
                _reset(upstream)
                continue
            pair.start()
