"""This process's view of the fleet's breakers (``worker.breaker``), one per gateway: may a
call go out now, and what its answer says about the gateway.

The happy path costs no round trip per event: the breaker is read at most every
``REFRESH`` seconds per gateway, and a 200 is reported only when a count or an outage is
there to reset. A call that finds the gateway down is reported at once. Whoever opens the
breaker logs the outage and sends its one Sentry event; whoever closes it logs how long it
lasted and sends the other.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from worker import metrics, observability
from worker.breaker import FleetBreaker, Reading, gateway_label
from worker.gateway import Answer
from worker.outage import Admit, Breaker, cooldown, defer_delay, is_down, outage_summary
from worker.settings import Settings

log = logging.getLogger("worker.outage")

#: Seconds between two reads of a breaker by one process.
REFRESH = 0.5


class Circuit:
    """The breakers of every gateway this process calls, as last read from the store."""

    def __init__(
        self,
        settings: Settings,
        store: FleetBreaker,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.store = store
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._breakers: dict[str, Breaker] = {}
        self._read_at: dict[str, float] = {}
        #: The store's clock minus this process's monotonic clock, from the last reading.
        self._offset: float | None = None
        #: Probe leases this process took for an event it has not fetched yet (``pausing``),
        #: with when each was taken: one unused for two intervals is let go.
        self._tokens: dict[str, float] = {}

    @classmethod
    def for_settings(cls, settings: Settings) -> Circuit:
        url = settings.state_store_url
        if url is None:
            raise ValueError("no state store for the breaker")
        return cls(settings, FleetBreaker(url))

    # --- reading ---------------------------------------------------------------------------

    def now(self) -> float:
        """The store's time, as far as this process knows it."""
        if self._offset is None:
            return time.time()
        return self._monotonic() + self._offset

    def breaker(self, url: str) -> Breaker:
        """The breaker of ``url``, read again when the last reading is older than
        ``REFRESH``; one thread reads while the others use the last reading."""
        at = self._read_at.get(url)
        stale = at is None or self._monotonic() - at >= REFRESH
        if stale and self._lock.acquire(blocking=at is None):
            try:
                self._take(url, self.store.read(url))
            finally:
                self._lock.release()
        return self._breakers.get(url, Breaker())

    # --- before a call ---------------------------------------------------------------------

    def admit(self, url: str) -> tuple[Admit, float]:
        """May a call to ``url`` go out now: ``SEND``; ``PROBE`` (the breaker is open and
        this call tests the gateway); ``DEFER`` with the seconds to wait."""
        breaker = self.breaker(url)
        if not breaker.is_open:
            return Admit.SEND, 0.0
        interval = self.settings.breaker_probe_interval
        if self._take_token(url):
            return Admit.PROBE, 0.0
        if breaker.probe_due(self.now(), interval):
            reading = self.store.lease_probe(url, interval)
            self._take(url, reading)
            if reading is None or not reading.breaker.is_open:
                return Admit.SEND, 0.0
            if reading.flag == "1":
                return Admit.PROBE, 0.0
            breaker = reading.breaker
        return Admit.DEFER, defer_delay(breaker, self.now(), interval)

    def deferral(self, url: str) -> float:
        """Seconds an event for ``url`` waits when its breaker is open."""
        interval = self.settings.breaker_probe_interval
        return defer_delay(self.breaker(url), self.now(), interval)

    def lease_for_fetch(self, url: str) -> bool:
        """A paused consumer's lease: take the probe for the next event this process
        fetches. ``True`` when taken."""
        reading = self.store.lease_probe(url, self.settings.breaker_probe_interval)
        self._take(url, reading)
        if reading is None or reading.flag != "1":
            return False
        with self._lock:
            self._tokens[url] = self._monotonic()
        return True

    def holds_lease(self, url: str) -> bool:
        with self._lock:
            taken = self._tokens.get(url)
            return taken is not None and self._fresh(taken)

    def _take_token(self, url: str) -> bool:
        with self._lock:
            taken = self._tokens.pop(url, None)
            return taken is not None and self._fresh(taken)

    def _fresh(self, taken: float) -> bool:
        return self._monotonic() - taken < 2 * self.settings.breaker_probe_interval

    # --- after a call ----------------------------------------------------------------------

    def report(self, url: str, answer: Answer) -> bool:
        """Count this answer; returns whether the breaker is open after it."""
        if is_down(answer.status):
            wait = cooldown(
                answer.status,
                answer.retry_after,
                answer.rate_limit_reset,
                self.settings.retry_after_max,
            )
            reading = self.store.failed(url, self.settings.breaker_threshold, wait)
            self._take(url, reading)
            if reading is None:
                return False
            if reading.flag == "1":
                self._started(url, reading, answer)
            return reading.breaker.is_open
        known = self._breakers.get(url)
        if known is None or not (known.failures or known.is_open):
            return False
        reading = self.store.succeeded(url)
        self._take(url, reading)
        if reading is not None and reading.flag:
            self._ended(url, float(reading.flag), reading.now)
        return reading is not None and reading.breaker.is_open

    def close(self) -> None:
        self.store.close()

    # --- state -----------------------------------------------------------------------------

    def _take(self, url: str, reading: Reading | None) -> None:
        """Keep a reading; a store that cannot be reached reads as closed (fail open)."""
        breaker = Breaker() if reading is None else reading.breaker
        if reading is not None:
            self._offset = reading.now - self._monotonic()
        self._breakers[url] = breaker
        self._read_at[url] = self._monotonic()
        metrics.set_breaker_open(gateway_label(url), breaker.is_open)

    def _started(self, url: str, reading: Reading, answer: Answer) -> None:
        breaker = reading.breaker
        cooling = max(0.0, breaker.until - reading.now)
        why = (
            f"the gateway asked to wait {cooling:.0f}s (status {answer.status})"
            if cooling > 0
            else f"{breaker.failures} consecutive calls failed across the fleet, "
            f"the last with {answer.status}"
        )
        log.warning(
            "gateway outage started gateway=%s: %s; workers stop taking events and probe "
            "it every %gs",
            gateway_label(url),
            why,
            self.settings.breaker_probe_interval,
        )
        observability.alert_outage("started", gateway_label(url), why, self.settings)

    def _ended(self, url: str, opened_at: float, now: float) -> None:
        lasted = outage_summary(opened_at, now)
        log.warning(
            "gateway outage ended gateway=%s after %s: events flow again",
            gateway_label(url),
            lasted,
        )
        observability.alert_outage("ended", gateway_label(url), f"after {lasted}", self.settings)
