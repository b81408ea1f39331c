"""A small, real HTTP server standing in for Totango's ``pixel.gif`` gateway, with programmable
failures and a JSON control API, for tests, the demo, the benchmark and docker compose."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

GATEWAY_PATH = "/pixel.gif"
#: Totango's examples write ``pixel.gif/?...``: both reach the gateway.
GATEWAY_PATHS = (GATEWAY_PATH, GATEWAY_PATH + "/")
# A valid 1x1 transparent GIF, 43 bytes.
PIXEL_GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
#: ``not_gif`` answers 200 with an HTML page, as a TLS-inspecting proxy might.
_FAILURES = ("timeout", "reset", "not_gif")
NOT_GIF_PAGE = b"<html><body>Your request is being inspected.</body></html>"

Response = int | str


@dataclass(frozen=True)
class Call:
    """One call that reached ``/pixel.gif`` and what it was answered."""

    method: str
    params: tuple[tuple[str, str], ...]
    raw: str
    status: Response
    received_at: float
    headers: dict[str, str] = field(compare=False)
    #: The request target as sent (path and query): where a POST put its parameters.
    target: str = field(default="", compare=False)
    #: The client's port: calls with one port came over one (kept-alive) connection.
    client_port: int = field(default=0, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "params": [list(pair) for pair in self.params],
            "raw": self.raw,
            "status": self.status,
            "received_at": self.received_at,
            "target": self.target,
        }


@dataclass
class _Rule:
    match: dict[str, str] | None
    responses: list[Response]
    retry_after: str | None

    def matches(self, params: tuple[tuple[str, str], ...]) -> bool:
        return bool(self.responses) and all(
            (key, value) in params for key, value in (self.match or {}).items()
        )


def _check_response(response: object) -> Response:
    if isinstance(response, int) and not isinstance(response, bool) and 200 <= response <= 599:
        return response
    if response in _FAILURES:
        return str(response)
    raise ValueError(
        f"response must be a status 200-599, 'timeout', 'reset' or 'not_gif', not {response!r}"
    )


def _check_length(length: object) -> int | None:
    if length is None or (isinstance(length, int) and not isinstance(length, bool) and length > 0):
        return length
    raise ValueError(f"max_url_length must be a positive integer or null, not {length!r}")


def _json_object(body: bytes) -> dict[str, Any]:
    data = json.loads(body or b"{}")
    if not isinstance(data, dict):
        raise TypeError("expected a JSON object")
    return data


class GatewayEmulator:
    """The gateway on a loopback port; program failures with add_rule() and set_outage()."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        delay: float = 0.0,
        max_url_length: int | None = None,
    ) -> None:
        self.host = host
        self._port = port
        self.delay = delay
        #: A GET whose request target (path and query) is longer is answered 414 URI Too
        #: Long, as a proxy or a gateway with a shorter limit would; None: no limit.
        self.max_url_length = _check_length(max_url_length)
        self.hang_seconds = 5.0
        #: The longest a call waits while the emulator holds (``hold``), so nothing hangs.
        self.max_hold = 120.0
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self._calls: list[Call] = []
        self._rules: list[_Rule] = []
        self._outage: tuple[Response, str | None] | None = None
        #: Calls held in transit (``delay_arrival``): each waits, before it reaches the
        #: gateway, until ``let_arrive``.
        self._transit_rules: list[dict[str, str]] = []
        self._arrive = threading.Event()
        self._in_transit = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    def start(self) -> None:
        if self._server is not None:
            return
        server = _Server((self.host, self._port), self)
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},  # stop() waits up to one poll interval
            name=f"gateway-emulator-{self._port}",
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
        server.drop_connections()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> GatewayEmulator:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def set_delay(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("delay must not be negative")
        self.delay = float(seconds)

    def hold(self) -> None:
        """Answer nothing until ``release``: each call that arrives is recorded, then waits
        (at most ``max_hold`` seconds). A test uses it to know what is in flight."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def delay_arrival(self, match: dict[str, str]) -> None:
        """The next call whose parameters include ``match`` is held in transit: it is not
        recorded, applied or answered until ``let_arrive`` (or ``max_hold`` seconds), as a
        call on a slow path reaches Totango after calls sent later."""
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in match.items()):
            raise ValueError("match must map strings to strings")
        with self._lock:
            self._arrive.clear()
            self._transit_rules.append(dict(match))

    def in_transit(self) -> int:
        """How many calls are held in transit now."""
        with self._lock:
            return self._in_transit

    def let_arrive(self) -> None:
        """Every call held in transit reaches the gateway now."""
        self._arrive.set()

    def _transit(self, raw: str) -> None:
        params = parse_qsl(raw, keep_blank_values=True)
        with self._lock:
            rule = next(
                (m for m in self._transit_rules if all(p in params for p in m.items())), None
            )
            if rule is None:
                return
            self._transit_rules.remove(rule)
            self._in_transit += 1
        try:
            self._arrive.wait(self.max_hold)
        finally:
            with self._lock:
                self._in_transit -= 1

    def set_max_url_length(self, length: int | None) -> None:
        self.max_url_length = _check_length(length)

    def add_rule(
        self,
        match: dict[str, str] | None,
        responses: list[Response],
        retry_after: str | None = None,
    ) -> None:
        if match is not None and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in match.items()
        ):
            raise ValueError("match must map strings to strings")
        if retry_after is not None and not isinstance(retry_after, str):
            raise ValueError("retry_after must be a string or null")
        checked = [_check_response(response) for response in responses]
        with self._lock:
            self._rules.append(_Rule(dict(match) if match else None, checked, retry_after))

    def set_outage(self, response: Response | None, retry_after: str | None = None) -> None:
        if retry_after is not None and not isinstance(retry_after, str):
            raise ValueError("retry_after must be a string or null")
        outage = None if response is None else (_check_response(response), retry_after)
        with self._lock:
            self._outage = outage

    def reset(self) -> None:
        with self._lock:
            self._rules.clear()
            self._outage = None
            self._transit_rules.clear()
            self._arrive.set()
            self._calls.clear()

    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def delivered(self) -> list[Call]:
        return [call for call in self.calls() if call.status == 200]

    def attributes(self, account_id: str, user_id: str | None = None) -> dict[str, str]:
        """What Totango shows for an account (or a user of it): the attributes of every call
        answered 200, applied in the order the calls arrived, the last one winning."""
        prefix = "sdr_o." if user_id is None else "sdr_u."
        shown: dict[str, str] = {}
        for call in self.delivered():
            params = dict(call.params)
            if params.get("sdr_o") != account_id:
                continue
            if user_id is not None and params.get("sdr_u") != user_id:
                continue
            for name, value in call.params:
                if name.startswith(prefix):
                    shown[name.removeprefix(prefix)] = value
        return shown

    def wait_for(self, count: int, timeout: float, delivered_only: bool = True) -> list[Call]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.delivered() if delivered_only else self.calls()
            if len(got) >= count:
                return got
            if time.monotonic() >= deadline:
                kind = "delivered" if delivered_only else "recorded"
                raise TimeoutError(f"expected {count} {kind} calls in {timeout}s, got {len(got)}")
            time.sleep(0.01)

    def _decide(
        self,
        method: str,
        raw: str,
        headers: dict[str, str],
        too_long: bool = False,
        target: str = "",
        *,
        client_port: int = 0,
    ) -> tuple[Response, str | None]:
        params = tuple(parse_qsl(raw, keep_blank_values=True))
        with self._lock:
            response: Response = 200
            retry_after = None
            if too_long:
                response = 414
            elif self._outage is not None:
                response, retry_after = self._outage
            else:
                rule = next((r for r in self._rules if r.matches(params)), None)
                if rule is not None:
                    response, retry_after = rule.responses.pop(0), rule.retry_after
                    if not rule.responses:
                        self._rules.remove(rule)
            call = Call(method, params, raw, response, time.time(), headers, target, client_port)
            self._calls.append(call)
        return response, retry_after


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], emulator: GatewayEmulator) -> None:
        self.emulator = emulator
        self.lock = threading.Lock()
        self.connections: set[socket.socket] = set()
        self.aborted: set[socket.socket] = set()
        self.closing = False
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve the host's FQDN, which can stall for seconds.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def drop_connections(self) -> None:
        """Close kept-alive connections too, so a stopped gateway answers nothing."""
        with self.lock:
            self.closing = True
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            aborted = request in self.aborted
            self.aborted.discard(request)
        if aborted:  # skip the graceful FIN: close with SO_LINGER 0 sends a RST
            self.close_request(request)
        else:
            super().shutdown_request(request)

    def handle_error(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # clients hanging up are not errors
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the second waits for the
    # client's delayed ACK, adding ~40 ms to every call on a kept-alive connection.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections.add(self.connection)
            if self.server.closing:
                self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        with self.server.lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default one-line-per-request stderr log."""

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def _route(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        parts = urlsplit(self.path)
        emulator = self.server.emulator
        if parts.path in GATEWAY_PATHS and method in ("GET", "POST"):
            raw = parts.query
            if method == "POST":
                # A form body, or the parameters in the URL of the POST as Totango's own
                # examples write them, or both: the URL's first.
                form = body.decode("utf-8", "replace")
                raw = "&".join(part for part in (raw, form) if part)
            limit = emulator.max_url_length
            too_long = method == "GET" and limit is not None and len(self.path) > limit
            self._gateway(method, raw, too_long)
        elif (method, parts.path) == ("GET", "/_emulator/health"):
            self._send(200, b"ok", "text/plain")
        elif (method, parts.path) == ("GET", "/_emulator/calls"):
            self._send_json(200, [call.to_json() for call in emulator.calls()])
        elif (method, parts.path) == ("DELETE", "/_emulator/calls"):
            emulator.reset()
            self._send_json(200, {"ok": True})
        elif method == "POST" and parts.path.startswith("/_emulator/"):
            self._control(parts.path, body)
        else:
            self._send(404, b"not found", "text/plain")

    def _control(self, path: str, body: bytes) -> None:
        emulator = self.server.emulator
        try:
            data = _json_object(body)
            if path == "/_emulator/rules":
                emulator.add_rule(data.get("match"), data["responses"], data.get("retry_after"))
            elif path == "/_emulator/outage":
                emulator.set_outage(data.get("response"), data.get("retry_after"))
            elif path == "/_emulator/delay":
                emulator.set_delay(float(data["seconds"]))
            elif path == "/_emulator/max_url_length":
                emulator.set_max_url_length(data["length"])
            else:
                self._send(404, b"not found", "text/plain")
                return
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            self._send(400, f"bad request: {exc!r}".encode(), "text/plain")
            return
        self._send_json(200, {"ok": True})

    def _gateway(self, method: str, raw: str, too_long: bool = False) -> None:
        emulator = self.server.emulator
        headers = dict(self.headers.items())
        emulator._transit(raw)
        response, retry_after = emulator._decide(
            method, raw, headers, too_long, self.path, client_port=self.client_address[1]
        )
        emulator._open.wait(emulator.max_hold)
        if response == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with self.server.lock:
                self.server.aborted.add(self.connection)
            self.close_connection = True
            return
        if response == "timeout":
            time.sleep(emulator.hang_seconds)
            self.close_connection = True
            return
        if emulator.delay > 0:
            time.sleep(emulator.delay)
        if response == "not_gif":
            self._send(200, NOT_GIF_PAGE, "text/html")
            return
        status = int(response)
        if status == 200:
            self._send(200, PIXEL_GIF, "image/gif")
            return
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        if 300 <= status < 400:
            headers["Location"] = "/elsewhere"
        self._send(status, b"" if status in (204, 304) else b"error", "text/plain", headers)

    def _send_json(self, status: int, data: object) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m totango_emulator", description="Run the Totango gateway emulator."
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port; 0 picks a free one")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="delay before each answer")
    parser.add_argument(
        "--max-url-length", type=int, default=None, help="answer 414 to a longer GET target"
    )
    args = parser.parse_args(argv)

    stopping = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001  signal API
        stopping.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    emulator = GatewayEmulator(args.host, args.port, args.delay_ms / 1000, args.max_url_length)
    emulator.start()
    print(f"gateway emulator listening on {emulator.url}", flush=True)
    try:
        while not stopping.is_set():
            stopping.wait(0.5)
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
