"""A tiny, real Sentry ingestion endpoint on loopback: it accepts what sentry-sdk sends
(envelopes, gzipped or not, and the legacy ``/store/`` body) and records every event."""

from __future__ import annotations

import gzip
import json
import re
import socketserver
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

_PATH_RE = re.compile(r"^/api/(?P<project>[^/]+)/(?P<kind>envelope|store)/?$")


def _decode(body: bytes, encoding: str) -> bytes:
    """The body without its Content-Encoding; sentry-sdk gzips by default (brotli only when
    the Brotli package is installed, which it is not here)."""
    encoding = encoding.strip().lower()
    if encoding in {"", "identity"}:
        return body
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    raise ValueError(f"unsupported Content-Encoding {encoding!r}")


def parse_envelope(data: bytes) -> tuple[dict[str, Any], list[tuple[dict[str, Any], bytes]]]:
    """Split an envelope into its header and its (item header, payload) pairs.

    The format is newline-delimited: the envelope header, then for each item a header line
    and a payload of ``length`` bytes, or up to the next newline when no length is given.
    """
    pos = data.find(b"\n")
    header_line, pos = (data, len(data)) if pos < 0 else (data[:pos], pos + 1)
    header = json.loads(header_line or b"{}")
    items: list[tuple[dict[str, Any], bytes]] = []
    while pos < len(data):
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end
        line = data[pos:end]
        pos = end + 1
        if not line.strip():
            continue
        item_header = json.loads(line)
        length = item_header.get("length")
        if length is None:
            end = data.find(b"\n", pos)
            end = len(data) if end < 0 else end
            payload, pos = data[pos:end], end + 1
        else:
            payload, pos = data[pos : pos + int(length)], pos + int(length) + 1
        items.append((item_header, payload))
    return header, items


class SentryServer:
    """Sentry on a loopback port; ``dsn`` points an SDK at it, ``events()`` is what came."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._lock = threading.Lock()
        self._events: list[dict[str, Any]] = []
        self._items: list[tuple[str, dict[str, Any]]] = []
        self._errors: list[str] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the Sentry server is not running")
        return int(self._server.server_address[1])

    @property
    def dsn(self) -> str:
        return f"http://public@{self.host}:{self.port}/1"

    def start(self) -> None:
        if self._server is not None:
            return
        self._server = _Server((self.host, 0), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"sentry-server-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> SentryServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def events(self) -> list[dict[str, Any]]:
        """Every event received so far (envelope items of type ``event`` and ``/store/``)."""
        with self._lock:
            return list(self._events)

    def item_types(self) -> list[str]:
        """The type of every envelope item received, events or not (client reports, ...)."""
        with self._lock:
            return [kind for kind, _ in self._items]

    def errors(self) -> list[str]:
        """Requests this server could not read; a test should expect none."""
        with self._lock:
            return list(self._errors)

    def wait_for(self, count: int, timeout: float) -> list[dict[str, Any]]:
        """At least ``count`` events, waiting up to ``timeout`` seconds for them."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.events()
            if len(got) >= count:
                return got
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"expected {count} Sentry events in {timeout}s, got {len(got)}; "
                    f"items {self.item_types()}, errors {self.errors()}"
                )
            time.sleep(0.02)

    def _record(self, kind: str, body: bytes) -> None:
        if kind == "store":
            with self._lock:
                self._events.append(json.loads(body))
                self._items.append(("event", {}))
            return
        _, items = parse_envelope(body)
        with self._lock:
            for item_header, payload in items:
                item_type = str(item_header.get("type"))
                self._items.append((item_type, item_header))
                if item_type == "event":
                    self._events.append(json.loads(payload))

    def _error(self, message: str) -> None:
        with self._lock:
            self._errors.append(message)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], sentry: SentryServer) -> None:
        self.sentry = sentry
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall for seconds.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default one-line-per-request stderr log."""

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        match = _PATH_RE.match(self.path.split("?", 1)[0])
        if match is None:
            self._send(404, {"detail": "not found"})
            return
        try:
            data = _decode(body, self.headers.get("Content-Encoding") or "")
            self.server.sentry._record(match["kind"], data)
        except (ValueError, OSError, EOFError, zlib.error) as exc:  # JSONDecodeError too
            self.server.sentry._error(f"{self.path}: {exc!r}")
            self._send(400, {"detail": repr(exc)})
            return
        self._send(200, {"id": None})

    def _send(self, status: int, data: object) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
