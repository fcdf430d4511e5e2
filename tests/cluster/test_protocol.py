"""Tests of the sans-IO wire protocol: roundtrips, every error class, and hostile byte streams."""

from __future__ import annotations

import itertools
import re
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster import protocol as p
from cluster.protocol import (
    HEADER,
    MAX_BATCH_MESSAGES,
    MAX_FRAME_ITEMS,
    MAX_OFFSET,
    MAX_QUEUES,
    SCHEMAS,
    Acks,
    FrameDecoder,
    ProtocolError,
    ResponseDecoder,
    Status,
    encode_frame,
    encode_request,
    make_request,
)
from cluster.protocol.cbor_items import count_items

SMALL_LIMIT = 1024
"""The smallest frame limit a decoder accepts; hypothesis streams use it to reach the fatal path."""


def frame_of(obj: Any) -> bytes:
    """A frame built without validation, to send the server what a broken client would."""
    body = cbor2.dumps(obj)
    return HEADER.pack(len(body)) + body


def raw_frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def envelope(op: str, req_id: int = 7, **fields: Any) -> dict[str, Any]:
    return {"v": 1, "op": op, "id": req_id, **fields}


def decode_all(data: bytes, **kwargs: Any) -> list[Any]:
    decoder = FrameDecoder(**kwargs)
    decoder.feed(data)
    return list(decoder)


def only(data: bytes) -> Any:
    items = decode_all(data)
    assert len(items) == 1, items
    return items[0]


def rejected(obj: Any) -> ProtocolError:
    """The non-fatal error a single frame holding ``obj`` earns."""
    item = only(frame_of(obj))
    assert isinstance(item, ProtocolError), item
    assert not item.fatal
    return item


# ---- roundtrips -----------------------------------------------------------------------------

ROUNDTRIPS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "send",
        {"topic": "orders", "body": b"\x00hello", "key": "user-1", "props": {"k": "v"}},
        {
            "topic": "orders",
            "body": b"\x00hello",
            "queue": None,
            "key": "user-1",
            "tags": None,
            "props": {"k": "v"},
            "born_us": None,
            "acks": Acks.DURABLE,
            "timeout_ms": 5000,
            "producer": None,
            "sequence": None,
            "epoch": None,
        },
    ),
    (
        "send_batch",
        {
            "topic": "orders",
            "messages": [{"body": b"a", "queue": 3}, {"body": b"", "key": b"\xff", "tags": "t"}],
            "acks": "replicated",
            "timeout_ms": 250,
        },
        {
            "topic": "orders",
            "messages": [
                {
                    "body": b"a",
                    "queue": 3,
                    "key": None,
                    "tags": None,
                    "props": None,
                    "born_us": None,
                },
                {
                    "body": b"",
                    "queue": None,
                    "key": b"\xff",
                    "tags": "t",
                    "props": None,
                    "born_us": None,
                },
            ],
            "acks": Acks.REPLICATED,
            "timeout_ms": 250,
            "producer": None,
            "sequence": None,
            "epoch": None,
        },
    ),
    ("init_producer", {}, {"producer": None, "epoch": None}),
    (
        "pull",
        {"topic": "orders", "queue": 2, "offset": 42},
        {
            "topic": "orders",
            "queue": 2,
            "offset": 42,
            "max_messages": 32,
            "max_bytes": 1024 * 1024,
            "wait_ms": 0,
            "format": "messages",
        },
    ),
    ("get_offsets", {"topic": "orders"}, {"topic": "orders", "queue": None}),
    (
        "offsets_for_time",
        {"topic": "orders", "time_us": 5},
        {"topic": "orders", "time_us": 5, "queue": None},
    ),
    ("read", {"offset": MAX_OFFSET}, {"offset": MAX_OFFSET}),
    ("create_topic", {"topic": "orders", "queues": 8}, {"topic": "orders", "queues": 8}),
    ("alter_topic", {"topic": "orders", "queues": 9}, {"topic": "orders", "queues": 9}),
    ("delete_topic", {"topic": "orders"}, {"topic": "orders"}),
    ("list_topics", {}, {}),
    ("describe_topic", {"topic": "a.b_c-9"}, {"topic": "a.b_c-9"}),
    ("status", {}, {}),
    ("promote", {}, {"ha_port": 0}),
    ("repoint", {"master_ha": "h:1"}, {"master_ha": "h:1", "master_client": None}),
    ("metadata", {}, {}),
    (
        "switchover",
        {"group": "g1", "to": "node-2"},
        {"group": "g1", "to": "node-2", "timeout_ms": 10_000},
    ),
    (
        "join_group",
        {"group": "g", "member": "m-1", "topics": ["b", "a", "b"]},
        {"group": "g", "member": "m-1", "topics": ["a", "b"], "session_timeout_ms": 10_000},
    ),
    (
        "heartbeat",
        {"group": "g", "member": "m-1", "generation": 3},
        {"group": "g", "member": "m-1", "generation": 3},
    ),
    ("leave_group", {"group": "g", "member": "m-1"}, {"group": "g", "member": "m-1"}),
    (
        "commit_offsets",
        {"group": "g", "offsets": [{"topic": "a", "queue": 1, "offset": 7}]},
        {
            "group": "g",
            "member": None,
            "generation": None,
            "offsets": [{"topic": "a", "queue": 1, "offset": 7}],
            "acks": Acks.DURABLE,
            "timeout_ms": 5000,
        },
    ),
    ("fetch_offsets", {"group": "g"}, {"group": "g"}),
    ("list_groups", {}, {}),
    ("describe_group", {"group": "g"}, {"group": "g"}),
]


