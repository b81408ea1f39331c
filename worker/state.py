"""The state store: a Redis that remembers which event ids the gateway answered 200 for,
so that another copy of a delivered event is acknowledged without a call, and, per
attribute, the newest ``occurred_at`` sent and its value (``worker.newest``).

Every operation **fails open**: when the store cannot be reached, the answer is "not known
to be delivered" and the event is sent as it would be without a store. A possible duplicate
is better than a loss. Each failure is counted (``totango_state_errors_total``) and logged,
at most once per ``LOG_EVERY`` seconds; after one, the process leaves the store alone for
``RETRY_AFTER`` seconds, so that a store that hangs costs one timeout, not one per event.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis

from worker import metrics, observability
from worker.newest import Claim, Entity
from worker.settings import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "totango-worker:delivered:"
#: A hash per account (or user of an account): attribute parameter -> ``<ms>:<value>``.
NEWEST_PREFIX = "totango-worker:newest:"
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


def newest_key(entity: Entity) -> str:
    return f"{NEWEST_PREFIX}{entity.key}"


#: Before the calls, in one round trip: which ids were delivered, and each claim's verdict.
#: KEYS: the delivered keys of the ids, then the entities' hashes. ARGV: ttl, number of ids,
#: then per claim: its id's position (0: not checked), its hash's position, the parameter,
#: the time (ms) and the value. A claim is superseded when the stored time is newer, or the
#: same with another value (the first claim of a time wins); else it is stored. A claim of
#: an event already delivered is not looked at (the event is not sent).
CHECK_SCRIPT = """
local ttl = tonumber(ARGV[1])
local ids = tonumber(ARGV[2])
local delivered = {}
for i = 1, ids do delivered[i] = redis.call('EXISTS', KEYS[i]) end
local superseded = {}
local touched = {}
local n = 0
for j = 3, #ARGV, 5 do
  n = n + 1
  local id = tonumber(ARGV[j])
  if id == 0 or delivered[id] == 0 then
    local key = KEYS[tonumber(ARGV[j + 1])]
    local field, at, value = ARGV[j + 2], tonumber(ARGV[j + 3]), ARGV[j + 4]
    local entry = redis.call('HGET', key, field)
    local newer = false
    if entry then
      local sep = string.find(entry, ':', 1, true)
      local stored = tonumber(string.sub(entry, 1, sep - 1))
      newer = stored > at or (stored == at and string.sub(entry, sep + 1) ~= value)
    end
    if newer then
      superseded[#superseded + 1] = n
    else
      redis.call('HSET', key, field, ARGV[j + 3] .. ':' .. value)
      touched[key] = true
    end
  end
end
for key in pairs(touched) do redis.call('EXPIRE', key, ttl) end
return {delivered, superseded}
"""

#: After the calls, in one round trip: record the delivered ids, and return every claim that
#: a newer one replaced meanwhile. KEYS: the delivered keys to set, then the hashes. ARGV:
#: ttl, stamp, number of delivered keys, then per claim: its hash's position, the parameter,
#: the time and the value. Returned flat: hash position, parameter, stored time, value.
FINISH_SCRIPT = """
local ttl = tonumber(ARGV[1])
local recorded = tonumber(ARGV[3])
for i = 1, recorded do redis.call('SET', KEYS[i], ARGV[2], 'EX', ttl) end
local newer = {}
for j = 4, #ARGV, 4 do
  local entry = redis.call('HGET', KEYS[tonumber(ARGV[j])], ARGV[j + 1])
  if entry and entry ~= ARGV[j + 2] .. ':' .. ARGV[j + 3] then
    local sep = string.find(entry, ':', 1, true)
    if tonumber(string.sub(entry, 1, sep - 1)) >= tonumber(ARGV[j + 2]) then
      newer[#newer + 1] = ARGV[j]
      newer[#newer + 1] = ARGV[j + 1]
      newer[#newer + 1] = string.sub(entry, 1, sep - 1)
      newer[#newer + 1] = string.sub(entry, sep + 1)
    end
  end
end
return newer
"""


@dataclass(frozen=True)
class Checked:
    """What the store said before the calls."""

    #: Ids the gateway already answered 200 for.
    delivered: set[str]
    #: Positions (in the claims given) of the claims a newer value supersedes.
    superseded: set[int]


def redacted(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()


#: The longest a caller waits for its commands' answer: the flusher's own socket timeout
#: bounds a round trip, this bounds a wait behind a slow one.
WAIT_TIMEOUT = 4 * SOCKET_TIMEOUT

Queueing = Callable[["redis.client.Pipeline"], object]


class _Request:
    """Commands for one round trip, and what came back. A caller that waits holds
    ``finished`` until the flusher releases it (a plain lock: the cheapest hand-off between
    two threads, with no Python code in the wait); a request nobody waits for gets
    ``on_error`` instead, called on the flusher's thread if its round trip failed."""

    __slots__ = ("error", "finished", "on_error", "queue", "results")

    def __init__(
        self, queue: Queueing, on_error: Callable[[Exception], None] | None = None
    ) -> None:
        self.queue = queue
        self.on_error = on_error
        self.finished = threading.Lock()
        if on_error is None:
            self.finished.acquire()  # released by ``end``
        self.results: list[Any] = []
        self.error: Exception | None = None

    def end(self, results: list[Any], error: Exception | None) -> None:
        self.results, self.error = results, error
        if self.on_error is None:
            self.finished.release()
        elif error is not None:
            try:
                self.on_error(error)
            except Exception:  # the flusher must outlive a bad callback
                log.exception("reporting a failed state store request")


class Pipeliner:
    """Every thread's store commands, sent together: one flusher thread takes all the
    requests queued since its last round trip and sends them in one pipeline (no MULTI),
    over one connection; each caller waits for its own answers. 128 pool threads each
    making their own round trip cost 3 to 4 times the CPU per event (lock hand-offs, a
    system call each way per event, a connection each) of the same commands sent together
    (measured on the 2-core test machine)."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, queue_commands: Queueing) -> list[Any]:
        """Queue the commands that ``queue_commands`` adds to a pipeline, and return their
        answers once they came back; raises ``redis.RedisError`` if they did not."""
        request = _Request(queue_commands)
        self._start()
        self._requests.put(request)
        if not request.finished.acquire(timeout=WAIT_TIMEOUT):
            raise redis.TimeoutError(f"no answer from the state store in {WAIT_TIMEOUT:g}s")
        if request.error is not None:
            raise request.error
        return request.results

    def post(self, queue_commands: Queueing, on_error: Callable[[Exception], None]) -> None:
        """Queue the commands without waiting for their answers: they go in the next round
        trip, after every request queued before them (so a later ``run`` from any thread
        of this process sees their effect); ``on_error`` is called if they fail."""
        self._start()
        self._requests.put(_Request(queue_commands, on_error))

    def close(self, timeout: float = WAIT_TIMEOUT) -> None:
        """Send what is queued, then stop the flusher; waits up to ``timeout`` for it."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._requests.put(None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._flush_forever, name="totango-state", daemon=True
                )
                self._thread.start()

    def _flush_forever(self) -> None:
        while True:
            first = self._requests.get()
            if first is None:
                return
            batch = [first]
            while True:
                try:
                    more = self._requests.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._flush(batch)
                    return
                batch.append(more)
            self._flush(batch)

    def _flush(self, batch: list[_Request]) -> None:
        pipe = self._client.pipeline(transaction=False)
        spans = []
        queued: list[_Request] = []
        for request in batch:
            before = len(pipe.command_stack)
            try:
                request.queue(pipe)
            except Exception as exc:  # noqa: BLE001  the caller's own mistake, its own error
                request.end([], exc)
                continue
            spans.append((before, len(pipe.command_stack)))
            queued.append(request)
        try:
            answers = pipe.execute(raise_on_error=False) if queued else []
        except Exception as exc:  # noqa: BLE001  every caller of this round trip fails open
            for request in queued:
                request.end([], exc)
            return
        for request, (start, end) in zip(queued, spans, strict=True):
            results = answers[start:end]
            request.end(results, next((r for r in results if isinstance(r, Exception)), None))


class StateStore:
    """This process's client of the state store: one connection, its commands pipelined
    across threads (``Pipeliner``)."""

    def __init__(self, url: str, ttl: float) -> None:
        self.url = url
        self.ttl = max(1, int(ttl))
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
            retry_on_timeout=False,
        )
        self._check = self._client.register_script(CHECK_SCRIPT)
        self._finish = self._client.register_script(FINISH_SCRIPT)
        self._pipeliner = Pipeliner(self._client)
        _open.add(self)
        self._skip_until = 0.0
        self._warning = observability.Throttle(LOG_EVERY)

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
        keys = [delivered_key(e) for e in event_ids]
        try:
            values = self._pipeliner.run(
                lambda pipe: [
                    pipe.mget(keys[start : start + CHUNK]) for start in range(0, len(keys), CHUNK)
                ]
            )
        except redis.RedisError as exc:
            self._failed("check", len(event_ids), exc)
            return None
        flat = [value for chunk in values for value in chunk]
        return {e for e, v in zip(event_ids, flat, strict=True) if v is not None}

    def record(self, event_ids: Sequence[str]) -> bool:
        """Remember these ids as delivered, for ``ttl`` seconds; ``False`` if the store
        could not be reached (the ids stay unrecorded, and a copy would be sent again)."""
        if not event_ids:
            return True
        if self._skipping():
            metrics.record_state_error("record", len(event_ids))
            return False
        try:
            self._pipeliner.run(self._recording(event_ids))
        except redis.RedisError as exc:
            self._failed("record", len(event_ids), exc)
            return False
        return True

    def record_later(self, event_ids: Sequence[str]) -> None:
        """``record`` without waiting for the store's answer: the ids go in the next round
        trip, and a failure is counted and logged from the flusher's thread. The caller's
        message is acknowledged meanwhile; a copy checked by this process later still sees
        them (one connection, in order)."""
        if not event_ids:
            return
        if self._skipping():
            metrics.record_state_error("record", len(event_ids))
            return
        count = len(event_ids)

        def failed(exc: Exception) -> None:
            self._failed("record", count, exc)

        self._pipeliner.post(self._recording(event_ids), failed)

    def _recording(self, event_ids: Sequence[str]) -> Queueing:
        stamp = f"{time.time():.3f}"
        ttl = self.ttl
        return lambda pipe: [pipe.set(delivered_key(e), stamp, ex=ttl) for e in event_ids]

    def check(
        self, event_ids: Sequence[str], claims: Sequence[tuple[str, Claim]], *, dedup: bool = True
    ) -> Checked | None:
        """One round trip before the calls of these events: which were delivered (when
        ``dedup``), and which claims (each with its event's id) are superseded; the others
        are stored as the newest. ``None`` when the store cannot be reached: nothing is
        known, everything is sent."""
        if not claims:
            delivered = self.delivered(event_ids) if dedup else set()
            return None if delivered is None else Checked(delivered, set())
        if self._skipping():
            metrics.record_state_error("check", len(event_ids))
            return None
        checked = list(event_ids) if dedup else []
        position = {event_id: n for n, event_id in enumerate(checked, 1)}
        hashes, slots = _hash_slots([claim for _, claim in claims], after=len(checked))
        argv: list[str | int] = [self.ttl, len(checked)]
        for (event_id, claim), slot in zip(claims, slots, strict=True):
            argv += [position.get(event_id, 0), slot, claim.param, claim.at, claim.value]
        keys = [delivered_key(e) for e in checked] + [newest_key(e) for e in hashes]
        try:
            ((flags, superseded),) = self._pipeliner.run(
                lambda pipe: self._check(keys=keys, args=argv, client=pipe)
            )
        except redis.RedisError as exc:
            self._failed("check", len(event_ids), exc)
            return None
        found = {e for e, flag in zip(checked, flags, strict=True) if flag}
        return Checked(found, {int(n) - 1 for n in superseded})

    def finish(self, delivered: Sequence[str], claims: Sequence[Claim]) -> list[Claim] | None:
        """One round trip after the calls: record ``delivered`` and return the claims
        that replaced any of ``claims`` while their calls were in flight. ``None`` when
        the store cannot be reached (the ids stay unrecorded; nothing is repaired).
        Without claims there is nothing to wait for: the ids are recorded without waiting
        (``record_later``), and the answer is ``[]``."""
        if not claims:
            self.record_later(delivered)
            return []
        if self._skipping():
            metrics.record_state_error("record", len(delivered) or 1)
            return None
        hashes, slots = _hash_slots(claims, after=len(delivered))
        argv: list[str | int] = [self.ttl, f"{time.time():.3f}", len(delivered)]
        for claim, slot in zip(claims, slots, strict=True):
            argv += [slot, claim.param, claim.at, claim.value]
        keys = [delivered_key(e) for e in delivered] + [newest_key(e) for e in hashes]
        try:
            (flat,) = self._pipeliner.run(
                lambda pipe: self._finish(keys=keys, args=argv, client=pipe)
            )
        except redis.RedisError as exc:
            self._failed("record", len(delivered) or 1, exc)
            return None
        entities = {slot: entity for entity, slot in hashes.items()}
        return [
            Claim(entities[int(slot)], _text(param), _text(value), int(at))
            for slot, param, at, value in zip(*[iter(flat)] * 4, strict=True)
        ]

    def ping(self) -> bool:
        """Whether the store answers now (for the start-up log line)."""
        try:
            return bool(self._client.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        """Send what is queued (``record_later``), then close the connection."""
        self._pipeliner.close()
        self._client.close()
        _open.discard(self)

    def _skipping(self) -> bool:
        return time.monotonic() < self._skip_until

    def _failed(self, op: str, events: int, exc: Exception) -> None:
        metrics.record_state_error(op, events)
        self._skip_until = time.monotonic() + RETRY_AFTER
        passed = self._warning.passes()
        if passed is None:
            return
        log.warning(
            "state store unreachable (%s: %s); events are sent unchecked, duplicates possible "
            "(%d failed round trips since the last warning)",
            op,
            exc,
            passed[0],
        )


#: This process's stores, so that a process that exits cleanly sends what is queued first.
_open: weakref.WeakSet[StateStore] = weakref.WeakSet()


def close_all() -> None:
    """Close every store of this process (the worker's shutdown signals call this)."""
    for store in list(_open):
        store.close()


def _hash_slots(claims: Sequence[Claim], *, after: int) -> tuple[dict[Entity, int], list[int]]:
    """Each entity's position in a script's KEYS (1-based, after the ``after`` delivered
    keys), and each claim's."""
    hashes: dict[Entity, int] = {}
    slots = [hashes.setdefault(c.entity, after + len(hashes) + 1) for c in claims]
    return hashes, slots


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value
