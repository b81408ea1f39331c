"""The only module that imports urllib3: one connection pool per process to the gateway's
host, TLS 1.2 or newer with verified certificates, no redirects, no retries, explicit
timeouts, and an answer reduced to a status string.
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


# --- pure decisions -----------------------------------------------------------------------


def pool_size(concurrency: int, batch_senders: int) -> int:
    """Connections one process can have in flight at once: one per Celery pool slot for
    single-event tasks, plus one per batch sender (``batch.new_executor`` has
    ``batch_senders`` threads). Sized to that bound, the pool never has to open a connection
    it cannot keep, so none is closed after one call (urllib3's "pool is full, discarding
    connection") and no call waits for a free one."""
    return max(1, concurrency) + max(1, batch_senders)


def method_for(settings: Settings, query: str) -> str:
    """GET by default; POST when set, or when the URL would be too long."""
    if settings.http_method == "POST":
        return "POST"
    if len(settings.gateway_url) + 1 + len(query) > settings.max_url_length:
        return "POST"
    return "GET"


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
    """Sends events to the collection gateway over one urllib3 connection pool."""

    def __init__(
        self, settings: Settings, size: int | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        self.settings = settings
        env = os.environ if env is None else env
        url = settings.gateway_url
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
        method = method_for(self.settings, query)
        started = time.perf_counter()
        try:
            if method == "GET":
                response = self._urlopen(
                    "GET",
                    f"{self.target}?{query}",
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
        excerpt = "" if status == "200" else _excerpt(response.data.decode("utf-8", "replace"))
        return Answer(status, response.headers.get("Retry-After"), excerpt, _since(started), method)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if self._manager is not None:
            self._manager.clear()


def _since(started: float) -> float:
    return time.perf_counter() - started


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    return text[:EXCERPT_LENGTH]


def check_gateway(settings: Settings, env: Mapping[str, str] | None = None) -> None:
    """Build the gateway once when the worker starts, so that a proxy or a CA bundle it
    cannot use stops the worker there (:class:`ConfigError`), not each event later."""
    env = os.environ if env is None else env
    proxy = _proxy_setting(settings.gateway_url, env)
    if proxy is not None:
        variable, url = proxy
        scheme = urlsplit(url).scheme
        if scheme not in {"http", "https"}:
            raise ConfigError(variable, f"must be an http:// or https:// proxy; got {scheme!r}")
    try:
        Gateway(settings, env=env).close()
    except OSError as exc:  # ssl.SSLError too: a CA bundle that cannot be read or parsed
        variable = _ca_bundle_variable(env) or "the CA bundle"
        raise ConfigError(variable, f"cannot be loaded ({exc})") from None
