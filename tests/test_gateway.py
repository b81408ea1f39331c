"""worker/gateway.py over real loopback HTTP(S): the gateway emulator (or a small TLS server
with a certificate made here) stands in for Totango; nothing patches libcurl.

Each test builds its settings from a plain dict and a ``Gateway`` of its own.
"""

from __future__ import annotations

import logging
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest

from totango_emulator import PIXEL_GIF, GatewayEmulator
from worker.errors import ConfigError
from worker.events import Event, track_activity
from worker.gateway import (
    USER_AGENT,
    Gateway,
    Gateways,
    ca_bundle,
    check_gateway,
    proxy_for,
    tls_context,
)
from worker.observability import CELERY_PER_TASK_LOGGERS, configure_logging
from worker.settings import Settings

SERVICE_ID = "SP-1234-56"


def settings_for(url: str, **extra: str) -> Settings:
    return Settings.from_env(
        {"TOTANGO_GATEWAY_URL": url, "TOTANGO_SERVICE_ID": SERVICE_ID, **extra}
    )


def event(account_id: str = "acme", event_id: str = "e-1", **kwargs: Any) -> Event:
    return track_activity(
        account_id=account_id,
        user_id="jane@acme.example",
        activity="Login",
        module="App",
        event_id=event_id,
        default_service_id=SERVICE_ID,
        **kwargs,
    )


@pytest.fixture
def emulator() -> Iterator[GatewayEmulator]:
    with GatewayEmulator() as emu:
        yield emu


@pytest.fixture
def client(emulator: GatewayEmulator) -> Iterator[Gateway]:
    settings = settings_for(
        f"{emulator.url}/pixel.gif", TOTANGO_CONNECT_TIMEOUT="0.5", TOTANGO_READ_TIMEOUT="1"
    )
    gateway = Gateway(settings, env={})
    yield gateway
    gateway.close()


def test_a_get_carries_the_event_and_the_user_agent_and_a_200_is_delivered(
    emulator: GatewayEmulator, client: Gateway
) -> None:
    """One GET to pixel.gif whose query decodes to exactly the event's parameters, with the
    worker's User-Agent; the answer is "200" with no excerpt."""
    sent = event("a&b=c d", account_attributes={"Contract Value": 1200.5})
    answer = client.send(sent)
    assert (answer.status, answer.method, answer.excerpt) == ("200", "GET", "")
    [call] = emulator.calls()
    assert call.method == "GET"
    assert call.params == sent.params
    assert {k.lower(): v for k, v in call.headers.items()}["user-agent"] == USER_AGENT


def test_a_query_too_long_for_a_url_is_posted_as_a_form_with_the_user_agent(
    emulator: GatewayEmulator,
) -> None:
    """Past TOTANGO_MAX_URL_LENGTH the call is a POST form, with the User-Agent of a GET and
    no ``Expect: 100-continue`` (libcurl's default for a body, one round trip more)."""
    settings = settings_for(f"{emulator.url}/pixel.gif", TOTANGO_MAX_URL_LENGTH="256")
    sent = event(user_attributes={"bio": "x" * 300})
    answer = Gateway(settings, env={}).send(sent)
    assert (answer.status, answer.method) == ("200", "POST")
    [call] = emulator.calls()
    headers = {k.lower(): v for k, v in call.headers.items()}
    assert call.method == "POST"
    assert call.params == sent.params
    assert headers["content-type"] == "application/x-www-form-urlencoded"
    assert headers["user-agent"] == USER_AGENT
    assert "expect" not in headers


def test_a_redirect_is_not_followed_but_answered_as_its_status(
    emulator: GatewayEmulator, client: Gateway
) -> None:
    """A 302 is a non-200 answer: one call, nothing sent to its Location."""
    emulator.add_rule(None, [302])
    assert client.send(event()).status == "302"
    assert [c.status for c in emulator.calls()] == [302]


def test_a_503_keeps_its_retry_after_and_an_excerpt(
    emulator: GatewayEmulator, client: Gateway
) -> None:
    emulator.add_rule(None, [503], retry_after="7")
    answer = client.send(event())
    assert (answer.status, answer.retry_after, answer.excerpt) == ("503", "7", "error")


