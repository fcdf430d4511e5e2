"""The common-shape check of a ``send`` (:mod:`cluster.protocol.plain_send`) agrees with the
schema's plan: whatever it accepts, the plan accepts with the same values, and everything
else (every invalid send included) still gets the plan's own answer, on the server's
decoder and in the client's ``make_request``."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.protocol import (
    HEADER,
    MAX_QUEUES,
    Acks,
    FrameDecoder,
    ProtocolError,
    make_request,
)
from cluster.protocol.limits import PROTOCOL_VERSION
from cluster.protocol.plain_send import plain_send
from cluster.protocol.schema import PLANS, Invalid, validate

ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=2**64),
    st.text(max_size=12),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
    st.floats(allow_nan=False),
)
"""Any value a client could put in a field, of the right type or not."""

FIELD_VALUES = {
    "body": st.one_of(st.binary(max_size=16), ODD_VALUES),
    "queue": st.one_of(st.integers(min_value=-1, max_value=MAX_QUEUES), ODD_VALUES),
    "key": st.one_of(st.binary(max_size=4), st.text(max_size=4), ODD_VALUES),
    "tags": st.one_of(st.text(max_size=4), ODD_VALUES),
    "props": ODD_VALUES,
    "born_us": ODD_VALUES,
    "acks": st.one_of(st.sampled_from([a.value for a in Acks] + ["all", "LEADER"]), ODD_VALUES),
    "timeout_ms": st.one_of(st.integers(min_value=-1, max_value=700_000), ODD_VALUES),
    "producer": ODD_VALUES,
    "sequence": ODD_VALUES,
    "extra": ODD_VALUES,
}


@st.composite
def send_fields(draw: st.DrawFn) -> dict[str, Any]:
    """A send's fields: each present or not, each value valid or not; often the plain
    shape (a body and a queue or a key, with acks and a timeout) so both paths are met."""
    fields: dict[str, Any] = {}
    plain = draw(st.booleans())
    for name, values in FIELD_VALUES.items():
        if plain and name in ("tags", "props", "born_us", "producer", "sequence", "extra"):
            continue
        if draw(st.booleans()):
            fields[name] = draw(values)
    return fields


def plan_result(fields: dict[str, Any]) -> dict[str, Any] | Invalid:
    out: dict[str, Any] = {}
    try:
        validate(PLANS["send"], {"topic": "t", **fields}, out)
    except Invalid as exc:
        return exc
    return out


ODD_SAMPLES = (None, True, -1, 0, 2**64, "", "x", b"", b"k", [1], {"a": "b"}, 1.5)
PLAIN = {"body": b"m", "queue": 1, "acks": "leader", "timeout_ms": 100}


@pytest.mark.parametrize("name", sorted(FIELD_VALUES.keys() - {"extra"}))
@pytest.mark.parametrize("value", ODD_SAMPLES, ids=repr)
def test_one_odd_field_in_a_plain_send_is_judged_as_the_plan_judges_it(
    name: str, value: Any
) -> None:
    fields = {**PLAIN, name: value}
    if name == "key":
        fields["queue"] = None
    shape = plain_send(fields)
    planned = plan_result(fields)
    if isinstance(planned, Invalid):
        assert shape is None
    elif shape is not None:
        assert shape == tuple(planned[k] for k in ("body", "queue", "key", "acks", "timeout_ms"))


@settings(max_examples=150)
@given(send_fields())
def test_what_the_plain_check_accepts_the_plan_accepts_with_the_same_values(
    fields: dict[str, Any],
) -> None:
    shape = plain_send(fields)
    planned = plan_result(fields)
    if shape is None:
        return  # the plan decides, as before
    assert not isinstance(planned, Invalid), (fields, planned.sentence("send"))
    body, queue, key, acks, timeout_ms = shape
    assert (body, queue, key, acks, timeout_ms) == (
        planned["body"],
        planned["queue"],
        planned["key"],
        planned["acks"],
        planned["timeout_ms"],
    )
    assert planned["tags"] is planned["props"] is planned["born_us"] is None
    assert planned["producer"] is planned["sequence"] is None


def decoded_twice(fields: dict[str, Any]) -> tuple[Any, Any]:
    """The same send decoded by a decoder that never saw its topic (the plan) and by one
    that did (where the plain check applies)."""
    body = cbor2.dumps({"v": 1, "op": "send", "id": 9, "topic": "orders", **fields})
    frame = HEADER.pack(len(body)) + body
    fresh = FrameDecoder()
    fresh.feed(frame)
    (first,) = list(fresh)
    warmed = FrameDecoder()
    warm_up = cbor2.dumps({"v": 1, "op": "send", "id": 1, "topic": "orders", "body": b""})
    warmed.feed(HEADER.pack(len(warm_up)) + warm_up + frame)
    _, second = list(warmed)
    return first, second


def comparable(item: Any) -> Any:
    if isinstance(item, ProtocolError):
        return (item.status, str(item), item.req_id, item.field)
    return item


@settings(max_examples=100)
@given(send_fields().filter(lambda fields: "extra" not in fields or fields["extra"] is None))
def test_the_server_decodes_a_send_alike_on_either_path(fields: dict[str, Any]) -> None:
    cbor_safe = {name: value for name, value in fields.items() if value is not None}
    first, second = decoded_twice(cbor_safe)
    assert comparable(first) == comparable(second)


def test_an_invalid_send_of_a_known_topic_still_names_its_field() -> None:
    _, second = decoded_twice({"body": b"x", "queue": MAX_QUEUES})
    assert isinstance(second, ProtocolError)
    assert second.field == "queue"
    assert f"must be between 0 and {MAX_QUEUES - 1}, got {MAX_QUEUES}" in str(second)
    _, second = decoded_twice({"body": b"x", "queue": 1, "key": b"k"})
    assert isinstance(second, ProtocolError) and "cannot be combined with 'key'" in str(second)


def make_or_error(fields: dict[str, Any]) -> Any:
    try:
        return make_request("send", 5, topic="orders", **fields)
    except ProtocolError as exc:
        return comparable(exc)


@settings(max_examples=100)
@given(send_fields())
def test_make_request_builds_a_send_as_the_plan_would(fields: dict[str, Any]) -> None:
    made = make_or_error(fields)
    planned = plan_result({k: v for k, v in fields.items() if k != "extra"})
    if "extra" in fields:
        assert isinstance(made, tuple) and "has no field(s) extra" in made[1]
    elif isinstance(planned, Invalid):
        assert isinstance(made, tuple) and made[1] == planned.sentence("send")
    else:
        expected = {"v": PROTOCOL_VERSION, "op": "send", "id": 5, "topic": "orders"}
        expected.update((k, v) for k, v in fields.items() if v is not None)
        assert made == expected
