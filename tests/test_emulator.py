"""The gateway emulator, exercised over real loopback HTTP with the standard library's client."""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from totango_emulator import PIXEL_GIF, GatewayEmulator

ROOT = Path(__file__).resolve().parent.parent
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def emulator() -> Iterator[GatewayEmulator]:
    with GatewayEmulator() as emu:
        yield emu


def call(
    emu: GatewayEmulator,
    path: str = "/pixel.gif",
    *,
    method: str = "GET",
    body: str | bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def control(emu: GatewayEmulator, path: str, payload: object) -> tuple[int, bytes]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    status, _, data = call(
        emu, path, method="POST", body=body, headers={"Content-Type": "application/json"}
    )
    return status, data


def statuses(emu: GatewayEmulator, n: int, path: str = "/pixel.gif") -> list[int]:
    return [call(emu, path)[0] for _ in range(n)]


def test_get_is_recorded_with_exactly_the_decoded_params(emulator: GatewayEmulator) -> None:
    """A GET answers a 43-byte GIF and records the decoded params; %20 and + are spaces,
    %26/%3D stay inside values, blank values are kept."""
    raw = "sdr_s=SP-1&sdr_o=acct%201&sdr_odn=Big+Co&q=a%26b%3Dc&empty="
    status, headers, body = call(emulator, "/pixel.gif?" + raw, headers={"X-Test": "yes"})
    assert (status, headers["Content-Type"], body) == (200, "image/gif", PIXEL_GIF)
    assert len(PIXEL_GIF) == 43
    assert PIXEL_GIF.startswith(b"GIF89a")
    (recorded,) = emulator.calls()
    assert recorded.method == "GET"
    assert recorded.raw == raw
    assert recorded.params == (
        ("sdr_s", "SP-1"),
        ("sdr_o", "acct 1"),
        ("sdr_odn", "Big Co"),
        ("q", "a&b=c"),
        ("empty", ""),
    )
    assert recorded.status == 200
    assert recorded.headers["X-Test"] == "yes"
    assert abs(recorded.received_at - time.time()) < 5
    with pytest.raises(FrozenInstanceError):
        recorded.status = 500  # type: ignore[misc]


def test_post_form_body_is_recorded_with_exactly_the_decoded_params(
    emulator: GatewayEmulator,
) -> None:
    """A form-encoded POST is decoded the same way as a GET query string."""
    raw = "sdr_s=SP-1&sdr_u=user%40x.io&sdr_a=Logged+In&sdr_m=Mod%20A"
    status, _, body = call(emulator, method="POST", body=raw, headers=FORM)
    assert (status, body) == (200, PIXEL_GIF)
    (recorded,) = emulator.delivered()
    assert (recorded.method, recorded.raw) == ("POST", raw)
    assert recorded.params == (
        ("sdr_s", "SP-1"),
        ("sdr_u", "user@x.io"),
        ("sdr_a", "Logged In"),
        ("sdr_m", "Mod A"),
    )


def test_rules_apply_in_order_and_are_spent(emulator: GatewayEmulator) -> None:
    """A rule's responses are served one per call, then later rules, then the default 200."""
    emulator.add_rule(None, [503, 503])
    emulator.add_rule(None, [500])
    assert statuses(emulator, 5) == [503, 503, 500, 200, 200]
    assert [c.status for c in emulator.calls()] == [503, 503, 500, 200, 200]
    assert len(emulator.delivered()) == 2


def test_match_filtered_rule_only_hits_matching_calls(emulator: GatewayEmulator) -> None:
    """A rule with a match applies only to calls carrying all its key/value pairs."""
    emulator.add_rule({"sdr_o": "acct 1", "sdr_s": "SP-1"}, [502])
    assert call(emulator, "/pixel.gif?sdr_o=acct+1")[0] == 200
    assert call(emulator, "/pixel.gif?sdr_o=other&sdr_s=SP-1")[0] == 200
    assert call(emulator, "/pixel.gif?sdr_s=SP-1&sdr_o=acct%201&x=y")[0] == 502
    assert call(emulator, "/pixel.gif?sdr_s=SP-1&sdr_o=acct%201")[0] == 200


def test_retry_after_and_redirect_location_headers(emulator: GatewayEmulator) -> None:
    """Error answers carry Retry-After when given and the body b"error"; 3xx sends Location."""
    emulator.add_rule(None, [429], retry_after="7")
    emulator.add_rule(None, [302])
    status, headers, body = call(emulator)
    assert (status, headers["Retry-After"], body) == (429, "7", b"error")
    status, headers, _ = call(emulator)
    assert (status, headers["Location"]) == (302, "/elsewhere")
    assert "Retry-After" not in headers


def test_timeout_holds_then_closes_without_answer(emulator: GatewayEmulator) -> None:
    """A "timeout" answer times out a short-timeout client; a patient one sees a hang-up."""
    emulator.hang_seconds = 0.3
    emulator.add_rule(None, ["timeout", "timeout"])
    with pytest.raises(TimeoutError):
        call(emulator, timeout=0.1)
    started = time.monotonic()
    with pytest.raises(http.client.RemoteDisconnected):
        call(emulator, timeout=5)
    assert time.monotonic() - started >= 0.25
    assert call(emulator)[0] == 200
    assert [c.status for c in emulator.calls()] == ["timeout", "timeout", 200]


def test_reset_closes_the_connection_without_answer(emulator: GatewayEmulator) -> None:
    """The "reset" response drops the connection at once, and the call is recorded as "reset"."""
    emulator.add_rule(None, ["reset"])
    with pytest.raises(ConnectionError):
        call(emulator)
    assert call(emulator)[0] == 200
    assert [c.status for c in emulator.calls()] == ["reset", 200]


def test_outage_takes_priority_then_recovers(emulator: GatewayEmulator) -> None:
    """An outage answers every call until cleared, without consuming the rules behind it."""
    emulator.add_rule(None, [500])
    emulator.set_outage(503, retry_after="2")
    for _ in range(3):
        status, headers, _ = call(emulator)
        assert (status, headers["Retry-After"]) == (503, "2")
    emulator.set_outage("reset")
    with pytest.raises(ConnectionError):
        call(emulator)
    emulator.set_outage(None)
    assert statuses(emulator, 2) == [500, 200]
    with pytest.raises(ValueError, match="status"):
        emulator.set_outage("broken")


def test_stop_refuses_connections_and_start_serves_on_the_same_port() -> None:
    """stop() closes the listener and kept-alive connections; start() binds the same port again."""
    emu = GatewayEmulator()
    emu.start()
    try:
        port = emu.port
        assert port > 0
        assert emu.url == f"http://127.0.0.1:{port}"
        kept = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            kept.request("GET", "/pixel.gif?a=1")
            assert kept.getresponse().read() == PIXEL_GIF
            emu.stop()
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            kept.request("GET", "/pixel.gif?a=2")  # the send may still succeed locally
            with pytest.raises(ConnectionError):
                kept.getresponse()
        finally:
            kept.close()
        emu.start()
        assert emu.port == port
        assert call(emu, "/pixel.gif?a=3")[0] == 200
        assert [c.params for c in emu.calls()] == [(("a", "1"),), (("a", "3"),)]
    finally:
        emu.stop()
    emu.stop()  # stopping twice is harmless


def test_http_control_api(emulator: GatewayEmulator) -> None:
    """Rules, outage, delay, calls and reset can all be driven over HTTP, never recorded."""
    assert call(emulator, "/_emulator/health")[::2] == (200, b"ok")
    payload = {"match": {"k": "v"}, "responses": [503, "reset"], "retry_after": "3"}
    assert control(emulator, "/_emulator/rules", payload)[0] == 200
    status, headers, _ = call(emulator, "/pixel.gif?k=v")
    assert (status, headers["Retry-After"]) == (503, "3")
    with pytest.raises(ConnectionError):
        call(emulator, "/pixel.gif?k=v")
    assert control(emulator, "/_emulator/outage", {"response": 500})[0] == 200
    assert call(emulator)[0] == 500
    assert control(emulator, "/_emulator/outage", {"response": None})[0] == 200
    assert control(emulator, "/_emulator/delay", {"seconds": 0.2})[0] == 200
    started = time.monotonic()
    assert call(emulator, "/_emulator/health")[0] == 200
    assert time.monotonic() - started < 0.15  # control endpoints are never delayed
    assert call(emulator, "/pixel.gif?a=b+c")[0] == 200
    assert time.monotonic() - started >= 0.2
    status, _, body = call(emulator, "/_emulator/calls")
    assert status == 200
    listed = json.loads(body)
    assert [c["status"] for c in listed] == [503, "reset", 500, 200]
    assert listed[-1]["method"] == "GET"
    assert listed[-1]["params"] == [["a", "b c"]]
    assert listed[-1]["raw"] == "a=b+c"
    assert isinstance(listed[-1]["received_at"], float)
    assert call(emulator, "/_emulator/calls", method="DELETE")[0] == 200
    assert emulator.calls() == []
    assert control(emulator, "/_emulator/delay", {"seconds": 0})[0] == 200


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/_emulator/rules", b"{not json"),
        ("/_emulator/rules", [1, 2]),
        ("/_emulator/rules", {"match": None}),
        ("/_emulator/rules", {"responses": ["explode"]}),
        ("/_emulator/rules", {"match": {"k": 1}, "responses": [503]}),
        ("/_emulator/outage", {"response": 99}),
        ("/_emulator/delay", {"seconds": "soon"}),
        ("/_emulator/delay", {"seconds": -1}),
    ],
)
def test_control_api_rejects_bad_input(
    emulator: GatewayEmulator, path: str, payload: object
) -> None:
    """Malformed JSON or invalid values answer 400 with a message and change nothing."""
    status, body = control(emulator, path, payload)
    assert status == 400
    assert body.startswith(b"bad request")
    assert statuses(emulator, 1) == [200]