def test_roundtrips_cover_every_op() -> None:
    assert {op for op, _, _ in ROUNDTRIPS} == set(SCHEMAS)


@pytest.mark.parametrize(("op", "fields", "expected"), ROUNDTRIPS, ids=[r[0] for r in ROUNDTRIPS])
def test_request_roundtrip(op: str, fields: dict[str, Any], expected: dict[str, Any]) -> None:
    request = only(encode_request(op, 2**64 - 1, **fields))
    assert request == {"op": op, "id": 2**64 - 1, **expected}
    assert set(request) == {"op", "id", *SCHEMAS[op].fields}


def test_make_request_omits_none_and_keeps_the_envelope() -> None:
    assert make_request("get_offsets", 3, topic="t", queue=None) == {
        "v": 2,
        "op": "get_offsets",
        "id": 3,
        "topic": "t",
    }


def test_null_means_absent_and_unknown_fields_are_ignored() -> None:
    request = only(frame_of(envelope("pull", topic="t", queue=1, offset=0, wait_ms=None, x=1)))
    assert request["wait_ms"] == 0
    assert "x" not in request


def test_acks_become_the_enum() -> None:
    request = only(encode_request("send", 1, topic="t", body=b"", acks="leader"))
    assert request["acks"] is Acks.LEADER


def test_responses_roundtrip() -> None:
    view = memoryview(b"xxpayloadxx")[2:9]
    pulled = p.pulled_message(5, 4096, view, born_us=1, store_us=2, tags="red", props={"a": "b"})
    responses = [
        p.send_response(1, "orders", 3, 10, 4096, 1_700_000_000_000_000),
        p.send_response(
            2, "orders", 3, 11, 4200, 5, status=Status.FLUSH_DISK_TIMEOUT, error="fsync slow"
        ),
        p.send_batch_response(3, "orders", [0, 1], [1, 0], [2, 9], 3),
        p.pull_response(4, [pulled], next_offset=6, min_offset=0, max_offset=6),
        p.read_response(5, "orders", 3, pulled),
        p.make_response(6, topics=[{"topic": "orders", "queues": 8}]),
        p.not_master_response(7, "10.0.0.2:7100"),
        p.not_master_response(8, None),
        p.error_response(9, Status.OFFSET_OUT_OF_RANGE, "too far", min_offset=0, max_offset=3),
    ]
    decoder = ResponseDecoder()
    decoder.feed(b"".join(encode_frame(r) for r in responses))
    decoded: list[Any] = list(decoder)
    assert decoded == responses
    assert all(type(r["status"]) is Status for r in decoded)
    assert p.batch_results(decoded[2]) == [p.send_result(0, 1, 2, 3), p.send_result(1, 0, 9, 3)]
    assert decoded[3]["messages"][0]["body"] == b"payload"
    assert decoded[6]["master"] == "10.0.0.2:7100"
    assert decoded[7]["master"] is None
    assert all(r["error"] for r in decoded if r["status"] is not Status.OK)


def test_every_error_response_names_the_problem() -> None:
    error = rejected(envelope("pull", topic="t", queue=1))
    response = error.response()
    assert response == {
        "v": 2,
        "id": 7,
        "status": Status.BAD_REQUEST,
        "error": error.message,
    }
    with pytest.raises(ValueError, match="error sentence"):
        p.make_response(1, Status.DISK_FULL)
    with pytest.raises(ValueError, match="OK"):
        p.error_response(1, Status.OK, "fine")


# ---- statuses -------------------------------------------------------------------------------


def test_status_table() -> None:
    retryable = {s for s in Status if s.retryable}
    unknown = {s for s in Status if s.outcome_unknown}
    assert retryable == {
        Status.NOT_MASTER,
        Status.SLAVE_NOT_AVAILABLE,
        Status.SHUTTING_DOWN,
        Status.TOO_MANY_CONNECTIONS,
        Status.COORDINATION_UNAVAILABLE,
    }
    assert unknown == {
        Status.FLUSH_DISK_TIMEOUT,
        Status.FLUSH_SLAVE_TIMEOUT,
        Status.STORAGE_FAILED,
        Status.INTERNAL_ERROR,
        Status.SEQUENCE_TOO_OLD,
    }
    assert not retryable & unknown
    assert {s for s in Status if s.has_result} == {
        Status.OK,
        Status.FLUSH_DISK_TIMEOUT,
        Status.FLUSH_SLAVE_TIMEOUT,
    }
    assert {s for s in Status if s.closes_connection} == {
        Status.FRAME_TOO_LARGE,
        Status.TOO_MANY_CONNECTIONS,
    }
    assert all(s.value == s.name for s in Status)


# ---- fatal: oversized length prefix ------------------------------------------------------------


