"""Frames with a byte string left in the sender's buffers (the stored records of a pull).

CBOR writes a byte string as a head (major type 2 and the length) followed by the bytes
themselves, so a frame holding one can be sent as three pieces: everything up to and
including that head, the bytes where they lie (views of the mapped log), and the rest of
the map. A writer that sends buffers (``writev``) then copies those bytes only in the
kernel. :func:`encode_spliced_frame` gives exactly the bytes :func:`encode_frame` gives
for the same map with the byte string joined: cbor2's own encoding, tested for that.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeAlias

import cbor2

from cluster.protocol.errors import ProtocolError
from cluster.protocol.limits import DEFAULT_MAX_FRAME_SIZE, HEADER
from cluster.protocol.statuses import Status

__all__ = ["Buffer", "SplicedBytes", "SplicedFrame", "encode_spliced_frame", "spliced_value"]

Buffer: TypeAlias = bytes | bytearray | memoryview
"""A piece of a frame (memoryviews are of bytes: format ``B``)."""

_MAP: Final = 5
_BYTES: Final = 2
_U8, _U16, _U32, _U64 = (
    struct.Struct(">B"),
    struct.Struct(">H"),
    struct.Struct(">I"),
    struct.Struct(">Q"),
)


def cbor_head(major: int, length: int) -> bytes:
    """The head of a CBOR item of ``major`` type and ``length``, in the shortest form (as
    cbor2 writes it)."""
    lead = major << 5
    if length < 24:
        return _U8.pack(lead | length)
    if length < 1 << 8:
        return _U8.pack(lead | 24) + _U8.pack(length)
    if length < 1 << 16:
        return _U8.pack(lead | 25) + _U16.pack(length)
    if length < 1 << 32:
        return _U8.pack(lead | 26) + _U32.pack(length)
    return _U8.pack(lead | 27) + _U64.pack(length)


class SplicedBytes:
    """A CBOR byte string given as buffers, ``size`` bytes in all, sent in place.

    ``parts`` may change while the frame waits, bytes for the same bytes (a lent view
    replaced by its copy, :mod:`storage.lent_views`): a sender reads it when it writes.
    ``done`` runs once, when the frame was sent or never will be (see :meth:`finish`).
    """

    __slots__ = ("_done", "parts", "size")

    def __init__(self, parts: list[Any], size: int, done: Callable[[], None] | None = None) -> None:
        assert sum(len(part) for part in parts) == size, "parts must hold size bytes"
        self.parts: list[Buffer] = parts
        self.size = size
        self._done = done

    def joined(self) -> bytes:
        return b"".join(self.parts)

    def finish(self) -> None:
        """The frame holding these bytes was sent or dropped: run ``done`` (once)."""
        done, self._done = self._done, None
        if done is not None:
            done()

    def __len__(self) -> int:
        return self.size


class SplicedFrame:
    """A whole frame as ``head`` (length prefix to the byte string's head), the bytes,
    and ``tail`` (the rest of the map); ``size`` bytes in all."""

    __slots__ = ("bytes", "head", "size", "tail")

    def __init__(self, head: bytes, spliced: SplicedBytes, tail: bytes) -> None:
        self.head = head
        self.bytes = spliced
        self.tail = tail
        self.size = len(head) + spliced.size + len(tail)

    def joined(self) -> bytes:
        return b"".join([self.head, *self.bytes.parts, self.tail])


def spliced_value(obj: Mapping[str, Any]) -> str | None:
    """The key of ``obj``'s :class:`SplicedBytes` value (at most one is allowed), or None."""
    found = None
    for key, value in obj.items():
        if type(value) is SplicedBytes:
            assert found is None, "a frame holds at most one spliced byte string"
            found = key
    return found


def _items(obj: dict[str, Any]) -> bytes:
    """cbor2's encoding of ``obj``'s entries, without the map's head."""
    return cbor2.dumps(obj)[len(cbor_head(_MAP, len(obj))) :]


def encode_spliced_frame(
    obj: Mapping[str, Any], key: str, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> SplicedFrame:
    """``obj`` as a frame whose ``key`` (a :class:`SplicedBytes`) stays in its buffers.

    Values other than ``obj[key]`` must be plain CBOR types. Raises ``ProtocolError``
    ``FRAME_TOO_LARGE`` as :func:`encode_frame` does.
    """
    items = list(obj.items())
    index = next(i for i, (name, _value) in enumerate(items) if name == key)
    spliced = items[index][1]
    assert type(spliced) is SplicedBytes, (key, type(spliced))
    before, after = dict(items[:index]), dict(items[index + 1 :])
    head = b"".join(
        [
            cbor_head(_MAP, len(items)),
            _items(before),
            cbor2.dumps(key),
            cbor_head(_BYTES, spliced.size),
        ]
    )
    tail = _items(after)
    body_size = len(head) + spliced.size + len(tail)
    if body_size > max_frame_size:
        req_id = obj.get("id")
        raise ProtocolError(
            Status.FRAME_TOO_LARGE,
            f"encoded frame body is {body_size} bytes, above the limit of {max_frame_size}; "
            "send fewer or smaller messages per frame",
            req_id=req_id if type(req_id) is int else 0,
        )
    return SplicedFrame(HEADER.pack(body_size) + head, spliced, tail)
