"""The fleet's breaker in the state store: one Redis hash per gateway, changed only by Lua
scripts, so that every worker sees one count, one opening and one closing
(``worker.outage`` decides what the answers mean).

Each script reads the time from Redis (``TIME``), not from the worker: the fleet agrees on
when a cooldown ends and a probe is due, whatever the pods' clocks say.

Every call **fails open**: when the store cannot be reached, the breaker reads as closed
and events are sent as they would be without it (counted in ``totango_state_errors_total``
with ``op="breaker"``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis

from worker import metrics
from worker.outage import Breaker

log = logging.getLogger(__name__)

KEY_PREFIX = "totango-worker:breaker:"
#: A breaker nobody touched for a day is forgotten (an outage ends with a 200 anyway).
KEY_TTL = 24 * 3600
#: Seconds a call to the store may take.
SOCKET_TIMEOUT = 0.5

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

#: The fields of the hash, as every script returns them, after the server's time.
_STATE = """
local function state(key)
  local f = redis.call('HMGET', key, 'failures', 'opened_at', 'until', 'probed_at')
  return {tostring(now), f[1] or '0', f[2] or '', f[3] or '0', f[4] or '0'}
end
local function answer(key, flag)
  local s = state(key)
  table.insert(s, 1, flag)
  return s
end
"""

#: A call found the gateway down. ARGV: threshold, cooldown seconds (0: none). Opens the
#: breaker at the threshold or on a cooldown; returns 1 when this call opened it, then the
#: state.
FAILED_SCRIPT = (
    _NOW
    + _STATE
    + """
local key = KEYS[1]
local failures = redis.call('HINCRBY', key, 'failures', 1)
local cooldown = tonumber(ARGV[2])
if cooldown > 0 then
  local till = now + cooldown
  if till > tonumber(redis.call('HGET', key, 'until') or '0') then
    redis.call('HSET', key, 'until', tostring(till))
  end
end
local opened = 0
if not redis.call('HGET', key, 'opened_at') and (failures >= tonumber(ARGV[1]) or cooldown > 0) then
  -- the first probe comes one interval after the opening
  redis.call('HSET', key, 'opened_at', tostring(now), 'probed_at', tostring(now))
  opened = 1
end
redis.call('EXPIRE', key, tonumber(ARGV[3]))
return answer(key, opened)
"""
)

#: A call found the gateway up. Resets the count and closes the breaker, unless a cooldown
#: the gateway asked for still runs. Returns the opening time when this call closed it
#: ('' otherwise), then the state.
SUCCEEDED_SCRIPT = (
    _NOW
    + _STATE
    + """
local key = KEYS[1]
local opened = redis.call('HGET', key, 'opened_at')
local closed = ''
if opened and now < tonumber(redis.call('HGET', key, 'until') or '0') then
  redis.call('HSET', key, 'failures', 0)
else
  redis.call('DEL', key)
  closed = opened or ''
end
return answer(key, closed)
"""
)

#: May this worker probe now? ARGV: the probe interval. 1: leased (no other worker gets
#: one before the interval has passed); 0: not due or taken. Then the state.
LEASE_SCRIPT = (
    _NOW
    + _STATE
    + """
local key = KEYS[1]
local leased = 0
local opened = redis.call('HGET', key, 'opened_at')
if opened then
  local till = tonumber(redis.call('HGET', key, 'until') or '0')
  local probed = tonumber(redis.call('HGET', key, 'probed_at') or '0')
  if now >= till and now >= probed + tonumber(ARGV[1]) then
    redis.call('HSET', key, 'probed_at', tostring(now))
    leased = 1
  end
end
return answer(key, leased)
"""
)

READ_SCRIPT = _NOW + _STATE + "return state(KEYS[1])"


def gateway_label(gateway_url: str) -> str:
    """A gateway as keys, metrics and logs name it: its host and path, never its query
    (which may hold a token) nor its credentials."""
    parts = urlsplit(gateway_url)
    return f"{parts.netloc.rsplit('@', 1)[-1]}{parts.path}"


def breaker_key(gateway_url: str) -> str:
    """One breaker per gateway: its label, hashed with the full URL so two tokens on one
    host are two gateways."""
    digest = hashlib.sha256(gateway_url.encode()).hexdigest()[:12]
    return f"{KEY_PREFIX}{gateway_label(gateway_url)}:{digest}"


@dataclass(frozen=True)
class Reading:
    """The breaker as a script left it, and the store's time then."""

    breaker: Breaker
    #: The store's clock (seconds since the epoch) when the script ran.
    now: float
    #: The script's own answer: opened, closed (the opening time) or leased.
    flag: str = ""


class FleetBreaker:
    """This process's client of the breakers in the state store."""

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
            retry_on_timeout=False,
        )
        self._failed = self._client.register_script(FAILED_SCRIPT)
        self._succeeded = self._client.register_script(SUCCEEDED_SCRIPT)
        self._lease = self._client.register_script(LEASE_SCRIPT)
        self._read = self._client.register_script(READ_SCRIPT)

    def failed(self, gateway_url: str, threshold: int, cooldown: float | None) -> Reading | None:
        """Count one call that found the gateway down; ``flag`` is ``"1"`` when this call
        opened the breaker. ``None``: the store cannot be reached."""
        return self._run(self._failed, gateway_url, [threshold, cooldown or 0, KEY_TTL], True)

    def succeeded(self, gateway_url: str) -> Reading | None:
        """Count one call that found the gateway up; ``flag`` is the opening time when
        this call closed the breaker, else ``""``."""
        return self._run(self._succeeded, gateway_url, [], True)

    def lease_probe(self, gateway_url: str, interval: float) -> Reading | None:
        """Take the probe lease if a probe is due; ``flag`` is ``"1"`` when taken."""
        return self._run(self._lease, gateway_url, [interval], True)

    def read(self, gateway_url: str) -> Reading | None:
        return self._run(self._read, gateway_url, [], False)

    def close(self) -> None:
        self._client.close()

    def _run(
        self,
        script: redis.commands.core.Script,
        gateway_url: str,
        args: Sequence[float | int],
        flagged: bool,
    ) -> Reading | None:
        try:
            raw = script(keys=[breaker_key(gateway_url)], args=list(args))
        except redis.RedisError as exc:
            metrics.record_state_error("breaker", 1)
            log.debug("state store unreachable for the breaker (%s); reading it closed", exc)
            return None
        values = [_text(v) for v in raw]
        flag = values.pop(0) if flagged else ""
        now, failures, opened_at, until, probed_at = values
        breaker = Breaker(
            failures=int(failures),
            opened_at=float(opened_at) if opened_at else None,
            until=float(until),
            probed_at=float(probed_at),
        )
        return Reading(breaker, float(now), flag)


def _text(value: bytes | str | int) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