def test_other_paths_are_404_and_not_recorded(emulator: GatewayEmulator) -> None:
    """Unknown paths answer 404; neither they nor control calls count as gateway calls."""
    assert call(emulator, "/other.gif?a=1")[0] == 404
    assert call(emulator, "/_emulator/nope", method="POST", body=b"{}")[0] == 404
    assert call(emulator, method="DELETE")[0] == 404
    assert call(emulator, "/_emulator/health")[0] == 200
    assert emulator.calls() == []


def test_wait_for_returns_or_reports_how_many_arrived(emulator: GatewayEmulator) -> None:
    """wait_for returns once enough calls arrive and otherwise says how many did."""
    emulator.add_rule(None, [503])
    statuses(emulator, 2)
    assert len(emulator.wait_for(2, timeout=1, delivered_only=False)) == 2
    with pytest.raises(TimeoutError, match="got 1"):
        emulator.wait_for(2, timeout=0.1)
    threading.Timer(0.1, call, (emulator,)).start()
    assert len(emulator.wait_for(2, timeout=3)) == 2


def test_many_keep_alive_clients_with_delay() -> None:
    """Concurrent keep-alive clients are served in parallel despite a 50 ms delay."""
    clients, each = 40, 5
    errors: list[BaseException] = []

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=10)
        try:
            for i in range(each):
                conn.request("POST", "/pixel.gif", f"c={n}&i={i}", FORM)
                assert conn.getresponse().read() == PIXEL_GIF
        except BaseException as exc:  # noqa: BLE001  reported by the main thread
            errors.append(exc)
        finally:
            conn.close()

    with GatewayEmulator(delay=0.05) as emu:
        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        assert errors == []
        assert len(emu.delivered()) == clients * each
    assert elapsed < 2.5  # 200 calls, serially 10 s; in parallel about 0.25 s


