"""One thread that runs every gateway call of a process, through libcurl's multi interface.

A sending thread (a Celery pool thread, a batch sender) prepares an easy handle, hands it
over as a ``Transfer`` and waits once, on a plain lock, until the transfer has ended. The
engine's thread adds the handle to its multi handle, drives all the transfers at once, and
releases each lock as its answer comes; the sending thread then reads the answer from the
handle. Connections stay alive in the multi handle's cache, shared by every handle.

A transfer may carry a ``vet``: a function the engine calls, on its own thread, with every
transfer of the same vet that arrived since its last round, before any of them is sent.
The state store's check is one: it asks about all those events in one round trip, marks
the ones not to send (``Transfer.event = None``) and may replace an event by a smaller one.
So a task whose event is checked waits once, for the check and the call together, instead
of once for each: in a process of 128 threads each wait ends with the thread taking the GIL
back, which costs about what the call itself costs (docs/benchmarks.md).

The engine knows nothing of events or answers: ``worker.gateway`` prepares the handles and
reads the answers.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import pycurl

log = logging.getLogger("worker.transfers")

#: How long the engine's thread waits on its sockets before it looks for new transfers.
#: New transfers wait at most this long to start while others are in flight (none do when
#: nothing is: the thread then sleeps until one comes).
POLL_SECONDS = 0.001
#: Connections kept alive in the cache (libcurl's default is 4 per handle in the multi
#: handle at the moment, and handles leave it between calls, so the cache would shrink and
#: drop kept-alive connections whenever few calls were in flight).
MAX_CONNECTIONS = 1024
#: Beyond the call's own libcurl timeout: how long a sender waits before it stops waiting
#: for a transfer that the engine has not ended (its thread died: a bug).
WAIT_MARGIN = 30.0

#: Asks about a round of transfers before they are sent; see the module's docstring.
Vet = Callable[[list["Transfer"]], None]


class EngineClosedError(RuntimeError):
    """A transfer was handed over after ``Engine.close``: it was not sent."""


class Transfer:
    """One call handed to the engine: its prepared handle, and what became of it."""

    __slots__ = ("_ended", "curl", "error", "event", "note", "prepare", "sent", "vet")

    def __init__(
        self,
        curl: pycurl.Curl,
        event: Any = None,
        *,
        vet: Vet | None = None,
        prepare: Callable[[Any], None] | None = None,
    ) -> None:
        self.curl = curl
        #: What the handle was prepared for; ``vet`` may set another (``prepare`` is then
        #: called with it before the call) or ``None``: not sent.
        self.event = event
        self.vet = vet
        self.prepare = prepare
        #: What ``vet`` found out about this transfer, for the sender.
        self.note: Any = None
        #: Whether the call was made; ``error`` is libcurl's (code, message) when it failed.
        self.sent = False
        self.error: tuple[int, str] | None = None
        self._ended = threading.Lock()
        self._ended.acquire()

    def end(self, error: tuple[int, str] | None = None) -> None:
        self.error = error
        self._ended.release()

    def wait(self, timeout: float) -> bool:
        return self._ended.acquire(timeout=timeout)


class Engine:
    """The process's one thread of gateway calls, started by the first transfer."""

    def __init__(self, name: str = "totango-curl") -> None:
        self._name = name
        self._queue: queue.SimpleQueue[Transfer | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        #: The transfers in the multi handle, by their easy handle.
        self._running: dict[pycurl.Curl, Transfer] = {}
        self._multi = pycurl.CurlMulti()
        self._multi.setopt(pycurl.M_MAXCONNECTS, MAX_CONNECTIONS)

    def run(self, transfer: Transfer, timeout: float) -> None:
        """Send ``transfer`` and wait until it has ended; ``timeout`` is the call's own
        (libcurl ends it by then). Raises ``EngineClosedError`` after ``close``, and
        ``TimeoutError`` if the engine has not ended it well after that (the handle is
        then still the engine's: the sender must not use it again)."""
        self._start()
        self._queue.put(transfer)
        if not transfer.wait(timeout + WAIT_MARGIN):
            raise TimeoutError(f"the engine did not end a call in {timeout + WAIT_MARGIN:g}s")

    def close(self, timeout: float = WAIT_MARGIN) -> None:
        """Let the transfers in flight end, then stop the thread (at most ``timeout``)."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    def _start(self) -> None:
        if self._thread is not None and not self._closed:
            return
        with self._lock:
            if self._closed:
                raise EngineClosedError("the gateway calls' engine is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()

    # --- the engine's thread ------------------------------------------------------------

    def _loop(self) -> None:
        multi = self._multi
        closing = False
        while not closing or self._running:
            try:
                closing = self._take() or closing
                self._drive(multi)
            except Exception:  # the thread must outlive a bug: every sender would hang
                log.exception("the gateway calls' thread")
                self._fail_running("the gateway calls' thread failed")
        multi.close()

    def _take(self) -> bool:
        """Start the transfers handed over since the last round; True when closing. With
        nothing in flight, sleep until one comes."""
        new: list[Transfer] = []
        closing = False
        try:
            item = self._queue.get(block=not self._running)
            while True:
                if item is None:
                    closing = True
                else:
                    new.append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        if new:
            self._begin(new)
        return closing

    def _begin(self, new: list[Transfer]) -> None:
        rounds: dict[Vet, list[Transfer]] = {}
        for transfer in new:
            if transfer.vet is None:
                self._add(transfer)
            else:
                rounds.setdefault(transfer.vet, []).append(transfer)
        for vet, transfers in rounds.items():
            prepared = [transfer.event for transfer in transfers]
            try:
                vet(transfers)
            except Exception:  # fail open: sent as prepared, with no note
                log.exception("vetting %d gateway calls; they are sent unchecked", len(transfers))
                for transfer, event in zip(transfers, prepared, strict=True):
                    transfer.event, transfer.note = event, None
            for transfer, event in zip(transfers, prepared, strict=True):
                if transfer.event is None:
                    transfer.end()
                    continue
                if transfer.event is not event and transfer.prepare is not None:
                    transfer.prepare(transfer.event)
                self._add(transfer)

    def _add(self, transfer: Transfer) -> None:
        transfer.sent = True
        self._running[transfer.curl] = transfer
        try:
            self._multi.add_handle(transfer.curl)
        except pycurl.error as exc:
            del self._running[transfer.curl]
            transfer.end((_code(exc), f"the call could not start: {exc}"))

    def _drive(self, multi: pycurl.CurlMulti) -> None:
        while multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        while True:
            queued, ok, failed = multi.info_read()
            for curl in ok:
                self._finished(multi, curl, None)
            for curl, code, message in failed:
                self._finished(multi, curl, (code, message))
            if not queued:
                break
        if self._running:
            multi.select(POLL_SECONDS)

    def _finished(
        self, multi: pycurl.CurlMulti, curl: pycurl.Curl, error: tuple[int, str] | None
    ) -> None:
        multi.remove_handle(curl)
        transfer = self._running.pop(curl, None)
        if transfer is not None:
            transfer.end(error)

    def _fail_running(self, message: str) -> None:
        for curl, transfer in list(self._running.items()):
            try:
                self._multi.remove_handle(curl)
            except pycurl.error:
                log.debug("removing a failed call's handle", exc_info=True)
            del self._running[curl]
            transfer.end((-1, message))


def _code(exc: pycurl.error) -> int:
    code = exc.args[0] if exc.args else -1
    return code if isinstance(code, int) else -1