def test_oversized_prefix_is_fatal_before_the_body_arrives() -> None:
    decoder = FrameDecoder(max_frame_size=SMALL_LIMIT)
    decoder.feed(encode_request("status", 1) + HEADER.pack(SMALL_LIMIT + 1))
    assert decoder.next_frame() == {"op": "status", "id": 1}
    with pytest.raises(ProtocolError) as caught:
        decoder.next_frame()
    error = caught.value
    assert error.fatal
    assert error.status is Status.FRAME_TOO_LARGE
    assert error.status.closes_connection
    assert error.req_id == 0
    assert str(SMALL_LIMIT + 1) in error.message
    assert str(SMALL_LIMIT) in error.message
    assert error.response()["id"] == 0
    decoder.feed(encode_request("status", 2))
    with pytest.raises(ProtocolError) as again:
        list(decoder)
    assert again.value is error
    assert decoder.buffered == 0


def test_frame_limit_is_per_decoder_and_inclusive() -> None:
    body = cbor2.dumps(envelope("send", topic="t", body=b"x" * 1500))
    frame = raw_frame(body)
    assert only(frame)["body"] == b"x" * 1500
    with pytest.raises(ProtocolError):
        decode_all(frame, max_frame_size=len(body) - 1)
    assert decode_all(frame, max_frame_size=len(body))[0]["op"] == "send"
    with pytest.raises(ValueError, match="max_frame_size"):
        FrameDecoder(max_frame_size=10)


# ---- non-fatal: malformed frames -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"", "empty"),
        (b"\xff", "not valid CBOR"),
        (b"\xa1\x61", "ends inside"),
        (cbor2.dumps(envelope("status")) + b"\x00\x01", "2 bytes after"),
        (b"\xa1\x61a\x62\xff\xfe", "not valid CBOR"),
        (b"\xa2\x61a\x01\x61a\x02", "not valid CBOR"),
        (b"\x81" * 40 + b"\x00", "not valid CBOR"),
        (cbor2.dumps([1, 2]), "must be a CBOR map"),
        (cbor2.dumps("hello"), "must be a CBOR map"),
    ],
    ids=["empty", "break", "truncated", "trailing", "utf8", "dup-keys", "deep", "array", "text"],
)
def test_malformed_frame_is_answered_and_the_stream_goes_on(body: bytes, words: str) -> None:
    items = decode_all(raw_frame(body) + encode_request("status", 9))
    error, after = items
    assert isinstance(error, ProtocolError)
    assert error.status is Status.MALFORMED_FRAME
    assert not error.fatal
    assert error.req_id == 0
    assert words in error.message
    assert after == {"op": "status", "id": 9}


PYTHON_WORDS = re.compile(
    r"CBOR[A-Z][a-z]+|Undefined|[A-Z][a-z]+Error|codec|position \d|frozendict|NoneType"
    r"|\b(?:None|True|False|tuple|dict|str)\b|\bb'|\bb\""
)
"""Python's words: class names, reprs, codec errors. A client in any language reads our errors."""


def assert_protocol_words(message: str) -> None:
    leaked = PYTHON_WORDS.search(message)
    assert leaked is None, f"{leaked.group()!r} leaks into {message!r}"


@pytest.mark.parametrize(
    ("obj", "field", "words"),
    [
        (
            envelope("pull", topic=cbor2.CBORSimpleValue(16), queue=0, offset=0),
            "topic",
            "got simple value 16",
        ),
        (envelope("send", topic="t", body=cbor2.undefined), "body", "got undefined"),
        (
            envelope("send", topic="t", body=b"", props={"k": cbor2.CBORSimpleValue(255)}),
            "props['k']",
            "got simple value 255",
        ),
        (
            envelope("send", topic="t", body=b"", props={"k": {"a": 1, "b": 2}}),
            "props['k']",
            "got map of 2 entries",
        ),
    ],
    ids=["simple", "undefined", "simple-in-props", "map"],
)
def test_wire_errors_name_cbor_types_not_python_classes(
    obj: dict[str, Any], field: str, words: str
) -> None:
    error = rejected(obj)
    assert error.field == field
    assert words in error.message
    assert_protocol_words(error.message)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (
            b"\xa1\x61a\x66hello\x98",
            "a text string is not valid UTF-8 (byte 0x98 at offset 5 of the string)",
        ),
        (b"\xa2\x41a\x01\x41a\x02", "a map holds the same key twice"),
        (b"\xa1\x41a\xf9\x7e\x00\x00", "1 byte after its CBOR map"),
        (b"\xa1\x61a\x1c", "reserved additional information value 0x1c"),
        (b"\xa1\x61a\xf8\x10", "a two-byte simple value is below 32"),
        (
            b"\xa1\x61a\x5f\x61b\xff",
            "a chunk of an indefinite-length byte string is not a byte string",
        ),
        (b"\x81" * 40 + b"\x00", "CBOR items nest deeper than 16 levels"),
        (b"\xa1\x61a\xd9\x27\x0f\x01", "CBOR tag 9999 is not allowed"),
    ],
    ids=["utf8", "dup-bytes-key", "trailing", "reserved-info", "simple", "chunk", "deep", "tag"],
)
def test_malformed_cbor_is_named_in_cbor_terms(body: bytes, words: str) -> None:
    error = only(raw_frame(body))
    assert isinstance(error, ProtocolError)
    assert error.status is Status.MALFORMED_FRAME
    assert words in error.message
    assert_protocol_words(error.message)


