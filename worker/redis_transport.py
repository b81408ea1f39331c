"""A Redis transport whose fetch cannot lose a message.

kombu's Redis transport takes a message with ``BRPOP`` and only afterwards, in a second
command, records it in the ``unacked`` hash that brings it back if the worker dies. A
worker killed between the two commands, or a connection cut after the server ran ``BRPOP``
but before its reply arrived, loses the message: it is in neither the queue nor ``unacked``.
The fault suite (``make faults``) catches this on a few runs in ten.

This channel closes the window. It waits with ``BLMOVE queue queue RIGHT RIGHT``, which
blocks until the queue has a message but moves it back onto the same end, so it changes
nothing. It then takes messages with one Lua script that pops each and records it in
``unacked`` and ``unacked_index`` in the same atomic step: as many as the prefetch limit
leaves room for, at most ``FETCH_MAX``, so that a backlog costs one round trip per
``FETCH_MAX`` messages, not one per message. Whatever dies and whenever, a message is either
still in its list or reserved, and a reserved message comes back after
``visibility_timeout``; one that was fetched but not handed over (its queue no longer
consumed, a consumer that raised) is put back at once. While messages keep coming, the
script itself is the command the event loop waits for, with no wake-up before it. With
several queues (a worker without ``-Q`` takes ``totango`` and ``totango.batch``), the script
looks at every queue; an idle channel watches one at a time for at most ``IDLE_LOOK``, since
Redis cannot block on several lists without taking from them. Everything else
(publishing, acks, restore, fan-out) is kombu's.

It needs Redis 6.2 or later (``BLMOVE``). A channel that has a ``no_ack`` consumer keeps
kombu's own fetch, since nothing would ever acknowledge what the script reserves.
"""

from __future__ import annotations

import logging
from queue import Empty
from time import monotonic, time
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.transport.virtual import Message
from kombu.utils.json import loads

logger = logging.getLogger(__name__)

#: With several queues, the longest an idle channel blocks on one of them (seconds): a
#: message arriving on another queue waits at most this long.
IDLE_LOOK = 0.2

# KEYS: unacked hash, unacked index, then for each list to take from, in order, the list
# and the list its unparseable items go to. ARGV: the time to record, as kombu's own
# QoS.append records it, and how many messages to take at most. Returns, flat, the number
# of each item's list and the item, in the order taken (each list emptied before the next,
# so a priority list goes first), or false when every list was empty. A message is stored in
# ``unacked`` as kombu stores it, ``[message, exchange, routing_key]``, built from the raw
# text so that nothing in it is re-encoded. A list item that is not a kombu message cannot
# be reserved by its tag: it is moved whole to its queue's unparseable list, never dropped,
# and its number is negative.
FETCH_SCRIPT = """
local want = tonumber(ARGV[2]) or 1
local taken = {}
local count = 0
for i = 3, #KEYS, 2 do
  local n = (i - 1) / 2
  while count < want do
    local item = redis.call('RPOP', KEYS[i])
    if not item then break end
    count = count + 1
    local ok, message = pcall(cjson.decode, item)
    local properties = ok and type(message) == 'table' and message['properties']
    local tag = type(properties) == 'table' and properties['delivery_tag']
    local info = type(properties) == 'table' and properties['delivery_info']
    if type(tag) ~= 'string' or type(info) ~= 'table' then
      redis.call('LPUSH', KEYS[i + 1], item)
      taken[#taken + 1] = -n
    else
      local exchange = info['exchange'] or ''
      local routing_key = info['routing_key'] or ''
      redis.call('ZADD', KEYS[2], ARGV[1], tag)
      redis.call('HSET', KEYS[1], tag, '[' .. item .. ', ' .. cjson.encode(exchange) ..
        ', ' .. cjson.encode(routing_key) .. ']')
      taken[#taken + 1] = n
    end
    taken[#taken + 1] = item
  end
  if count >= want then break end
end
if count == 0 then return false end
return taken
"""

#: The most messages one fetch takes, within the room the prefetch limit leaves. While a
#: backlog waits, one round trip brings this many (each reserved as it is taken), instead
#: of one round trip per message.
FETCH_MAX = 16

