"""The common shape of a ``send``, checked in one pass instead of the generic plan walk.

One message per request is how most clients write, so a ``send`` is checked on both
sides of every such request (by :func:`~cluster.protocol.make_request` and by the
server's :class:`~cluster.protocol.FrameDecoder`). The generic walk over the op's plan
(:func:`~cluster.protocol.schema.apply_steps`) costs more there than decoding the frame.
A send in its most common form -- a bytes body, a queue or a key or neither, ``acks``
and ``timeout_ms`` or their defaults, and no tags, properties, timestamp or producer --
is recognised here instead. Anything else, which includes every invalid send, gives
None: the caller then takes the plan, which names the problem as it always did. So this
module never decides an error, and what it accepts the plan accepts with the same values
(a hypothesis test holds it to that). Bounds and defaults are read from the send schema.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from cluster.protocol.schema import SCHEMAS
from cluster.protocol.statuses import ACKS_BY_VALUE, Acks

__all__ = ["PlainSend", "plain_send"]

_FIELDS: Final = SCHEMAS["send"].fields


def _bound(value: int | None) -> int:
    assert value is not None, "the send schema bounds its queue and timeout_ms"
    return value


_QUEUE_LOW: Final = _bound(_FIELDS["queue"].low)
_QUEUE_HIGH: Final = _bound(_FIELDS["queue"].high)
_ACKS_DEFAULT: Final[Acks] = _FIELDS["acks"].default
_TIMEOUT_DEFAULT: Final[int] = _FIELDS["timeout_ms"].default
_TIMEOUT_LOW: Final = _bound(_FIELDS["timeout_ms"].low)
_TIMEOUT_HIGH: Final = _bound(_FIELDS["timeout_ms"].high)
assert _FIELDS["body"].types == (bytes,) and _FIELDS["key"].types == (bytes, str)
assert {"body", "queue", "key", "tags", "props", "born_us", "producer", "sequence", "epoch"} <= set(
    _FIELDS
)

PlainSend = tuple[bytes, "int | None", "bytes | str | None", Acks, int]
"""``(body, queue, key, acks, timeout_ms)`` of a send in the common shape."""


def plain_send(raw: Mapping[Any, Any]) -> PlainSend | None:
    """The message fields of ``raw`` (a send's map, or a client's keyword fields) when
    they take the common shape and are valid; None otherwise (take the plan). The
    ``topic`` is not looked at: the caller checks it (the server remembers good names).
    """
    body = raw.get("body")
    if type(body) is not bytes:
        return None
    queue = raw.get("queue")
    key = raw.get("key")
    if queue is not None:
        if type(queue) is not int or not _QUEUE_LOW <= queue <= _QUEUE_HIGH or key is not None:
            return None
    elif key is not None and type(key) is not bytes and type(key) is not str:
        return None
    acks_value = raw.get("acks")
    if acks_value is None:
        acks = _ACKS_DEFAULT
    else:
        if type(acks_value) is not str:
            return None
        found = ACKS_BY_VALUE.get(acks_value)
        if found is None:
            return None
        acks = found
    timeout_ms = raw.get("timeout_ms")
    if timeout_ms is None:
        timeout_ms = _TIMEOUT_DEFAULT
    elif type(timeout_ms) is not int or not _TIMEOUT_LOW <= timeout_ms <= _TIMEOUT_HIGH:
        return None
    if (
        raw.get("tags") is not None
        or raw.get("props") is not None
        or raw.get("born_us") is not None
        or raw.get("producer") is not None
        or raw.get("sequence") is not None
        or raw.get("epoch") is not None
    ):
        return None
    return body, queue, key, acks, timeout_ms
