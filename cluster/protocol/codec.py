"""Framing and hardened CBOR: bytes in, validated requests (or responses) out; dicts in, frames out."""

from __future__ import annotations

import abc
import io
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, Generic, TypeVar

import cbor2

from cluster.protocol.cbor_items import count_items
from cluster.protocol.compact import (
    ACKS_CODES,
    ANSWER_MARKER,
    QUEUE_SET,
    SEND_HEAD,
    SEND_MARKER,
    compact_send_id,
    decode_send,
    decode_send_answer,
)
from cluster.protocol.errors import ProtocolError
from cluster.protocol.limits import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER,
    LOWEST_VERSION,
    MAX_DEPTH,
    MAX_FRAME_ITEMS,
    MAX_FRAME_SIZE_LIMIT,
    MAX_REQUEST_ID,
    MIN_MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
)
from cluster.protocol.messages import Request
from cluster.protocol.plain_send import (
    _QUEUE_HIGH,
    _QUEUE_LOW,
    _TIMEOUT_HIGH,
    _TIMEOUT_LOW,
    plain_send,
)
from cluster.protocol.schema import (
    KNOWN_TOPIC_PLANS,
    PLANS,
    SCHEMAS,
    Invalid,
    KnownTopics,
    apply_steps,
)
from cluster.protocol.spliced import encode_spliced_frame, spliced_value
from cluster.protocol.statuses import STATUS_BY_VALUE, Status
from cluster.protocol.wording import clip, describe, plural

log = logging.getLogger("cluster.protocol")

__all__ = ["COMPACT_ANSWER", "FrameDecoder", "ResponseDecoder", "encode_frame"]

COMPACT_ANSWER: Final = 0
"""``answer_version`` of a compact send: answered compactly when ``OK``, else as a map of
version 2 (compact sends are version 2)."""

_COMPACT_MIN: Final = 64 * 1024
"""Consumed bytes a decoder keeps before it considers moving the live tail to the front."""


class _TagRejected(ValueError):
    """A CBOR tag in a frame: version 1 accepts none (they would build arbitrary objects)."""


def _reject_tag(tag: cbor2.CBORTag, immutable: bool) -> Any:
    raise _TagRejected(f"CBOR tag {tag.tag} is not allowed")


def _reject_builtin_tag(value: Any, immutable: bool) -> Any:
    raise _TagRejected("CBOR tags are not allowed")


_BUILTIN_TAGS: Final = (
    *(0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100),
    *(256, 258, 260, 261, 1004, 43000, 55799),
)
"""Tags cbor2 6.2 decodes itself: into datetimes, bignums, regexes, shared (cyclic) values...

The protocol uses no tags, so these (through ``semantic_decoders``) and every
other tag (through ``tag_hook``) make the frame malformed before any such
object is built.
"""
_NO_TAGS: Final[dict[int, Callable[[Any, bool], Any]]] = dict.fromkeys(
    _BUILTIN_TAGS, _reject_builtin_tag
)


def _new_cbor_decoder() -> cbor2.CBORDecoder:
    return cbor2.CBORDecoder(
        io.BytesIO(),
        tag_hook=_reject_tag,
        semantic_decoders=_NO_TAGS,
        max_depth=MAX_DEPTH,
        allow_duplicate_keys=False,
    )


_CBOR_PROBLEMS: Final = tuple(
    (re.compile(pattern), wording)
    for pattern, wording in (
        (r"[Dd]uplicate map key", "a map holds the same key twice"),
        (r"nesting depth", f"CBOR items nest deeper than {MAX_DEPTH} levels"),
        (
            r"(?:unknown unsigned integer|reserved major type \d) subtype 0x(?P<info>[0-9a-f]+)",
            "an initial byte uses the reserved additional information value 0x{info}",
        ),
        (r"two-byte sequence for simple value", "a two-byte simple value is below 32"),
        (r"break code", "a break code (0xff) stands where a data item was expected"),
        (r"indefinite length not allowed", "an item that must have a definite length has none"),
        (
            r"non-(?P<kind>byte|text) string .* found in indefinite length",
            "a chunk of an indefinite-length {kind} string is not a {kind} string",
        ),
        (r"missing value for key", "an indefinite-length map ends between a key and its value"),
        (r"chunk too long", "a string chunk is longer than the frame"),
    )
)
_DECODING: Final = re.compile(r"error decoding (?P<kind>[a-z ]+?)(?: \d+)?:")


