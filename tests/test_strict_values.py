"""Strict values and the gateway, through the real task bodies: what is refused is
dead-lettered with its reason and never sent; what is now accepted is delivered in one call;
a 414 falls back to a POST; a 200 that is not the GIF is counted; a service map routes each
event to its service's gateway and refuses the others.

Run broker-free as ``tests/test_orchestration.py`` does: ``Task.apply`` on an app built from
``Settings`` with the embedded (filesystem) broker and the loopback gateway emulator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from totango_emulator import GatewayEmulator
from worker import observability, relay
from worker.application import TotangoCelery
from worker.client import Producer
from worker.contract import TRACK_ACTIVITY, TRACK_BATCH, UPDATE_ACCOUNT, UPDATE_USER
from worker.deadletter import browse
from worker.errors import InvalidEvent
from worker.settings import Settings

ACTIVITY = {"account_id": "acme", "user_id": "jo@acme.test", "activity": "Login", "module": "App"}
USER = {"account_id": "acme", "user_id": "jo@acme.test"}
UNEXPECTED_BODY = "totango_gateway_unexpected_body_total"
RESPONSES = "totango_gateway_responses_total"


@pytest.fixture
def make_app(embedded_app: Callable[..., TotangoCelery]) -> Callable[..., TotangoCelery]:
    return embedded_app


def run(app: TotangoCelery, task: str, kwargs: dict[str, Any], task_id: str) -> Any:
    return app.tasks[task].apply(kwargs=kwargs, task_id=task_id).get()


# --- refused: dead-lettered with the reason, never sent ----------------------------------------

REFUSED = [
    (UPDATE_ACCOUNT, {"account_id": "a", "attributes": {"Create Date": "20260131"}}, "Create Date"),
    (UPDATE_ACCOUNT, {"account_id": "a", "attributes": {"Create Date": 20260131}}, "Create Date"),
    (
        UPDATE_ACCOUNT,
        {"account_id": "a", "attributes": {"Contract Start Date": "2026-01-31 10:00"}},
        "Contract Start Date",
    ),
    (
        UPDATE_ACCOUNT,
        {"account_id": "a", "attributes": {"Contract Renewal Date": "2026-W05-1"}},
        "Contract Renewal Date",
    ),
    (UPDATE_USER, {**USER, "attributes": {"contact": "YES"}}, "contact"),
    (UPDATE_USER, {**USER, "attributes": {"Key%20Contact": "yes"}}, "Key%20Contact"),
    (UPDATE_USER, {**USER, "attributes": {"Contact\u200b": "yes"}}, "Contact\u200b"),
    (
        UPDATE_ACCOUNT,
        {"account_id": "a", "attributes": {"Contract value": "$1,200"}},
        "Contract value",
    ),
    (UPDATE_ACCOUNT, {"account_id": "a", "attributes": {"create date": "garbage"}}, "create date"),
    (
        TRACK_ACTIVITY,
        {**ACTIVITY, "account_attributes": {"Create Date ": "garbage"}},
        "Create Date ",
    ),
]
REFUSED_IDS = [
    "basic-date",
    "int-date",
    "space-separator",
    "week-date",
    "contact-lowercase",
    "percent-encoded",
    "zero-width",
    "contract-value-case",
    "create-date-case",
    "trailing-space",
]


@pytest.mark.parametrize(("task", "kwargs", "field"), REFUSED, ids=REFUSED_IDS)
def test_a_value_totango_would_misread_is_dead_lettered_and_never_sent(
    make_app: Callable[..., TotangoCelery],
    gateway: GatewayEmulator,
    task: str,
    kwargs: dict[str, Any],
    field: str,
) -> None:
    """Each was sent unchanged before (a 200, and the value lost in Totango): now an
    ``invalid:<field>`` dead letter with the arguments kept, and no call at all."""
    app = make_app()
    assert run(app, task, kwargs, "e-1") == "dead_lettered"
    (envelope,) = browse(app)
    assert envelope.reason == f"invalid:{field}"
    assert envelope.attempts == 0
    assert envelope.kwargs == kwargs
    assert gateway.calls() == []


def test_an_integer_event_id_is_the_dead_letters_event_id(
    make_app: Callable[..., TotangoCelery],
) -> None:
    """An invalid event with ``event_id: 42`` is dead-lettered as event 42, not under its
    task id (an integer id was ignored there before)."""
    app = make_app()
    kwargs = {"account_id": "a", "attributes": {"Create Date": "31/01/2026"}, "event_id": 42}
    assert run(app, UPDATE_ACCOUNT, kwargs, "task-1") == "dead_lettered"
    (envelope,) = browse(app)
    assert (envelope.event_id, envelope.task_id) == ("42", "task-1")


def test_a_batchs_integer_event_ids_are_strings_in_its_dead_letters(
    make_app: Callable[..., TotangoCelery], gateway: GatewayEmulator
) -> None:
    """In a batch, an integer event id is the event's id too: its dead letter says "7",
    and a valid event with an integer id is delivered."""
    app = make_app()
    events = [
        {"task": TRACK_ACTIVITY, "kwargs": {**ACTIVITY, "event_id": 6}},
        {"task": UPDATE_USER, "kwargs": {**USER, "attributes": {"contact": "yes"}, "event_id": 7}},
    ]
    result = app.tasks[TRACK_BATCH].apply(kwargs={"events": events}, task_id="b-1").get()
    assert result == {"delivered": 1, "retrying": 0, "dead_lettered": 1}
    (envelope,) = browse(app)
    assert (envelope.reason, envelope.event_id) == ("invalid:contact", "7")
    assert len(gateway.calls()) == 1


# --- accepted now: delivered in one call -------------------------------------------------------

ACCEPTED = [
    (
        UPDATE_ACCOUNT,
        {"account_id": "a", "attributes": {"Contact": "YES"}},
        ("sdr_o.Contact", "YES"),
    ),
    (
        UPDATE_USER,
        {**USER, "attributes": {"Create Date": "garbage"}},
        ("sdr_u.Create Date", "garbage"),
    ),
    (TRACK_ACTIVITY, {**ACTIVITY, "writeback": True}, ("enableWriteback", "true")),
    (
        UPDATE_USER,
        {
            **USER,
            "attributes": {"role": "admin"},
            "account_attributes": {"plan": "x"},
            "writeback": True,
        },
        ("enableWriteback", "true"),
    ),
    (UPDATE_ACCOUNT, {"account_id": "a", "account_name": "ACME"}, ("sdr_o.account_name", "ACME")),
    (
        UPDATE_ACCOUNT,
        {"account_id": "a", "attributes": {"plan": "x"}, "writeback": None},
        ("sdr_o.plan", "x"),
    ),
    (TRACK_ACTIVITY, {**ACTIVITY, "event_id": 12345}, ("sdr_a", "Login")),
]
ACCEPTED_IDS = [
    "account-contact-is-custom",
    "user-create-date-is-custom",
    "activity-writeback",
    "user-writeback",
    "account-name-alone",
    "writeback-null",
    "int-event-id",
]


@pytest.mark.parametrize(("task", "kwargs", "param"), ACCEPTED, ids=ACCEPTED_IDS)
def test_what_the_contract_allows_is_delivered_in_one_call(
    make_app: Callable[..., TotangoCelery],
    gateway: GatewayEmulator,
    task: str,
    kwargs: dict[str, Any],
    param: tuple[str, str],
) -> None:
    """Each was dead-lettered as invalid before: now one call carrying the parameter."""
    app = make_app()
    assert run(app, task, kwargs, "e-2") == "delivered"
    (call,) = gateway.calls()
    assert param in call.params
    assert browse(app) == []


def test_the_producer_api_sends_date_objects_as_iso_strings() -> None:
    """``datetime.date`` and ``datetime.datetime`` values are formatted by the producer API
    (only strings cross the wire), and an integer event id becomes its string form."""
    from datetime import UTC, date, datetime  # noqa: PLC0415  only this test needs them

    producer = Producer(Settings.from_env({"TOTANGO_SERVICE_ID": "SP-1-2"}))
    prepared = producer.prepare(
        UPDATE_ACCOUNT,
        account_id="a",
        attributes={
            "Create Date": date(2026, 1, 31),
            "Contract Start Date": datetime(2026, 1, 31, 10, 0, tzinfo=UTC),
            "seen": datetime(2026, 2, 1, 8, 30, 15, 250000),
        },
        event_id=42,
    )
    assert prepared.kwargs["attributes"] == {
        "Create Date": "2026-01-31",
        "Contract Start Date": "2026-01-31T10:00:00+00:00",
        "seen": "2026-02-01T08:30:15.250000",
    }
    assert (prepared.event_id, prepared.kwargs["event_id"]) == ("42", "42")


def test_the_producer_api_refuses_a_lenient_date_string_at_once() -> None:
    """The producer API raises the same InvalidEvent the worker would dead-letter."""
    producer = Producer(Settings.from_env({"TOTANGO_SERVICE_ID": "SP-1-2"}))
    with pytest.raises(InvalidEvent) as info:
        producer.prepare(UPDATE_ACCOUNT, account_id="a", attributes={"Create Date": "20260131"})
    assert info.value.field == "Create Date"


# --- the gateway: 414, a 200 that is not the GIF ----------------------------------------------


def test_a_414_is_delivered_by_a_post_in_the_same_attempt_not_retried(
    make_app: Callable[..., TotangoCelery], gateway: GatewayEmulator
) -> None:
    """The gateway (or a proxy) takes shorter URLs than TOTANGO_MAX_URL_LENGTH: the GET is
    answered 414, the same event goes as a POST at once, and the task is delivered with no
    retry (before: the same GET retried until the retries ran out)."""
    gateway.set_max_url_length(300)
    app = make_app()
    kwargs = {**ACTIVITY, "user_attributes": {"bio": "x" * 400}}
    answered_414 = REGISTRY.get_sample_value(RESPONSES, {"status": "414"}) or 0.0
    assert run(app, TRACK_ACTIVITY, kwargs, "e-3") == "delivered"
    assert [(c.method, c.status) for c in gateway.calls()] == [("GET", 414), ("POST", 200)]
    assert browse(app) == []
    # The 414 is counted with the answers, so an operator sees the limit on the way.
    assert (REGISTRY.get_sample_value(RESPONSES, {"status": "414"}) or 0.0) - answered_414 == 1


def counted(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


@pytest.fixture
def warning_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The unexpected-body warning with a clock of the test's own: ``clock[0]`` is now."""
    clock = [0.0]
    fresh = observability.RateLimitedWarning(relay.log, 60.0, clock=lambda: clock[0])
    monkeypatch.setattr(relay, "unexpected_body_warning", fresh)
    return clock


