"""The gateway engine (``worker.transfers``): every call of a process in one thread, with
libcurl's multi interface, against the loopback gateway emulator; and the vet that checks a
round of calls before any of them is sent (the state store's check of single events)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from tests.test_gateway import event, settings_for
from tests.workers import wait_until
from totango_emulator import GatewayEmulator
from worker.gateway import Gateway, Gateways
from worker.transfers import Engine, Transfer

#: A name of this module's own: other tests' gateways have engines of their own.
ENGINE_THREAD = "totango-curl-test-transfers"


@pytest.fixture
def emulator() -> Iterator[GatewayEmulator]:
    with GatewayEmulator() as emu:
        yield emu


@pytest.fixture
def engine() -> Iterator[Engine]:
    engine = Engine(ENGINE_THREAD)
    yield engine
    engine.close()


def gateway_on(emulator: GatewayEmulator, engine: Engine) -> Gateway:
    return Gateway(settings_for(f"{emulator.url}/pixel.gif"), env={}, engine=engine)


def engine_threads() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name == ENGINE_THREAD)


def test_the_calls_of_many_threads_are_in_flight_at_once_in_one_thread(
    emulator: GatewayEmulator, engine: Engine
) -> None:
    """Ten threads send at once while the gateway holds each call 0.5 s: every call reaches
    the gateway before the first is answered (they are in flight together), each is
    answered 200, and one engine thread made them all."""
    delay, senders = 0.5, 10
    emulator.set_delay(delay)
    gateway = gateway_on(emulator, engine)
    barrier = threading.Barrier(senders)

    def send(n: int) -> str:
        barrier.wait(5)
        return gateway.send(event(event_id=f"e-{n}")).status

    with ThreadPoolExecutor(senders) as pool:
        statuses = list(pool.map(send, range(senders)))
    assert statuses == ["200"] * senders
    received = sorted(call.received_at for call in emulator.calls())
    assert len(received) == senders
    assert received[-1] - received[0] < delay
    assert engine_threads() == 1
    gateway.close()


def test_a_vet_sees_a_round_together_keeps_one_back_and_replaces_another(
    emulator: GatewayEmulator, engine: Engine
) -> None:
    """The first call's vet is held until five more calls wait in the engine's queue; the
    next round's vet then gets all five at once. It keeps one back (not sent: no answer,
    no call), sends a smaller event for another (the gateway gets the replacement), and
    its notes reach each sender."""
    gateway = gateway_on(emulator, engine)
    rounds: list[list[str]] = []
    release = threading.Event()

    def vet(transfers: list[Transfer]) -> None:
        ids = [transfer.event.event_id for transfer in transfers]
        rounds.append(ids)
        if ids == ["first"]:
            release.wait(10)
        for transfer in transfers:
            transfer.note = f"seen {transfer.event.event_id}"
            if transfer.event.event_id == "kept-back":
                transfer.event = None
            elif transfer.event.event_id == "replaced":
                transfer.event = replace(transfer.event, params=(("sdr_s", "smaller"),))

    ids = ["first", "kept-back", "replaced", "a", "b", "c"]
    with ThreadPoolExecutor(len(ids)) as pool:
        first = pool.submit(gateway.send_vetted, event(event_id="first"), vet)
        wait_until(lambda: rounds == [["first"]], 5, "the first round's vet")
        rest = {i: pool.submit(gateway.send_vetted, event(event_id=i), vet) for i in ids[1:]}
        wait_until(lambda: engine._queue.qsize() == len(rest), 5, "five calls queued")
        release.set()
        results = {"first": first.result(10), **{i: f.result(10) for i, f in rest.items()}}
    assert rounds[0] == ["first"]
    assert sorted(rounds[1]) == sorted(ids[1:])
    assert len(rounds) == 2
    answer, note = results["kept-back"]
    assert (answer, note) == (None, "seen kept-back")
    for i in ("first", "replaced", "a", "b", "c"):
        answer, note = results[i]
        assert answer is not None, i
        assert answer.status == "200", i
        assert note == f"seen {i}"
    sent = [dict(call.params) for call in emulator.calls()]
    assert len(sent) == 5
    assert {"sdr_s": "smaller"} in sent
    gateway.close()


def test_a_vet_that_fails_sends_its_round_unchecked_and_the_engine_goes_on(
    emulator: GatewayEmulator, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Fail open: a vet that raises (after changing a transfer and noting it) is logged,
    its calls are sent as they were prepared with no note, and the next call goes through
    the same engine."""
    gateway = gateway_on(emulator, engine)

    def broken(transfers: list[Transfer]) -> None:
        transfers[0].event = None
        transfers[0].note = "half done"
        raise RuntimeError("the store's answer made no sense")

    answer, note = gateway.send_vetted(event(event_id="unchecked"), broken)
    assert answer is not None
    assert answer.status == "200"
    assert note is None
    assert "sent unchecked" in caplog.text
    assert gateway.send(event(event_id="after")).status == "200"
    assert len(emulator.calls()) == 2
    gateway.close()


def test_a_call_after_the_engine_closed_is_a_connection_error_and_is_not_sent(
    emulator: GatewayEmulator,
) -> None:
    """Closing the process's gateways stops their engine; a call handed over after that is
    answered ``connection_error`` at once (a retry, not a loss), and nothing is sent."""
    gateways = Gateways(settings_for(f"{emulator.url}/pixel.gif"))
    assert gateways.send(event(event_id="before")).status == "200"
    gateways.close()
    answer = gateways.send(event(event_id="after"))
    assert answer.status == "connection_error"
    assert "closed" in answer.excerpt
    assert len(emulator.calls()) == 1
