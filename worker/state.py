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

import hashlib
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
#: the time and the value. Returned flat, per replaced claim: its position among the claims
#: (1-based), the stored time and the stored value.
FINISH_SCRIPT = """
local ttl = tonumber(ARGV[1])
local recorded = tonumber(ARGV[3])
for i = 1, recorded do redis.call('SET', KEYS[i], ARGV[2], 'EX', ttl) end
local newer = {}
local n = 0
for j = 4, #ARGV, 4 do
  n = n + 1
  local entry = redis.call('HGET', KEYS[tonumber(ARGV[j])], ARGV[j + 1])
  if entry and entry ~= ARGV[j + 2] .. ':' .. ARGV[j + 3] then
    local sep = string.find(entry, ':', 1, true)
    if tonumber(string.sub(entry, 1, sep - 1)) >= tonumber(ARGV[j + 2]) then
      newer[#newer + 1] = n
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


@dataclass(frozen=True, eq=False)  # each one its own, hashed by identity
class _Finish:
    """One caller's ``finish_later``: the ids to record, the claims to look at again, and
    who hears of the newer ones."""

    delivered: Sequence[str]
    claims: Sequence[Claim]
    on_newer: Callable[[list[Claim]], object] | None = None

    @property
    def events(self) -> int:
        return len(self.delivered) or 1


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


#: Called on the flusher's thread with a posted request's answers, or the error of its round
#: trip.
Ended = Callable[[list[Any], Exception | None], None]


def _ignore(_results: list[Any], _error: Exception | None) -> None:
    """The end of a request whose caller reads it itself (``Pipeliner.run(here=True)``)."""


class _Request:
    """Commands for one round trip, and what came back. A caller that waits holds
    ``finished`` until the flusher releases it (a plain lock: the cheapest hand-off between
    two threads, with no Python code in the wait); a request nobody waits for has no lock
    and gets ``on_end`` instead, called on the flusher's thread."""

    __slots__ = ("ended", "error", "finished", "on_end", "queue", "results")

    def __init__(
        self,
        queue: Queueing,
        *,
        finished: threading.Lock | None = None,
        on_end: Ended | None = None,
    ) -> None:
        self.queue = queue
        self.finished = finished
        self.on_end = on_end
        self.results: list[Any] = []
        self.error: Exception | None = None
        self.ended = False

    def end(self, results: list[Any], error: Exception | None) -> None:
        self.results, self.error, self.ended = results, error, True
        if self.finished is not None:
            self.finished.release()
            return
        try:
            if self.on_end is not None:
                self.on_end(results, error)
        except Exception:  # the flusher must outlive a bad callback
            log.exception("acting on a state store answer")


#: Put on the flusher's queue when a posted request is waiting for a round trip.
_POSTED = _Request(lambda _pipe: None)
#: A posted request waits at most this long for a round trip that a caller waits for, to go
#: in it; then it goes on its own.
POST_DELAY = 0.02


