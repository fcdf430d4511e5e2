"""Compact sends (:mod:`cluster.protocol.compact`): a compact send is judged exactly as the
CBOR map of the same fields (same request, or the same error), its ``OK`` answer decodes
to the same dict as the CBOR answer, a layout that cannot be read is a clear
``MALFORMED_FRAME`` that loses nothing else, and a node answers compact with compact."""

from __future__ import annotations

import struct
from pathlib import Path
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
    ResponseDecoder,
    Status,
    encode_frame,
    encode_request,
    request_frame,
    requests,
    send_response,
)
from cluster.protocol.compact import (
    ANSWER_MARKER,
    SEND_HEAD,
    SEND_MARKER,
    encode_send,
    encode_send_answer,
)
from tests.cluster.test_server import client, node_config, running

TOPICS = st.one_of(
    st.sampled_from(["orders", "a.b_c-1", "x" * 127]),
    st.text(min_size=0, max_size=20),
)


@st.composite
def sends(draw: st.DrawFn) -> dict[str, Any]:
    """The fields a compact send can carry, valid or not for the schema."""
    fields: dict[str, Any] = {
        "topic": draw(TOPICS),
        "body": draw(st.binary(max_size=64)),
        "acks": draw(st.sampled_from(list(Acks))),
        "timeout_ms": draw(
            st.one_of(
                st.sampled_from([0, 1, 600_000, 600_001]),
                st.integers(min_value=0, max_value=2**32 - 1),
            )
        ),
    }
    where = draw(st.sampled_from(["none", "queue", "key"]))
    if where == "queue":
        fields["queue"] = draw(
            st.one_of(
                st.sampled_from([0, MAX_QUEUES - 1, MAX_QUEUES]),
                st.integers(min_value=0, max_value=2**16 - 1),
            )
        )
    elif where == "key":
        fields["key"] = draw(st.one_of(st.binary(max_size=12), st.text(max_size=12)))
    return fields


def cbor_send(req_id: int, fields: dict[str, Any]) -> bytes:
    raw = {"v": 1, "op": "send", "id": req_id} | fields
    raw["acks"] = fields["acks"].value
    body = cbor2.dumps(raw)
    return HEADER.pack(len(body)) + body


def compact_send(req_id: int, fields: dict[str, Any]) -> bytes:
    """The compact frame of ``fields`` (a send the layout can carry)."""
    compact = encode_send(
        req_id,
        fields["topic"],
        fields["body"],
        fields.get("queue"),
        fields.get("key"),
        fields["acks"],
        fields["timeout_ms"],
    )
    assert compact is not None
    return compact


def judged(decoder: FrameDecoder, frame: bytes) -> Any:
    decoder.feed(frame)
    item = decoder.next_frame()
    if isinstance(item, ProtocolError):
        return ("error", item.status, str(item), item.field, item.req_id)
    return item


@settings(max_examples=200)
@given(sends(), st.integers(min_value=0, max_value=2**64 - 1))
def test_a_compact_send_is_judged_as_its_cbor_map(fields: dict[str, Any], req_id: int) -> None:
    compact = compact_send(req_id, fields)
    on_compact, on_cbor = FrameDecoder(), FrameDecoder()
    for _ in range(2):  # the second time the topic may be a known one (another path)
        expected = judged(on_cbor, cbor_send(req_id, fields))
        assert judged(on_compact, compact) == expected
        assert on_compact.compact == (not isinstance(expected, tuple))
        assert not on_cbor.compact


@settings(max_examples=100)
@given(st.lists(sends(), min_size=1, max_size=12), st.data())
def test_a_connection_of_compact_sends_is_judged_as_its_cbor_maps(
    sent: list[dict[str, Any]], data: st.DataObject
) -> None:
    """Many sends on one decoder, topics from a few: a topic once accepted takes the
    compact fast path, with every other field still judged as its map is."""
    on_compact, on_cbor = FrameDecoder(), FrameDecoder()
    for req_id, fields in enumerate(sent):
        fields["topic"] = data.draw(st.sampled_from(["orders", "t", "x" * 127, "bad name"]))
        compact = compact_send(req_id, fields)
        assert judged(on_compact, compact) == judged(on_cbor, cbor_send(req_id, fields))


@settings(max_examples=100)
@given(
    st.integers(min_value=0, max_value=2**64 - 1),
    TOPICS,
    st.integers(min_value=0, max_value=1023),
    *[st.integers(min_value=0, max_value=2**64 - 1)] * 3,
)
def test_a_compact_answer_decodes_as_its_cbor_map(
    req_id: int, topic: str, queue: int, queue_offset: int, offset: int, store_us: int
) -> None:
    response = send_response(req_id, topic, queue, queue_offset, offset, store_us)
    frame = encode_send_answer(response)
    assert frame is not None and frame[HEADER.size] == ANSWER_MARKER
    compact, cbor = ResponseDecoder(), ResponseDecoder()
    compact.feed(frame)
    cbor.feed(encode_frame(response))
    assert compact.next_frame() == cbor.next_frame()
    assert compact.compact and not cbor.compact


