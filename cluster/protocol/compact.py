"""Compact sends: a fixed binary layout for the common one-message send and its answer.

One message per request is how most clients write, and for such a request the CBOR
map costs more than the rest of the node's work on it but the append: decoding the
map, reading its fields back, encoding the answer map (about a third of the node's
CPU per pipelined 1 KiB send, profiled). A frame whose body starts with
:data:`SEND_MARKER` holds a send in the common shape of :mod:`~cluster.protocol.plain_send`
(a body, a queue or a key or neither, ``acks``, ``timeout_ms``) at fixed places; the
node answers it, when the answer is ``OK``, with a body starting with
:data:`ANSWER_MARKER`. A CBOR map's first byte is never one of these (0xa0-0xbf), so
the two kinds of frame share a stream. docs/protocol.md describes every byte.

Decoding gives the same raw map a CBOR send would: the server checks it exactly as
one (same statuses, same sentences), and the client gets the same answer dict. So
this module decides no error beyond "the layout cannot be read".
"""

from __future__ import annotations

import struct
from typing import Any, Final

from cluster.protocol.limits import HEADER, MAX_REQUEST_ID, PROTOCOL_VERSION
from cluster.protocol.statuses import Acks, Status

__all__ = [
    "ANSWER_MARKER",
    "SEND_MARKER",
    "compact_send_id",
    "decode_send",
    "decode_send_answer",
    "encode_checked_send",
    "encode_send",
    "encode_send_answer",
]

SEND_MARKER: Final = 0x01
"""First body byte of a compact send (a CBOR map starts with 0xa0-0xbf)."""
ANSWER_MARKER: Final = 0x02
"""First body byte of a compact send's ``OK`` answer."""

SEND_HEAD: Final = struct.Struct(">BBBBQIHH")
"""marker, flags, acks code, topic length, id, timeout_ms, queue, key length; then the
topic (UTF-8), the key, the body (the rest)."""
ANSWER_HEAD: Final = struct.Struct(">BxHQQQQ")
"""marker, pad, queue, id, queue_offset, offset, store_us; then the topic (the rest)."""

QUEUE_SET: Final = 0x01
KEY_SET: Final = 0x02
KEY_IS_TEXT: Final = 0x04
_FLAGS: Final = QUEUE_SET | KEY_SET | KEY_IS_TEXT
ACKS_CODES: Final[tuple[Acks, ...]] = (Acks.LEADER, Acks.DURABLE, Acks.IN_SYNC, Acks.REPLICATED)
"""An ``acks`` level's code is its index here (fixed: part of the wire format)."""
_U16: Final = 0xFFFF
_U32: Final = 0xFFFF_FFFF
_U64: Final = 0xFFFF_FFFF_FFFF_FFFF
_TOPIC_MAX: Final = 0xFF
_OK: Final = Status.OK
"""(A module global: an enum member read through its class costs a descriptor call on
Python 3.11.)"""

_pack_framed_send: Final = struct.Struct(">I" + SEND_HEAD.format[1:]).pack
"""The length prefix and the head of a compact send, in one pack."""
_unpack_send: Final = SEND_HEAD.unpack_from
_pack_answer: Final = ANSWER_HEAD.pack
_unpack_answer: Final = ANSWER_HEAD.unpack_from
_pack_length: Final = HEADER.pack
_unpack_id: Final = struct.Struct(">Q").unpack_from


def encode_send(
    req_id: int,
    topic: str,
    body: bytes,
    queue: int | None,
    key: bytes | str | None,
    acks: Acks,
    timeout_ms: int,
) -> bytes | None:
    """The whole frame (length prefix included) of a send whose fields the caller
    checked (a valid send in the common shape); None when one does not fit the layout
    (a topic over 255 bytes, a key over 65,535: send the CBOR map)."""
    topic_raw = topic.encode()
    if key is None:
        key_raw = b""
        flags = 0
    elif type(key) is str:
        key_raw = key.encode()
        flags = KEY_SET | KEY_IS_TEXT
    else:
        key_raw = key  # type: ignore[assignment]
        flags = KEY_SET
    if queue is None:
        queue = 0
    else:
        flags |= QUEUE_SET
    topic_size, key_size = len(topic_raw), len(key_raw)
    if (
        topic_size > _TOPIC_MAX
        or key_size > _U16
        or not 0 <= queue <= _U16
        or not 0 <= timeout_ms <= _U32
        or not 0 <= req_id <= MAX_REQUEST_ID
    ):
        return None
    head = _pack_framed_send(
        SEND_HEAD.size + topic_size + key_size + len(body),
        SEND_MARKER,
        flags,
        ACKS_CODES.index(acks),  # by identity first: cheaper than hashing an enum member
        topic_size,
        req_id,
        timeout_ms,
        queue,
        key_size,
    )
    return head + topic_raw + key_raw + body if key_size else head + topic_raw + body