@pytest.mark.parametrize(
    "tagged",
    [
        b"\xc0\x74" + b"2020-01-01T00:00:00Z",  # tag 0: datetime
        b"\xc2\x49" + b"\x01" * 9,  # tag 2: bignum
        b"\xd8\x23\x63a+b",  # tag 35: regex
        b"\xd8\x1c\x81\xd8\x1d\x00",  # tags 28/29: shared, cyclic values
        b"\xd9\xd9\xf7\x01",  # tag 55799: self-describe
        b"\xd9\x27\x0f\x01",  # tag 9999: unknown
    ],
    ids=["datetime", "bignum", "regex", "shared", "self-describe", "unknown"],
)
def test_cbor_tags_are_rejected(tagged: bytes) -> None:
    body = b"\xa4\x61v\x01\x62op\x66status\x62id\x01\x61x" + tagged
    assert cbor2.loads(body)  # well-formed CBOR: only the protocol forbids it
    error = only(raw_frame(body))
    assert isinstance(error, ProtocolError)
    assert error.status is Status.MALFORMED_FRAME
    assert "tag" in error.message


def test_malformed_messages_stay_short() -> None:
    key = "k" * 100_000
    body = b"\xa2" + cbor2.dumps(key) + b"\x01" + cbor2.dumps(key) + b"\x02"
    error = only(raw_frame(body))
    assert isinstance(error, ProtocolError)
    assert error.status is Status.MALFORMED_FRAME
    assert len(error.message) < 400


def test_a_bogus_length_claim_stays_inside_its_frame() -> None:
    """A body claiming a 4 GiB string must neither read the frames behind it nor break the decoder."""
    bogus = raw_frame(b"\x5a\xff\xff\xff\xff")
    items = decode_all(bogus * 500 + encode_request("status", 3))
    assert all(isinstance(i, ProtocolError) for i in items[:-1])
    assert len(items) == 501
    assert items[-1] == {"op": "status", "id": 3}


@pytest.mark.parametrize(
    ("req_id", "words"),
    [
        (None, "is missing"),
        ("7", "text string '7'"),
        (-1, "integer -1"),
        (True, "boolean true"),
        (1.5, "float 1.5"),
    ],
)
def test_unreadable_id_is_reported_with_id_zero(req_id: Any, words: str) -> None:
    obj = envelope("status")
    if req_id is None:
        del obj["id"]
    else:
        obj["id"] = req_id
    error = rejected(obj)
    assert error.status is Status.MALFORMED_FRAME
    assert error.req_id == 0
    assert error.field == "id"
    assert "'id'" in error.message
    assert words in error.message


@pytest.mark.parametrize(("version", "words"), [(None, "is missing"), ("1", "text string")])
def test_missing_or_mistyped_version(version: Any, words: str) -> None:
    obj = envelope("status", req_id=12)
    if version is None:
        del obj["v"]
    else:
        obj["v"] = version
    error = rejected(obj)
    assert error.status is Status.MALFORMED_FRAME
    assert (error.req_id, error.field) == (12, "v")
    assert "'v'" in error.message
    assert words in error.message


def test_unsupported_version_lists_the_supported_ones() -> None:
    error = rejected({**envelope("status", req_id=12), "v": 3})
    assert error.status is Status.UNSUPPORTED_VERSION
    assert error.req_id == 12
    assert "3" in error.message
    assert error.response()["supported"] == [1, 2]


@pytest.mark.parametrize("op", [None, 5, b"status"])
def test_missing_or_mistyped_op(op: Any) -> None:
    obj = envelope("status", req_id=4)
    if op is None:
        del obj["op"]
    else:
        obj["op"] = op
    error = rejected(obj)
    assert error.status is Status.MALFORMED_FRAME
    assert (error.req_id, error.field) == (4, "op")
    assert "'op'" in error.message


@pytest.mark.parametrize("op", ["frobnicate", "repl_fetch", "x" * 1000])
def test_unknown_op(op: str) -> None:
    error = rejected(envelope(op, req_id=5))
    assert error.status is Status.UNKNOWN_OP
    assert (error.req_id, error.field) == (5, "op")
    assert op[:20] in error.message
    assert "pull" in error.message
    assert len(error.message) < 400