def _cbor_problem(exc: Exception) -> str:
    """What is wrong with the body in CBOR's words: never a Python exception's own text.

    cbor2's messages quote Python reprs (``Duplicate map key: b'a'``) and codec errors
    (``'utf-8' codec can't decode byte 0x98 in position 5``); a client in any language
    must be able to read the answer.
    """
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        bad = cause.object[cause.start]
        return (
            f"a text string is not valid UTF-8 (byte 0x{bad:02x} at offset {cause.start} "
            "of the string)"
        )
    text = str(exc)
    if isinstance(cause, _TagRejected):
        tag = re.search(r"semantic tag (\d+)", text)
        return f"CBOR tag {tag.group(1) if tag else ''} is not allowed: this protocol uses no tags"
    for pattern, wording in _CBOR_PROBLEMS:
        found = pattern.search(text)
        if found is not None:
            problem = wording.format(**found.groupdict())
            break
    else:
        problem = "the body is not well-formed CBOR"
    where = _DECODING.match(text)
    if where is None:
        return problem
    kind = where.group("kind")
    return f"{problem} (in {'an' if kind[0] in 'aeiou' else 'a'} {kind})"


def _malformed_message(exc: Exception) -> str:
    if isinstance(exc, cbor2.CBORDecodeEOF):
        return (
            "frame body ends inside a CBOR item; the length prefix must cover the whole "
            "CBOR map (is it computed over the encoded body?)"
        )
    return (
        f"frame body is not valid CBOR for this protocol: {_cbor_problem(exc)}; "
        "encode the body as one untagged CBOR map without duplicate keys"
    )


_T = TypeVar("_T")
_unpack_header: Final = HEADER.unpack_from
_unpack_compact_head: Final = SEND_HEAD.unpack_from
_COMPACT_HEAD_SIZE: Final = SEND_HEAD.size


