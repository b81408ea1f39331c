"""The Redis delivery counter (worker/redeliveries.py): it counts each delivery of a
message, and a Redis it cannot reach never fails the event."""

from __future__ import annotations

import socket
import uuid

import pytest

from tests.brokers import redis_database
from worker.redeliveries import count_delivery

pytestmark = pytest.mark.integration


def test_each_delivery_of_a_message_is_counted_apart_from_its_retries() -> None:
    """The same message (task id, retry number) counts up; its next retry counts afresh."""
    task_id = f"t-{uuid.uuid4().hex[:8]}"
    with redis_database() as url:
        assert [count_delivery(url, task_id, 0, 60) for _ in range(3)] == [1, 2, 3]
        assert count_delivery(url, task_id, 1, 60) == 1


def test_a_redis_that_cannot_be_reached_counts_zero_instead_of_failing() -> None:
    """With Redis cut (here a loopback port nothing listens on), counting gives 0 (under
    any limit), so the call goes ahead instead of the event being dead-lettered."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        assert count_delivery(f"redis://127.0.0.1:{port}/0", "t-cut", 0, 60) == 0