# ---- non-fatal: bad requests ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "field", "words"),
    [
        (envelope("pull", topic="t", queue="3", offset=0), "queue", ["an integer", "'3'"]),
        (envelope("pull", topic="t", queue=True, offset=0), "queue", ["boolean true"]),
        (envelope("pull", topic="t", queue=1), "offset", ["required", "an integer"]),
        (envelope("pull", topic="t", queue=None, offset=1), "queue", ["missing or null"]),
        (envelope("pull", topic="t", queue=MAX_QUEUES, offset=0), "queue", ["0 and 1023"]),
        (envelope("pull", topic="t", queue=0, offset=-1), "offset", ["-1"]),
        (envelope("pull", topic="t", queue=0, offset=0, max_messages=0), "max_messages", ["0"]),
        (envelope("pull", topic="t", queue=0, offset=0, wait_ms=60_001), "wait_ms", ["60001"]),
        (envelope("pull", topic=b"t", queue=0, offset=0), "topic", ["a text string"]),
        (envelope("send", topic="t", body="text"), "body", ["a byte string", "'text'"]),
        (envelope("send", topic="t", body=b"", key=1), "key", ["a byte string or a text"]),
        (envelope("send", topic="t", body=b"", queue=1, key="k"), "queue", ["'key'"]),
        (envelope("send", topic="t", body=b"", acks="all"), "acks", ["'durable'", "'all'"]),
        (envelope("send", topic="t", body=b"", timeout_ms=0), "timeout_ms", ["1 and"]),
        (envelope("send", topic="t", body=b"", props=[]), "props", ["a map"]),
        (envelope("send", topic="t", body=b"", props={"a": 1}), "props['a']", ["integer 1"]),
        (envelope("send", topic="t", body=b"", props={"": "v"}), "props", ["non-empty"]),
        (envelope("send", topic="t", body=b"", born_us=1.5), "born_us", ["float 1.5"]),
        (envelope("send_batch", topic="t", messages={}), "messages", ["an array"]),
        (envelope("send_batch", topic="t", messages=[]), "messages", ["got 0"]),
        (envelope("send_batch", topic="t", messages=[{"body": b""}, 3]), "messages[1]", ["a map"]),
        (
            envelope("send_batch", topic="t", messages=[{"body": b""}, {}, {"body": "x"}]),
            "messages[1].body",
            ["required"],
        ),
        (
            envelope("send_batch", topic="t", messages=[{"body": b"", "props": {"k": None}}]),
            "messages[0].props['k']",
            ["null"],
        ),
        (
            envelope("send_batch", topic="t", messages=[{"body": b"", "queue": 0, "key": "k"}]),
            "messages[0].queue",
            ["'key'"],
        ),
        (envelope("create_topic", topic="t", queues=0), "queues", ["1 and 1024"]),
        (envelope("create_topic", topic="t", queues=MAX_QUEUES + 1), "queues", ["1025"]),
        (envelope("read", offset=MAX_OFFSET + 1), "offset", [str(MAX_OFFSET + 1)]),
        (envelope("get_offsets", topic="t", queue=-5), "queue", ["-5"]),
    ],
)
def test_bad_request_names_field_expectation_and_value(
    obj: dict[str, Any], field: str, words: list[str]
) -> None:
    error = rejected(obj)
    assert error.status is Status.BAD_REQUEST
    assert error.req_id == 7
    assert error.field == field
    assert f"'{field}'" in error.message or f'"{field}"' in error.message
    assert f"op '{obj['op']}'" in error.message
    for word in words:
        assert word in error.message


def test_batch_size_limit() -> None:
    messages = [{"body": b""}] * (MAX_BATCH_MESSAGES + 1)
    error = rejected(envelope("send_batch", topic="t", messages=messages))
    assert error.field == "messages"
    assert str(MAX_BATCH_MESSAGES + 1) in error.message


@pytest.mark.parametrize("topic", ["", ".", "..", "../etc", "-x", "a/b", "é", "a" * 128])
@pytest.mark.parametrize("op", ["create_topic", "pull", "describe_topic"])
def test_invalid_topic_names(op: str, topic: str) -> None:
    fields = {"create_topic": {"queues": 1}, "pull": {"queue": 0, "offset": 0}}.get(op, {})
    error = rejected(envelope(op, topic=topic, **fields))
    assert error.status is Status.INVALID_TOPIC
    assert error.field == "topic"
    assert "'topic'" in error.message
    assert not p.is_valid_topic_name(topic)


def test_valid_topic_names() -> None:
    for topic in ("a", "A.b-c_9", "9" * 127):
        assert p.is_valid_topic_name(topic)
        assert only(encode_request("describe_topic", 1, topic=topic))["topic"] == topic


def test_error_messages_stay_short_for_huge_values() -> None:
    error = rejected(envelope("pull", topic="t", queue="q" * 100_000, offset=0))
    assert len(error.message) < 300
    assert "..." in error.message


# ---- building requests on the client ---------------------------------------------------------


def test_make_request_checks_like_the_server() -> None:
    with pytest.raises(ProtocolError) as unknown:
        make_request("frobnicate", 1)
    assert unknown.value.status is Status.UNKNOWN_OP
    with pytest.raises(ProtocolError) as typo:
        make_request("pull", 1, topic="t", queue=0, ofset=3)
    assert typo.value.field == "ofset"
    with pytest.raises(ProtocolError) as bad:
        make_request("send_batch", 1, topic="t", messages=[{"body": "x"}])
    assert (bad.value.status, bad.value.field) == (Status.BAD_REQUEST, "messages[0].body")
    with pytest.raises(ProtocolError) as topic:
        make_request("create_topic", 1, topic="..", queues=1)
    assert topic.value.status is Status.INVALID_TOPIC
    with pytest.raises(ValueError, match="request id"):
        make_request("status", -1)


def test_encode_frame_layout_and_limit() -> None:
    frame = encode_frame({"v": 1, "op": "status", "id": 1})
    assert frame == bytes.fromhex("00000012") + cbor2.dumps({"v": 1, "op": "status", "id": 1})
    with pytest.raises(ProtocolError) as caught:
        encode_frame({"id": 4, "body": b"x" * 2000}, max_frame_size=SMALL_LIMIT)
    assert caught.value.status is Status.FRAME_TOO_LARGE
    assert caught.value.req_id == 4
    assert not caught.value.fatal


