"""``events.encode``: tricky characters never split, add or drop a gateway parameter."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

import pytest

from worker import events
from worker.events import TRACK_ACTIVITY, UPDATE_ACCOUNT, UPDATE_USER, encode

TRICKY = [
    "a&b=c",
    "a+b",
    "a#b",
    "a b",
    "100%",
    "%20",
    "%2B",
    "a?b",
    "a/b",
    "a;b",
    "café",
    "日本",
    "😀",
    "x=",
    "&",
    "==",
    "sdr_o=evil&sdr_s=SP-9-9",
    "a.b",
    "~-_.",
]
TRICKY_IDS = [
    "amp-eq",
    "plus",
    "hash",
    "space",
    "percent",
    "pct-20",
    "pct-2B",
    "question",
    "slash",
    "semicolon",
    "cafe",
    "cjk",
    "emoji",
    "trailing-eq",
    "lone-amp",
    "eqeq",
    "smuggle",
    "dot",
    "unreserved",
]


def parsed(encoded: str) -> list[tuple[str, str]]:
    return parse_qsl(encoded, keep_blank_values=True, strict_parsing=True)


@pytest.mark.parametrize(
    ("params", "encoded"),
    [
        ((("sdr_o", "a&b=c"),), "sdr_o=a%26b%3Dc"),
        ((("sdr_o.Account Type", "Demo"),), "sdr_o.Account%20Type=Demo"),
        ((("sdr_u", "a b+c"),), "sdr_u=a%20b%2Bc"),
        ((("sdr_a", "#1"),), "sdr_a=%231"),
        ((("sdr_o.pct", "100%"),), "sdr_o.pct=100%25"),
        ((("sdr_m", "a?b/c"),), "sdr_m=a%3Fb%2Fc"),
        ((("sdr_o.name", "café"),), "sdr_o.name=caf%C3%A9"),
        ((("sdr_o.日本", "日本"),), "sdr_o.%E6%97%A5%E6%9C%AC=%E6%97%A5%E6%9C%AC"),
        ((("sdr_u.mood", "😀"),), "sdr_u.mood=%F0%9F%98%80"),
        ((("sdr_u", "joe@example.com"),), "sdr_u=joe%40example.com"),
        ((("sdr_o.note", ""),), "sdr_o.note="),
        ((("sdr_o.x", "~a-b_c.d"),), "sdr_o.x=~a-b_c.d"),
        ((("sdr_s", "SP-1-2"), ("sdr_o", "a")), "sdr_s=SP-1-2&sdr_o=a"),
    ],
    ids=[
        "amp-eq-escaped",
        "space-is-pct20",
        "space-and-plus",
        "hash",
        "percent",
        "question-slash",
        "utf8-2-bytes",
        "utf8-name-and-value",
        "utf8-4-bytes",
        "at-sign",
        "empty-value",
        "unreserved-kept",
        "two-params",
    ],
)
def test_encode_exact_string(params: tuple[tuple[str, str], ...], encoded: str) -> None:
    """Names and values are percent-encoded as UTF-8; a space is %20, never '+'."""
    assert encode(params) == encoded


def test_documented_combined_call_encodes_as_expected() -> None:
    """The combined example from Totango's documentation, built from a message."""
    event = events.from_message(
        TRACK_ACTIVITY,
        {
            "account_id": "u12214",
            "user_id": "joe@example.com",
            "activity": "Login",
            "module": "Application",
            "account_attributes": {"Account Type": "Demo"},
            "user_attributes": {"role": "admin"},
        },
        event_id="e",
        default_service_id="SP-1234-56",
    )
    assert encode(event.params) == (
        "sdr_s=SP-1234-56&sdr_o=u12214&sdr_u=joe%40example.com&sdr_a=Login&sdr_m=Application"
        "&sdr_o.Account%20Type=Demo&sdr_u.role=admin"
    )


def tricky_event(text: str) -> events.Event:
    """An activity with ``text`` in every id, name and value it can hold."""
    return events.from_message(
        TRACK_ACTIVITY,
        {
            "account_id": text,
            "user_id": text,
            "activity": text,
            "module": text,
            "account_name": text,
            "account_attributes": {text: text, "plain": text},
            "user_attributes": {text: text},
            "event_id": "e",
        },
        event_id="e",
        default_service_id="SP-1-2",
    )


@pytest.mark.parametrize("text", TRICKY, ids=TRICKY_IDS)
def test_tricky_text_round_trips_without_splitting(text: str) -> None:
    """parse_qsl of the encoding gives back exactly the parameters: none split, added or lost."""
    event = tricky_event(text)
    encoded = encode(event.params)
    assert parsed(encoded) == list(event.params)
    assert encoded.count("&") == len(event.params) - 1
    assert encoded.count("=") == len(event.params)


@pytest.mark.parametrize("text", TRICKY, ids=TRICKY_IDS)
def test_encoding_has_no_raw_space_plus_or_non_ascii(text: str) -> None:
    """The wire form is plain ASCII with no literal space or '+' (which a form decoder reads as
    a space), and no '#' (which would end the URL)."""
    encoded = encode(tricky_event(text).params)
    assert encoded.isascii()
    assert not {" ", "+", "#", "?"} & set(encoded)


@pytest.mark.parametrize(
    ("task", "kwargs"),
    [
        (UPDATE_ACCOUNT, {"account_id": "a&b", "attributes": {"Account Type": "x y"}}),
        (UPDATE_USER, {"account_id": "a", "user_id": "u=1", "attributes": {"role & rank": "a+b"}}),
    ],
    ids=["account", "user"],
)
def test_dot_after_prefix_stays_literal(task: str, kwargs: dict[str, Any]) -> None:
    """``sdr_o.`` / ``sdr_u.`` keep their dot literal; only the attribute name is escaped."""
    event = events.from_message(task, kwargs, event_id="e", default_service_id="SP-1-2")
    encoded = encode(event.params)
    attribute_params = [p for p in encoded.split("&") if p.startswith(("sdr_o.", "sdr_u."))]
    assert len(attribute_params) == 1
    assert "%2E" not in encoded.upper()
    assert attribute_params[0] in {"sdr_o.Account%20Type=x%20y", "sdr_u.role%20%26%20rank=a%2Bb"}


@pytest.mark.parametrize(
    "text", ["a b", "a+b", "a%20b", "a%2Bb"], ids=["space", "plus", "p20", "p2B"]
)
def test_space_and_plus_stay_distinct(text: str) -> None:
    """'a b', 'a+b' and their percent forms decode back to four different values."""
    event = tricky_event(text)
    assert dict(parsed(encode(event.params)))["sdr_o"] == text


def test_encode_accepts_a_list_and_empty_params() -> None:
    """encode takes the params as a tuple or a list; no params is the empty string."""
    assert encode([("sdr_s", "SP-1-2")]) == encode((("sdr_s", "SP-1-2"),)) == "sdr_s=SP-1-2"
    assert encode(()) == ""
