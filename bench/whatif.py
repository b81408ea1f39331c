"""What-if for ``bench/run.py --sweep ... --conf bench_whatif='"urllib3"'``: the worker with
its gateway calls made by urllib3 directly instead of requests (same timeouts, TLS >= 1.2,
no redirects, no retries), to measure what ``worker/gateway.py`` would gain. Not used by the
default ``make bench`` run."""

from __future__ import annotations

import ssl
import time

import urllib3

from worker import gateway
from worker.events import Event, encode
from worker.settings import Settings


class Urllib3Gateway(gateway.Gateway):
    def __init__(self, settings: Settings, pool_size: int | None = None) -> None:
        super().__init__(settings, pool_size)
        context = ssl.create_default_context()
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.pool = urllib3.PoolManager(
            num_pools=4,
            maxsize=pool_size or settings.concurrency,
            ssl_context=context,
            headers={"User-Agent": gateway.USER_AGENT},
            retries=False,
            timeout=urllib3.Timeout(connect=settings.connect_timeout, read=settings.read_timeout),
        )

    def send(self, event: Event) -> gateway.Answer:
        query = encode(event.params)
        method = self.method_for(query)
        url = self.settings.gateway_url
        started = time.perf_counter()
        try:
            if method == "GET":
                answer = self.pool.request("GET", f"{url}?{query}", redirect=False)
            else:
                answer = self.pool.request(
                    "POST",
                    url,
                    body=query.encode("ascii"),
                    headers={"Content-Type": "application/x-www-form-urlencoded"},
                    redirect=False,
                )
        except urllib3.exceptions.TimeoutError as exc:
            return gateway.Answer("timeout", None, str(exc)[:200], _since(started), method)
        except urllib3.exceptions.HTTPError as exc:
            return gateway.Answer("connection_error", None, str(exc)[:200], _since(started), method)
        status = str(answer.status)
        excerpt = "" if status == "200" else answer.data.decode("utf-8", "replace")[:200]
        retry_after = answer.headers.get("Retry-After")
        return gateway.Answer(status, retry_after, excerpt, _since(started), method)


def _since(started: float) -> float:
    return time.perf_counter() - started


def install() -> None:
    # process_gateway() builds whatever class the module's name Gateway holds.
    setattr(gateway, "Gateway", Urllib3Gateway)  # noqa: B010  a what-if, not a pattern