def test_a_retry_after_date_is_read_as_seconds_from_now_without_header_lines(
    emulator: GatewayEmulator, client: Gateway
) -> None:
    """A healthy gateway's handles keep no header lines: the first 503 in a while has its
    Retry-After date read by libcurl, as seconds from now."""
    emulator.add_rule(None, [503], retry_after=formatdate(time.time() + 30, usegmt=True))
    answer = client.send(event())
    assert answer.status == "503"
    assert answer.retry_after is not None
    assert 25 <= int(answer.retry_after) <= 30


def test_a_read_timeout_is_a_timeout_and_a_reset_a_connection_error(
    emulator: GatewayEmulator, client: Gateway
) -> None:
    """A call is bounded by the connect and read timeouts together (0.5 s + 1 s here; the
    gateway hangs 3 s), the bound the task's time limit is computed from."""
    emulator.hang_seconds = 3.0
    emulator.add_rule(None, ["timeout"])
    answer = client.send(event())
    assert answer.status == "timeout"
    assert 1.4 < answer.elapsed < 2.5
    emulator.add_rule(None, ["reset"])
    assert client.send(event()).status == "connection_error"
    assert client.send(event()).status == "200"  # the pool recovers


def test_a_refused_connection_is_a_connection_error_not_a_timeout() -> None:
    """A refusal is reported as ``connection_error``, as requests reported it, not as a
    timeout, and the excerpt keeps libcurl's reason."""
    with GatewayEmulator() as emu:
        url = f"{emu.url}/pixel.gif"
    answer = Gateway(settings_for(url), env={}).send(event())
    assert answer.status == "connection_error"
    assert "curl error 7" in answer.excerpt


def test_each_sending_thread_keeps_one_connection_alive_between_its_calls(
    emulator: GatewayEmulator,
) -> None:
    """Seven threads (pool slots and batch senders alike) make three rounds of calls at
    once: each thread's calls come over one kept-alive connection of its own, so the
    gateway sees seven connections for 21 calls, and closing the gateway frees them."""
    threads = 7
    emulator.set_delay(0.1)
    client = Gateway(settings_for(f"{emulator.url}/pixel.gif"), env={})
    barrier = threading.Barrier(threads)

    def calls(_: int) -> list[str]:
        statuses = []
        for _ in range(3):
            barrier.wait(5)
            statuses.append(client.send(event()).status)
        return statuses

    with ThreadPoolExecutor(max_workers=threads) as pool:
        answers = [status for statuses in pool.map(calls, range(threads)) for status in statuses]
    assert answers == ["200"] * 3 * threads
    ports = [call.client_port for call in emulator.calls()]
    assert len(ports) == 3 * threads
    assert len(set(ports)) == threads
    assert len(client._handles) == threads
    client.close()
    assert client._handles == []


# --- TLS ----------------------------------------------------------------------------------


