"""The project's one small exception hierarchy: bad input, bad settings, failed deliveries."""

from __future__ import annotations


class TotangoWorkerError(Exception):
    """Base of every error this package raises on purpose."""


class InvalidEvent(TotangoWorkerError, ValueError):  # noqa: N818  the name reads as the outcome
    """An event that can never be delivered as it stands. It is never retried.

    ``field`` names the offending parameter (``account_id``, ``Contract Value``, ...) and
    ``reason`` says what is wrong with it, so the dead-letter reason is ``invalid:<field>``.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason

    @property
    def code(self) -> str:
        return f"invalid:{self.field}"


class ConfigError(TotangoWorkerError):
    """A setting is wrong. Raised when the worker starts, never on the first task."""

    def __init__(self, variable: str, reason: str) -> None:
        super().__init__(f"{variable}: {reason}")
        self.variable = variable
        self.reason = reason


class DeliveryFailed(TotangoWorkerError):  # noqa: N818  the name reads as the outcome
    """The gateway did not answer 200: a status, a timeout or a connection error.

    ``status`` is the HTTP status as a string (``"503"``), or ``"timeout"`` or
    ``"connection_error"``; ``retry_after`` is the raw Retry-After header, if any.
    """

    def __init__(self, status: str, retry_after: str | None = None, excerpt: str = "") -> None:
        super().__init__(f"gateway answered {status}")
        self.status = status
        self.retry_after = retry_after
        self.excerpt = excerpt
