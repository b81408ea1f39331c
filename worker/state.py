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
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis

from worker import metrics
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
        self._check = self._client.register_script(CHECK_SCRIPT)
        self._finish = self._client.register_script(FINISH_SCRIPT)
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
        hashes: dict[Entity, int] = {}
        argv: list[str | int] = [self.ttl, len(checked)]
        for event_id, claim in claims:
            slot = hashes.setdefault(claim.entity, len(checked) + len(hashes) + 1)
            argv += [position.get(event_id, 0), slot, claim.param, claim.at, claim.value]
        keys = [delivered_key(e) for e in checked] + [newest_key(e) for e in hashes]
        try:
            flags, superseded = self._check(keys=keys, args=argv)
        except redis.RedisError as exc:
            self._failed("check", len(event_ids), exc)
            return None
        found = {e for e, flag in zip(checked, flags, strict=True) if flag}
        return Checked(found, {int(n) - 1 for n in superseded})

    def finish(self, delivered: Sequence[str], claims: Sequence[Claim]) -> list[Claim] | None:
        """One round trip after the calls: record ``delivered`` and return the claims
        that replaced any of ``claims`` while their calls were in flight. ``None`` when
        the store cannot be reached (the ids stay unrecorded; nothing is repaired)."""
        if not claims:
            return [] if self.record(delivered) else None
        if self._skipping():
            metrics.record_state_error("record", len(delivered) or 1)
            return None
        hashes: dict[Entity, int] = {}
        argv: list[str | int] = [self.ttl, f"{time.time():.3f}", len(delivered)]
        for claim in claims:
            slot = hashes.setdefault(claim.entity, len(delivered) + len(hashes) + 1)
            argv += [slot, claim.param, claim.at, claim.value]
        keys = [delivered_key(e) for e in delivered] + [newest_key(e) for e in hashes]
        try:
            flat = self._finish(keys=keys, args=argv)
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


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value
