"""Received values described in the protocol's words (CBOR types), for error sentences.

An error goes back to a client that may not be written in Python: it names CBOR
types ("a text string", "simple value 16"), never Python classes or codec internals.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType, NoneType
from typing import Final

import cbor2

__all__ = ["clip", "describe", "expected", "plural"]

_TYPE_NAMES: Final[Mapping[type, str]] = MappingProxyType(
    {
        str: "a text string",
        bytes: "a byte string",
        int: "an integer",
        list: "an array",
        dict: "a map",
        bool: "a boolean",
        float: "a float",
        NoneType: "null",
    }
)


def plural(count: int, noun: str) -> str:
    """``"1 byte"``, ``"2 bytes"``, ``"2 entries"``."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {noun[:-1]}ies" if noun.endswith("y") else f"{count} {noun}s"


def clip(text: str, limit: int = 40) -> str:
    """A repr of at most ``limit`` characters of ``text``: errors must stay short and printable."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def describe(value: object) -> str:
    """A short description of a received value in CBOR terms; never huge, never raises."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean true" if value else "boolean false"
    if isinstance(value, int):
        return f"integer {value}" if value.bit_length() <= 128 else "a huge integer"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        return f"text string {clip(value)}"
    if isinstance(value, bytes):
        return f"byte string of {plural(len(value), 'byte')}"
    if isinstance(value, list | tuple):  # an array used as a map key decodes as a tuple
        return f"array of {plural(len(value), 'item')}"
    if isinstance(value, Mapping):  # a map used as a map key decodes as a frozen map
        return f"map of {plural(len(value), 'entry')}"
    if isinstance(value, cbor2.CBORSimpleValue):
        return f"simple value {value.value}"
    if value is cbor2.undefined:
        return "undefined"
    return "a CBOR item of an unsupported kind"


def expected(types: tuple[type, ...]) -> str:
    """The wire types a field accepts, e.g. ``"a byte string or a text string"``."""
    return " or ".join(_TYPE_NAMES.get(t, "a CBOR item") for t in types)