def test_documented_example_bytes() -> None:
    """docs/protocol.md shows these exact bytes; regenerate the docs if this changes."""
    frame = encode_request("pull", 1, topic="orders", queue=0, offset=42)
    assert frame.hex(" ") == (
        "00 00 00 2d a6 61 76 02 62 6f 70 64 70 75 6c 6c 62 69 64 01 65 74 6f 70 69 63 "
        "66 6f 72 64 65 72 73 65 71 75 65 75 65 00 66 6f 66 66 73 65 74 18 2a"
    )
    response = p.send_response(1, "orders", 0, 42, 8192, 1_700_000_000_000_000)
    assert encode_frame(response).hex(" ") == (
        "00 00 00 51 a8 61 76 02 62 69 64 01 66 73 74 61 74 75 73 62 4f 4b 65 74 6f 70 69 63 "
        "66 6f 72 64 65 72 73 65 71 75 65 75 65 00 6c 71 75 65 75 65 5f 6f 66 66 73 65 74 18 "
        "2a 66 6f 66 66 73 65 74 19 20 00 68 73 74 6f 72 65 5f 75 73 1b 00 06 0a 24 18 1e 40 00"
    )


def test_queue_for_key() -> None:
    assert p.queue_for_key(b"123456789", MAX_QUEUES) == 0xE3069283 % MAX_QUEUES
    assert p.queue_for_key("123456789", 7) == p.queue_for_key(b"123456789", 7)
    assert p.queue_for_key("ключ", 1) == 0
    with pytest.raises(ValueError):
        p.queue_for_key(b"k", 0)


# ---- the response decoder --------------------------------------------------------------------


def test_response_decoder_rejects_unknown_status_with_its_id() -> None:
    decoder = ResponseDecoder()
    decoder.feed(frame_of({"v": 1, "id": 8, "status": "TEAPOT"}) + frame_of({"status": "OK"}))
    unknown, no_id = list(decoder)
    assert isinstance(unknown, ProtocolError)
    assert (unknown.req_id, unknown.field) == (8, "status")
    assert "TEAPOT" in unknown.message
    assert isinstance(no_id, ProtocolError)
    assert (no_id.req_id, no_id.field) == (0, "id")


# ---- streaming -------------------------------------------------------------------------------


def test_truncated_frame_waits_for_more_bytes() -> None:
    frame = encode_request("pull", 1, topic="t", queue=0, offset=0)
    decoder = FrameDecoder()
    for i in range(len(frame) - 1):
        decoder.feed(frame[i : i + 1])
        assert decoder.next_frame() is None
    decoder.feed(frame[-1:])
    assert decoder.next_frame() == only(frame)
    assert decoder.next_frame() is None
    assert decoder.buffered == 0


def test_consumed_bytes_are_dropped() -> None:
    frame = encode_request("send", 1, topic="t", body=b"x" * 300)
    decoder = FrameDecoder()
    peak = 0
    for _ in range(2000):
        decoder.feed(frame + frame[:100])
        assert len(list(decoder)) >= 1
        decoder.feed(frame[100:])
        assert len(list(decoder)) == 1
        peak = max(peak, len(decoder._buf))
    assert decoder.buffered == 0
    assert peak < 4 * len(frame)
    # Frames left behind a long-lived partial frame are compacted away too.
    decoder = FrameDecoder()
    big = encode_request("send", 2, topic="t", body=b"y" * 200_000)
    decoder.feed(frame * 1000 + big[:10])
    assert len(list(decoder)) == 1000
    for i in range(10, len(big), 1000):
        decoder.feed(big[i : i + 1000])
        assert decoder.buffered == i + len(big[i : i + 1000])
    assert len(decoder._buf) < 2 * len(big)
    last: Any = next(iter(decoder))
    assert only(big)["body"] == last["body"]


def test_feed_accepts_any_bytes_like() -> None:
    frame = encode_request("status", 1)
    decoder = FrameDecoder()
    decoder.feed(bytearray(frame[:3]))
    decoder.feed(memoryview(frame)[3:])
    assert list(decoder) == [{"op": "status", "id": 1}]


# ---- hypothesis: hostile and split streams ---------------------------------------------------


def drain(decoder: FrameDecoder, fed: int, seen: list[Any]) -> bool:
    """Collect frames; False once a fatal error ends the stream. Bounded: a frame eats >= 4 bytes."""
    try:
        for item in decoder:
            seen.append(item)
            assert len(seen) <= fed // 4, "decoder produced frames out of nothing"
    except ProtocolError as exc:
        assert exc.fatal
        assert exc.status is Status.FRAME_TOO_LARGE
        return False
    return True


def check_items(items: list[Any]) -> None:
    for item in items:
        if isinstance(item, ProtocolError):
            assert not item.fatal
            assert item.status is not Status.OK
            assert item.message
            assert_protocol_words(item.message)
            encode_frame(item.response())
        else:
            assert item["op"] in SCHEMAS
            assert type(item["id"]) is int


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def feed_in_chunks(data: bytes, cuts: list[int]) -> tuple[list[Any], bool]:
    decoder = FrameDecoder(max_frame_size=SMALL_LIMIT)
    seen: list[Any] = []
    fed = 0
    for chunk in split(data, cuts):
        decoder.feed(chunk)
        fed += len(chunk)
        if not drain(decoder, fed, seen):
            return seen, False
    return seen, True


