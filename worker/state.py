"""The state store: a Redis that remembers which event ids the gateway answered 200 for,
so that another copy of a delivered event is acknowledged without a call.

Every operation **fails open**: when the store cannot be reached, the answer is "not known
to be delivered" and the event is sent as it would be without a store. A possible duplicate
is better than a loss. Each failure is counted (``totango_state_errors_total``) and logged,
at most once per ``LOG_EVERY`` seconds; after one, the process leaves the store alone for
``RETRY_AFTER`` seconds, so that a store that hangs costs one timeout, not one per event.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

import redis

from worker import metrics
from worker.settings import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "totango-worker:delivered:"
#: Seconds a call to the store may take. Short: the store is a shortcut, not the path, and
#: every event waits for it.
SOCKET_TIMEOUT = 0.5
#: After a failure, the store is not asked again for this long (per process).
RETRY_AFTER = 1.0
#: A failing store is logged at most this often (per process), with the count since.
LOG_EVERY = 30.0
#: Ids read or written per round trip (the batch path sends at most 100; a replay, more).
CHUNK = 1000


def delivered_key(event_id: str) -> str:
    return f"{KEY_PREFIX}{event_id}"


def redacted(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()


class StateStore:
    """One Redis client (a thread-safe pool) for this process's records of delivered ids."""

    def __init__(self, url: str, ttl: float) -> None:
        self.url = url
        self.ttl = max(1, int(ttl))
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
            retry_on_timeout=False,
        )
        self._lock = threading.Lock()
        self._skip_until = 0.0
        self._errors_since_log = 0
        self._logged_at = 0.0

    @classmethod
    def for_settings(cls, settings: Settings) -> StateStore:
        url = settings.state_store_url
        if url is None:
            raise ValueError(
                "no state store: TOTANGO_STATE_URL is unset and the broker is not Redis"
            )
        return cls(url, settings.dedup_ttl)

    def delivered(self, event_ids: Sequence[str]) -> set[str] | None:
        """The ids among these that were delivered; ``None`` if the store cannot tell
        (unreachable): then nothing is known, and every one is to be sent."""
        if not event_ids:
            return set()
        if self._skipping():
            metrics.record_state_error("check", len(event_ids))
            return None
        found: set[str] = set()
        try:
            if len(event_ids) == 1:  # a single event: GET costs less than MGET
                return set(event_ids) if self._client.get(delivered_key(event_ids[0])) else set()
            for start in range(0, len(event_ids), CHUNK):
                chunk = event_ids[start : start + CHUNK]
                values = self._client.mget([delivered_key(e) for e in chunk])  # one round trip
                found.update(e for e, v in zip(chunk, values, strict=True) if v is not None)
        except redis.RedisError as exc:
            self._failed("check", len(event_ids), exc)
            return None
        return found

    def record(self, event_ids: Sequence[str]) -> bool:
        """Remember these ids as delivered, for ``ttl`` seconds; ``False`` if the store
        could not be reached (the ids stay unrecorded, and a copy would be sent again)."""
        if not event_ids:
            return True
        if self._skipping():
            metrics.record_state_error("record", len(event_ids))
            return False
        stamp = f"{time.time():.3f}"
        try:
            if len(event_ids) == 1:  # a single event: no pipeline object to build
                self._client.set(delivered_key(event_ids[0]), stamp, ex=self.ttl)
                return True
            for start in range(0, len(event_ids), CHUNK):
                pipe = self._client.pipeline(transaction=False)  # one round trip, no MULTI
                for event_id in event_ids[start : start + CHUNK]:
                    pipe.set(delivered_key(event_id), stamp, ex=self.ttl)
                pipe.execute()
        except redis.RedisError as exc:
            self._failed("record", len(event_ids), exc)
            return False
        return True

    def ping(self) -> bool:
        """Whether the store answers now (for the start-up log line)."""
        try:
            return bool(self._client.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        self._client.close()

    def _skipping(self) -> bool:
        return time.monotonic() < self._skip_until

    def _failed(self, op: str, events: int, exc: Exception) -> None:
        metrics.record_state_error(op, events)
        now = time.monotonic()
        with self._lock:
            self._skip_until = now + RETRY_AFTER
            self._errors_since_log += 1
            if now - self._logged_at < LOG_EVERY:
                return
            errors, self._errors_since_log, self._logged_at = self._errors_since_log, 0, now
        log.warning(
            "state store unreachable (%s: %s); events are sent unchecked, duplicates possible "
            "(%d failed round trips since the last warning)",
            op,
            exc,
            errors,
        )