class Pipeliner:
    """Every thread's store commands, sent together: one flusher thread takes all the
    requests queued since its last round trip and sends them in one pipeline (no MULTI),
    over one connection; each caller waits for its own answers. 128 pool threads each
    making their own round trip cost 3 to 4 times the CPU per event (lock hand-offs, a
    system call each way per event, a connection each) of the same commands sent together
    (measured on the 2-core test machine).

    A request that nobody waits for (``post``: the records after a call) rides with the
    next round trip that a caller waits for (the check before a call), up to
    ``POST_DELAY`` later: one round trip per event, not one before its call and one
    after."""

    def __init__(self, client: redis.Redis, scripts: Sequence[Script] = ()) -> None:
        self._client = client
        #: Loaded before the first round trip, and again when the store answers NOSCRIPT.
        self._scripts = tuple(scripts)
        self._loaded = False
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        #: Posted requests not sent yet, and whether the flusher was told of them.
        self._posted: list[_Request] = []
        self._posted_told = False
        self._posted_lock = threading.Lock()

    def run(self, queue_commands: Queueing, *, here: bool = False) -> list[Any]:
        """Queue the commands that ``queue_commands`` adds to a pipeline, and return their
        answers once they came back; raises ``redis.RedisError`` if they did not.

        ``here``: the round trip is made on the calling thread, with the posted requests
        first, instead of by the flusher. For a thread that asks on behalf of many (the
        gateway engine's vet, ``worker.transfers``), so that it does not hand every round
        to the flusher and back. A posted request the flusher has in flight at that moment
        may reach the store after this one: the check may miss a record made a moment
        before, and a copy be sent (at least once)."""
        if here:
            request = _Request(queue_commands, on_end=_ignore)
            self._flush([*self._take_posted(), request])
            if request.error is not None:
                raise request.error
            return request.results
        finished = threading.Lock()
        finished.acquire()  # released by ``_Request.end``
        request = _Request(queue_commands, finished=finished)
        self._start()
        self._requests.put(request)
        if not finished.acquire(timeout=WAIT_TIMEOUT):
            raise redis.TimeoutError(f"no answer from the state store in {WAIT_TIMEOUT:g}s")
        if request.error is not None:
            raise request.error
        return request.results

    def post(self, queue_commands: Queueing, on_end: Ended, *, ride: bool = True) -> None:
        """Queue the commands without waiting for their answers: they go in the next round
        trip, before the requests of that round trip (so a later ``run`` from any thread
        of this process sees their effect); ``on_end`` gets the answers, or the error.
        ``ride=False``: in a round trip at once, not held for a caller's (``POST_DELAY``)."""
        self._start()
        if not ride:
            self._requests.put(_Request(queue_commands, on_end=on_end))
            return
        with self._posted_lock:
            self._posted.append(_Request(queue_commands, on_end=on_end))
            tell, self._posted_told = not self._posted_told, True
        if tell:
            self._requests.put(_POSTED)

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
            if first is _POSTED:  # only posted requests so far: wait a little for a caller
                try:
                    first = self._requests.get(timeout=POST_DELAY)
                except queue.Empty:
                    first = _POSTED
            batch = [] if first is None or first is _POSTED else [first]
            stop = first is None
            while not stop:
                try:
                    more = self._requests.get_nowait()
                except queue.Empty:
                    break
                stop = more is None
                if more is not None and more is not _POSTED:
                    batch.append(more)
            posted = self._take_posted()
            if posted or batch:
                self._flush(posted + batch)
            if stop:
                return

    def _take_posted(self) -> list[_Request]:
        """The posted requests not sent yet, for the round trip about to be made."""
        with self._posted_lock:
            posted, self._posted, self._posted_told = self._posted, [], False
        return posted

    def _flush(self, batch: list[_Request]) -> None:
        try:
            if not self._loaded:
                # Loaded first, so that a record sent by script reaches the store before a
                # check queued after it in the same round trip. After a restart of the store
                # (its scripts gone), one round trip's checks may miss its records, and a
                # copy be sent: at least once, as while the store is down.
                self._load_scripts()
                self._loaded = True
            answered = self._round_trip(batch)
            unknown = [r for r, results in answered if any(map(_no_script, results))]
            if unknown:  # the store restarted or was flushed: load the scripts, send again
                self._load_scripts()
                again = dict(self._round_trip(unknown))
                answered = [(r, again.get(r, results)) for r, results in answered]
        except Exception as exc:  # noqa: BLE001  every caller of this round trip fails open
            for request in batch:
                if not request.ended:
                    request.end([], exc)
            return
        for request, results in answered:
            if not request.ended:  # not ended by its own mistake when queued again
                request.end(results, next((r for r in results if isinstance(r, Exception)), None))

    def _load_scripts(self) -> None:
        for script in self._scripts:
            self._client.script_load(script.text)

    def _round_trip(self, batch: list[_Request]) -> list[tuple[_Request, list[Any]]]:
        """The batch's commands in one pipeline; a request whose commands cannot be queued
        ends with its own error, and is not in the answer."""
        pipe = self._client.pipeline(transaction=False)
        spans = []
        for request in batch:
            before = len(pipe.command_stack)
            try:
                request.queue(pipe)
            except Exception as exc:  # noqa: BLE001  the caller's own mistake, its own error
                request.end([], exc)
                continue
            spans.append((request, before, len(pipe.command_stack)))
        if not spans:
            return []
        answers = pipe.execute(raise_on_error=False)
        return [(request, answers[start:end]) for request, start, end in spans]