cbor_scalars = (
    st.none()
    | st.sampled_from([cbor2.undefined, *map(cbor2.CBORSimpleValue, (0, 16, 19, 32, 255))])
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
cbor_values = st.recursive(
    cbor_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)
field_names = st.sampled_from(
    sorted({name for s in SCHEMAS.values() for name in s.fields} | {"v", "op", "id"})
)
near_requests = st.builds(
    lambda op, req_id, extra: {"v": 1, "op": op, "id": req_id, **extra},
    st.sampled_from([*SCHEMAS, "nope"]),
    st.integers(0, 2**64 - 1),
    st.dictionaries(field_names, cbor_values, max_size=6),
)


@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=8))
def test_arbitrary_bytes_only_raise_protocol_error(data: bytes, cuts: list[int]) -> None:
    items, _ = feed_in_chunks(data, cuts)
    check_items(items)


@given(
    st.lists(
        st.binary(max_size=40).map(raw_frame)
        | cbor_values.map(frame_of)
        | near_requests.map(frame_of),
        max_size=12,
    ),
    st.lists(st.integers(0, 2000), max_size=8),
)
def test_frames_of_garbage_are_answered_one_by_one(frames: list[bytes], cuts: list[int]) -> None:
    data = b"".join(frames)
    items, alive = feed_in_chunks(data, cuts)
    check_items(items)
    if all(len(f) - 4 <= SMALL_LIMIT for f in frames):
        assert alive
        assert len(items) == len(frames)


valid_requests = st.one_of(
    st.builds(
        lambda i, body, key: make_request("send", i, topic="t", body=body, key=key),
        st.integers(0, 2**64 - 1),
        st.binary(max_size=64),
        st.none() | st.text(max_size=8),
    ),
    st.builds(
        lambda i, bodies: make_request(
            "send_batch", i, topic="orders", messages=[{"body": b} for b in bodies]
        ),
        st.integers(0, 2**32),
        st.lists(st.binary(max_size=16), min_size=1, max_size=5),
    ),
    st.builds(
        lambda i, queue, offset: make_request("pull", i, topic="q", queue=queue, offset=offset),
        st.integers(0, 2**32),
        st.integers(0, MAX_QUEUES - 1),
        st.integers(0, MAX_OFFSET),
    ),
    st.builds(lambda i: make_request("status", i), st.integers(0, 100)),
)


@given(st.lists(valid_requests, min_size=1, max_size=20), st.lists(st.integers(0, 5000)))
def test_split_pipelined_stream_yields_the_same_frames(
    requests: list[dict[str, Any]], cuts: list[int]
) -> None:
    frames = [encode_frame(r) for r in requests]
    whole = decode_all(b"".join(frames))
    assert whole == [only(f) for f in frames]  # one fresh decoder per frame: no shared state
    assert [(r["op"], r["id"]) for r in whole] == [(r["op"], r["id"]) for r in requests]
    data = b"".join(frames)
    pieces, alive = feed_in_chunks(data, cuts)
    assert alive
    assert pieces == whole


# ---- the decode-work bound: CBOR items per frame --------------------------------------------


def items_of(value: Any) -> int:
    """The reference count: every container, map key and value, and array element."""
    if isinstance(value, list):
        return 1 + sum(items_of(v) for v in value)
    if isinstance(value, dict):
        return 1 + sum(items_of(k) + items_of(v) for k, v in value.items())
    return 1


@given(cbor_values)
def test_count_items_matches_the_reference_count(value: Any) -> None:
    body = cbor2.dumps(value)
    total = items_of(value)
    assert count_items(body, total) == total
    if total > 1:
        assert count_items(body, total - 1) > total - 1


@pytest.mark.parametrize(
    ("body", "total"),
    [
        (b"\x9f\x01\x9f\x02\x03\xff\xff", 5),  # [_ 1, [_ 2, 3]]
        (b"\xbf\x61a\x01\xff", 3),  # {_ "a": 1}
        (b"\x5f\x41a\x41b\xff", 3),  # (_ h'61', h'62')
        (b"\x82\xc1\x01\x02", 4),  # [1(1), 2]: a tag's content counts
    ],
    ids=["indefinite-arrays", "indefinite-map", "chunked-bytes", "tag"],
)
def test_count_items_of_indefinite_lengths_and_tags(body: bytes, total: int) -> None:
    assert count_items(body, 100) == total


@given(st.binary(max_size=300), st.integers(1, 50))
def test_count_items_of_any_bytes_stops(data: bytes, limit: int) -> None:
    assert count_items(data, limit) >= 0  # never raises, never loops


def test_counting_stops_at_the_limit_not_at_the_end() -> None:
    """The work is bounded by the limit: a huge body is never walked to its end."""
    one_byte_items = b"\x9f" + b"\x80" * 1_000_000 + b"\xff"  # [_ [], [], ...]
    assert count_items(one_byte_items, 1000) == 1001
    announced = b"\x9b" + (2**63).to_bytes(8, "big") + b"\x00" * 1000  # refused at the header
    assert count_items(announced, 1000) == 1 + 2**63


