"""Building requests on the client side, checked against the schema the server applies."""

from __future__ import annotations

from typing import Any, Final, cast

from crc32c import crc32c

from cluster.protocol.codec import encode_frame
from cluster.protocol.compact import encode_send
from cluster.protocol.errors import ProtocolError
from cluster.protocol.limits import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER,
    MAX_QUEUES,
    MAX_REQUEST_ID,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
)
from cluster.protocol.plain_send import PlainSend, plain_send
from cluster.protocol.schema import PLANS, SCHEMAS, Invalid, KnownTopics, validate
from cluster.protocol.statuses import Status
from cluster.protocol.wording import clip, describe
from storage.names import is_valid_topic_name

__all__ = ["encode_request", "make_request", "queue_for_key", "request_frame"]


def make_request(op: str, req_id: int, /, **fields: Any) -> dict[str, Any]:
    """A request envelope for ``op``, checked against the schema the server applies.

    Raises a non-fatal ``ProtocolError`` (``UNKNOWN_OP``, ``BAD_REQUEST``,
    ``INVALID_TOPIC``) so client bugs surface before a round trip. Fields left
    as None are not sent; the server fills in defaults.
    """
    return _make_request(op, req_id, fields, PROTOCOL_VERSION)


def _make_request(op: str, req_id: int, fields: dict[str, Any], version: int) -> dict[str, Any]:
    """:func:`make_request` in protocol ``version`` (every field means the same in each)."""
    if type(req_id) is not int or not 0 <= req_id <= MAX_REQUEST_ID:
        raise ValueError(f"request id must be an integer in 0..2**64-1, got {describe(req_id)}")
    if op == "send" and _is_plain_send(fields):  # one message per request: the hot path
        plain: dict[str, Any] = {"v": version, "op": op, "id": req_id}
        for name, value in fields.items():
            if value is not None:
                plain[name] = value
        return plain
    entry = PLANS.get(op)
    if entry is None:
        raise ProtocolError(Status.UNKNOWN_OP, f"unknown op {clip(op)}", req_id=req_id, field="op")
    extra = fields.keys() - entry[0].fields.keys()
    if extra:
        raise ProtocolError(
            Status.BAD_REQUEST,
            f"op {op!r} has no field(s) {', '.join(sorted(extra))}",
            req_id=req_id,
            field=min(extra),
        )
    try:
        validate(entry, fields, {})
    except Invalid as exc:
        raise ProtocolError(exc.status, exc.sentence(op), req_id=req_id, field=exc.path) from None
    request: dict[str, Any] = {"v": version, "op": op, "id": req_id}
    for name, value in fields.items():
        if value is not None:
            request[name] = value
    return request


_SEND_FIELDS: Final = frozenset(SCHEMAS["send"].fields)
_GOOD_TOPICS: Final = KnownTopics()
"""Topic names this process checked against the rule (a client sends to a few, often)."""


def _is_plain_send(fields: dict[str, Any]) -> bool:
    """``fields`` make a valid send in the common shape (see :mod:`cluster.protocol.plain_send`):
    no unknown field, a topic the name rule accepts. False: the full check decides."""
    return _plain_send_shape(fields) is not None


def _plain_send_shape(fields: dict[str, Any]) -> PlainSend | None:
    """The shape of ``fields`` when :func:`_is_plain_send` holds, else None."""
    topic = fields.get("topic")
    if type(topic) is not str:
        return None
    if topic not in _GOOD_TOPICS:
        if not is_valid_topic_name(topic):
            return None
        _GOOD_TOPICS.add(topic)
    if not _SEND_FIELDS.issuperset(fields):
        return None
    return plain_send(fields)


def encode_request(op: str, req_id: int, /, **fields: Any) -> bytes:
    """``encode_frame(make_request(...))``."""
    return encode_frame(make_request(op, req_id, **fields))


def request_frame(
    op: str,
    req_id: int,
    fields: dict[str, Any],
    *,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    version: int = PROTOCOL_VERSION,
    compact: bool = True,
) -> bytes:
    """The frame of a request, checked as :func:`make_request` checks it: with ``compact``
    (a server known to speak version 2) and ``version`` 2, a send in the common shape (see
    :mod:`cluster.protocol.plain_send`) as a compact send (see
    :mod:`cluster.protocol.compact`); anything else as a CBOR map of protocol
    ``version``. Raises what :func:`make_request` and :func:`encode_frame` raise."""
    if (
        compact
        and version == PROTOCOL_VERSION
        and op == "send"
        and type(req_id) is int
        and (shape := _plain_send_shape(fields)) is not None
    ):
        body, queue, key, acks, timeout_ms = shape
        frame = encode_send(req_id, fields["topic"], body, queue, key, acks, timeout_ms)
        if frame is not None and len(frame) - HEADER.size <= max_frame_size:
            return frame
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"version must be one of {list(SUPPORTED_VERSIONS)}, got {version!r}")
    request = _make_request(op, req_id, fields, version)
    return encode_frame(request, max_frame_size=max_frame_size)


def queue_for_key(key: bytes | str, queues: int) -> int:
    """The queue a keyed message goes to: CRC32C of the key (UTF-8 if text) modulo the queue count.

    Part of the protocol so that clients can predict placement and per-key
    order survives server upgrades; changing it would reshuffle every key.
    """
    if not 1 <= queues <= MAX_QUEUES:
        raise ValueError(f"queues must be between 1 and {MAX_QUEUES}, got {queues}")
    data = key.encode() if type(key) is str else cast(bytes, key)
    return crc32c(data) % queues