def test_an_answer_other_than_ok_stays_a_cbor_map() -> None:
    timed_out = send_response(
        1, "t", 0, 5, 6, 7, status=Status.FLUSH_DISK_TIMEOUT, error="the fsync took too long"
    )
    assert encode_send_answer(timed_out) is None


def test_request_frame_is_compact_only_for_a_plain_send() -> None:
    plain = request_frame("send", 3, {"topic": "t", "body": b"x", "key": "k", "acks": "leader"})
    assert plain[HEADER.size] == SEND_MARKER
    tagged = {"topic": "t", "body": b"x", "tags": "red"}
    assert request_frame("send", 3, tagged) == encode_request("send", 3, **tagged)
    assert request_frame("status", 4, {}) == encode_request("status", 4)
    with pytest.raises(ProtocolError) as refused:
        request_frame("send", 5, {"topic": "t", "body": b"x", "queue": 0, "key": b"k"})
    assert refused.value.status is Status.BAD_REQUEST
    with pytest.raises(ProtocolError) as too_large:
        request_frame("send", 6, {"topic": "t", "body": bytes(70_000)}, max_frame_size=65_536)
    assert too_large.value.status is Status.FRAME_TOO_LARGE


def frame_or_error(req_id: int, fields: dict[str, Any]) -> bytes | tuple[Any, ...]:
    try:
        return request_frame("send", req_id, fields)
    except ProtocolError as exc:
        return ("error", exc.status, str(exc), exc.field)


@settings(max_examples=200)
@given(sends(), st.integers(min_value=0, max_value=2**64 - 1), st.data())
def test_a_send_repeating_a_framed_topic_acks_and_timeout_frames_to_the_same_bytes(
    fields: dict[str, Any], req_id: int, data: st.DataObject
) -> None:
    """request_frame remembers the topic, acks and timeout of a send it framed, and frames
    later sends with the same three without checking those again: the bytes (or the
    error) are the ones a process that framed nothing before makes."""
    first = fields | {"acks": fields["acks"].value}
    frame_or_error(1, first)
    again = first | {"body": data.draw(st.binary(max_size=64))}
    if "key" not in again:
        again["queue"] = data.draw(
            st.one_of(st.none(), st.integers(min_value=-1, max_value=2**16 - 1), st.just(True))
        )
    remembered = dict(requests._CHECKED_SENDS)
    warm = frame_or_error(req_id, again)
    requests._CHECKED_SENDS.clear()
    try:
        assert frame_or_error(req_id, again) == warm
    finally:
        requests._CHECKED_SENDS.update(remembered)


def test_a_remembered_send_frames_other_bodies_and_queues_as_encode_send_does() -> None:
    requests._CHECKED_SENDS.clear()
    request_frame("send", 1, {"topic": "orders", "body": b"a", "acks": "in_sync", "timeout_ms": 9})
    assert requests._CHECKED_SENDS == {("orders", "in_sync", 9): (b"orders", 2)}
    for queue in (None, 0, 7, MAX_QUEUES - 1):
        again = {
            "topic": "orders",
            "body": b"bc",
            "queue": queue,
            "acks": "in_sync",
            "timeout_ms": 9,
        }
        framed = request_frame("send", 2**40, again)
        assert framed == encode_send(2**40, "orders", b"bc", queue, None, Acks.IN_SYNC, 9)


def _head(**overrides: int) -> bytes:
    values = {
        "marker": SEND_MARKER,
        "flags": 0,
        "acks": 0,
        "topic": 1,
        "id": 77,
        "timeout": 100,
        "queue": 0,
        "key": 0,
    } | overrides
    return SEND_HEAD.pack(*values.values())