def test_the_tls_context_refuses_anything_below_tls_1_2_and_verifies() -> None:
    context = tls_context(ca_bundle({}))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate for localhost, made with the openssl command."""
    folder = tmp_path_factory.mktemp("tls")
    pem = folder / "localhost.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(pem), "-out", str(pem)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return pem


class _Pixel(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[list[tuple[str, str]]]

    def do_GET(self) -> None:
        self.seen.append(parse_qsl(self.path.partition("?")[2]))
        self.send_response(200)
        self.send_header("Content-Type", "image/gif")
        self.send_header("Content-Length", str(len(PIXEL_GIF)))
        self.end_headers()
        self.wfile.write(PIXEL_GIF)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


class _RateLimited(_Pixel):
    """Answers 429 with ``RateLimit-Reset: 12`` and no Retry-After; the pixel to ``healthy``."""

    def do_GET(self) -> None:
        if "sdr_o=healthy" in self.path:
            super().do_GET()
            return
        self.send_response(429)
        self.send_header("RateLimit-Reset", "12")
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_after_a_non_200_the_answers_headers_are_kept_for_ratelimit_reset() -> None:
    """libcurl does not read RateLimit-Reset: once a gateway has answered a non-200, its
    handles keep the header lines, and the next answers carry it; a minute of answers
    later they keep none again."""
    handler = type("RateLimited", (_RateLimited,), {"seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/pixel.gif"
    client = Gateway(settings_for(url), env={})
    try:
        first, second = client.send(event()), client.send(event())
        assert (first.status, first.rate_limit_reset) == ("429", None), "no lines kept yet"
        assert (second.status, second.retry_after, second.rate_limit_reset) == ("429", None, "12")
        client._headers_until = time.perf_counter()  # the minute has passed
        assert client.send(event("healthy")).status == "200"
        assert client.send(event()).rate_limit_reset is None, "none kept after a healthy minute"
    finally:
        client.close()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def tls_gateway(certificate: Path) -> Iterator[tuple[str, list[list[tuple[str, str]]]]]:
    """An HTTPS pixel.gif on loopback, serving the self-signed certificate."""
    seen: list[list[tuple[str, str]]] = []
    handler = type("Pixel", (_Pixel,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"https://localhost:{server.server_address[1]}/pixel.gif", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_an_unverifiable_certificate_is_refused(
    tls_gateway: tuple[str, list[list[tuple[str, str]]]],
) -> None:
    """Certificates are always verified: a self-signed one is a connection error, and the
    event never reaches the server."""
    url, seen = tls_gateway
    answer = Gateway(settings_for(url), env={}).send(event())
    assert answer.status == "connection_error"
    assert "certificate" in answer.excerpt.lower()
    assert "curl error 60" in answer.excerpt
    assert seen == []


def test_a_ca_bundle_named_in_the_environment_is_trusted(
    tls_gateway: tuple[str, list[list[tuple[str, str]]]], certificate: Path
) -> None:
    """REQUESTS_CA_BUNDLE (honoured by requests, which the worker used before) still names
    the CAs to trust; the call then goes through over TLS."""
    url, seen = tls_gateway
    client = Gateway(settings_for(url), env={"REQUESTS_CA_BUNDLE": str(certificate)})
    assert client.send(event()).status == "200"
    assert len(seen) == 1


# --- proxies, from the environment as requests read them ----------------------------------


@pytest.mark.parametrize(
    ("env", "url", "expected"),
    [
        ({}, "https://sdr.totango.com/pixel.gif", None),
        ({"HTTPS_PROXY": "http://p:3128"}, "https://sdr.totango.com/pixel.gif", "http://p:3128"),
        ({"https_proxy": "http://a:1", "HTTPS_PROXY": "http://b:2"}, "https://x.com/", "http://a:1"),
        ({"HTTP_PROXY": "http://p:3128"}, "https://sdr.totango.com/pixel.gif", None),
        ({"ALL_PROXY": "http://p:3128"}, "https://sdr.totango.com/pixel.gif", "http://p:3128"),
        (
            {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "totango.com"},
            "https://sdr.totango.com/pixel.gif",
            None,
        ),
        ({"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "*"}, "https://x.com/", None),
        ({"HTTP_PROXY": "http://p:3128", "NO_PROXY": "10.0.0.0/8"}, "http://10.1.2.3/", None),
        ({"HTTP_PROXY": "http://p:3128", "NO_PROXY": "10.0.0.0/8"}, "http://11.1.2.3/", "http://p:3128"),
    ],
)  # fmt: skip
def test_the_proxy_is_chosen_as_requests_chose_it(
    env: dict[str, str], url: str, expected: str | None
) -> None:
    assert proxy_for(url, env) == expected


def test_a_call_goes_through_the_proxy_named_in_the_environment(
    emulator: GatewayEmulator,
) -> None:
    """An http:// gateway behind HTTP_PROXY: the proxy (the emulator here) is sent the
    absolute URL and answers for it, with a Proxy-Authorization from the proxy URL."""
    settings = settings_for("http://gateway.invalid/pixel.gif", TOTANGO_ALLOW_INSECURE_GATEWAY="1")
    proxy = f"http://user:p%40ss@127.0.0.1:{emulator.port}"
    client = Gateway(settings, env={"HTTP_PROXY": proxy})
    assert client.send(event()).status == "200"
    [call] = emulator.calls()
    assert call.params == event().params
    headers = {k.lower(): v for k, v in call.headers.items()}
    assert headers["proxy-authorization"] == "Basic dXNlcjpwQHNz"  # user:p@ss
    assert headers["user-agent"] == USER_AGENT


def test_a_proxy_the_gateway_cannot_use_stops_the_worker_at_start() -> None:
    """A SOCKS proxy (the worker takes HTTP proxies only, as requests did without its socks
    extra) is a bad setting named by its variable when the worker starts, instead of a
    failure on every event."""
    settings = settings_for("https://sdr.totango.com/pixel.gif")
    with pytest.raises(ConfigError) as caught:
        check_gateway(settings, {"HTTPS_PROXY": "socks5://127.0.0.1:1080"})
    assert caught.value.variable == "HTTPS_PROXY"
    assert "socks5" in caught.value.reason
    check_gateway(settings, {"HTTPS_PROXY": "http://127.0.0.1:3128"})  # an HTTP proxy is fine


def test_a_ca_bundle_that_cannot_be_loaded_stops_the_worker_at_start(tmp_path: Path) -> None:
    """A CA bundle named in the environment that is missing, or is not PEM, is a bad
    setting named by its variable."""
    settings = settings_for("https://sdr.totango.com/pixel.gif")
    not_pem = tmp_path / "bundle.pem"
    not_pem.write_text("not a certificate\n")
    for bundle in (str(tmp_path / "missing.pem"), str(not_pem)):
        with pytest.raises(ConfigError) as caught:
            check_gateway(settings, {"REQUESTS_CA_BUNDLE": bundle})
        assert caught.value.variable == "REQUESTS_CA_BUNDLE"
        assert "cannot be loaded" in caught.value.reason


# --- the gateway URL's own query, its path ------------------------------------------------


def test_a_get_merges_the_urls_own_query_with_the_event(emulator: GatewayEmulator) -> None:
    """``pixel.gif?api-token=...``: the GET sends the URL's query, then ``&`` and the event,
    so every parameter arrives (before, ``?sdr_s=`` was glued onto the token's value and the
    event was lost behind a 200)."""
    settings = settings_for(f"{emulator.url}/pixel.gif?api-token=a%26b")
    sent = event()
    assert Gateway(settings, env={}).send(sent).status == "200"
    [call] = emulator.calls()
    assert call.params == (("api-token", "a&b"), *sent.params)
    assert call.target.startswith("/pixel.gif?api-token=a%26b&sdr_s=")


def test_a_post_keeps_the_urls_own_query_in_the_url_and_the_event_in_the_body(
    emulator: GatewayEmulator,
) -> None:
    """A POST is sent to the URL as configured, query included; its form body is the event
    alone."""
    settings = settings_for(f"{emulator.url}/pixel.gif?api-token=t", TOTANGO_HTTP_METHOD="POST")
    sent = event()
    assert Gateway(settings, env={}).send(sent).method == "POST"
    [call] = emulator.calls()
    assert call.target == "/pixel.gif?api-token=t"
    assert call.params == (("api-token", "t"), *sent.params)


def test_a_trailing_slash_gateway_url_is_sent_as_pixel_gif(emulator: GatewayEmulator) -> None:
    """Totango's ``pixel.gif/`` form is accepted in the setting; the call goes to
    ``pixel.gif``."""
    Gateway(settings_for(f"{emulator.url}/pixel.gif/"), env={}).send(event())
    [call] = emulator.calls()
    assert call.target.startswith("/pixel.gif?sdr_s=")


# --- a 200 that is not the GIF; 414 -----------------------------------------------------------


def test_a_200_whose_body_is_not_the_gif_is_a_delivery_marked_unexpected(
    emulator: GatewayEmulator, client: Gateway
) -> None:
    """A proxy's HTML page with a 200 is still "200" (Totango's rule), marked as an
    unexpected body with an excerpt of it; the GIF is not marked."""
    emulator.add_rule(None, ["not_gif"])
    answer = client.send(event())
    assert (answer.status, answer.unexpected_body) == ("200", True)
    assert "inspected" in answer.excerpt
    again = client.send(event())
    assert (again.status, again.unexpected_body, again.excerpt) == ("200", False, "")


def test_a_414_to_a_get_is_sent_again_as_a_post_in_the_same_attempt() -> None:
    """A GET answered 414 URI Too Long (a limit shorter than TOTANGO_MAX_URL_LENGTH on the
    way) is sent once more as a form POST at once; the answer is the POST's, and it keeps
    the 414 it followed."""
    with GatewayEmulator(max_url_length=300) as emu:
        sent = event(user_attributes={"bio": "x" * 300})
        answer = Gateway(settings_for(f"{emu.url}/pixel.gif"), env={}).send(sent)
        assert (answer.status, answer.method) == ("200", "POST")
        assert answer.first is not None
        assert (answer.first.status, answer.first.method) == ("414", "GET")
        get, post = emu.calls()
        assert (get.method, get.status, post.method, post.status) == ("GET", 414, "POST", 200)
        assert post.params == sent.params


def test_a_414_to_the_post_too_is_the_answer(emulator: GatewayEmulator, client: Gateway) -> None:
    """The fallback is made once: a POST answered 414 as well is returned as a 414 (and
    retried later like any non-200), never a loop."""
    emulator.add_rule(None, [414, 414])
    answer = client.send(event())
    assert (answer.status, answer.method) == ("414", "POST")
    assert [(c.method, c.status) for c in emulator.calls()] == [("GET", 414), ("POST", 414)]


# --- several services: one gateway each --------------------------------------------------------


def test_gateways_sends_each_event_to_its_services_gateway() -> None:
    """With TOTANGO_SERVICE_MAP, each event goes to its service's gateway (one pool per URL);
    without it, everything goes to TOTANGO_GATEWAY_URL."""
    with GatewayEmulator() as us, GatewayEmulator() as eu:
        settings = Settings.from_env(
            {
                "TOTANGO_SERVICE_ID": "SP-1-2",
                "TOTANGO_SERVICE_MAP": f"SP-1-2={us.url}/pixel.gif,SP-3-4={eu.url}/pixel.gif",
            }
        )
        gateways = Gateways(settings, env={})
        try:
            assert len(gateways.by_url) == 2
            to_us = event(service_id="SP-1-2")
            to_eu = event(service_id="SP-3-4")
            assert gateways.send(to_us).status == "200"
            assert gateways.send(to_eu).status == "200"
        finally:
            gateways.close()
        assert [c.params for c in us.calls()] == [to_us.params]
        assert [c.params for c in eu.calls()] == [to_eu.params]


def test_check_gateway_builds_every_mapped_gateway(tmp_path: Path) -> None:
    """A CA bundle that cannot be loaded stops the worker at start with a service map too."""
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    settings = Settings.from_env(
        {"TOTANGO_SERVICE_MAP": "SP-1-2=us,SP-3-4=eu", "TOTANGO_SERVICE_ID": "SP-1-2"}
    )
    with pytest.raises(ConfigError) as info:
        check_gateway(settings, env={"REQUESTS_CA_BUNDLE": str(bad)})
    assert info.value.variable == "REQUESTS_CA_BUNDLE"


def test_at_debug_no_log_line_carries_the_query_string(
    client: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """With the worker's logging at DEBUG (TOTANGO_LOG_LEVEL=DEBUG), no line of a call
    carries the query, which holds the user's e-mail address; urllib3, whose pool logs each
    request line at DEBUG (sentry-sdk's transport uses it), stays at WARNING."""
    root, pool = logging.getLogger(), logging.getLogger("urllib3")
    touched = [root, pool, *map(logging.getLogger, CELERY_PER_TASK_LOGGERS)]
    levels = [logger.level for logger in touched]
    try:
        configure_logging("DEBUG")
        with caplog.at_level(logging.DEBUG):
            assert client.send(event()).status == "200"
        leaked = [r.getMessage() for r in caplog.records if "jane" in r.getMessage()]
        assert leaked == []
        assert not pool.isEnabledFor(logging.DEBUG)
        assert pool.isEnabledFor(logging.WARNING)
    finally:
        for logger, level in zip(touched, levels, strict=True):
            logger.setLevel(level)
