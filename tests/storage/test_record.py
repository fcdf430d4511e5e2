"""The record format: packing, decoding, the scanner's checks, topics and properties."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.commit_log import _pack_record
from storage.errors import CorruptSegmentError, InvalidMessageError, InvalidTopicError
from storage.record import (
    BLANK_MAGIC,
    BLANK_MIN,
    CRC_START,
    HEADER_SIZE,
    MAX_TOPIC_LENGTH,
    RECORD_MAGIC,
    Message,
    ScanStop,
    check_record,
    decode_properties,
    decode_record,
    encode_properties,
    read_header,
    record_size,
    tags_hash,
    validate_topic,
    write_blank,
)

AREA = 4096
BASE = 1 << 20
"""Log offset of the test area: records must carry ``BASE + pos`` as their position."""

# Header fields that check_record verifies before the CRC (so a flip there fails earlier).
SIZE_FIELD = range(0, 4)
MAGIC_FIELD = range(4, 8)
BODY_SIZE_FIELD = range(20, 24)
PHYSICAL_FIELD = range(32, 40)
SIZES_FIELD = range(64, 67)  # props_size (u16) and topic_size (u8)


def pack(
    view: memoryview,
    pos: int,
    message: Message,
    *,
    base: int = BASE,
    queue_offset: int = 7,
    now_us: int = 1_700_000_000_000_000,
    offset: int | None = None,
) -> int:
    """Pack ``message`` at ``pos`` as the CommitLog would; return the record size."""
    topic = validate_topic(message.topic)
    size = record_size(len(topic), len(message.properties), len(message.body))
    at = base + pos if offset is None else offset
    _pack_record(view, pos, size, at, message, topic, queue_offset, now_us)
    return size


def area() -> memoryview:
    return memoryview(bytearray(AREA))


def sample() -> Message:
    return Message.create(
        "orders.eu-1",
        b"hello, tidelog",
        queue_id=3,
        tags="paid",
        properties={"k": "v", "trace": "abc"},
        born_us=123_456,
    )


# ---- round trip ------------------------------------------------------------------------


def test_pack_then_decode_round_trip() -> None:
    view = area()
    message = sample()
    pos = 100
    size = pack(view, pos, message, queue_offset=42, now_us=999)

    assert size == HEADER_SIZE + len("orders.eu-1") + len(message.properties) + len(
        b"hello, tidelog"
    )
    assert check_record(view, pos, BASE, AREA) == size

    record = decode_record(view, pos, BASE)
    assert record.physical_offset == BASE + pos
    assert record.size == size
    assert record.end_offset == BASE + pos + size
    assert record.queue_id == 3
    assert record.queue_offset == 42
    assert record.born_us == 123_456
    assert record.store_us == 999
    assert record.tags_hash == tags_hash("paid") != 0
    assert record.topic == "orders.eu-1"
    assert record.properties == {"k": "v", "trace": "abc"}
    assert bytes(record.body) == b"hello, tidelog"

    header = read_header(view, pos)
    assert (header.size, header.queue_id, header.queue_offset) == (size, 3, 42)
    assert header.physical_offset == BASE + pos
    assert (header.topic_size, header.props_size) == (len("orders.eu-1"), len(message.properties))
    assert header.body_size == len(b"hello, tidelog")
    assert header.tags_hash == tags_hash("paid")
    record.release()


def test_no_born_timestamp_takes_the_store_timestamp_and_no_tags_hash_zero() -> None:
    view = area()
    pack(view, 0, Message.create("t", b""), now_us=555)
    record = decode_record(view, 0, BASE)
    assert (record.born_us, record.store_us, record.tags_hash) == (555, 555, 0)
    assert bytes(record.body) == b""
    assert record.properties == {}


@given(
    body=st.binary(max_size=512),
    topic=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True),
    queue_id=st.integers(0, 0xFFFF),
    queue_offset=st.integers(0, 2**63),
    tags=st.none() | st.text(max_size=10),
    props=st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=4),
    pos=st.integers(0, 256),
)
def test_round_trip_property(
    body: bytes,
    topic: str,
    queue_id: int,
    queue_offset: int,
    tags: str | None,
    props: dict[str, str],
    pos: int,
) -> None:
    view = memoryview(bytearray(2048))
    message = Message.create(topic, body, queue_id, tags=tags, properties=props)
    size = pack(view, pos, message, queue_offset=queue_offset)
    assert check_record(view, pos, BASE, len(view)) == size
    record = decode_record(view, pos, BASE)
    assert (record.topic, bytes(record.body), record.queue_id) == (topic, body, queue_id)
    assert record.queue_offset == queue_offset
    assert record.properties == props
    assert record.tags_hash == tags_hash(tags)


# ---- check_record: what stops a scan -------------------------------------------------


def test_zeros_are_the_end_of_data() -> None:
    with pytest.raises(ScanStop) as stop:
        check_record(area(), 64, BASE, AREA)
    assert stop.value.reason == "end of data"
    assert stop.value.offset == BASE + 64


def test_no_room_for_a_header_at_the_very_end() -> None:
    with pytest.raises(ScanStop, match="no room"):
        check_record(area(), AREA - BLANK_MIN + 1, BASE, AREA)


def test_truncated_record_runs_past_the_limit() -> None:
    view = area()
    size = pack(view, 0, sample())
    with pytest.raises(ScanStop, match="runs past the data"):
        check_record(view, 0, BASE, size - 1)


def test_torn_record_with_zeroed_tail_fails_its_crc() -> None:
    view = area()
    size = pack(view, 0, sample())
    view[size - 5 : size] = bytes(5)  # the last bytes never reached the disk
    with pytest.raises(ScanStop, match="CRC mismatch"):
        check_record(view, 0, BASE, AREA)
    with pytest.raises(CorruptSegmentError, match="CRC"):
        decode_record(view, 0, BASE)


@given(data=st.data())
def test_any_flipped_byte_is_caught(data: st.DataObject) -> None:
    view = area()
    size = pack(view, 0, sample())
    index = data.draw(st.integers(0, size - 1), label="index")
    flip = data.draw(st.integers(1, 255), label="flip")
    view[index] ^= flip
    with pytest.raises(ScanStop) as stop:
        check_record(view, 0, BASE, AREA)
    checked_before_crc = (
        index in SIZE_FIELD
        or index in MAGIC_FIELD
        or index in BODY_SIZE_FIELD
        or index in PHYSICAL_FIELD
        or index in SIZES_FIELD
    )
    if not checked_before_crc:
        assert index >= CRC_START - 4  # the CRC field itself, or what it covers
        assert stop.value.reason == "CRC mismatch (torn or corrupt record)"
    with pytest.raises(CorruptSegmentError):
        decode_record(view, 0, BASE)


@pytest.mark.parametrize(
    "index", [*range(CRC_START - 4, 20), 24, 31, 40, 47, 56, 63, 67, HEADER_SIZE, -1]
)
def test_flipped_byte_outside_the_checked_fields_is_a_crc_mismatch(index: int) -> None:
    view = area()
    size = pack(view, 0, sample())
    view[index % size] ^= 0x40
    with pytest.raises(ScanStop, match=r"CRC mismatch"):
        check_record(view, 0, BASE, AREA)


def test_record_at_the_wrong_physical_offset() -> None:
    view = area()
    pack(view, 0, sample(), offset=BASE + 4096)  # claims to live elsewhere
    with pytest.raises(ScanStop, match=f"record claims offset {BASE + 4096}"):
        check_record(view, 0, BASE, AREA)
    with pytest.raises(CorruptSegmentError, match="no record starts"):
        decode_record(view, 0, BASE)


def test_record_read_at_another_base_is_rejected() -> None:
    view = area()
    pack(view, 0, sample())
    with pytest.raises(ScanStop, match="claims offset"):
        check_record(view, 0, BASE + AREA, AREA)


def test_bad_magic() -> None:
    view = area()
    pack(view, 0, sample())
    view[4:8] = (0xDEADBEEF).to_bytes(4, "little")
    with pytest.raises(ScanStop, match="bad magic 0xdeadbeef"):
        check_record(view, 0, BASE, AREA)


def test_filler_that_ends_the_segment_is_accepted() -> None:
    view = area()
    write_blank(view, 1000, AREA - 1000)
    assert check_record(view, 1000, BASE, AREA) == -(AREA - 1000)
    assert int.from_bytes(view[1004:1008], "little") == BLANK_MAGIC


@pytest.mark.parametrize("size", [BLANK_MIN, AREA - 1001, AREA - 999])
def test_filler_that_does_not_end_the_segment(size: int) -> None:
    view = area()
    write_blank(view, 1000, size)
    with pytest.raises(ScanStop, match=f"filler of {size} bytes does not end the segment"):
        check_record(view, 1000, BASE, AREA)


def test_parts_that_do_not_add_up() -> None:
    view = area()
    size = pack(view, 0, sample())
    # Grow the declared size and fix the CRC-free size field only: parts no longer add up.
    view[0:4] = (size + 4).to_bytes(4, "little")
    with pytest.raises(ScanStop, match="do not add up"):
        check_record(view, 0, BASE, AREA)


def test_decode_inside_the_last_bytes_of_an_area_is_a_clear_error() -> None:
    """An offset that leaves no room for a header (inside a filler) is not a struct.error."""
    view = area()
    with pytest.raises(CorruptSegmentError, match=f"no record starts at offset {BASE + AREA - 4}"):
        decode_record(view, AREA - 4, BASE)


def test_magic_constants_differ() -> None:
    assert RECORD_MAGIC != BLANK_MAGIC
    assert RECORD_MAGIC & 0xFFFF == 1  # format version 1


# ---- topics ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    ["a", "A-z_0.9", "x" * MAX_TOPIC_LENGTH, "a...", "0.hidden", "orders.eu-1", "0"],
)
def test_valid_topics(topic: str) -> None:
    assert validate_topic(topic) == topic.encode("ascii")


RULE = "1 to 127 characters from A-Z a-z 0-9 . _ - starting with a letter or digit"


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "x" * (MAX_TOPIC_LENGTH + 1),
        "has space",
        "a/b",
        "../etc",
        "tópico",
        "主题",
        "٣",  # an Arabic-Indic digit: a digit for str.isdigit, not for the rule
        "tab\t",
        "nl\n",
        # one rule for the store and the wire: a name starts with a letter or a digit
        "...a",
        ".hidden",
        "-x",
        "_x",
    ],
)
def test_invalid_topics_name_the_rule(topic: str) -> None:
    with pytest.raises(InvalidTopicError) as error:
        validate_topic(topic)
    assert RULE in str(error.value)
    assert repr(topic) in str(error.value)


@pytest.mark.parametrize("topic", [".", ".."])
def test_dot_topics_are_reserved(topic: str) -> None:
    """A topic is a directory name under consumequeue/: '..' would escape it."""
    with pytest.raises(InvalidTopicError, match="reserved"):
        validate_topic(topic)


def test_non_string_topic_is_rejected() -> None:
    with pytest.raises(InvalidTopicError, match=re.escape(RULE)):
        validate_topic(b"bytes")  # type: ignore[arg-type]


def test_topic_errors_are_invalid_message_errors() -> None:
    assert issubclass(InvalidTopicError, InvalidMessageError)


# ---- properties ------------------------------------------------------------------------


@given(st.dictionaries(st.text(min_size=1, max_size=40), st.text(max_size=80), max_size=12))
def test_properties_round_trip(props: dict[str, str]) -> None:
    encoded = encode_properties(props)
    assert decode_properties(encoded) == props
    assert decode_properties(memoryview(encoded)) == props


def test_empty_properties_encode_to_nothing() -> None:
    assert encode_properties(None) == b""
    assert encode_properties({}) == b""
    assert decode_properties(b"") == {}


def test_property_layout_is_length_prefixed_pairs() -> None:
    assert encode_properties({"k": "vé"}) == b"\x01\x00k\x03\x00v\xc3\xa9"


def test_oversize_property_value() -> None:
    with pytest.raises(InvalidMessageError, match="longer than 65535 bytes"):
        encode_properties({"k": "v" * 0x10000})


def test_oversize_property_key() -> None:
    with pytest.raises(InvalidMessageError, match="longer than 65535 bytes"):
        encode_properties({"k" * 0x10000: "v"})


def test_largest_single_property_value_fits() -> None:
    props = {"k": "v" * (0xFFFF - 2 - 1 - 2)}
    assert len(encode_properties(props)) == 0xFFFF
    assert decode_properties(encode_properties(props)) == props


def test_properties_over_65535_bytes_in_all() -> None:
    props = {f"key{i}": "v" * 30_000 for i in range(3)}
    with pytest.raises(InvalidMessageError, match="more than 65535 bytes in all"):
        encode_properties(props)
    with pytest.raises(InvalidMessageError, match="more than 65535 bytes in all"):
        Message.create("t", b"", properties=props)


@pytest.mark.parametrize("props", [{"": "v"}, {"k": 1}, {1: "v"}])
def test_bad_property_types(props: dict) -> None:
    with pytest.raises(InvalidMessageError, match="keys must be non-empty strings"):
        encode_properties(props)


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"\x05\x00ab", "run past"),
        (b"\x01\x00k", "key without a value"),
    ],
)
def test_corrupt_properties(raw: bytes, match: str) -> None:
    with pytest.raises(CorruptSegmentError, match=match):
        decode_properties(raw)