@pytest.mark.parametrize(
    ("body", "problem", "req_id"),
    [
        (bytes([SEND_MARKER]) + b"\x00" * 5, "at least 20 bytes", 0),
        (_head(flags=0x08) + b"t", "flags byte 0x08", 77),
        (_head(flags=0x04) + b"t", "flags byte 0x04", 77),
        (_head(acks=4) + b"t", "acks code 4", 77),
        (_head(topic=9) + b"t", "run past the end", 77),
        (_head(flags=0x06, key=2) + b"t\xff\xfe", "not valid UTF-8", 77),
        (_head(key=3) + b"tabcBODY", "key length is 3 but its flags set no key", 77),
        (_head(queue=5) + b"tBODY", "queue is 5 but its flags set no queue", 77),
    ],
)
def test_an_unreadable_compact_send_is_malformed_and_the_next_frame_is_read(
    body: bytes, problem: str, req_id: int
) -> None:
    decoder = FrameDecoder()
    decoder.feed(HEADER.pack(len(body)) + body + encode_request("status", 9))
    error = decoder.next_frame()
    assert isinstance(error, ProtocolError) and not error.fatal
    assert error.status is Status.MALFORMED_FRAME and error.req_id == req_id
    assert problem in str(error) and "docs/protocol.md" in str(error)
    assert not decoder.compact
    following = decoder.next_frame()
    assert isinstance(following, dict) and following["id"] == 9


@pytest.mark.parametrize("fields", [{"key": 3}, {"queue": 5}])
def test_a_length_or_queue_its_flags_do_not_set_is_malformed_for_a_known_topic_too(
    fields: dict[str, int],
) -> None:
    """A key length or queue the flags byte does not set is refused on the known-topic
    fast path as well. (The body lost as many bytes as the key length said, and the
    queue was ignored: the message stored was not the one sent.)"""
    decoder = FrameDecoder()
    good = _head() + b"tBODY"
    bad = _head(**fields) + b"tabcBODY"
    decoder.feed(b"".join(HEADER.pack(len(body)) + body for body in (good, good, bad)))
    first, known = decoder.next_frame(), decoder.next_frame()
    assert isinstance(first, dict) and isinstance(known, dict)
    assert known["op"] == "send" and known["body"] == b"BODY"
    error = decoder.next_frame()
    assert isinstance(error, ProtocolError), error
    assert error.status is Status.MALFORMED_FRAME and error.req_id == 77


def test_an_unreadable_compact_answer_is_malformed() -> None:
    decoder = ResponseDecoder()
    body = bytes([ANSWER_MARKER]) + b"\x00" * 10
    decoder.feed(HEADER.pack(len(body)) + body)
    error = decoder.next_frame()
    assert isinstance(error, ProtocolError) and error.status is Status.MALFORMED_FRAME
    assert "at least 36 bytes" in str(error)


async def test_a_node_answers_a_compact_send_compactly_and_its_errors_as_maps(
    tmp_path: Path,
) -> None:
    async with running(node_config(tmp_path / "node")) as node, client(node) as raw:
        await raw.ok("create_topic", topic="t", queues=2)
        frames = [
            request_frame("send", 101, {"topic": "t", "body": b"one", "queue": 1}),
            request_frame("send", 102, {"topic": "t", "body": b"two", "acks": "durable"}),
            request_frame("send", 103, {"topic": "t", "body": b"3", "key": "k"}),
            encode_send(104, "t", b"four", 5, None, Acks.LEADER, 100),  # queue 5 of 2
            encode_send(105, "nope", b"five", None, None, Acks.LEADER, 100),
        ]
        assert all(frame is not None and frame[HEADER.size] == SEND_MARKER for frame in frames)
        await raw.send_raw(b"".join(frame for frame in frames if frame is not None))
        answers: dict[int, dict[str, Any]] = {}
        kinds: dict[int, bool] = {}
        while len(answers) < len(frames):
            answer = await raw.recv()
            assert answer is not None
            answers[answer["id"]] = answer
            kinds[answer["id"]] = raw.decoder.compact
        assert kinds == {101: True, 102: True, 103: True, 104: False, 105: False}
        assert answers[101]["queue"] == 1 and answers[101]["topic"] == "t"
        assert answers[102]["status"] is Status.OK
        assert answers[104]["status"] is Status.BAD_REQUEST and "queue" in answers[104]["error"]
        assert answers[105]["status"] is Status.UNKNOWN_TOPIC
        for req_id, body in ((101, b"one"), (102, b"two"), (103, b"3")):
            stored = await raw.ok("read", offset=answers[req_id]["offset"])
            assert stored["record"]["body"] == body
            assert (stored["topic"], stored["queue"]) == ("t", answers[req_id]["queue"])


def test_the_layout_is_the_documented_one() -> None:
    frame = encode_send(2**40 + 3, "tp", b"BODY", None, b"KY", Acks.IN_SYNC, 1500)
    assert frame == (
        struct.pack(">I", 20 + 2 + 2 + 4)
        + bytes([0x01, 0x02, 0x02, 0x02])
        + (2**40 + 3).to_bytes(8, "big")
        + (1500).to_bytes(4, "big")
        + b"\x00\x00\x00\x02"
        + b"tpKYBODY"
    )