def status_with_padding(padding: int) -> bytes:
    """A status request whose unknown key ``x`` holds ``padding`` one-byte items."""
    body = cbor2.dumps(envelope("status", 3, x=[0] * padding))
    assert items_of(cbor2.loads(body)) == 1 + 2 * 4 + padding  # the map, its 4 keys and values
    return raw_frame(body)


def test_frame_item_limit_is_inclusive_and_the_stream_goes_on() -> None:
    at_limit = MAX_FRAME_ITEMS - 9
    assert only(status_with_padding(at_limit)) == {"op": "status", "id": 3}
    error, after = decode_all(status_with_padding(at_limit + 1) + encode_request("status", 4))
    assert isinstance(error, ProtocolError)
    assert error.status is Status.MALFORMED_FRAME
    assert not error.fatal
    assert error.req_id == 0
    assert f"more than {MAX_FRAME_ITEMS} CBOR data items" in error.message
    assert "fewer messages per batch" in error.message
    assert_protocol_words(error.message)
    assert after == {"op": "status", "id": 4}


@pytest.mark.parametrize(
    "body",
    [
        b"\xbf\x61x\x9f" + b"\x80" * (16 * 1024 * 1024 - 6) + b"\xff\xff",  # 16 MiB of []
        b"\xa1\x61x\x9b" + (2**40).to_bytes(8, "big") + b"\xa0" * 200_000,  # announced 2^40
        b"\xa1\x61x\x5f" + b"\x40" * 200_000 + b"\xff",  # 200,000 empty byte-string chunks
    ],
    ids=["16MiB-of-empty-arrays", "announced-count", "chunks"],
)
def test_a_frame_of_tiny_items_is_refused_undecoded(body: bytes) -> None:
    """Issue 8, point 6: such a frame held the server's loop for seconds while it decoded."""
    decoder = FrameDecoder()
    decoder.feed(raw_frame(body))
    with no_cbor_decoding(decoder):
        error = decoder.next_frame()
    assert isinstance(error, ProtocolError)
    assert error.status is Status.MALFORMED_FRAME
    assert "CBOR data items" in error.message


class no_cbor_decoding:
    """Fails the test if the decoder hands the frame to cbor2: the refusal must come first."""

    def __init__(self, decoder: FrameDecoder) -> None:
        self.decoder = decoder

    def __enter__(self) -> None:
        self.saved = self.decoder._cbor

        class Refuse:
            fp: Any = None

            def decode(self) -> Any:
                raise AssertionError("the frame was decoded")

        self.decoder._cbor = Refuse()  # type: ignore[assignment]

    def __exit__(self, *exc: object) -> None:
        self.decoder._cbor = self.saved


def test_a_full_batch_with_every_field_fits_the_item_limit() -> None:
    props = {f"p{i}": "v" for i in range(10)}
    messages = [
        {"body": b"x", "queue": 1, "tags": "t", "props": props, "born_us": 1} for _ in range(4096)
    ]
    assert len(messages) == MAX_BATCH_MESSAGES
    request = make_request("send_batch", 1, topic="t", messages=messages, acks="durable")
    request["timeout_ms"] = 5000
    assert items_of(request) <= MAX_FRAME_ITEMS
    decoded = only(encode_frame(request))
    assert decoded["op"] == "send_batch"
    assert len(decoded["messages"]) == MAX_BATCH_MESSAGES


def test_known_topic_names_are_bounded_per_decoder_and_never_skip_the_rule() -> None:
    decoder = FrameDecoder()
    capacity = decoder._known_topics.capacity
    for index in range(capacity + 50):
        decoder.feed(encode_request("describe_topic", index, topic=f"t{index}"))
        assert decoder.next_frame() == {"op": "describe_topic", "id": index, "topic": f"t{index}"}
    assert len(decoder._known_topics) == capacity
    decoder.feed(frame_of(envelope("describe_topic", 1, topic="-t0")))
    error = decoder.next_frame()
    assert isinstance(error, ProtocolError)
    assert error.status is Status.INVALID_TOPIC
    assert "-t0" not in decoder._known_topics
    assert FrameDecoder()._known_topics == set()  # each connection's decoder starts afresh


@given(cut=st.integers(min_value=0, max_value=200))
def test_incomplete_frame_size_names_the_frame_a_reader_waits_for(cut: int) -> None:
    """What a reader reserves before reading on: the size announced by the next frame
    whose prefix is here but not all its body; None before the prefix and once complete."""
    small = p.encode_request("status", 1)
    large = p.encode_request("send", 2, topic="t", body=bytes(100))
    stream = small + large
    decoder = FrameDecoder()
    decoder.feed(stream[:cut])
    ids = [frame["id"] for frame in decoder if isinstance(frame, dict)]
    size = decoder.incomplete_frame_size()
    if cut < 4:
        assert (ids, size) == ([], None)
    elif cut < len(small):
        assert (ids, size) == ([], len(small) - 4)
    elif cut < len(small) + 4:
        assert (ids, size) == ([1], None)
    elif cut < len(stream):
        assert (ids, size) == ([1], len(large) - 4)
    else:
        assert (ids, size) == ([1, 2], None)
