"""PURE: a value that belongs to one process, built on first use and dropped in a child
after ``fork`` (the prefork pool), so that no connection pool or thread pool is shared
across a fork."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

_holders: weakref.WeakSet[PerProcess[object]] = weakref.WeakSet()


class PerProcess(Generic[T]):
    """``get()`` builds the value once per process; a forked child builds its own."""

    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self._value: T | None = None
        self._lock = threading.Lock()
        _holders.add(self)  # type: ignore[arg-type]  # the set only resets holders

    def get(self) -> T:
        value = self._value
        if value is not None:  # every call after the first: no lock
            return value
        with self._lock:
            if self._value is None:
                self._value = self._build()
            return self._value

    def peek(self) -> T | None:
        """The value if this process built it, without building it."""
        return self._value

    def reset(self) -> None:
        """Forget the value: the next ``get()`` builds a new one."""
        self._lock = threading.Lock()  # a lock held by a thread the fork did not copy
        self._value = None


def _reset_all_after_fork() -> None:
    for holder in list(_holders):
        holder.reset()


os.register_at_fork(after_in_child=_reset_all_after_fork)