def test_a_200_that_is_not_the_gif_is_delivered_counted_and_warned_about_once_a_minute(
    make_app: Callable[..., TotangoCelery],
    gateway: GatewayEmulator,
    caplog: pytest.LogCaptureFixture,
    warning_clock: list[float],
) -> None:
    """A proxy's page with a 200 is a delivery (Totango's rule) but is counted in
    totango_gateway_unexpected_body_total each time, and warned about at most once a
    minute, the next warning saying how many were held back."""
    caplog.set_level(logging.WARNING, logger="worker.tasks")
    app = make_app()
    gateway.add_rule(None, ["not_gif", "not_gif", "not_gif"])
    before = counted(UNEXPECTED_BODY)
    for n in range(2):
        assert run(app, TRACK_ACTIVITY, ACTIVITY, f"g-{n}") == "delivered"
    warning_clock[0] = 61.0
    assert run(app, TRACK_ACTIVITY, ACTIVITY, "g-2") == "delivered"
    assert run(app, TRACK_ACTIVITY, ACTIVITY, "g-3") == "delivered"  # the GIF: not counted
    assert counted(UNEXPECTED_BODY) - before == 3
    warnings = [r.getMessage() for r in caplog.records if "not the GIF" in r.getMessage()]
    assert len(warnings) == 2
    assert "event_id=g-0" in warnings[0]
    assert "(0 more since the last warning)" in warnings[0]
    assert "event_id=g-2" in warnings[1]
    assert "(1 more since the last warning)" in warnings[1]
    assert browse(app) == []


