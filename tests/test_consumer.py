"""The consumer's request: a message's body is decoded once, in the consumer, and the pool
gets the decoded arguments (``worker.consumer.DecodedOnce``).

Built from real Celery and kombu objects, the way Celery's default strategy builds a request
from a received message; the end-to-end tests (``test_relay``, ``test_batch``) run every
task through it in a real worker, and ``test_relay``'s bad messages still reach the
dead-letter queue.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from celery.worker.request import Request
from kombu.message import Message
from kombu.serialization import dumps, prepare_accept_content

from worker.application import TotangoCelery
from worker.consumer import DecodedOnce
from worker.contract import QUEUE, TRACK_ACTIVITY, TRACK_BATCH, UPDATE_ACCOUNT, UPDATE_USER

Env = dict[str, str]


def received(app: TotangoCelery, kwargs: dict[str, Any]) -> Message:
    """A protocol-2 message of ``totango.track_activity`` as a consumer receives it."""
    task_message = app.amqp.as_task_v2("a-task-id", TRACK_ACTIVITY, args=(), kwargs=kwargs)
    content_type, encoding, body = dumps(task_message.body, serializer="json")
    return Message(
        body=body,
        content_type=content_type,
        content_encoding=encoding,
        headers=task_message.headers,
        properties=task_message.properties,
        delivery_info={"exchange": "", "routing_key": QUEUE},
        accept=prepare_accept_content(app.conf.accept_content),
    )


def request_of(app: TotangoCelery, message: Message, request_cls: type[Request]) -> Request:
    """The request, made as ``celery.worker.strategy.default`` makes it for protocol 2."""
    return request_cls(
        message,
        app=app,
        hostname="test@host",
        task=app.tasks[TRACK_ACTIVITY],
        body=message.body,
        headers=message.headers,
        decoded=False,
        utc=True,
    )


def test_the_pool_gets_the_arguments_the_consumer_decoded(
    app_for: Callable[[Env], TotangoCelery], env_for: Callable[..., Env]
) -> None:
    """With ``DecodedOnce`` the request hands the pool the decoded (args, kwargs, embed)
    and no content type, so Celery's tracer takes them as they are instead of parsing the
    JSON a second time; with Celery's own request the pool gets the raw body to parse. Both
    see the same arguments."""
    app = app_for(env_for())
    kwargs = {"account_id": "acme", "activity": "login", "module": "web", "event_id": "e-1"}
    message = received(app, kwargs)

    ours = request_of(app, message, DecodedOnce)
    raw = received(app, kwargs)
    celerys = request_of(app, raw, Request)

    assert (ours.content_type, ours.content_encoding) == (None, None)
    args, passed, embed = ours.body
    assert (tuple(args), passed) == ((), kwargs)
    assert isinstance(embed, dict)
    assert "callbacks" in embed
    assert celerys.content_type == "application/json"
    assert celerys.body == raw.body  # the raw bytes, parsed again on the pool's thread
    assert (ours.args, ours.kwargs) == (celerys.args, celerys.kwargs)


@pytest.mark.parametrize(
    ("pool", "decoded_once"), [("threads", True), ("solo", True), ("prefork", False)]
)
def test_every_task_decodes_once_where_the_pool_runs_in_the_consumers_process(
    app_for: Callable[[Env], TotangoCelery],
    env_for: Callable[..., Env],
    pool: str,
    decoded_once: bool,
) -> None:
    """Every task of an app with an in-process pool uses ``DecodedOnce``; under prefork a
    child decodes the raw body itself (pickling the decoded body to it would move the work to
    the consumer), so Celery's request stays. Each app's tasks follow its own settings."""
    app = app_for(env_for(TOTANGO_POOL=pool))
    names = (TRACK_ACTIVITY, UPDATE_ACCOUNT, UPDATE_USER, TRACK_BATCH)
    expected = "worker.consumer:DecodedOnce" if decoded_once else "celery.worker.request:Request"
    assert {app.tasks[name].Request for name in names} == {expected}
