"""A one-message send's frame built from a kept prefix reads, on the node, exactly as the
frame ``encode_frame(make_request(...))`` makes; whatever it does not build is left to
``make_request``, which still names what is wrong."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.client.send_frames import SendFrames
from cluster.protocol import ProtocolError, encode_frame, make_request
from cluster.protocol.codec import FrameDecoder
from cluster.protocol.limits import MAX_REQUEST_ID

topics = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
shapes = st.fixed_dictionaries(
    {"topic": topics, "body": st.binary(max_size=300)},
    optional={
        "acks": st.sampled_from(["leader", "durable", "in_sync", "replicated", "bogus"]),
        "timeout_ms": st.integers(-5, 2**31),
        "queue": st.integers(-3, 70_000),
    },
)


def decoded(frame: bytes) -> object:
    """What the node reads from ``frame`` (its only item)."""
    decoder = FrameDecoder()
    decoder.feed(frame)
    items = list(decoder)
    assert len(items) == 1 and decoder.buffered == 0
    return items[0]


@given(shapes, st.integers(0, MAX_REQUEST_ID))
def test_a_built_frame_reads_as_the_encoded_one(fields: dict[str, Any], req_id: int) -> None:
    """Same request on the node, same length; an invalid shape raises what
    ``make_request`` raises (the second time too: nothing invalid is kept)."""
    frames = SendFrames(1 << 20)
    try:
        expected = encode_frame(make_request("send", req_id, **fields))
    except ProtocolError as exc:
        for _ in range(2):
            with pytest.raises(ProtocolError) as raised:
                frames.frame(req_id, fields)
            assert (raised.value.status, str(raised.value)) == (exc.status, str(exc))
        return
    for _ in range(2):  # checked once, then from the kept prefix
        built = frames.frame(req_id, fields)
        assert built is not None
        assert len(built) == len(expected)
        assert decoded(built) == decoded(expected)


def test_the_prefix_is_kept_per_shape_and_the_id_and_body_change() -> None:
    frames = SendFrames(1 << 20)
    first = frames.frame(1, {"topic": "t", "queue": 0, "body": b"a"})
    other_queue = frames.frame(2, {"topic": "t", "queue": 1, "body": b"bb"})
    assert first is not None and other_queue is not None
    assert decoded(first) == decoded(
        encode_frame(make_request("send", 1, topic="t", queue=0, body=b"a"))
    )
    read = decoded(other_queue)
    assert isinstance(read, dict)
    assert (read["id"], read["queue"], read["body"]) == (2, 1, b"bb")


@pytest.mark.parametrize(
    "fields",
    [
        {"topic": "t", "key": b"k", "body": b"x"},
        {"topic": "t", "tags": "a", "body": b"x"},
        {"topic": "t", "body": bytearray(b"x")},
        {"topic": "t", "body": b"x", "producer": 1, "sequence": 0},
        {"topic": "t", "queue": [0], "body": b"x"},
    ],
)
def test_other_sends_are_left_to_make_request(fields: dict[str, Any]) -> None:
    assert SendFrames(1 << 20).frame(1, fields) is None


def test_a_body_too_large_for_a_frame_is_left_to_make_request() -> None:
    """``encode_frame`` then refuses it with its own words."""
    frames = SendFrames(2048)
    assert frames.frame(1, {"topic": "t", "body": b"x" * 1000}) is not None
    assert frames.frame(2, {"topic": "t", "body": b"x" * 2100}) is None
