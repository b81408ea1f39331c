"""The only module that imports requests: one pooled session per process, TLS 1.2 or newer,
no redirects, explicit timeouts, and an answer reduced to a status string.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from worker import __version__
from worker.events import Event, encode
from worker.settings import Settings

USER_AGENT = f"totango-worker/{__version__} (+https://pypi.org/project/totango-worker/)"
EXCERPT_LENGTH = 200


@dataclass(frozen=True)
class Answer:
    """What one call came to: ``"200"``, another status, ``"timeout"`` or ``"connection_error"``."""

    status: str
    retry_after: str | None
    excerpt: str
    elapsed: float
    method: str


class TLS12Adapter(HTTPAdapter):
    """An adapter whose SSL context refuses anything older than TLS 1.2 and always verifies."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        context = ssl.create_default_context()
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        kwargs["ssl_context"] = context
        super().init_poolmanager(*args, **kwargs)


class Gateway:
    """Sends events to the collection gateway over one pooled ``requests.Session``."""

    def __init__(self, settings: Settings, pool_size: int | None = None) -> None:
        self.settings = settings
        size = pool_size or settings.concurrency
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT
        adapter = TLS12Adapter(pool_connections=4, pool_maxsize=size, max_retries=0)
        self.session.mount("https://", adapter)
        self.session.mount("http://", HTTPAdapter(pool_connections=4, pool_maxsize=size))
        self.timeout = (settings.connect_timeout, settings.read_timeout)

    def method_for(self, query: str) -> str:
        """GET by default; POST when set, or when the URL would be too long."""
        if self.settings.http_method == "POST":
            return "POST"
        if len(self.settings.gateway_url) + 1 + len(query) > self.settings.max_url_length:
            return "POST"
        return "GET"

    def send(self, event: Event) -> Answer:
        query = encode(event.params)
        method = self.method_for(query)
        started = time.perf_counter()
        try:
            if method == "GET":
                response = self.session.get(
                    f"{self.settings.gateway_url}?{query}",
                    timeout=self.timeout,
                    allow_redirects=False,
                    verify=True,
                )
            else:
                response = self.session.post(
                    self.settings.gateway_url,
                    data=query.encode("ascii"),
                    headers={"Content-Type": "application/x-www-form-urlencoded"},
                    timeout=self.timeout,
                    allow_redirects=False,
                    verify=True,
                )
        except requests.Timeout as exc:
            return Answer("timeout", None, _excerpt(str(exc)), _since(started), method)
        except requests.RequestException as exc:
            return Answer("connection_error", None, _excerpt(str(exc)), _since(started), method)
        with response:
            status = str(response.status_code)
            excerpt = "" if status == "200" else _excerpt(response.text)
            return Answer(
                status, response.headers.get("Retry-After"), excerpt, _since(started), method
            )

    def close(self) -> None:
        self.session.close()


def _since(started: float) -> float:
    return time.perf_counter() - started


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    return text[:EXCERPT_LENGTH]


_local_lock = threading.Lock()
_gateway: Gateway | None = None
_gateway_pid = 0


def process_gateway(settings: Settings) -> Gateway:
    """The gateway of this process, created after a fork so no pool is shared across it."""
    global _gateway, _gateway_pid  # noqa: PLW0603  one session per process is the point
    with _local_lock:
        if _gateway is None or _gateway_pid != os.getpid():
            _gateway = Gateway(settings)
            _gateway_pid = os.getpid()
        return _gateway


def reset_process_gateway() -> None:
    """Drop the session after a fork, so that the child makes its own."""
    global _gateway  # noqa: PLW0603  one session per process is the point
    with _local_lock:
        _gateway = None
