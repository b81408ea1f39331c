"""The only module that imports urllib3: one connection pool per process to each gateway
host, TLS 1.2 or newer with verified certificates, no redirects, no retries, explicit
timeouts, and an answer reduced to a status string. ``Gateways`` routes an event to its
service's gateway when ``TOTANGO_SERVICE_MAP`` is set.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit
from urllib.request import proxy_bypass_environment  # type: ignore[attr-defined]  # untyped

import certifi
import urllib3
from urllib3.exceptions import HTTPError, NewConnectionError, TimeoutError

from worker import __version__
from worker.errors import ConfigError
from worker.events import Event, encode
from worker.settings import Settings

USER_AGENT = f"totango-worker/{__version__} (+https://pypi.org/project/totango-worker/)"
EXCERPT_LENGTH = 200
#: How a GIF starts (GIF87a or GIF89a). A 200 whose body does not is still a delivery by
#: Totango's rule, but it is counted and logged: it is usually a proxy's page, not Totango.
GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
#: Environment variables naming a CA bundle to trust instead of certifi's; requests, which
#: the worker used before, honoured them, so a deployment that sets one keeps working.
CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


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


def pool_size(concurrency: int, batch_senders: int) -> int:
    """Connections one process can have in flight at once: one per Celery pool slot for
    single-event tasks, plus one per batch sender (``batch.new_executor`` has
    ``batch_senders`` threads). Sized to that bound, the pool never has to open a connection
    it cannot keep, so none is closed after one call (urllib3's "pool is full, discarding
    connection") and no call waits for a free one."""
    return max(1, concurrency) + max(1, batch_senders)


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
    """An SSL context that refuses anything older than TLS 1.2 and always verifies."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if os.path.isdir(bundle):
        context.load_verify_locations(capath=bundle)
    else:
        context.load_verify_locations(cafile=bundle)
    return context


class Gateway:
    """Sends events to one collection gateway URL over one urllib3 connection pool.

    The URL's own query (``pixel.gif?api-token=...``) is kept: a GET sends it first and the
    event's parameters after an ``&``; a POST keeps it in the URL and sends the event alone
    as its form body.
    """

    def __init__(
        self,
        settings: Settings,
        size: int | None = None,
        env: Mapping[str, str] | None = None,
        url: str | None = None,
    ) -> None:
        self.settings = settings
        env = os.environ if env is None else env
        url = url or settings.gateway_url
        self.url = url
        #: What joins the event's query to the target of a GET.
        self._joiner = "&" if urlsplit(url).query else "?"
        self.headers = {"User-Agent": USER_AGENT, "Accept": "*/*"}
        self.form_headers = {**self.headers, "Content-Type": "application/x-www-form-urlencoded"}
        self.timeout = urllib3.Timeout(connect=settings.connect_timeout, read=settings.read_timeout)
        pool_kw: dict[str, Any] = {
            "maxsize": size or pool_size(settings.concurrency, settings.batch_senders),
            "block": False,  # never reached: the pool holds every call a process can make
            "headers": self.headers,
            "timeout": self.timeout,
            "retries": False,
        }
        if urlsplit(url).scheme == "https":
            pool_kw["ssl_context"] = tls_context(ca_bundle(env))
            pool_kw["cert_reqs"] = "CERT_REQUIRED"
        proxy = proxy_for(url, env)
        self._manager: urllib3.PoolManager | None = None
        self._pool: urllib3.HTTPConnectionPool | None = None
        self._urlopen: Callable[..., urllib3.BaseHTTPResponse]
        if proxy is None:
            # One host: its pool is asked directly, with only the path and query, which
            # saves PoolManager's per-call URL parsing and pool lookup.
            self._pool = urllib3.connection_from_url(url, **pool_kw)
            parts = urlsplit(url)
            self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            self._urlopen = self._pool.urlopen
        else:
            auth = urlsplit(proxy)
            proxy_headers = None
            if auth.username is not None:
                credentials = f"{unquote(auth.username)}:{unquote(auth.password or '')}"
                proxy_headers = urllib3.make_headers(proxy_basic_auth=credentials)
            self._manager = urllib3.ProxyManager(
                proxy, num_pools=1, proxy_headers=proxy_headers, **pool_kw
            )
            self.target = url
            self._urlopen = self._manager.urlopen

    def send(self, event: Event) -> Answer:
        query = encode(event.params)
        method = method_for(self.settings, query, self.url)
        answer = self._call(method, query)
        if method == "GET" and answer.status == "414":
            # URI Too Long: something on the way takes shorter URLs than
            # TOTANGO_MAX_URL_LENGTH. The same event as a form body, once, in this attempt;
            # retrying the same GET would only be refused again.
            post = self._call("POST", query)
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

    def _call(self, method: str, query: str) -> Answer:
        started = time.perf_counter()
        try:
            if method == "GET":
                response = self._urlopen(
                    "GET",
                    f"{self.target}{self._joiner}{query}",
                    redirect=False,
                    retries=False,
                    timeout=self.timeout,
                )
            else:
                response = self._urlopen(
                    "POST",
                    self.target,
                    body=query.encode("ascii"),
                    headers=self.form_headers,  # replaces the pool's: so it repeats them
                    redirect=False,
                    retries=False,
                    timeout=self.timeout,
                )
        # A refused connection or a failed DNS look-up is a NewConnectionError, which
        # urllib3 derives from ConnectTimeoutError: it is a connection error, not a timeout.
        except NewConnectionError as exc:
            return Answer("connection_error", None, _excerpt(str(exc)), _since(started), method)
        except TimeoutError as exc:  # connect or read timeout, while sending or reading
            return Answer("timeout", None, _excerpt(str(exc)), _since(started), method)
        except (HTTPError, OSError) as exc:  # reset, TLS failure, a malformed answer
            return Answer("connection_error", None, _excerpt(str(exc)), _since(started), method)
        # The body is read already (preload), and the connection back in the pool.
        status = str(response.status)
        body = response.data
        unexpected = status == "200" and not is_gif(body)
        excerpt = "" if status == "200" and not unexpected else _excerpt(_text(body))
        headers = response.headers
        retry_after = headers.get("Retry-After")
        reset = None if status == "200" else headers.get("RateLimit-Reset")
        return Answer(
            status,
            retry_after,
            excerpt,
            _since(started),
            method,
            unexpected,
            rate_limit_reset=reset,
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if self._manager is not None:
            self._manager.clear()


class Gateways:
    """The gateways of this process, one ``Gateway`` (one pool) per URL: every event goes to
    ``TOTANGO_GATEWAY_URL`` (or the region's), or, with ``TOTANGO_SERVICE_MAP``, to its
    service's gateway. Validation has refused an event whose service is not in the map."""

    def __init__(
        self, settings: Settings, size: int | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        self.settings = settings
        self.by_url = {url: Gateway(settings, size, env, url) for url in settings.gateway_urls}

    def for_event(self, event: Event) -> Gateway:
        return self.by_url[self.settings.gateway_for(event.service_id)]

    def send(self, event: Event) -> Answer:
        return self.for_event(event).send(event)

    def close(self) -> None:
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
    """Build the gateway once when the worker starts, so that a proxy or a CA bundle it
    cannot use stops the worker there (:class:`ConfigError`), not each event later."""
    env = os.environ if env is None else env
    for gateway_url in settings.gateway_urls:
        proxy = _proxy_setting(gateway_url, env)
        if proxy is not None:
            variable, url = proxy
            scheme = urlsplit(url).scheme
            if scheme not in {"http", "https"}:
                raise ConfigError(variable, f"must be an http:// or https:// proxy; got {scheme!r}")
    try:
        Gateways(settings, env=env).close()
    except OSError as exc:  # ssl.SSLError too: a CA bundle that cannot be read or parsed
        variable = _ca_bundle_variable(env) or "the CA bundle"
        raise ConfigError(variable, f"cannot be loaded ({exc})") from None