def encode_checked_send(
    req_id: int, topic_raw: bytes, acks_code: int, timeout_ms: int, queue: int | None, body: bytes
) -> bytes:
    """:func:`encode_send` of a keyless send whose topic (UTF-8, ``topic_raw``), acks level
    (``acks_code``, its index in :data:`ACKS_CODES`) and ``timeout_ms`` the caller took
    from an earlier frame :func:`encode_send` built, and whose ``req_id`` and ``queue``
    it checked: the same bytes, without checking and encoding those again."""
    return (
        _pack_framed_send(
            SEND_HEAD.size + len(topic_raw) + len(body),
            SEND_MARKER,
            0 if queue is None else QUEUE_SET,
            acks_code,
            len(topic_raw),
            req_id,
            timeout_ms,
            0 if queue is None else queue,
            0,
        )
        + topic_raw
        + body
    )


def decode_send(buf: bytes | bytearray, start: int, size: int) -> dict[str, Any] | str:
    """The raw request map of the compact send in ``buf[start:start+size]`` (what the
    CBOR map of the same send decodes to), or what is wrong with its layout."""
    if size < SEND_HEAD.size:
        return f"a compact send needs at least {SEND_HEAD.size} bytes, the frame body has {size}"
    _, flags, acks_code, topic_size, req_id, timeout_ms, queue, key_size = _unpack_send(buf, start)
    if flags & ~_FLAGS or (flags & KEY_IS_TEXT and not flags & KEY_SET):
        return f"a compact send's flags byte 0x{flags:02x} sets undefined bits"
    if key_size and not flags & KEY_SET:
        return f"a compact send's key length is {key_size} but its flags set no key: send 0"
    if queue and not flags & QUEUE_SET:
        return f"a compact send's queue is {queue} but its flags set no queue: send 0"
    if acks_code >= len(ACKS_CODES):
        return f"a compact send's acks code {acks_code} is undefined (0-{len(ACKS_CODES) - 1})"
    pos = start + SEND_HEAD.size
    end = start + size
    if pos + topic_size + key_size > end:
        return (
            f"a compact send's topic ({topic_size} bytes) and key ({key_size} bytes) run "
            "past the end of its frame"
        )
    try:
        topic = buf[pos : pos + topic_size].decode()
        pos += topic_size
        key: bytes | str | None = None
        if flags & KEY_SET:
            raw_key = bytes(buf[pos : pos + key_size])
            key = raw_key.decode() if flags & KEY_IS_TEXT else raw_key
    except UnicodeDecodeError:
        return "a compact send's topic or text key is not valid UTF-8"
    raw: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "op": "send",
        "id": req_id,
        "topic": topic,
        "body": bytes(buf[pos + key_size : end]),
        "acks": ACKS_CODES[acks_code].value,
        "timeout_ms": timeout_ms,
    }
    if flags & QUEUE_SET:
        raw["queue"] = queue
    if key is not None:
        raw["key"] = key
    return raw


def compact_send_id(buf: bytes | bytearray, start: int, size: int) -> int:
    """The request id of a compact send that could not be read (0 if the body is too
    short to hold one), so its error answer reaches the request."""
    return _unpack_id(buf, start + 4)[0] if size >= 12 else 0


def encode_send_answer(response: dict[str, Any]) -> bytes | None:
    """The compact frame of a send's answer built by
    :func:`~cluster.protocol.responses.send_response`, when it is ``OK`` and fits;
    None otherwise (send the CBOR map)."""
    if response["status"] is not _OK or len(response) != 8:
        return None
    topic_raw = response["topic"].encode()
    queue_offset, offset, store_us = (
        response["queue_offset"],
        response["offset"],
        response["store_us"],
    )
    if not (
        0 <= queue_offset <= _U64 and 0 <= offset <= _U64 and 0 <= store_us <= _U64
    ):  # never in practice: the log's offsets and clock
        return None
    head = _pack_answer(
        ANSWER_MARKER, response["queue"], response["id"], queue_offset, offset, store_us
    )
    return _pack_length(ANSWER_HEAD.size + len(topic_raw)) + head + topic_raw


def decode_send_answer(buf: bytes | bytearray, start: int, size: int) -> dict[str, Any] | str:
    """The answer map of the compact answer in ``buf[start:start+size]`` (what the CBOR
    map of the same answer decodes to, ``status`` a :class:`Status`), or what is wrong."""
    if size < ANSWER_HEAD.size:
        return (
            f"a compact send answer needs at least {ANSWER_HEAD.size} bytes, the frame body "
            f"has {size}"
        )
    _, queue, req_id, queue_offset, offset, store_us = _unpack_answer(buf, start)
    try:
        topic = buf[start + ANSWER_HEAD.size : start + size].decode()
    except UnicodeDecodeError:
        return "a compact send answer's topic is not valid UTF-8"
    return {
        "v": PROTOCOL_VERSION,
        "id": req_id,
        "status": _OK,
        "topic": topic,
        "queue": queue,
        "queue_offset": queue_offset,
        "offset": offset,
        "store_us": store_us,
    }
