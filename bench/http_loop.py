"""Floor (d): a bare HTTP loop, the floor of one gateway call for a process like the worker.

``python -m bench.http_loop --url URL --calls N --threads T --tag TAG``: T threads share one
urllib3 keep-alive connection pool of T connections to the gateway emulator and make N GET
calls between them, each with an event's parameters in the query string, as the worker
sends it (no retries, no redirects, explicit timeouts, the body read). No broker, no queue,
no Celery. Exits 0 once every call had its answer, 1 if any answer was not a 200.
"""

from __future__ import annotations

import argparse
import sys
import threading
from urllib.parse import urlencode, urlsplit

import urllib3

from bench.load import SERVICE_ID, event_kwargs


def params(tag: str, index: int) -> dict[str, str]:
    """What the worker sends for ``event_kwargs(tag, index)``."""
    kwargs = event_kwargs(tag, index)
    out = {
        "sdr_s": SERVICE_ID,
        "sdr_o": kwargs["account_id"],
        "sdr_u": kwargs["user_id"],
        "sdr_a": kwargs["activity"],
        "sdr_m": kwargs["module"],
    }
    for name, value in kwargs["user_attributes"].items():
        out[f"sdr_u.{name}"] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http_loop")
    parser.add_argument("--url", required=True)
    parser.add_argument("--calls", type=int, required=True)
    parser.add_argument("--threads", type=int, default=128)
    parser.add_argument("--tag", required=True)
    args = parser.parse_args(argv)
    calls = min(max(1, args.calls), 100_000)
    threads = min(max(1, args.threads), 1024)
    parts = urlsplit(args.url)
    timeout = urllib3.Timeout(connect=3.05, read=10.0)
    pool = urllib3.connection_from_url(
        args.url,
        maxsize=threads,
        block=False,
        headers={"User-Agent": "bench-http-loop", "Accept": "*/*"},
        timeout=timeout,
        retries=False,
    )
    # Every query string is built before the first call: the loop measures HTTP alone.
    path = parts.path or "/"
    targets = [f"{path}?{urlencode(params(args.tag, i))}" for i in range(calls)]
    todo = iter(targets)
    lock = threading.Lock()
    failed: list[str] = []

    def run() -> None:
        while True:
            with lock:
                target = next(todo, None)
            if target is None:
                return
            try:
                response = pool.urlopen(
                    "GET", target, redirect=False, retries=False, timeout=timeout
                )
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                failed.append(repr(exc))
                continue
            if response.status != 200:
                failed.append(str(response.status))

    workers = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    pool.close()
    if failed:
        print(f"{len(failed)} of {calls} calls failed, first: {failed[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
