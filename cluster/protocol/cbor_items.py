"""Counting the CBOR data items of a frame body before decoding it: the decode-work bound.

Decoding costs per item, not per byte: a 16 MiB body of one-byte items (16 million
empty arrays, say) holds the event loop for seconds while one 16 MiB message body
costs a copy. The codec counts a large body's items first and refuses it, undecoded,
when there are more than :data:`~cluster.protocol.limits.MAX_FRAME_ITEMS`. Counting
reads only item headers (a string's bytes are skipped, not read) and stops at the
limit, so its own work is bounded too.
"""

from __future__ import annotations

from typing import Final

__all__ = ["count_items"]

_SCALAR, _STRING, _ARRAY, _MAP, _TAG, _OPEN, _BREAK, _INVALID = range(8)


def _initial_byte_table() -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Per initial byte: what the item is, its header length, and its argument when inline."""
    kinds, header_sizes, arguments = [], [], []
    for initial in range(256):
        major, info = initial >> 5, initial & 0x1F
        size = 1 if info < 24 else {24: 2, 25: 3, 26: 5, 27: 9}.get(info, 1)
        if info in (28, 29, 30):
            kind = _INVALID
        elif info == 31:
            kind = {2: _OPEN, 3: _OPEN, 4: _OPEN, 5: _OPEN, 7: _BREAK}.get(major, _INVALID)
        else:
            kind = (_SCALAR, _SCALAR, _STRING, _STRING, _ARRAY, _MAP, _TAG, _SCALAR)[major]
        kinds.append(kind)
        header_sizes.append(size)
        arguments.append(info if info < 24 else -1)
    return tuple(kinds), tuple(header_sizes), tuple(arguments)


_KIND, _HEADER_SIZE, _ARGUMENT = _initial_byte_table()
_WHOLE_SIZE: Final = tuple(
    size + (argument if kind == _STRING else 0)
    if kind == _SCALAR or (kind == _STRING and argument >= 0)
    else 0
    for kind, size, argument in zip(_KIND, _HEADER_SIZE, _ARGUMENT, strict=True)
)
"""The size of a whole item known from its initial byte alone (scalars, short strings), else 0."""
_INDEFINITE: Final = -1
"""``left`` inside an indefinite-length container: its items are counted as they come."""
_BREAK_CODE: Final = 0xFF


def count_items(data: bytes | bytearray, limit: int, start: int = 0, end: int | None = None) -> int:
    """The number of CBOR data items in ``data[start:end]`` (one item, the body), or a number
    above ``limit`` once there are more.

    Every item counts once: each container, each map key and value, each array element,
    each tag's content and each chunk of an indefinite-length string. A definite-length
    container counts its items when it opens, so a huge one is refused at its header.
    Counting stops early, with the count so far, at anything malformed: the decoder
    reports that error itself.
    """
    kinds, header_sizes, arguments, whole_sizes = _KIND, _HEADER_SIZE, _ARGUMENT, _WHOLE_SIZE
    end = len(data) if end is None else end
    pos = start
    total = 1  # the body is one item
    left = 1  # items still to read in the innermost open container
    enclosing: list[int] = []
    while pos < end:
        if left == 0:
            if not enclosing:
                break
            left = enclosing.pop()
            continue
        initial = data[pos]
        if left > 0:
            left -= 1
        else:  # inside an indefinite-length container
            if initial == _BREAK_CODE:
                pos += 1
                left = enclosing.pop()
                continue
            total += 1
            if total > limit:
                return total
        whole = whole_sizes[initial]
        if whole:  # every integer, float and simple value, and every short string
            pos += whole
            continue
        kind = kinds[initial]
        size = header_sizes[initial]
        argument = arguments[initial]
        if argument < 0:
            argument = int.from_bytes(data[pos + 1 : pos + size], "big")
        pos += size
        if kind == _STRING:
            pos += argument
        elif kind in (_ARRAY, _MAP):
            items = argument if kind == _ARRAY else 2 * argument
            total += items
            if total > limit:
                return total
            if items:
                enclosing.append(left)
                left = items
        elif kind == _TAG:
            if left >= 0:  # inside an indefinite container the content counts as it comes
                total += 1
                left += 1
        elif kind == _OPEN:
            enclosing.append(left)
            left = _INDEFINITE
        else:
            return total  # malformed (a reserved initial byte, a stray break code)
    return total