class _FrameReader(Generic[_T], abc.ABC):
    """Buffering and framing shared by the request and the response decoders.

    Received bytes accumulate in a ``bytearray`` read from an offset; consumed
    bytes are dropped when the buffer empties, or when they outweigh the live
    tail, so feeding stays linear in the bytes fed. Each body is decoded from
    its own ``BytesIO``, which bounds a malformed item to its frame (a shared
    buffer let a bogus length claim read every frame behind it, per frame) and
    lets ``tell()`` prove that the body held exactly one CBOR item.

    A body whose first byte is the subclass's ``_compact_marker`` is read by its
    ``_compact`` instead (see :mod:`cluster.protocol.compact`); ``compact`` tells
    whether the frame returned last was one.
    """

    _compact_marker = -1
    """First body byte of this side's compact frames (-1: none)."""

    def __init__(
        self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, *, max_items: int | None = None
    ) -> None:
        if not MIN_MAX_FRAME_SIZE <= max_frame_size <= MAX_FRAME_SIZE_LIMIT:
            raise ValueError(
                f"max_frame_size must be between {MIN_MAX_FRAME_SIZE} and "
                f"{MAX_FRAME_SIZE_LIMIT}, got {max_frame_size}"
            )
        if max_items is not None and max_items < 1:
            raise ValueError(f"max_items must be at least 1 (or None: no bound), got {max_items}")
        self._max = max_frame_size
        self._max_items = max_items
        self._buf = bytearray()
        self._pos = 0
        self._cbor = _new_cbor_decoder()
        self._fatal: ProtocolError | None = None
        self.compact = False
        self.answer_version = LOWEST_VERSION
        """How to answer the frame returned last: :data:`COMPACT_ANSWER` for a compact send
        (compactly when ``OK``, else as a map of this version), else the ``v`` of the
        answer's map: the request's own, or the lowest version when the request's could
        not be read or is not spoken (a server never answers in a version the client did
        not send). Meaningful on the request decoder only."""

    @property
    def max_frame_size(self) -> int:
        return self._max

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned as frames (for back-pressure)."""
        return len(self._buf) - self._pos

    def incomplete_frame_size(self) -> int | None:
        """The body size announced by the next frame when its length prefix is buffered but
        not all of its body (None otherwise): what a reader may reserve before reading on."""
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < 4:
            return None
        (size,) = _unpack_header(buf, pos)
        return size if avail - 4 < size else None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes; after a fatal error they are dropped (the stream is dead)."""
        if self._fatal is not None:
            return
        buf = self._buf
        pos = self._pos
        if pos:
            if pos == len(buf):
                buf.clear()
                self._pos = 0
            elif pos >= _COMPACT_MIN and pos * 2 >= len(buf):
                del buf[:pos]
                self._pos = 0
        buf += data

    def next_frame(self) -> _T | ProtocolError | None:
        """The next frame: a decoded value, a non-fatal ``ProtocolError``, or None for "need more bytes".

        Raises a fatal ``ProtocolError`` when a length prefix exceeds the limit,
        and again on every later call.
        """
        if self._fatal is not None:
            raise self._fatal
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < 4:
            return None
        (size,) = _unpack_header(buf, pos)
        if size > self._max:
            raise self._die(size)
        if avail - 4 < size:
            return None
        start = pos + 4
        self._pos = start + size
        if size == 0:
            self.answer_version = LOWEST_VERSION
            return self._error(
                Status.MALFORMED_FRAME,
                "frame body is empty; a frame must hold one CBOR map after its length prefix",
            )
        if buf[start] == self._compact_marker:
            return self._compact(buf, start, size)
        self.answer_version = LOWEST_VERSION  # until _interpret reads a spoken ``v``
        max_items = self._max_items
        # A body of n bytes holds at most n items: only larger bodies need counting.
        if max_items is not None and size > max_items:
            items = count_items(buf, max_items, start, start + size)
            if items > max_items:
                return self._too_many_items(max_items)
        body = io.BytesIO(memoryview(buf)[start : start + size])
        cbor = self._cbor
        cbor.fp = body
        try:
            obj = cbor.decode()
        except (cbor2.CBORError, ValueError, TypeError, OverflowError) as exc:
            # cbor2 6.2 panics when a decoder is reused after an error: start afresh.
            self._cbor = _new_cbor_decoder()
            return self._error(Status.MALFORMED_FRAME, _malformed_message(exc))
        used = body.tell()
        if used != size:
            return self._error(
                Status.MALFORMED_FRAME,
                f"frame body has {plural(size - used, 'byte')} after its CBOR map; "
                "the length prefix must cover exactly one CBOR map",
            )
        self.compact = False
        return self._interpret(obj)

    @abc.abstractmethod
    def _compact(self, buf: bytearray, start: int, size: int) -> _T | ProtocolError:
        """Read the compact frame in ``buf[start:start+size]`` (see ``_compact_marker``)."""

    def __iter__(self) -> Iterator[_T | ProtocolError]:
        """Yield every complete frame buffered so far; fatal errors propagate."""
        while (item := self.next_frame()) is not None:
            yield item

    @abc.abstractmethod
    def _interpret(self, obj: Any) -> _T | ProtocolError:
        """Turn one decoded CBOR item into a request (server) or response (client)."""

    def _too_many_items(self, max_items: int) -> ProtocolError:
        return self._error(
            Status.MALFORMED_FRAME,
            f"frame body holds more than {max_items} CBOR data items (each container, map "
            "key and value, and array element counts); decoding it would hold up every other "
            "client, so it was not decoded: send fewer messages per batch or fewer "
            "properties per message",
        )

    def _die(self, size: int) -> ProtocolError:
        error = ProtocolError(
            Status.FRAME_TOO_LARGE,
            f"frame length prefix announces {size} bytes, above the limit of {self._max}; "
            "the stream cannot be parsed past it, so the connection is closed: reconnect "
            "and send smaller frames (split large batches)",
            fatal=True,
        )
        log.debug("protocol_fatal status=%s size=%d limit=%d", error.status, size, self._max)
        self._fatal = error
        self._buf = bytearray()
        self._pos = 0
        return error

    @staticmethod
    def _error(
        status: Status,
        message: str,
        *,
        req_id: int = 0,
        field: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> ProtocolError:
        log.debug("protocol_error status=%s id=%d field=%s", status, req_id, field)
        return ProtocolError(status, message, req_id=req_id, field=field, details=details)

    def _bad_envelope(self, obj: Any, kind: str) -> ProtocolError:
        """The error for a body that is not a map or whose ``id`` is unusable (reported as id 0)."""
        if type(obj) is not dict:
            return self._error(
                Status.MALFORMED_FRAME,
                f"frame body must be a CBOR map holding the {kind} envelope, got {describe(obj)}",
            )
        req_id = obj.get("id")
        problem = (
            "is missing"
            if req_id is None
            else f"must be an unsigned integer below 2**64, got {describe(req_id)}"
        )
        return self._error(
            Status.MALFORMED_FRAME,
            f"envelope field 'id' {problem}; send the request id as a CBOR unsigned "
            "integer (this error is reported with id 0)",
            field="id",
        )


class FrameDecoder(_FrameReader[Request]):
    """Server side: turns received bytes into validated requests.

    ``feed()`` bytes, then iterate (or call ``next_frame()`` until None). Each
    item is a request dict, or a non-fatal ``ProtocolError`` to answer with
    ``encode_frame(err.response())`` before reading on. A fatal ``ProtocolError``
    (oversized length prefix) is raised: answer it, then close the connection.

    A body with more than ``max_items`` CBOR data items is answered
    ``MALFORMED_FRAME`` without being decoded (see :mod:`cluster.protocol.cbor_items`).
    """

    def __init__(
        self,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        *,
        max_items: int = MAX_FRAME_ITEMS,
        versions: tuple[int, ...] = SUPPORTED_VERSIONS,
    ) -> None:
        super().__init__(max_frame_size, max_items=max_items)
        if not versions or not set(versions) <= set(SUPPORTED_VERSIONS):
            raise ValueError(
                f"versions must be some of {list(SUPPORTED_VERSIONS)}, got {list(versions)}"
            )
        self._versions = frozenset(versions)
        """The protocol versions this decoder accepts (a server answers the rest
        ``UNSUPPORTED_VERSION``); without version 2 a compact send is malformed, as it
        is to a node of version 1."""
        self._supported = sorted(versions)
        if PROTOCOL_VERSION not in self._versions:
            self._compact_marker = -1
        self._known_topics = KnownTopics()
        self._compact_topics: dict[bytes, str] = {}
        """The UTF-8 of names in :attr:`_known_topics` that came in compact sends."""

    _compact_marker = SEND_MARKER

    def _compact(self, buf: bytearray, start: int, size: int) -> Request | ProtocolError:
        """A compact send, checked as the CBOR map it stands for.

        The common one (a known topic, no key, queue and timeout in range) is built
        here from the head at once: the request the map's checks would give (a
        hypothesis test holds the two ways to it). Anything else takes the map's way."""
        if size >= _COMPACT_HEAD_SIZE:
            _, flags, acks_code, topic_size, req_id, timeout_ms, queue, key_size = (
                _unpack_compact_head(buf, start)
            )
            body_at = start + _COMPACT_HEAD_SIZE + topic_size
            topic = self._compact_topics.get(bytes(buf[start + _COMPACT_HEAD_SIZE : body_at]))
            if (
                topic is not None
                and flags <= QUEUE_SET
                and acks_code < len(ACKS_CODES)
                and not key_size
                and _TIMEOUT_LOW <= timeout_ms <= _TIMEOUT_HIGH
                and (_QUEUE_LOW <= queue <= _QUEUE_HIGH if flags else not queue)
                and body_at <= start + size
            ):
                self.compact = True
                self.answer_version = COMPACT_ANSWER
                return {
                    "op": "send",
                    "id": req_id,
                    "topic": topic,
                    "body": bytes(buf[body_at : start + size]),
                    "queue": queue if flags else None,
                    "key": None,
                    "tags": None,
                    "props": None,
                    "born_us": None,
                    "acks": ACKS_CODES[acks_code],
                    "timeout_ms": timeout_ms,
                    "producer": None,
                    "sequence": None,
                    "epoch": None,
                }
        raw = decode_send(buf, start, size)
        if isinstance(raw, str):
            self.compact = False
            self.answer_version = PROTOCOL_VERSION
            return self._error(
                Status.MALFORMED_FRAME,
                f"frame body is not a valid compact send: {raw}; see docs/protocol.md for "
                "the layout, or send the request as a CBOR map",
                req_id=compact_send_id(buf, start, size),
            )
        request = self._interpret(raw)
        if isinstance(request, ProtocolError):
            self.compact = False
            self.answer_version = PROTOCOL_VERSION
            return request
        self.compact = True
        self.answer_version = COMPACT_ANSWER
        topic = raw["topic"]
        if topic in self._known_topics:
            self._compact_topics[topic.encode()] = topic  # bounded as the known names are
        return request

    def _interpret(self, obj: Any) -> Request | ProtocolError:
        req_id = obj.get("id") if type(obj) is dict else None
        if type(req_id) is not int or not 0 <= req_id <= MAX_REQUEST_ID:
            return self._bad_envelope(obj, "request")
        version = obj.get("v")
        if type(version) is not int or version not in self._versions:
            return self._bad_version(version, req_id)
        self.answer_version = version
        op = obj.get("op")
        if type(op) is not str:
            return self._error(
                Status.MALFORMED_FRAME,
                f"envelope field 'op' must be a text string naming the operation, got "
                f"{describe(op)}",
                req_id=req_id,
                field="op",
            )
        entry = PLANS.get(op)
        if entry is None:
            return self._error(
                Status.UNKNOWN_OP,
                f"unknown op {clip(op)}; protocol v{version} defines "
                f"{','.join(SCHEMAS)}: upgrade the server or stop sending this op",
                req_id=req_id,
                field="op",
            )
        topic = obj.get("topic")
        known = type(topic) is str and topic in self._known_topics
        if known and op == "send" and (shape := plain_send(obj)) is not None:
            body, queue, key, acks, timeout_ms = shape  # what the plan gives, sooner
            return {
                "op": "send",
                "id": req_id,
                "topic": topic,
                "body": body,
                "queue": queue,
                "key": key,
                "tags": None,
                "props": None,
                "born_us": None,
                "acks": acks,
                "timeout_ms": timeout_ms,
                "producer": None,
                "sequence": None,
                "epoch": None,
            }
        schema, steps = KNOWN_TOPIC_PLANS[op] if known else entry
        out: Any = {"op": op, "id": req_id}
        try:
            apply_steps(steps, obj, out)
            if schema.check is not None:
                schema.check(out)
        except Invalid as exc:
            return self._error(exc.status, exc.sentence(op), req_id=req_id, field=exc.path)
        if not known and "topic" in out:
            self._known_topics.add(out["topic"])
        return out  # a Request: the schema guarantees its keys and their types

    def _bad_version(self, version: Any, req_id: int) -> ProtocolError:
        if type(version) is not int:
            problem = (
                "is missing" if version is None else f"must be an integer, got {describe(version)}"
            )
            return self._error(
                Status.MALFORMED_FRAME,
                f"envelope field 'v' (protocol version) {problem}; send v={self._supported[-1]}",
                req_id=req_id,
                field="v",
            )
        return self._error(
            Status.UNSUPPORTED_VERSION,
            f"protocol version {describe(version)} is not supported; this server speaks "
            f"{self._supported}: resend with one of them or upgrade the server",
            req_id=req_id,
            field="v",
            details={"supported": list(self._supported)},
        )


class ResponseDecoder(_FrameReader[dict[str, Any]]):
    """Client side: turns received bytes into response dicts whose ``status`` is a :class:`Status`.

    Only the envelope (``v``, ``id``, ``status``) is checked; op fields are the
    server's to get right. A response with an unknown status comes back as a
    non-fatal ``ProtocolError`` carrying its id, so the caller fails that request.
    Responses come from the server the client chose, so their item count is not bounded.
    """

    _compact_marker = ANSWER_MARKER

    def _compact(self, buf: bytearray, start: int, size: int) -> dict[str, Any] | ProtocolError:
        answer = decode_send_answer(buf, start, size)
        if type(answer) is str:
            self.compact = False
            return self._error(
                Status.MALFORMED_FRAME, f"frame body is not a valid compact send answer: {answer}"
            )
        self.compact = True
        return answer  # type: ignore[return-value]

    def _interpret(self, obj: Any) -> dict[str, Any] | ProtocolError:
        req_id = obj.get("id") if type(obj) is dict else None
        if type(req_id) is not int or not 0 <= req_id <= MAX_REQUEST_ID:
            return self._bad_envelope(obj, "response")
        if type(obj.get("v")) is not int:
            return self._error(
                Status.MALFORMED_FRAME,
                f"response envelope field 'v' must be an integer, got {describe(obj.get('v'))}",
                req_id=req_id,
                field="v",
            )
        raw = obj.get("status")
        status = STATUS_BY_VALUE.get(raw) if type(raw) is str else None
        if status is None:
            return self._error(
                Status.MALFORMED_FRAME,
                f"response field 'status' must be a known status, got {describe(raw)}; "
                "the server may be newer than this client: treat the request as failed",
                req_id=req_id,
                field="status",
            )
        obj["status"] = status
        return obj


def encode_frame(obj: Mapping[str, Any], *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Length prefix + CBOR body, ready to send.

    Values must be plain CBOR types. Note that cbor2 encodes a ``memoryview`` as
    an array of integers: turn views into ``bytes`` first (:func:`pulled_message`
    does this for bodies read from the log).
    """
    try:
        body = cbor2.dumps(obj)
    except cbor2.CBOREncodeError:
        key = spliced_value(obj)  # a records answer: joined here (the writer sends it in place)
        if key is None:
            raise
        return encode_spliced_frame(obj, key, max_frame_size=max_frame_size).joined()
    if len(body) > max_frame_size:
        req_id = obj.get("id")
        raise ProtocolError(
            Status.FRAME_TOO_LARGE,
            f"encoded frame body is {len(body)} bytes, above the limit of {max_frame_size}; "
            "send fewer or smaller messages per frame",
            req_id=req_id if type(req_id) is int else 0,
        )
    return HEADER.pack(len(body)) + body
