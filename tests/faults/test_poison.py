"""Poison: more than a thousand messages that can never be valid, mixed with valid events
whose ids hold ``&``, ``=`` and ``#``. On RabbitMQ and on Redis."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import pytest

from tests.faults.accounting import DEAD_LETTER, KEY_RE
from tests.faults.harness import Run, assert_nothing_lost, send
from tests.faults.poison import TRACK, build, outlet, task_headers
from worker.client import Producer

pytestmark = pytest.mark.faults

POISON_TIMEOUT = 120.0


def test_poison_is_dead_lettered_with_a_reason_and_never_reaches_the_gateway(run: Run) -> None:
    """1,040 poison messages (bodies that are not JSON, wrong content types, wrong or
    missing arguments, unknown task names, 1 MB values, nesting 50 and 5,000 deep, ids with
    ``&``, ``=``, ``#`` that break a limit, messages that are no task at all), shuffled with
    150 valid events whose ids and names hold ``&``, ``=`` and ``#``. The worker keeps
    running; each poison message is in the dead-letter queue with the reason its kind
    calls for, none reaches the gateway; each valid event is delivered once, with exactly
    its parameters."""
    worker = run.worker(run.env(), "poison")
    worker.start()
    app = run.app()
    ledger = run.ledger("6 poison messages")
    batch = build(ledger, random.Random())
    with outlet(app, run.broker_url) as out:
        for item in batch.items:
            item.publish(out)

    tally = run.settle(ledger, app, timeout=POISON_TIMEOUT, worker=worker)
    wrong: dict[str, Counter[str]] = defaultdict(Counter)
    for item in batch.invalid:
        envelope = tally.dead.get(item.key)
        if envelope is not None and not envelope.reason.startswith(item.reasons):
            wrong[item.kind][envelope.reason] += 1
    mangled = []
    for item in batch.valid:
        calls = [
            c for c in run.gateway.delivered()
            if item.key in {k for _, v in c.params for k in KEY_RE.findall(v)}
        ]  # fmt: skip
        if calls and sorted(calls[0].params) != sorted(item.params or []):
            mangled.append((item.key, calls[0].params))
    kinds = Counter(item.kind for item in batch.items)
    note = "sent: " + ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items()))
    row = run.record(ledger.row(tally, duplicate_bound=0, note=note))

    assert worker.alive, worker.tail()
    assert not tally.wrongly_delivered, f"poison reached the gateway: {tally.wrongly_delivered}"
    assert tally.foreign_calls == 0
    assert not wrong, f"dead-lettered with an unexpected reason: {dict(wrong)}"
    assert not mangled, f"parameters changed on the way: {mangled[:3]}"
    assert len(batch.invalid) >= 1000
    assert row.duplicates == 0
    assert_nothing_lost(run, tally, row)


#: Bodies that decode (or pass as a raw type kombu trusts) but that Celery cannot run: not
#: the three items of its protocol 2 (args, kwargs, embed), or keyword arguments that are
#: not a mapping; and the reason each must be dead-lettered with.
MALFORMED_BODIES = {
    "empty body": (b"", "application/json", "undecodable"),
    "a list of one": (b'["one"]', "application/json", "undecodable"),
    "an object": (b'{"kwargs": {}}', "application/json", "undecodable"),
    "raw bytes": (b"raw bytes", "application/data", "undecodable"),
    "kwargs a string": (b'[[], "kwargs", {}]', "application/json", "error:InvalidTaskError"),
    "kwargs a list": (b'[[], ["kwargs"], {}]', "application/json", "error:InvalidTaskError"),
}


def test_a_body_celery_cannot_run_is_dead_lettered_and_the_worker_keeps_running(
    run: Run,
) -> None:
    """Two ways a body that decodes can still escape the dead-letter queue:
    - Celery unpacks it into (args, kwargs, embed) while building the request, in the
      worker's main process, and lets the ValueError of any other shape out of its
      consumer: the worker stops ("Unrecoverable error") and meets the same message again
      after each restart;
    - keyword arguments that are not a mapping fail "outside the body": Celery sends
      task_internal_error, not task_failure, and acknowledges the message.
    Each must be in the dead-letter queue with a reason, and the worker must go on to
    deliver a valid event sent after them."""
    worker = run.worker(run.env(), "malformed")
    worker.start()
    app = run.app()
    ledger = run.ledger("6 poison: bodies Celery cannot run")
    expected = {}
    with outlet(app, run.broker_url) as out:
        for body, content_type, reason in MALFORMED_BODIES.values():
            key = ledger.key(DEAD_LETTER)
            out.publish_raw(body, content_type, task_headers(TRACK, key))
            expected[key] = reason
    send(Producer(app=app), ledger, 1)
    tally = run.settle(ledger, app, timeout=30, worker=worker)
    row = run.record(ledger.row(tally, duplicate_bound=0))
    assert worker.alive, f"a malformed body stopped the worker:\n{worker.tail()}"
    assert_nothing_lost(run, tally, row)
    assert {key: tally.dead[key].reason for key in expected} == expected
