"""Frames of one-message sends, built from a checked prefix instead of encoded whole (sans-IO).

A producer sending one message per request sends the same fields again and again:
only the request id and the body change. Checking the fields against the send schema
(:func:`~cluster.protocol.make_request`) and encoding the map (cbor2) cost more than the
rest of the client's work on such a request. :class:`SendFrames` does both once per
shape -- topic, ``acks``, ``timeout_ms``, queue -- and keeps the encoded pairs; a frame
is then that prefix, the id and the body, joined. Key order inside a CBOR map carries
no meaning (docs/protocol.md), so the node reads the same map as from
``encode_frame(make_request("send", ...))``; a test holds the two to that.

Anything else (a key, tags, properties, a producer id, a body too large for a frame,
a field of the wrong type) gives None: the caller then takes ``make_request``, which
raises for what is invalid as it always did.
"""

from __future__ import annotations

import struct
from typing import Any, Final

import cbor2

from cluster.protocol import make_request
from cluster.protocol.limits import HEADER

__all__ = ["SendFrames"]

_SHAPE_FIELDS: Final = frozenset({"topic", "acks", "timeout_ms", "queue", "body"})
"""The fields of a send this module builds frames for (``body`` is always present)."""

_MAX_SHAPES: Final = 1024
"""Prefixes kept at most (a client sends to a few topics and queues, often)."""

_ID_KEY: Final = cbor2.dumps("id")
_BODY_KEY: Final = cbor2.dumps("body")
_pack_header: Final = HEADER.pack


_SMALL_HEADS: Final = [bytes((byte,)) for byte in range(256)]
"""Heads whose argument fits in the initial byte, by that byte."""
_HEAD_8: Final = struct.Struct(">BB").pack
_HEAD_16: Final = struct.Struct(">BH").pack
_HEAD_32: Final = struct.Struct(">BI").pack
_HEAD_64: Final = struct.Struct(">BQ").pack


def _head(major: int, value: int) -> bytes:
    """A CBOR item's head: major type and argument (an unsigned integer below 2**64)."""
    if value < 24:
        return _SMALL_HEADS[major | value]
    if value < 0x100:
        return _HEAD_8(major | 24, value)
    if value < 0x10000:
        return _HEAD_16(major | 25, value)
    if value < 0x100000000:
        return _HEAD_32(major | 26, value)
    return _HEAD_64(major | 27, value)


class SendFrames:
    """Builds frames of one-message sends on one connection.

    Invariant: every prefix kept was checked by ``make_request`` with the fields of its
    shape (the body aside, which is checked to be ``bytes`` at every call). Used from
    one event loop; it holds no I/O.
    """

    def __init__(self, max_frame_size: int) -> None:
        self._max_frame_size = max_frame_size
        self._prefixes: dict[tuple[Any, ...], bytes] = {}

    def frame(self, req_id: int, fields: dict[str, Any]) -> bytes | None:
        """The frame of ``send`` with ``fields`` and id ``req_id`` (None: take
        ``make_request``, which builds it or says what is wrong)."""
        body = fields.get("body")
        if type(body) is not bytes or not _SHAPE_FIELDS.issuperset(fields):
            return None
        shape = (
            fields.get("topic"),
            fields.get("acks"),
            fields.get("timeout_ms"),
            fields.get("queue"),
        )
        try:
            prefix = self._prefixes[shape]
        except KeyError:
            prefix = self._check(shape, fields)
        except TypeError:  # an unhashable field: wrong anyway, let the check say so
            return None
        id_part = _head(0x00, req_id)
        body_head = _head(0x40, len(body))
        size = len(prefix) + len(_ID_KEY) + len(id_part) + len(_BODY_KEY) + len(body_head)
        size += len(body)
        if size > self._max_frame_size:
            return None
        return b"".join((_pack_header(size), prefix, _ID_KEY, id_part, _BODY_KEY, body_head, body))

    def _check(self, shape: tuple[Any, ...], fields: dict[str, Any]) -> bytes:
        """Check the shape with ``make_request`` (raises for what is invalid) and keep
        its prefix: the map's head and every pair but ``id`` and ``body``."""
        request = make_request("send", 0, **fields)
        others = {name: value for name, value in request.items() if name not in ("id", "body")}
        assert len(others) + 2 < 24, "a send's map head is one byte"
        prefix = bytes((0xA0 | (len(others) + 2),)) + cbor2.dumps(others)[1:]
        if len(self._prefixes) >= _MAX_SHAPES:
            self._prefixes.clear()
        self._prefixes[shape] = prefix
        return prefix