def _no_script(result: object) -> bool:
    return isinstance(result, redis.exceptions.NoScriptError)


class Script:
    """A Lua script sent by its SHA1 alone. redis-py's own ``Script`` in a pipeline first
    asks the store whether the script exists (``SCRIPT EXISTS``), a second round trip on
    every flush; the ``Pipeliner`` loads its scripts only when the store answers that it
    does not know one (``NOSCRIPT``), and sends those requests again."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode("utf-8")).hexdigest()  # noqa: S324  Redis's name

    def queue(
        self, pipe: redis.client.Pipeline, keys: Sequence[str], args: Sequence[str | int]
    ) -> None:
        pipe.evalsha(self.sha, len(keys), *keys, *args)


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
        self._check = Script(CHECK_SCRIPT)
        self._finish = Script(FINISH_SCRIPT)
        self._pipeliner = Pipeliner(self._client, (self._check, self._finish))
        #: The finishes posted for the next round trip, not queued in it yet (``post_finish``).
        self._group: list[_Finish] | None = None
        self._group_lock = threading.Lock()
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

    def delivered(self, event_ids: Sequence[str], *, here: bool = False) -> set[str] | None:
        """The ids among these that were delivered; ``None`` if the store cannot tell
        (unreachable): then nothing is known, and every one is to be sent. ``here``: the
        round trip on this thread (``Pipeliner.run``)."""
        if not event_ids:
            return set()
        if not self._open_for("check", len(event_ids)):
            return None
        keys = [delivered_key(e) for e in event_ids]
        try:
            values = self._pipeliner.run(
                lambda pipe: [
                    pipe.mget(keys[start : start + CHUNK]) for start in range(0, len(keys), CHUNK)
                ],
                here=here,
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
        if not self._open_for("record", len(event_ids)):
            return False
        try:
            self._pipeliner.run(self._recording(event_ids))
        except redis.RedisError as exc:
            self._failed("record", len(event_ids), exc)
            return False
        return True

    def record_later(self, event_ids: Sequence[str], *, ride: bool = True) -> None:
        """``record`` without waiting for the store's answer: the ids go in the next round
        trip, and a failure is counted and logged from the flusher's thread. The caller's
        message is acknowledged meanwhile; a copy checked by this process later still sees
        them (one connection, in order). ``ride=False`` for a batch's events: its message
        is acknowledged only at its end, and a batch cut short sends again every event not
        recorded yet, so the record goes at once instead of waiting for the next check."""
        if not ride:
            if event_ids and self._open_for("record", len(event_ids)):
                self._pipeliner.post(
                    self._recording(event_ids),
                    self._on_failure("record", len(event_ids)),
                    ride=False,
                )
            return
        self._post_finish(_Finish(event_ids, ()))

    def _recording(self, event_ids: Sequence[str]) -> Queueing:
        stamp = f"{time.time():.3f}"
        ttl = self.ttl
        return lambda pipe: [pipe.set(delivered_key(e), stamp, ex=ttl) for e in event_ids]

    def check(
        self,
        event_ids: Sequence[str],
        claims: Sequence[tuple[str, Claim]],
        *,
        dedup: bool = True,
        here: bool = False,
    ) -> Checked | None:
        """One round trip before the calls of these events: which were delivered (when
        ``dedup``), and which claims (each with its event's id) are superseded; the others
        are stored as the newest. ``None`` when the store cannot be reached: nothing is
        known, everything is sent. ``here``: the round trip on this thread
        (``Pipeliner.run``)."""
        if not claims:
            delivered = self.delivered(event_ids, here=here) if dedup else set()
            return None if delivered is None else Checked(delivered, set())
        if not self._open_for("check", len(event_ids)):
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
                lambda pipe: self._check.queue(pipe, keys, argv), here=here
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
        (``record_later``, at once), and the answer is ``[]``."""
        if not claims:
            self.record_later(delivered, ride=False)
            return []
        if not self._open_for("record", len(delivered) or 1):
            return None
        queue_commands, newer = self._finishing(delivered, claims)
        try:
            return [claim for _, claim in newer(self._pipeliner.run(queue_commands))]
        except redis.RedisError as exc:
            self._failed("record", len(delivered) or 1, exc)
            return None

    def finish_later(
        self,
        delivered: Sequence[str],
        claims: Sequence[Claim],
        on_newer: Callable[[list[Claim]], object],
    ) -> None:
        """``finish`` without waiting for the store's answer: ``on_newer`` is called on the
        flusher's thread with the claims that replaced any of ``claims``, if there are any;
        a failure is counted and logged there."""
        self._post_finish(_Finish(delivered, claims, on_newer))

    def _post_finish(self, finish: _Finish) -> None:
        """Post a finish: every finish posted before the next round trip goes in it as one
        script call (one command and one reply for all their events, not one each), at most
        ``CHUNK`` finishes a call."""
        if not (finish.delivered or finish.claims) or not self._open_for("record", finish.events):
            return
        with self._group_lock:
            group = self._group
            if group is not None and len(group) < CHUNK:
                group.append(finish)
                return
            group = self._group = [finish]
        #: The group's commands and how to read their answer, made once when it is first
        #: queued (again, unchanged, if the round trip is sent again after NOSCRIPT).
        commands: Queueing | None = None
        read: Callable[[list[Any]], list[tuple[int, Claim]]] | None = None

        def close() -> list[_Finish]:
            """The group as it stands; later finishes go in a group of their own."""
            with self._group_lock:
                if self._group is group:
                    self._group = None
            return group

        def queue_commands(pipe: redis.client.Pipeline) -> None:
            nonlocal commands, read
            if commands is None:
                finishes = close()
                commands, read = self._finishing(
                    [e for f in finishes for e in f.delivered],
                    [c for f in finishes for c in f.claims],
                )
            commands(pipe)

        def ended(results: list[Any], error: Exception | None) -> None:
            finishes = close()
            if error is not None or read is None:
                self._failed("record", sum(f.events for f in finishes), error or _NOT_QUEUED)
                return
            owners = [f for f in finishes for _ in f.claims]
            replaced: dict[_Finish, list[Claim]] = {}
            for position, claim in read(results):
                replaced.setdefault(owners[position], []).append(claim)
            for f, claims in replaced.items():
                if f.on_newer is not None:
                    f.on_newer(claims)

        self._pipeliner.post(queue_commands, ended)

    def _finishing(
        self, delivered: Sequence[str], claims: Sequence[Claim]
    ) -> tuple[Queueing, Callable[[list[Any]], list[tuple[int, Claim]]]]:
        """The commands of ``finish``, and how to read their answer: each claim a newer one
        replaced, as its position in ``claims`` and the newer claim."""
        hashes, slots = _hash_slots(claims, after=len(delivered))
        argv: list[str | int] = [self.ttl, f"{time.time():.3f}", len(delivered)]
        for claim, slot in zip(claims, slots, strict=True):
            argv += [slot, claim.param, claim.at, claim.value]
        keys = [delivered_key(e) for e in delivered] + [newest_key(e) for e in hashes]

        def newer(results: list[Any]) -> list[tuple[int, Claim]]:
            (flat,) = results
            out = []
            for number, at, value in zip(*[iter(flat)] * 3, strict=True):
                position = int(number) - 1
                old = claims[position]
                out.append((position, Claim(old.entity, old.param, _text(value), int(at))))
            return out

        return (lambda pipe: self._finish.queue(pipe, keys, argv)), newer

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

    def _open_for(self, op: str, events: int) -> bool:
        """Whether to ask the store now; after a failure, for ``RETRY_AFTER``, the answer
        is no, and the events are counted as that op's errors."""
        if time.monotonic() < self._skip_until:
            metrics.record_state_error(op, events)
            return False
        return True

    def _on_failure(self, op: str, count: int) -> Ended:
        """A posted request's ``on_end``: a failed round trip is counted and logged."""

        def ended(_results: list[Any], error: Exception | None) -> None:
            if error is not None:
                self._failed(op, count, error)

        return ended

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


#: The error counted for finishes whose round trip ended before they were queued in it.
_NOT_QUEUED = redis.RedisError("the round trip ended before the records were queued")


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
