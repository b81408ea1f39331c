"""``PerProcess``: one value per process, made again in a forked child (the prefork pool),
so that no connection pool is shared across a fork."""

from __future__ import annotations

import os
from itertools import count

from worker.process_local import PerProcess


def test_the_value_is_built_once_per_process() -> None:
    """Every get() in one process returns the value the first one built."""
    built = count()
    holder = PerProcess(lambda: next(built))
    assert holder.get() == holder.get() == 0


def test_reset_builds_a_new_value() -> None:
    """After reset() the next get() builds again."""
    built = count()
    holder = PerProcess(lambda: next(built))
    assert holder.get() == 0
    holder.reset()
    assert holder.get() == 1


def test_a_forked_child_builds_its_own_value() -> None:
    """A child after fork does not reuse the parent's object: it builds one of its own."""
    holder = PerProcess(os.getpid)
    parent_value = holder.get()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it got, and leave without running pytest's exit
        os.close(read)
        os.write(write, str(holder.get()).encode())
        os._exit(0)
    os.close(write)
    child_value = int(os.read(read, 64).decode())
    os.close(read)
    os.waitpid(pid, 0)
    assert parent_value == os.getpid()
    assert child_value == pid
    assert holder.get() == parent_value