def test_cli_serves_until_terminated() -> None:
    """`python -m totango_emulator --port 0` prints its real address, serves, and exits on TERM."""
    with subprocess.Popen(
        [sys.executable, "-m", "totango_emulator", "--port", "0", "--delay-ms", "10"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.fullmatch(r"gateway emulator listening on http://127\.0\.0\.1:(\d+)\n", line)
        assert found, line
        port = int(found.group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/pixel.gif?sdr_s=SP-1")
            assert conn.getresponse().read() == PIXEL_GIF
            conn.request("GET", "/_emulator/calls")
            (listed,) = json.loads(conn.getresponse().read())
            assert listed["params"] == [["sdr_s", "SP-1"]]
        finally:
            conn.close()
        proc.terminate()
        assert proc.wait(timeout=5) == 0


def test_a_held_call_is_recorded_at_once_and_answered_only_after_release(
    emulator: GatewayEmulator,
) -> None:
    """hold(): a call that arrives is in calls() right away but gets no answer until
    release(); then it is answered as usual."""
    emulator.hold()
    answers: list[int] = []
    caller = threading.Thread(target=lambda: answers.append(call(emulator)[0]))
    caller.start()
    deadline = time.monotonic() + 5
    while not emulator.calls() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(emulator.calls()) == 1
    caller.join(0.3)
    assert caller.is_alive()
    assert answers == []
    emulator.release()
    caller.join(5)
    assert answers == [200]


@pytest.mark.parametrize("path", ["/pixel.gif", "/pixel.gif/"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_pixel_gif_with_and_without_the_trailing_slash_is_the_gateway(
    emulator: GatewayEmulator, path: str, method: str
) -> None:
    """Totango's examples write ``pixel.gif/?``: both paths answer the GIF and are recorded
    (``pixel.gif/`` was a 404 before)."""
    raw = "sdr_s=SP-1&sdr_o=a"
    if method == "GET":
        status, _, body = call(emulator, f"{path}?{raw}")
    else:
        status, _, body = call(emulator, path, method="POST", body=raw, headers=FORM)
    assert (status, body) == (200, PIXEL_GIF)
    (recorded,) = emulator.calls()
    assert (recorded.method, recorded.params) == (method, (("sdr_s", "SP-1"), ("sdr_o", "a")))


def test_post_with_the_parameters_in_its_url_is_decoded_like_a_form(
    emulator: GatewayEmulator,
) -> None:
    """The seed's own form, a POST with the parameters in the URL and no body, is recorded
    with those parameters (it was recorded with none before)."""
    status, _, _ = call(emulator, "/pixel.gif/?sdr_s=SP-1&sdr_o=acct%201", method="POST", body=b"")
    assert status == 200
    (recorded,) = emulator.calls()
    assert recorded.method == "POST"
    assert recorded.params == (("sdr_s", "SP-1"), ("sdr_o", "acct 1"))
    assert recorded.target == "/pixel.gif/?sdr_s=SP-1&sdr_o=acct%201"


def test_post_with_parameters_in_url_and_body_records_both_url_first(
    emulator: GatewayEmulator,
) -> None:
    """A POST to a URL with a query of its own and a form body: both, the URL's first."""
    call(emulator, "/pixel.gif?api-token=t", method="POST", body="sdr_s=SP-1", headers=FORM)
    (recorded,) = emulator.calls()
    assert recorded.params == (("api-token", "t"), ("sdr_s", "SP-1"))
    assert recorded.target == "/pixel.gif?api-token=t"


def test_a_get_longer_than_max_url_length_is_answered_414_and_a_post_is_not() -> None:
    """With max_url_length set, a GET whose target is longer is answered 414 URI Too Long
    and recorded; a POST of the same parameters, and a GET within the limit, are 200."""
    with GatewayEmulator(max_url_length=40) as emu:
        long_query = "sdr_s=SP-1&sdr_o=" + "a" * 40
        assert call(emu, "/pixel.gif?" + long_query)[0] == 414
        assert call(emu, method="POST", body=long_query, headers=FORM)[0] == 200
        assert call(emu, "/pixel.gif?sdr_s=SP-1")[0] == 200
        assert [(c.method, c.status) for c in emu.calls()] == [
            ("GET", 414),
            ("POST", 200),
            ("GET", 200),
        ]


def test_max_url_length_is_set_over_http_and_cleared_with_null(emulator: GatewayEmulator) -> None:
    """The control API sets the limit and clears it; a bad limit is a 400."""
    query = "/pixel.gif?" + "k=" + "v" * 50
    assert control(emulator, "/_emulator/max_url_length", {"length": 20})[0] == 200
    assert call(emulator, query)[0] == 414
    assert control(emulator, "/_emulator/max_url_length", {"length": None})[0] == 200
    assert call(emulator, query)[0] == 200
    assert control(emulator, "/_emulator/max_url_length", {"length": 0})[0] == 400
    assert control(emulator, "/_emulator/max_url_length", {"length": "20"})[0] == 400


def test_not_gif_answers_200_with_an_html_page(emulator: GatewayEmulator) -> None:
    """The ``not_gif`` response stands for a proxy's page: 200, HTML, not the GIF."""
    emulator.add_rule(None, ["not_gif"])
    status, headers, body = call(emulator, "/pixel.gif?sdr_s=SP-1")
    assert (status, headers["Content-Type"]) == (200, "text/html")
    assert not body.startswith(b"GIF")
    assert [c.status for c in emulator.calls()] == ["not_gif"]
