"""The gateway calls, with libcurl: a handle per call in flight, driven by the process's
engine (``worker.transfers``), kept-alive connections, TLS 1.2 or newer with verified
certificates, no redirects, no retries, explicit timeouts, and an answer reduced to a
status string.
``Gateways`` routes an event to its service's gateway when ``TOTANGO_SERVICE_MAP`` is set.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import os
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import unquote, urlsplit
from urllib.request import proxy_bypass_environment  # type: ignore[attr-defined]  # untyped

import certifi
import pycurl

from worker import __version__
from worker.errors import ConfigError
from worker.events import Event, encode
from worker.settings import Settings
from worker.transfers import Engine, EngineClosedError, Transfer, Vet

USER_AGENT = f"totango-worker/{__version__} (+https://pypi.org/project/totango-worker/)"
EXCERPT_LENGTH = 200
#: How a GIF starts (GIF87a or GIF89a). A 200 whose body does not is still a delivery by
#: Totango's rule, but it is counted and logged: it is usually a proxy's page, not Totango.
GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
#: Environment variables naming a CA bundle to trust instead of certifi's; requests, which
#: the worker used before, honoured them, so a deployment that sets one keeps working.
CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
FORM = "application/x-www-form-urlencoded"
#: For this many seconds after a gateway's last non-200 answer, its handles keep each
#: answer's header lines (for ``RateLimit-Reset``, which libcurl does not parse). Otherwise
#: none are kept: libcurl would call back into Python once per header line, and each call
#: takes the GIL back from the other sending threads.
HEADERS_AFTER_FAILURE = 60.0


@dataclass(frozen=True)
class Answer:
    """What one call came to: ``"200"``, another status, ``"timeout"`` or ``"connection_error"``."""

    status: str
    retry_after: str | None
    excerpt: str
    elapsed: float
    method: str
    #: A 200 whose body is not a GIF (a TLS-inspecting proxy's page, say).
    unexpected_body: bool = False
    #: The GET answered 414 URI Too Long, when this answer is the POST that followed it.
    first: Answer | None = None
    #: ``RateLimit-Reset`` (delta-seconds), read when there is no ``Retry-After``.
    rate_limit_reset: str | None = None


# --- pure decisions -----------------------------------------------------------------------


def method_for(settings: Settings, query: str, url: str | None = None) -> str:
    """GET by default; POST when set, or when the URL (``url``, by default the settings'
    gateway, with the event's query) would be too long."""
    if settings.http_method == "POST":
        return "POST"
    if len(url or settings.gateway_url) + 1 + len(query) > settings.max_url_length:
        return "POST"
    return "GET"


def is_gif(body: bytes) -> bool:
    return body.startswith(GIF_SIGNATURES)


def proxy_for(url: str, env: Mapping[str, str]) -> str | None:
    """The proxy for ``url`` from the standard variables (``HTTPS_PROXY``, ``HTTP_PROXY``,
    ``ALL_PROXY``, the lowercase names winning, and ``NO_PROXY``), as requests chose it."""
    setting = _proxy_setting(url, env)
    return None if setting is None else setting[1]


def _proxy_setting(url: str, env: Mapping[str, str]) -> tuple[str, str] | None:
    """The variable that names the proxy for ``url``, and its value."""
    settings: dict[str, tuple[str, str]] = {}
    for name in sorted(env, key=lambda n: n.islower()):  # lowercase last, so it wins
        if name.lower().endswith("_proxy") and env[name]:
            settings[name.lower().removesuffix("_proxy")] = (name, env[name])
    parts = urlsplit(url)
    host = parts.hostname or ""
    if "no" in settings:
        no_proxy = settings["no"][1]
        if _in_no_proxy_network(host, no_proxy) or _bypass(host, no_proxy):
            return None
    return settings.get(parts.scheme) or settings.get("all")


def _bypass(host: str, no_proxy: str) -> bool:
    # Given the mapping, the standard library reads no environment variable itself.
    return bool(proxy_bypass_environment(host, {"no": no_proxy}))


def _in_no_proxy_network(host: str, no_proxy: str) -> bool:
    """``NO_PROXY=10.0.0.0/8`` style entries, which requests honours for an IP host."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    for entry in no_proxy.replace(" ", "").split(","):
        if "/" in entry:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
    return False


def ca_bundle(env: Mapping[str, str]) -> str:
    """The CA bundle trusted on top of the system's: certifi's, as requests used, unless
    ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE`` names another."""
    name = _ca_bundle_variable(env)
    return env[name] if name else certifi.where()


def _ca_bundle_variable(env: Mapping[str, str]) -> str | None:
    return next((name for name in CA_BUNDLE_VARIABLES if env.get(name)), None)


# --- the HTTP client ----------------------------------------------------------------------


def tls_context(bundle: str) -> ssl.SSLContext:
    """The TLS policy as a standard-library context: TLS 1.2 or newer, always verified, the
    bundle trusted on top of the system's CAs. ``check_gateway`` loads the bundle through it
    when the worker starts, so that one that cannot be read or parsed is a ``ConfigError``
    there; libcurl applies the same policy to every call (``_tls_options``)."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if os.path.isdir(bundle):
        context.load_verify_locations(capath=bundle)
    else:
        context.load_verify_locations(cafile=bundle)
    return context


def _tls_options(bundle: str) -> list[tuple[int, Any]]:
    """libcurl's options for the TLS policy of ``tls_context``: TLS 1.2 or newer, the peer's
    certificate and name verified, ``bundle`` trusted, and the system's CAs besides (a
    directory bundle takes the place of the system's directory, a file that of its file)."""
    system = ssl.get_default_verify_paths()
    options: list[tuple[int, Any]] = [
        (pycurl.SSLVERSION, pycurl.SSLVERSION_TLSv1_2),
        (pycurl.SSL_VERIFYPEER, 1),
        (pycurl.SSL_VERIFYHOST, 2),
    ]
    if os.path.isdir(bundle):
        options.append((pycurl.CAPATH, bundle))
        if system.cafile and os.path.isfile(system.cafile):
            options.append((pycurl.CAINFO, system.cafile))
    else:
        options.append((pycurl.CAINFO, bundle))
        if system.capath and os.path.isdir(system.capath):
            options.append((pycurl.CAPATH, system.capath))
    return options


def _proxy_options(proxy: str | None, tls: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """No proxy at all unless ``proxy_for`` chose one: libcurl would otherwise read the
    proxy variables itself, by rules of its own. The proxy's credentials are taken out of
    its URL and given percent-decoded, as requests sent them."""
    if proxy is None:
        return [(pycurl.PROXY, "")]
    parts = urlsplit(proxy)
    netloc = parts.netloc.rpartition("@")[2]
    options: list[tuple[int, Any]] = [(pycurl.PROXY, parts._replace(netloc=netloc).geturl())]
    if parts.username is not None:
        options.append((pycurl.PROXYUSERNAME, unquote(parts.username)))
        options.append((pycurl.PROXYPASSWORD, unquote(parts.password or "")))
    if parts.scheme == "https":  # TLS to the proxy itself, under the same policy
        proxied = {
            pycurl.SSLVERSION: pycurl.PROXY_SSLVERSION,
            pycurl.SSL_VERIFYPEER: pycurl.PROXY_SSL_VERIFYPEER,
            pycurl.SSL_VERIFYHOST: pycurl.PROXY_SSL_VERIFYHOST,
            pycurl.CAINFO: pycurl.PROXY_CAINFO,
            pycurl.CAPATH: pycurl.PROXY_CAPATH,
        }
        options += [(proxied[option], value) for option, value in tls]
    return options


class Gateway:
    """Sends events to one collection gateway URL with libcurl (pycurl).

    Every call goes through the process's engine (``worker.transfers``): one thread that
    drives all the calls in flight with libcurl's multi interface, parsing the answers in C
    without the GIL. The sending thread prepares an easy handle (from this gateway's pool of
    them, one per call in flight), hands it over and waits once; the connections stay alive
    in the engine's cache between calls, one per call in flight at most.

    The URL's own query (``pixel.gif?api-token=...``) is kept: a GET sends it first and the
    event's parameters after an ``&``; a POST keeps it in the URL and sends the event alone
    as its form body.
    """

    def __init__(
        self,
        settings: Settings,
        env: Mapping[str, str] | None = None,
        url: str | None = None,
        engine: Engine | None = None,
    ) -> None:
        self.settings = settings
        env = os.environ if env is None else env
        url = url or settings.gateway_url
        self.url = url
        #: What joins the event's query to the URL of a GET.
        parts = urlsplit(url)
        self._get_prefix = url + ("&" if parts.query else "?")
        tls = _tls_options(ca_bundle(env)) if parts.scheme == "https" else []
        #: The whole call, connection included: the bound the task's time limit and the
        #: deployments' grace periods are computed from.
        self._timeout = settings.connect_timeout + settings.read_timeout
        self._options: list[tuple[int, Any]] = [
            (pycurl.NOSIGNAL, 1),  # timeouts without SIGALRM: the caller is one of many threads
            (pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS),
            (pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1),
            (pycurl.FOLLOWLOCATION, 0),  # a redirect is an answer, not followed
            (pycurl.USERAGENT, USER_AGENT),
            (pycurl.CONNECTTIMEOUT_MS, round(settings.connect_timeout * 1000)),
            (pycurl.TIMEOUT_MS, round(self._timeout * 1000)),
            *tls,
            *_proxy_options(proxy_for(url, env), tls),
        ]
        self._get_headers = ["Accept: */*"]
        # No "Expect: 100-continue" before a body: one round trip more, for a form Totango
        # always takes.
        self._form_headers = [*self._get_headers, f"Content-Type: {FORM}", "Expect:"]
        self._engine = engine or Engine()
        self._owns_engine = engine is None
        #: Every handle made, and those not in a call (``list`` appends and pops are atomic).
        self._handles: list[_Handle] = []
        self._free: list[_Handle] = []
        self._lock = threading.Lock()
        #: Until when (``time.perf_counter``) the handles keep header lines.
        self._headers_until = 0.0

    def send(self, event: Event) -> Answer:
        return self._call(event)

    def send_vetted(self, event: Event, vet: Vet | None) -> tuple[Answer | None, Any]:
        """The call, after ``vet`` (``worker.transfers``) has seen it with the other calls
        of its round, on the engine's thread: the answer, ``None`` when the vet kept the
        call from being sent, and the vet's note on it."""
        handle = self._take()
        transfer = Transfer(handle.curl, event, vet=vet, prepare=partial(self._prepare, handle))
        started = time.perf_counter()
        self._prepare(handle, event)
        answer = self._run(handle, transfer, started)
        return (None if answer is None else self._answer_of(answer, transfer)), transfer.note

    def _call(self, event: Event, method: str | None = None) -> Answer:
        """An unvetted call, which is always made (``method``: by default ``method_for``)."""
        handle = self._take()
        started = time.perf_counter()
        self._prepare(handle, event, method)
        transfer = Transfer(handle.curl, event)
        answer = self._run(handle, transfer, started)
        if answer is None:  # pragma: no cover - only a vet keeps a call back
            raise RuntimeError("an unvetted call was not sent")
        return self._answer_of(answer, transfer)

    def _answer_of(self, answer: Answer, transfer: Transfer) -> Answer:
        """``answer``, or after a 414 to a GET the POST that follows it."""
        if answer.method == "GET" and answer.status == "414":
            # URI Too Long: something on the way takes shorter URLs than
            # TOTANGO_MAX_URL_LENGTH. The same event as a form body, once, in this attempt;
            # retrying the same GET would only be refused again.
            post = self._call(transfer.event, "POST")
            return Answer(
                post.status,
                post.retry_after,
                post.excerpt,
                answer.elapsed + post.elapsed,
                "POST",
                post.unexpected_body,
                first=answer,
                rate_limit_reset=post.rate_limit_reset,
            )
        return answer

    def _take(self) -> _Handle:
        try:
            return self._free.pop()
        except IndexError:
            handle = _Handle(self._options)
            with self._lock:
                self._handles.append(handle)
            return handle

    def _prepare(self, handle: _Handle, event: Event, method: str | None = None) -> None:
        query = encode(event.params)
        method = method or method_for(self.settings, query, self.url)
        curl = handle.curl
        if method == "GET":
            curl.setopt(pycurl.URL, self._get_prefix + query)
            curl.setopt(pycurl.HTTPGET, 1)
            curl.setopt(pycurl.HTTPHEADER, self._get_headers)
        else:
            curl.setopt(pycurl.URL, self.url)
            curl.setopt(pycurl.POSTFIELDS, query)
            curl.setopt(pycurl.HTTPHEADER, self._form_headers)
        handle.method = method
        handle.prepare(time.perf_counter() < self._headers_until)

    def _run(self, handle: _Handle, transfer: Transfer, started: float) -> Answer | None:
        """Hand the call to the engine; its answer, or ``None`` if the vet kept it back."""
        try:
            self._engine.run(transfer, self._timeout)
        except EngineClosedError as exc:
            self._free.append(handle)
            return Answer("connection_error", None, _excerpt(str(exc)), 0.0, handle.method)
        except TimeoutError as exc:  # the handle stays the engine's: not used again
            return Answer("timeout", None, _excerpt(str(exc)), _since(started), handle.method)
        try:
            return self._read(handle, transfer, started) if transfer.sent else None
        finally:
            self._free.append(handle)

    def _read(self, handle: _Handle, transfer: Transfer, started: float) -> Answer:
        method = handle.method
        if transfer.error is not None:
            code, message = transfer.error
            # 28 is libcurl's timeout, connecting or waiting for the answer; every other
            # failure (refused, reset, a failed DNS look-up or TLS handshake, a malformed
            # answer) is a connection error.
            status = "timeout" if code == pycurl.E_OPERATION_TIMEDOUT else "connection_error"
            excerpt = _excerpt(f"{message} (curl error {code})")
            return Answer(status, None, excerpt, _since(started), method)
        curl = handle.curl
        status = str(curl.getinfo(pycurl.RESPONSE_CODE))
        data = handle.body.getvalue()
        if status == "200":
            if is_gif(data):
                return Answer("200", None, "", _since(started), method)
            return Answer("200", None, _excerpt(_text(data)), _since(started), method, True)
        self._headers_until = time.perf_counter() + HEADERS_AFTER_FAILURE
        # libcurl's own reading of the answer's Retry-After, a delay or a date, in seconds
        # from now; 0 when there is none (or it cannot be read).
        retry_after = curl.getinfo(pycurl.RETRY_AFTER)
        # No lines (so no RateLimit-Reset) unless the handle kept them for this call.
        headers = _last_headers(handle.header_lines)
        return Answer(
            status,
            str(retry_after) if retry_after > 0 else None,
            _excerpt(_text(data)),
            _since(started),
            method,
            rate_limit_reset=headers.get("ratelimit-reset"),
        )

    def close(self) -> None:
        """Stop the engine (when this gateway made it), then close the handles."""
        if self._owns_engine:
            self._engine.close()
        with self._lock:
            handles, self._handles = self._handles, []
        self._free.clear()
        for handle in handles:
            handle.close()


class _Handle:
    """One libcurl handle of a gateway, with the buffers its answers are read into."""

    __slots__ = ("body", "curl", "header_lines", "keeps_headers", "method")

    def __init__(self, options: list[tuple[int, Any]]) -> None:
        self.curl = pycurl.Curl()
        for option, value in options:
            self.curl.setopt(option, value)
        self.body = io.BytesIO()
        self.header_lines: list[bytes] = []
        self.keeps_headers = False
        self.method = "GET"
        self.curl.setopt(pycurl.WRITEDATA, self.body)

    def prepare(self, keep_headers: bool) -> None:
        """Empty the buffers for the next call, and keep its header lines or not."""
        self.body.seek(0)
        self.body.truncate()
        self.header_lines.clear()
        if keep_headers != self.keeps_headers:
            if keep_headers:
                self.curl.setopt(pycurl.HEADERFUNCTION, self.header_lines.append)
            else:
                self.curl.unsetopt(pycurl.HEADERFUNCTION)
            self.keeps_headers = keep_headers

    def close(self) -> None:
        # A handle still in a call cannot be closed: it goes with the process.
        with contextlib.suppress(pycurl.error):
            self.curl.close()


def _last_headers(lines: list[bytes]) -> dict[str, str]:
    """The headers of the last answer among ``lines`` (a proxy's ``CONNECT`` answer or an
    interim ``100`` come first), by lowercase name."""
    headers: dict[str, str] = {}
    for raw in lines:
        line = raw.decode("latin-1")
        if line.startswith("HTTP/"):
            headers = {}
            continue
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return headers


class Gateways:
    """The gateways of this process, one ``Gateway`` per URL: every event goes to
    ``TOTANGO_GATEWAY_URL`` (or the region's), or, with ``TOTANGO_SERVICE_MAP``, to its
    service's gateway. Validation has refused an event whose service is not in the map."""

    def __init__(self, settings: Settings, env: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        #: One engine, one thread, for the calls to every gateway.
        self.engine = Engine()
        self.by_url = {
            url: Gateway(settings, env, url, self.engine) for url in settings.gateway_urls
        }

    def for_event(self, event: Event) -> Gateway:
        return self.by_url[self.settings.gateway_for(event.service_id)]

    def send(self, event: Event) -> Answer:
        return self.for_event(event).send(event)

    def close(self) -> None:
        self.engine.close()
        for gateway in self.by_url.values():
            gateway.close()


def _text(body: bytes) -> str:
    return body.decode("utf-8", "replace")


def _since(started: float) -> float:
    return time.perf_counter() - started


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    return text[:EXCERPT_LENGTH]


def check_gateway(settings: Settings, env: Mapping[str, str] | None = None) -> None:
    """Check the gateways' settings once when the worker starts, so that a proxy or a CA
    bundle they cannot use stops the worker there (:class:`ConfigError`), not each event
    later."""
    env = os.environ if env is None else env
    for gateway_url in settings.gateway_urls:
        proxy = _proxy_setting(gateway_url, env)
        if proxy is not None:
            variable, url = proxy
            scheme = urlsplit(url).scheme
            if scheme not in {"http", "https"}:
                raise ConfigError(variable, f"must be an http:// or https:// proxy; got {scheme!r}")
    if not any(urlsplit(url).scheme == "https" for url in settings.gateway_urls):
        return
    try:
        tls_context(ca_bundle(env))
    except OSError as exc:  # ssl.SSLError too: a CA bundle that cannot be read or parsed
        variable = _ca_bundle_variable(env) or "the CA bundle"
        raise ConfigError(variable, f"cannot be loaded ({exc})") from None