# --- the service map --------------------------------------------------------------------------


@pytest.fixture
def eu_gateway() -> Iterator[GatewayEmulator]:
    with GatewayEmulator() as emulator:
        yield emulator


def test_with_a_service_map_each_event_goes_to_its_services_gateway(
    make_app: Callable[..., TotangoCelery], gateway: GatewayEmulator, eu_gateway: GatewayEmulator
) -> None:
    """SP-1234-56 to one gateway, SP-7-8 to another: the default service's events and
    each named service's go to their own gateway, and nowhere else."""
    app = make_app(
        TOTANGO_GATEWAY_URL="",
        TOTANGO_SERVICE_MAP=f"SP-1234-56={gateway.url}/pixel.gif,SP-7-8={eu_gateway.url}/pixel.gif",
    )
    assert run(app, TRACK_ACTIVITY, ACTIVITY, "s-1") == "delivered"
    assert run(app, TRACK_ACTIVITY, {**ACTIVITY, "service_id": "SP-7-8"}, "s-2") == "delivered"
    assert [dict(c.params)["sdr_s"] for c in gateway.calls()] == ["SP-1234-56"]
    assert [dict(c.params)["sdr_s"] for c in eu_gateway.calls()] == ["SP-7-8"]


def test_with_a_service_map_an_unmapped_service_is_dead_lettered_and_never_sent(
    make_app: Callable[..., TotangoCelery], gateway: GatewayEmulator, eu_gateway: GatewayEmulator
) -> None:
    """An event for a service the map does not name is ``invalid:service_id``, single or in
    a batch: never sent, not even to the default service's gateway."""
    app = make_app(
        TOTANGO_GATEWAY_URL="",
        TOTANGO_SERVICE_MAP=f"SP-1234-56={gateway.url}/pixel.gif,SP-7-8={eu_gateway.url}/pixel.gif",
    )
    stray = {**ACTIVITY, "service_id": "SP-9-9", "event_id": "stray"}
    assert run(app, TRACK_ACTIVITY, stray, "s-3") == "dead_lettered"
    batch = [{"task": TRACK_ACTIVITY, "kwargs": {**stray, "event_id": "stray-2"}}]
    result = app.tasks[TRACK_BATCH].apply(kwargs={"events": batch}, task_id="b-2").get()
    assert result == {"delivered": 0, "retrying": 0, "dead_lettered": 1}
    assert sorted((e.reason, e.event_id) for e in browse(app)) == [
        ("invalid:service_id", "stray"),
        ("invalid:service_id", "stray-2"),
    ]
    assert gateway.calls() == []
    assert eu_gateway.calls() == []


def test_the_producer_api_refuses_an_unmapped_service_at_once() -> None:
    """A producer whose settings carry the map refuses the event before enqueueing it."""
    settings = Settings.from_env(
        {"TOTANGO_SERVICE_MAP": "SP-1-2=us,SP-3-4=eu", "TOTANGO_SERVICE_ID": "SP-1-2"}
    )
    producer = Producer(settings)
    assert producer.prepare(TRACK_ACTIVITY, **ACTIVITY, service_id="SP-3-4").event_id
    with pytest.raises(InvalidEvent) as info:
        producer.prepare(TRACK_ACTIVITY, **ACTIVITY, service_id="SP-5-6")
    assert info.value.code == "invalid:service_id"
