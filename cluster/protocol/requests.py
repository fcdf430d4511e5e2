"""Building requests on the client side, checked against the schema the server applies."""

from __future__ import annotations

from typing import Any, Final, cast

from crc32c import crc32c

from cluster.protocol.codec import encode_frame
from cluster.protocol.compact import ACKS_CODES, encode_checked_send, encode_send
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
from cluster.protocol.statuses import Acks, Status
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


_CHECKED_SENDS: Final[dict[tuple[str, str, int], tuple[bytes, int]]] = {}
"""``(topic, acks, timeout_ms)`` of compact sends this process built -> the topic's UTF-8
and the acks code: a producer sends with the same three over and over, and checking
them is most of the cost of a one-message request's frame (2.2 -> 0.7 us a frame)."""
_CHECKED_SENDS_MAX: Final = 1024
_REPEATED_SEND_FIELDS: Final = frozenset({"topic", "body", "queue", "acks", "timeout_ms"})
_QUEUE_HIGH: Final = MAX_QUEUES - 1
assert SCHEMAS["send"].fields["queue"].high == _QUEUE_HIGH


def _remember_send(fields: dict[str, Any], acks: Acks) -> None:
    """Note the topic, acks and timeout of a send :func:`encode_send` framed, when all
    three were given (with exactly these types: ``True == 1`` hashes alike)."""
    topic, acks_value, timeout_ms = fields["topic"], fields.get("acks"), fields.get("timeout_ms")
    if (
        type(acks_value) is str
        and type(timeout_ms) is int
        and len(_CHECKED_SENDS) < _CHECKED_SENDS_MAX
    ):
        _CHECKED_SENDS[(topic, acks_value, timeout_ms)] = (topic.encode(), ACKS_CODES.index(acks))


def _repeated_send_frame(req_id: int, fields: dict[str, Any]) -> bytes | None:
    """The compact frame of a keyless send with a bytes body, a valid queue or none, and a
    topic, acks and timeout_ms an earlier send framed (see :data:`_CHECKED_SENDS`); None
    otherwise (the full check decides: it frames the same send to the same bytes)."""
    if not _REPEATED_SEND_FIELDS.issuperset(fields):
        return None
    topic, acks_value, timeout_ms = (
        fields.get("topic"),
        fields.get("acks"),
        fields.get("timeout_ms"),
    )
    if type(topic) is not str or type(acks_value) is not str or type(timeout_ms) is not int:
        return None
    checked = _CHECKED_SENDS.get((topic, acks_value, timeout_ms))
    body = fields.get("body")
    if checked is None or type(body) is not bytes or not 0 <= req_id <= MAX_REQUEST_ID:
        return None
    queue = fields.get("queue")
    if queue is not None and (type(queue) is not int or not 0 <= queue <= _QUEUE_HIGH):
        return None
    topic_raw, acks_code = checked
    return encode_checked_send(req_id, topic_raw, acks_code, timeout_ms, queue, body)


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
    ``version``. Raises what :func:`make_request` and :func:`encode_frame` raise.
    A send repeating the topic, acks and timeout of one framed before skips their checks
    (:func:`_repeated_send_frame`): the same bytes."""
    if compact and version == PROTOCOL_VERSION and op == "send" and type(req_id) is int:
        frame = _repeated_send_frame(req_id, fields)
        if frame is not None and len(frame) - HEADER.size <= max_frame_size:
            return frame
        shape = _plain_send_shape(fields)
        if shape is not None:
            body, queue, key, acks, timeout_ms = shape
            frame = encode_send(req_id, fields["topic"], body, queue, key, acks, timeout_ms)
            if frame is not None:
                _remember_send(fields, acks)
                if len(frame) - HEADER.size <= max_frame_size:
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