UNPARSEABLE_SUFFIX = ".unparseable"


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS, minus the write the fetch script has already made."""

    channel: Channel

    def append(self, message: Any, delivery_tag: str) -> None:
        if self.channel.take_reserved(delivery_tag):
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)


# kombu's Redis channel is untyped: the attributes used below are kombu's.
_KombuChannel: Any = kombu_redis.Channel


class Channel(_KombuChannel):  # type: ignore[misc]
    """kombu's Redis channel with an atomic fetch-and-reserve."""

    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Set before kombu's __init__, which already sends commands.
        self._reserved: set[str] = set()
        self._no_ack_queues: set[str] = set()
        self._fetch_sha: str | None = None
        #: The queue a pending BLMOVE wake-up watches.
        self._blmove_queue: str | None = None
        #: The lists of the fetch script sent as the event loop's command (busy path).
        self._pending_fetch: list[tuple[str, str]] | None = None
        #: The last look found a message (the next one is fetched without a wake-up).
        self._busy = False
        self._sync_client: Any = None
        super().__init__(*args, **kwargs)

    # -- which path ----------------------------------------------------------------------
    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack and queue not in self._fanout_queues:  # fan-out is LISTEN, not a fetch
            self._no_ack_queues.add(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_cancel(self, consumer_tag: str) -> Any:
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        if queue is not None and queue not in self._active_queues:
            self._no_ack_queues.discard(queue)
        return result

    def take_reserved(self, delivery_tag: str) -> bool:
        """True once for a message the fetch script has already recorded in ``unacked``."""
        try:
            self._reserved.remove(delivery_tag)
        except KeyError:
            return False
        return True

    # -- the consumer's fetch ------------------------------------------------------------
    def _brpop_start(self, timeout: float | None = None) -> None:
        if self._no_ack_queues:  # nothing would acknowledge what the script reserves
            super()._brpop_start(timeout)
            return
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        if self._busy and self._fetch_sha is not None:
            # The last look found a message, so more are likely waiting: the fetch script
            # itself is the command the event loop waits for. No wake-up round trip, and
            # every queue is looked at.
            keys, self._pending_fetch = self._fetch_keys(queues)
            self.client.connection.send_command(
                "EVALSHA", self._fetch_sha, len(keys), *keys, repr(time()), self._room()
            )
            return
        # Nothing was waiting: block until the cycle's first queue has a message (BLMOVE
        # moves it onto the same end of the same list: a no-op), then run the script on
        # every queue. Redis cannot block on several lists without taking from them, so
        # with several queues the wait is short and watches each queue in turn: a message
        # on another queue waits IDLE_LOOK at most.
        if len(queues) > 1:
            timeout = min(timeout, IDLE_LOOK)
        self._blmove_queue = queues[0]
        key = self.global_keyprefix + self._q_for_pri(queues[0], 0)
        self.client.connection.send_command("BLMOVE", key, key, "RIGHT", "RIGHT", timeout or 0)

    def _brpop_read(self, **options: Any) -> bool:
        if self._pending_fetch is not None:
            return self._fetch_read(**options)
        watched = self._blmove_queue
        if watched is None:
            return bool(super()._brpop_read(**options))
        try:
            try:
                # The reply only says whether the list had something; the script decides.
                self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            except redis.ResponseError as exc:
                if "unknown command" in str(exc).lower():
                    msg = "the Redis broker must be 6.2 or later (BLMOVE)"
                    raise RuntimeError(msg) from exc
                raise
        finally:
            self._in_poll = None
            self._blmove_queue = None
            self._flush_brpop_reauth()
        queues = list(self.active_queues)
        if self._closing or not queues:
            # Closing reads the pending wake-up only to free the connection; the wake-up
            # took nothing, so nothing is fetched now that nobody would run it.
            raise Empty
        found = self._fetch_reserved(queues, self._room())
        if not found:
            self._busy = False
            if watched in queues:
                self._queue_cycle.rotate(watched)  # the next wait watches another queue
            raise Empty
        return self._deliver_found(found)

    def _fetch_read(self, **options: Any) -> bool:
        """The reply of the fetch script sent as the event loop's command (busy path)."""
        lists = self._pending_fetch or []
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "EVALSHA", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            except redis.exceptions.NoScriptError:  # Redis restarted: its script cache is empty
                self._fetch_sha = None
                self._busy = False
                raise Empty from None
        finally:
            self._in_poll = None
            self._pending_fetch = None
            self._flush_brpop_reauth()
        found = self._found(reply, lists)
        if not found:
            self._busy = False
            raise Empty
        if self._closing:
            self._put_back(found)
            raise Empty
        return self._deliver_found(found)

    def _room(self) -> int:
        """How many messages the next fetch may take: what the prefetch limit leaves, at
        most ``FETCH_MAX`` (the poller only fetches while there is room for one)."""
        room = self.qos.can_consume_max_estimate()
        return FETCH_MAX if room is None else max(1, min(FETCH_MAX, room))

    def _deliver_found(self, found: list[tuple[str, dict[str, Any]]]) -> bool:
        """Hand each fetched message to its queue's consumer. One whose queue is no longer
        consumed, and every one after a consumer that raised, is put back at once rather
        than left to the visibility timeout."""
        self._busy = True
        active = self.active_queues
        for position, (queue, payload) in enumerate(found):
            if queue not in active:
                self._put_back([(queue, payload)])
                continue
            self._queue_cycle.rotate(queue)
            try:
                self.connection._deliver(payload, queue)
            except BaseException:
                self._put_back(found[position + 1 :])
                raise
        return True

    def _put_back(self, found: list[tuple[str, dict[str, Any]]]) -> None:
        """Reserved, but nobody will run these now: back on their lists."""
        for _queue, payload in found:
            tag = payload["properties"]["delivery_tag"]
            self._reserved.discard(tag)
            self.qos.restore_by_tag(tag)

    def _poll_error(self, type: str, **options: Any) -> None:
        if type == "BRPOP" and self._pending_fetch is not None:
            # A reservation the script made stays in ``unacked`` and comes back from there.
            self._pending_fetch = None
            self.client.parse_response(self.client.connection, "EVALSHA")
            return
        if type == "BRPOP" and self._blmove_queue is not None:
            self.client.parse_response(self.client.connection, "BLMOVE")
            return
        super()._poll_error(type, **options)

    def _create_client(self, asynchronous: bool = False) -> Any:
        # kombu builds a new client object for every command it sends outside the fetch
        # (each ack, each task event published): about a sixth of a task's CPU on Redis.
        # A client is thread-safe and holds no connection of its own, so one per channel
        # and pool serves them all; a new pool (after a reconnect) gets a new one.
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        client = self._sync_client
        if client is None or client.connection_pool is not pool:
            client = self._sync_client = super()._create_client()
        return client

    def _connparams(self, asynchronous: bool = False) -> Any:
        # A channel closed after its connection (Celery does so when the broker drops)
        # would raise AttributeError from kombu here, which nothing catches and which
        # stops the whole worker (kombu#970, kombu#582). A connection error is what it is:
        # kombu ignores it while closing, and the reservations come back from Redis.
        if self.connection.client is None:
            msg = "the broker connection is already closed"
            raise redis.exceptions.ConnectionError(msg)
        return super()._connparams(asynchronous=asynchronous)

    # -- basic_get -----------------------------------------------------------------------
    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Message | None:
        if no_ack:
            message: Message | None = super().basic_get(queue, no_ack=True, **kwargs)
            return message
        found = self._fetch_reserved([queue], 1)
        if not found:
            return None
        message = self.Message(found[0][1], channel=self)
        self.qos.append(message, message.delivery_tag)
        return message

    # -- the script ----------------------------------------------------------------------
    def _fetch_keys(self, queues: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
        """The script's keys for ``queues``, and each list with the queue it belongs to."""
        prefix = self.global_keyprefix
        lists = [
            (q, prefix + self._q_for_pri(q, pri)) for pri in self.priority_steps for q in queues
        ]
        keys = [prefix + self.unacked_key, prefix + self.unacked_index_key]
        for queue, key in lists:
            keys += [key, prefix + queue + UNPARSEABLE_SUFFIX]
        return keys, lists

    def _fetch_reserved(self, queues: list[str], want: int) -> list[tuple[str, dict[str, Any]]]:
        """Pop up to ``want`` messages of ``queues`` and reserve each, in one atomic step."""
        keys, lists = self._fetch_keys(queues)
        with self.conn_or_acquire() as client:
            reply = self._run_fetch(client, keys, time(), want)
        return self._found(reply, lists)

    def _found(self, reply: Any, lists: list[tuple[str, str]]) -> list[tuple[str, dict[str, Any]]]:
        """The queue and message of each item a script reply reserved, in order."""
        found: list[tuple[str, dict[str, Any]]] = []
        for number_text, raw in zip(*[iter(reply or ())] * 2, strict=True):
            number = int(number_text)
            if number < 0:
                queue, key = lists[-number - 1]
                logger.error(
                    "a message in Redis list %s is not a kombu message; moved it to %s",
                    key,
                    self.global_keyprefix + queue + UNPARSEABLE_SUFFIX,
                )
                continue
            queue = lists[number - 1][0]
            payload: dict[str, Any] = loads(raw.decode() if isinstance(raw, bytes) else raw)
            self._reserved.add(payload["properties"]["delivery_tag"])
            found.append((queue, payload))
        return found

    def _run_fetch(self, client: Any, keys: list[str], now: float, want: int) -> Any:
        # Keys are prefixed above; kombu's prefixing client would prefix only the first.
        execute: Any = redis.Redis.execute_command
        if self._fetch_sha is None:
            self._fetch_sha = execute(client, "SCRIPT", "LOAD", FETCH_SCRIPT)
        try:
            return execute(client, "EVALSHA", self._fetch_sha, len(keys), *keys, repr(now), want)
        except redis.exceptions.NoScriptError:
            return execute(client, "EVAL", FETCH_SCRIPT, len(keys), *keys, repr(now), want)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel
