"""tidelog's wire protocol, sans-IO: framing, request validation, statuses and response builders.

A frame is a big-endian ``u32`` body length followed by that many bytes holding
exactly one CBOR map. Nothing here touches a socket: the server and the client
feed whatever bytes they received into a decoder and write whatever
:func:`encode_frame` returns, so every rule of the protocol can be tested
without trio. docs/protocol.md describes every byte; keep the two in step.

Decoded requests are plain dicts, normalised by a declarative schema per op
(every field present, defaults filled in) and typed with ``TypedDict``. Frozen
``attrs`` classes were measured and rejected for the hot path: building them
doubled the validation cost of a 100-message ``send_batch`` (45 -> 91 us) and
added a quarter to a whole ``pull`` frame (2.5 -> 3.1 us).
"""

from __future__ import annotations

import abc
import enum
import io
import logging
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType, NoneType
from typing import Any, Final, Generic, Literal, TypeAlias, TypedDict, TypeVar, cast

import attrs
import cbor2
from crc32c import crc32c

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_MAX_MESSAGES",
    "DEFAULT_TIMEOUT_MS",
    "DEFAULT_WAIT_MS",
    "HEADER",
    "MAX_BATCH_MESSAGES",
    "MAX_FRAME_SIZE_LIMIT",
    "MAX_OFFSET",
    "MAX_PULL_BYTES",
    "MAX_PULL_MESSAGES",
    "MAX_QUEUES",
    "MAX_REQUEST_ID",
    "MAX_TIMEOUT_MS",
    "MAX_TOPIC_LENGTH",
    "MAX_WAIT_MS",
    "MIN_MAX_FRAME_SIZE",
    "PROTOCOL_VERSION",
    "SCHEMAS",
    "SUPPORTED_VERSIONS",
    "Acks",
    "BatchMessage",
    "CreateTopicRequest",
    "DescribeTopicRequest",
    "Field",
    "FrameDecoder",
    "GetOffsetsRequest",
    "ListTopicsRequest",
    "OpSchema",
    "PromoteRequest",
    "ProtocolError",
    "PullRequest",
    "ReadRequest",
    "RepointRequest",
    "Request",
    "ResponseDecoder",
    "SendBatchRequest",
    "SendRequest",
    "Status",
    "StatusRequest",
    "describe",
    "encode_frame",
    "encode_request",
    "error_response",
    "is_valid_topic_name",
    "make_request",
    "make_response",
    "not_master_response",
    "pull_response",
    "pulled_message",
    "queue_for_key",
    "read_response",
    "send_batch_response",
    "send_response",
    "send_result",
]

# ---- limits ----------------------------------------------------------------------------

PROTOCOL_VERSION: Final = 1
"""The version this module speaks; every frame carries it as ``v``."""
SUPPORTED_VERSIONS: Final = (PROTOCOL_VERSION,)
"""Versions a server accepts; an ``UNSUPPORTED_VERSION`` answer lists them."""

HEADER: Final = struct.Struct(">I")
"""The length prefix: body size in bytes, big-endian, not counting the prefix itself."""
DEFAULT_MAX_FRAME_SIZE: Final = 16 * 1024 * 1024
MIN_MAX_FRAME_SIZE: Final = 1024
MAX_FRAME_SIZE_LIMIT: Final = 0xFFFF_FFFF
MAX_REQUEST_ID: Final = 2**64 - 1
MAX_OFFSET: Final = 2**63 - 1
MAX_QUEUES: Final = 1024
"""Queues per topic; queue ids run from 0 to ``MAX_QUEUES - 1``."""
MAX_TOPIC_LENGTH: Final = 127
MAX_BATCH_MESSAGES: Final = 4096
MAX_PULL_MESSAGES: Final = 1024
MAX_PULL_BYTES: Final = 8 * 1024 * 1024
"""Half the default frame limit: a full answer fits even with one message over ``max_bytes``."""
MAX_TIMEOUT_MS: Final = 600_000
MAX_WAIT_MS: Final = 60_000

DEFAULT_TIMEOUT_MS: Final = 5000
DEFAULT_MAX_MESSAGES: Final = 32
DEFAULT_MAX_BYTES: Final = 1024 * 1024
DEFAULT_WAIT_MS: Final = 0

_TOPIC_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,126}")
"""Starts with a letter or digit so that ``.``, ``..`` and ``-x`` never become directory names."""

_COMPACT_MIN: Final = 64 * 1024
"""Consumed bytes a decoder keeps before it considers moving the live tail to the front."""


# ---- statuses ----------------------------------------------------------------------------


class Status(enum.StrEnum):
    """Every ``status`` a response can carry; the table in docs/protocol.md says what to do."""

    OK = "OK"
    FLUSH_DISK_TIMEOUT = "FLUSH_DISK_TIMEOUT"
    FLUSH_SLAVE_TIMEOUT = "FLUSH_SLAVE_TIMEOUT"
    SLAVE_NOT_AVAILABLE = "SLAVE_NOT_AVAILABLE"
    NOT_MASTER = "NOT_MASTER"
    BAD_REQUEST = "BAD_REQUEST"
    UNKNOWN_OP = "UNKNOWN_OP"
    FRAME_TOO_LARGE = "FRAME_TOO_LARGE"
    MALFORMED_FRAME = "MALFORMED_FRAME"
    UNSUPPORTED_VERSION = "UNSUPPORTED_VERSION"
    UNKNOWN_TOPIC = "UNKNOWN_TOPIC"
    TOPIC_EXISTS = "TOPIC_EXISTS"
    INVALID_TOPIC = "INVALID_TOPIC"
    MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"
    OFFSET_OUT_OF_RANGE = "OFFSET_OUT_OF_RANGE"
    DISK_FULL = "DISK_FULL"
    STORAGE_FAILED = "STORAGE_FAILED"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    TOO_MANY_CONNECTIONS = "TOO_MANY_CONNECTIONS"
    INTERNAL_ERROR = "INTERNAL_ERROR"

    @property
    def retryable(self) -> bool:
        """Nothing was applied: the same request may be sent again (after a pause, or to the hinted master)."""
        return self in _RETRYABLE

    @property
    def outcome_unknown(self) -> bool:
        """A write may or may not have taken effect; resending it can store a duplicate."""
        return self in _OUTCOME_UNKNOWN

    @property
    def has_result(self) -> bool:
        """The response carries the op's result fields (a flush timeout still reports the offsets)."""
        return self in _HAS_RESULT

    @property
    def closes_connection(self) -> bool:
        """The server closes the connection right after this answer."""
        return self in _CLOSES_CONNECTION


_RETRYABLE: Final = frozenset(
    {
        Status.NOT_MASTER,
        Status.SLAVE_NOT_AVAILABLE,
        Status.SHUTTING_DOWN,
        Status.TOO_MANY_CONNECTIONS,
    }
)
_CLOSES_CONNECTION: Final = frozenset({Status.FRAME_TOO_LARGE, Status.TOO_MANY_CONNECTIONS})
_OUTCOME_UNKNOWN: Final = frozenset(
    {
        Status.FLUSH_DISK_TIMEOUT,
        Status.FLUSH_SLAVE_TIMEOUT,
        Status.STORAGE_FAILED,
        Status.INTERNAL_ERROR,
    }
)
_HAS_RESULT: Final = frozenset({Status.OK, Status.FLUSH_DISK_TIMEOUT, Status.FLUSH_SLAVE_TIMEOUT})
_STATUS_BY_VALUE: Final[dict[str, Status]] = {s.value: s for s in Status}


class Acks(enum.StrEnum):
    """How much durability a write waits for before the server answers."""

    LEADER = "leader"
    """Appended to the master's log (page cache); lost if the master's machine crashes."""
    DURABLE = "durable"
    """Fsynced on the master (group commit); otherwise ``FLUSH_DISK_TIMEOUT``."""
    REPLICATED = "replicated"
    """Fsynced on the master and acknowledged by an in-sync slave; otherwise ``FLUSH_SLAVE_TIMEOUT``."""


_ACKS_BY_VALUE: Final[dict[str, Acks]] = {a.value: a for a in Acks}


class ProtocolError(Exception):
    """A frame the peer sent cannot be served as it is.

    ``fatal`` means the byte stream can no longer be parsed (only an oversized
    length prefix does that): send :meth:`response` and close the connection.
    A non-fatal error concerns one frame whose boundary is known: answer it and
    keep reading. ``req_id`` is 0 when the frame's id could not be read.
    """

    def __init__(
        self,
        status: Status,
        message: str,
        *,
        req_id: int = 0,
        fatal: bool = False,
        field: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.req_id = req_id
        self.fatal = fatal
        self.field = field
        """The envelope or op field at fault (e.g. ``"messages[3].body"``), if one is."""
        self.details: dict[str, Any] = dict(details) if details else {}
        """Extra response fields, e.g. ``supported`` for ``UNSUPPORTED_VERSION``."""

    def response(self) -> dict[str, Any]:
        """The error response to send back for this frame."""
        return error_response(self.req_id, self.status, self.message, **self.details)

    def __repr__(self) -> str:
        return (
            f"ProtocolError({self.status.value}, {self.message!r}, req_id={self.req_id}, "
            f"fatal={self.fatal}, field={self.field!r})"
        )


# ---- describing values in error messages -------------------------------------------------

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


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _clip(text: str, limit: int = 40) -> str:
    """A repr of at most ``limit`` characters of ``text``: errors must stay short and printable."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def describe(value: object) -> str:
    """A short description of a received value for error messages; never huge, never raises."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean true" if value else "boolean false"
    if isinstance(value, int):
        return f"integer {value}" if value.bit_length() <= 128 else "a huge integer"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        return f"text string {_clip(value)}"
    if isinstance(value, bytes):
        return f"byte string of {_plural(len(value), 'byte')}"
    if isinstance(value, list):
        return f"array of {_plural(len(value), 'item')}"
    if isinstance(value, dict):
        return f"map of {_plural(len(value), 'entry')}"
    return type(value).__name__


def _expected(types: tuple[type, ...]) -> str:
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


# ---- schema ------------------------------------------------------------------------------


class _Invalid(Exception):
    """A field failed validation; ``path`` grows as the error leaves nested values."""

    def __init__(self, path: str, problem: str, status: Status = Status.BAD_REQUEST) -> None:
        super().__init__(problem)
        self.path = path
        self.problem = problem
        self.status = status

    def under(self, prefix: str) -> _Invalid:
        if not self.path:
            self.path = prefix
        elif self.path.startswith("["):
            self.path = prefix + self.path
        else:
            self.path = f"{prefix}.{self.path}"
        return self


@attrs.frozen
class Field:
    """One request field: wire type(s), whether it is required, its default and extra checks.

    An absent field and an explicit CBOR null mean the same thing. ``low`` and
    ``high`` bound integers; ``check`` validates (and may convert) the value and
    raises ``_Invalid``.
    """

    types: tuple[type, ...]
    required: bool = False
    default: Any = None
    low: int | None = None
    high: int | None = None
    check: Callable[[Any], Any] | None = None
    doc: str = ""


@attrs.frozen
class OpSchema:
    """An op's fields, a cross-field check run after them, and whether it writes.

    Writes are what a slave refuses with ``NOT_MASTER``; reads may be served anywhere.
    """

    op: str
    fields: Mapping[str, Field] = attrs.field(converter=MappingProxyType)
    writes: bool = False
    check: Callable[[dict[str, Any]], None] | None = None
    doc: str = ""


_Step: TypeAlias = tuple[
    str, frozenset[type], bool, Any, int | None, int, Callable[[Any], Any] | None, str
]


def _plan(fields: Mapping[str, Field]) -> tuple[_Step, ...]:
    """Flatten a schema into tuples: the validation loop unpacks them instead of reading attributes."""
    return tuple(
        (
            name,
            frozenset(f.types),
            f.required,
            f.default,
            f.low,
            f.high if f.high is not None else MAX_OFFSET,
            f.check,
            _expected(f.types),
        )
        for name, f in fields.items()
    )


def _apply(plan: tuple[_Step, ...], raw: Mapping[Any, Any], out: dict[str, Any]) -> None:
    """Copy the schema's fields from ``raw`` into ``out``, validated; unknown keys are ignored."""
    for name, types, required, default, low, high, check, expected in plan:
        value = raw.get(name)
        if value is None:
            if required:
                raise _Invalid(name, f"is required ({expected}) but missing or null")
            value = default
        else:
            if type(value) not in types:
                raise _Invalid(name, f"must be {expected}, got {describe(value)}")
            if low is not None and not low <= value <= high:
                raise _Invalid(name, f"must be between {low} and {high}, got {value}")
            if check is not None:
                try:
                    value = check(value)
                except _Invalid as exc:
                    raise exc.under(name) from None
        out[name] = value


_known_topics: set[str] = set()
_KNOWN_TOPICS_MAX: Final = 4096


def is_valid_topic_name(name: str) -> bool:
    """1 to 127 of ``A-Z a-z 0-9 . _ -``, starting with a letter or a digit."""
    return type(name) is str and _TOPIC_NAME.fullmatch(name) is not None


def _check_topic(name: str) -> str:
    # Remembering valid names keeps the regex off the hot path; the set is bounded.
    if name in _known_topics:
        return name
    if _TOPIC_NAME.fullmatch(name) is None:
        raise _Invalid(
            "",
            f"must be 1 to {MAX_TOPIC_LENGTH} characters from A-Z a-z 0-9 . _ - starting "
            f"with a letter or digit, got {describe(name)}",
            Status.INVALID_TOPIC,
        )
    if len(_known_topics) < _KNOWN_TOPICS_MAX:
        _known_topics.add(name)
    return name


def _check_acks(value: str) -> Acks:
    acks = _ACKS_BY_VALUE.get(value)
    if acks is None:
        choices = ", ".join(repr(a.value) for a in Acks)
        raise _Invalid("", f"must be one of {choices}, got {describe(value)}")
    return acks


def _check_props(props: dict[Any, Any]) -> dict[str, str]:
    for key, value in props.items():
        if type(key) is not str or not key:
            raise _Invalid(
                "", f"keys must be non-empty text strings, got a key that is {describe(key)}"
            )
        if type(value) is not str:
            raise _Invalid(f"[{_clip(key)}]", f"must be a text string, got {describe(value)}")
    return props


def _check_route(fields: dict[str, Any]) -> None:
    if fields["queue"] is not None and fields["key"] is not None:
        raise _Invalid(
            "queue", "cannot be combined with 'key': send an explicit queue or a key to hash"
        )


def _check_host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) <= 65535):
        raise _Invalid("", f"must be host:port with a port in 1..65535, got {describe(value)}")
    return value


def _int_field(default: Any, low: int, high: int, doc: str, *, required: bool = False) -> Field:
    return Field((int,), required=required, default=default, low=low, high=high, doc=doc)


_TOPIC: Final = Field((str,), required=True, check=_check_topic, doc="topic name")
_ACKS: Final = Field(
    (str,), default=Acks.DURABLE, check=_check_acks, doc="leader | durable | replicated"
)
_TIMEOUT: Final = _int_field(
    DEFAULT_TIMEOUT_MS, 1, MAX_TIMEOUT_MS, "how long to wait for the requested acks"
)

_MESSAGE_FIELDS: Final[Mapping[str, Field]] = MappingProxyType(
    {
        "body": Field((bytes,), required=True, doc="message payload"),
        "queue": _int_field(None, 0, MAX_QUEUES - 1, "explicit queue id"),
        "key": Field((bytes, str), doc="hashed to pick the queue (see queue_for_key)"),
        "tags": Field((str,), doc="tag string consumers filter on"),
        "props": Field((dict,), check=_check_props, doc="user properties, text to text"),
        "born_us": _int_field(
            None, 0, MAX_OFFSET, "producer timestamp, us since the epoch (default: receive time)"
        ),
    }
)
_MESSAGE_PLAN: Final = _plan(_MESSAGE_FIELDS)


def _check_messages(messages: list[Any]) -> list[BatchMessage]:
    if not 1 <= len(messages) <= MAX_BATCH_MESSAGES:
        raise _Invalid(
            "",
            f"must hold 1 to {MAX_BATCH_MESSAGES} messages, got {len(messages)}; "
            "split larger batches",
        )
    out: list[Any] = []
    append = out.append
    for index, raw in enumerate(messages):
        if type(raw) is not dict:
            raise _Invalid(f"[{index}]", f"must be a map, got {describe(raw)}")
        message: dict[str, Any] = {}
        try:
            _apply(_MESSAGE_PLAN, raw, message)
            _check_route(message)
        except _Invalid as exc:
            raise exc.under(f"[{index}]") from None
        append(message)
    return out


SCHEMAS: Final[Mapping[str, OpSchema]] = MappingProxyType(
    {
        schema.op: schema
        for schema in (
            OpSchema(
                "send",
                {"topic": _TOPIC, **_MESSAGE_FIELDS, "acks": _ACKS, "timeout_ms": _TIMEOUT},
                writes=True,
                check=_check_route,
                doc="append one message",
            ),
            OpSchema(
                "send_batch",
                {
                    "topic": _TOPIC,
                    "messages": Field(
                        (list,), required=True, check=_check_messages, doc="array of message maps"
                    ),
                    "acks": _ACKS,
                    "timeout_ms": _TIMEOUT,
                },
                writes=True,
                doc="append many messages to one topic, all or nothing",
            ),
            OpSchema(
                "pull",
                {
                    "topic": _TOPIC,
                    "queue": _int_field(None, 0, MAX_QUEUES - 1, "queue id", required=True),
                    "offset": _int_field(None, 0, MAX_OFFSET, "first queue offset", required=True),
                    "max_messages": _int_field(
                        DEFAULT_MAX_MESSAGES, 1, MAX_PULL_MESSAGES, "most messages to return"
                    ),
                    "max_bytes": _int_field(
                        DEFAULT_MAX_BYTES, 1, MAX_PULL_BYTES, "soft limit on body bytes"
                    ),
                    "wait_ms": _int_field(
                        DEFAULT_WAIT_MS, 0, MAX_WAIT_MS, "long-poll: wait this long for data"
                    ),
                },
                doc="read messages of one queue from a queue offset",
            ),
            OpSchema(
                "get_offsets",
                {
                    "topic": _TOPIC,
                    "queue": _int_field(None, 0, MAX_QUEUES - 1, "one queue (default: all)"),
                },
                doc="min and max queue offsets",
            ),
            OpSchema(
                "read",
                {"offset": _int_field(None, 0, MAX_OFFSET, "physical offset", required=True)},
                doc="one record by physical offset",
            ),
            OpSchema(
                "create_topic",
                {
                    "topic": _TOPIC,
                    "queues": _int_field(None, 1, MAX_QUEUES, "number of queues", required=True),
                },
                writes=True,
                doc="create a topic",
            ),
            OpSchema("list_topics", {}, doc="every topic with its queue count"),
            OpSchema("describe_topic", {"topic": _TOPIC}, doc="one topic with its offsets"),
            OpSchema("status", {}, doc="role, offsets, flush and replication state"),
            OpSchema(
                "promote",
                {
                    "ha_port": _int_field(
                        0, 0, 65535, "HA port the new master listens on (0: any free port)"
                    )
                },
                doc="admin: turn this slave into a master, with a new epoch",
            ),
            OpSchema(
                "repoint",
                {
                    "master_ha": Field(
                        (str,), required=True, check=_check_host_port, doc="new master's HA port"
                    ),
                    "master_client": Field(
                        (str,), check=_check_host_port, doc="new master's client address"
                    ),
                },
                doc="admin: make this slave follow another master",
            ),
        )
    }
)
"""Every op this protocol version defines. Ops named ``repl_*`` are reserved for replication."""

_PLANS: Final[dict[str, tuple[OpSchema, tuple[_Step, ...]]]] = {
    op: (schema, _plan(schema.fields)) for op, schema in SCHEMAS.items()
}
"""A plain dict: looking up a mappingproxy costs a wrapper call on every frame."""


# ---- decoded requests --------------------------------------------------------------------


class BatchMessage(TypedDict):
    body: bytes
    queue: int | None
    key: bytes | str | None
    tags: str | None
    props: dict[str, str] | None
    born_us: int | None


class SendRequest(TypedDict):
    op: Literal["send"]
    id: int
    topic: str
    body: bytes
    queue: int | None
    key: bytes | str | None
    tags: str | None
    props: dict[str, str] | None
    born_us: int | None
    acks: Acks
    timeout_ms: int


class SendBatchRequest(TypedDict):
    op: Literal["send_batch"]
    id: int
    topic: str
    messages: list[BatchMessage]
    acks: Acks
    timeout_ms: int


class PullRequest(TypedDict):
    op: Literal["pull"]
    id: int
    topic: str
    queue: int
    offset: int
    max_messages: int
    max_bytes: int
    wait_ms: int


class GetOffsetsRequest(TypedDict):
    op: Literal["get_offsets"]
    id: int
    topic: str
    queue: int | None


class ReadRequest(TypedDict):
    op: Literal["read"]
    id: int
    offset: int


class CreateTopicRequest(TypedDict):
    op: Literal["create_topic"]
    id: int
    topic: str
    queues: int


class ListTopicsRequest(TypedDict):
    op: Literal["list_topics"]
    id: int


class DescribeTopicRequest(TypedDict):
    op: Literal["describe_topic"]
    id: int
    topic: str


class StatusRequest(TypedDict):
    op: Literal["status"]
    id: int


class PromoteRequest(TypedDict):
    op: Literal["promote"]
    id: int
    ha_port: int


class RepointRequest(TypedDict):
    op: Literal["repoint"]
    id: int
    master_ha: str
    master_client: str | None


Request: TypeAlias = (
    SendRequest
    | SendBatchRequest
    | PullRequest
    | GetOffsetsRequest
    | ReadRequest
    | CreateTopicRequest
    | ListTopicsRequest
    | DescribeTopicRequest
    | StatusRequest
    | PromoteRequest
    | RepointRequest
)
"""A validated request: ``op``, ``id`` and every field of the op's schema."""


# ---- framing -------------------------------------------------------------------------------


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
_MAX_DEPTH: Final = 16
"""Requests nest four deep (envelope, messages, message, props); the rest is headroom."""


def _new_cbor_decoder() -> cbor2.CBORDecoder:
    return cbor2.CBORDecoder(
        io.BytesIO(),
        tag_hook=_reject_tag,
        semantic_decoders=_NO_TAGS,
        max_depth=_MAX_DEPTH,
        allow_duplicate_keys=False,
    )


def _malformed_message(exc: Exception) -> str:
    if isinstance(exc, cbor2.CBORDecodeEOF):
        return (
            "frame body ends inside a CBOR item; the length prefix must cover the whole "
            "CBOR map (is it computed over the encoded body?)"
        )
    detail = f"{exc}: {exc.__cause__}" if exc.__cause__ is not None else str(exc)
    if len(detail) > 200:  # cbor2 may quote the offending value, e.g. a huge duplicate key
        detail = detail[:200] + "..."
    return (
        f"frame body is not valid CBOR for this protocol ({detail}); "
        "encode the body as one untagged CBOR map without duplicate keys"
    )


_T = TypeVar("_T")
_unpack_header: Final = HEADER.unpack_from


class _FrameReader(Generic[_T], abc.ABC):
    """Buffering and framing shared by the request and the response decoders.

    Received bytes accumulate in a ``bytearray`` read from an offset; consumed
    bytes are dropped when the buffer empties, or when they outweigh the live
    tail, so feeding stays linear in the bytes fed. Each body is decoded from
    its own ``BytesIO``, which bounds a malformed item to its frame (a shared
    buffer let a bogus length claim read every frame behind it, per frame) and
    lets ``tell()`` prove that the body held exactly one CBOR item.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if not MIN_MAX_FRAME_SIZE <= max_frame_size <= MAX_FRAME_SIZE_LIMIT:
            raise ValueError(
                f"max_frame_size must be between {MIN_MAX_FRAME_SIZE} and "
                f"{MAX_FRAME_SIZE_LIMIT}, got {max_frame_size}"
            )
        self._max = max_frame_size
        self._buf = bytearray()
        self._pos = 0
        self._cbor = _new_cbor_decoder()
        self._fatal: ProtocolError | None = None

    @property
    def max_frame_size(self) -> int:
        return self._max

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned as frames (for back-pressure)."""
        return len(self._buf) - self._pos

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
            return self._error(
                Status.MALFORMED_FRAME,
                "frame body is empty; a frame must hold one CBOR map after its length prefix",
            )
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
                f"frame body has {_plural(size - used, 'byte')} after its CBOR map; "
                "the length prefix must cover exactly one CBOR map",
            )
        return self._interpret(obj)

    def __iter__(self) -> Iterator[_T | ProtocolError]:
        """Yield every complete frame buffered so far; fatal errors propagate."""
        while (item := self.next_frame()) is not None:
            yield item

    @abc.abstractmethod
    def _interpret(self, obj: Any) -> _T | ProtocolError:
        """Turn one decoded CBOR item into a request (server) or response (client)."""

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
    """

    def _interpret(self, obj: Any) -> Request | ProtocolError:
        req_id = obj.get("id") if type(obj) is dict else None
        if type(req_id) is not int or not 0 <= req_id <= MAX_REQUEST_ID:
            return self._bad_envelope(obj, "request")
        version = obj.get("v")
        if type(version) is not int or version != PROTOCOL_VERSION:
            return self._bad_version(version, req_id)
        op = obj.get("op")
        if type(op) is not str:
            return self._error(
                Status.MALFORMED_FRAME,
                f"envelope field 'op' must be a text string naming the operation, got "
                f"{describe(op)}",
                req_id=req_id,
                field="op",
            )
        entry = _PLANS.get(op)
        if entry is None:
            return self._error(
                Status.UNKNOWN_OP,
                f"unknown op {_clip(op)}; protocol v{PROTOCOL_VERSION} defines "
                f"{', '.join(SCHEMAS)}: upgrade the server or stop sending this op",
                req_id=req_id,
                field="op",
            )
        schema, plan = entry
        out: Any = {"op": op, "id": req_id}
        try:
            _apply(plan, obj, out)
            if schema.check is not None:
                schema.check(out)
        except _Invalid as exc:
            return self._error(
                exc.status,
                f"op {op!r}: field {exc.path!r} {exc.problem}",
                req_id=req_id,
                field=exc.path,
            )
        return out  # a Request: the schema guarantees its keys and their types

    def _bad_version(self, version: Any, req_id: int) -> ProtocolError:
        if type(version) is not int:
            problem = (
                "is missing" if version is None else f"must be an integer, got {describe(version)}"
            )
            return self._error(
                Status.MALFORMED_FRAME,
                f"envelope field 'v' (protocol version) {problem}; send v={PROTOCOL_VERSION}",
                req_id=req_id,
                field="v",
            )
        return self._error(
            Status.UNSUPPORTED_VERSION,
            f"protocol version {describe(version)} is not supported; this server speaks "
            f"{list(SUPPORTED_VERSIONS)}: resend with one of them or upgrade the server",
            req_id=req_id,
            field="v",
            details={"supported": list(SUPPORTED_VERSIONS)},
        )


class ResponseDecoder(_FrameReader[dict[str, Any]]):
    """Client side: turns received bytes into response dicts whose ``status`` is a :class:`Status`.

    Only the envelope (``v``, ``id``, ``status``) is checked; op fields are the
    server's to get right. A response with an unknown status comes back as a
    non-fatal ``ProtocolError`` carrying its id, so the caller fails that request.
    """

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
        status = _STATUS_BY_VALUE.get(raw) if type(raw) is str else None
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
    body = cbor2.dumps(obj)
    if len(body) > max_frame_size:
        req_id = obj.get("id")
        raise ProtocolError(
            Status.FRAME_TOO_LARGE,
            f"encoded frame body is {len(body)} bytes, above the limit of {max_frame_size}; "
            "send fewer or smaller messages per frame",
            req_id=req_id if type(req_id) is int else 0,
        )
    return HEADER.pack(len(body)) + body


# ---- building requests -------------------------------------------------------------------


def make_request(op: str, req_id: int, /, **fields: Any) -> dict[str, Any]:
    """A request envelope for ``op``, checked against the schema the server applies.

    Raises a non-fatal ``ProtocolError`` (``UNKNOWN_OP``, ``BAD_REQUEST``,
    ``INVALID_TOPIC``) so client bugs surface before a round trip. Fields left
    as None are not sent; the server fills in defaults.
    """
    if type(req_id) is not int or not 0 <= req_id <= MAX_REQUEST_ID:
        raise ValueError(f"request id must be an integer in 0..2**64-1, got {describe(req_id)}")
    entry = _PLANS.get(op)
    if entry is None:
        raise ProtocolError(Status.UNKNOWN_OP, f"unknown op {_clip(op)}", req_id=req_id, field="op")
    schema, plan = entry
    extra = fields.keys() - schema.fields.keys()
    if extra:
        raise ProtocolError(
            Status.BAD_REQUEST,
            f"op {op!r} has no field(s) {', '.join(sorted(extra))}",
            req_id=req_id,
            field=min(extra),
        )
    try:
        checked: dict[str, Any] = {}
        _apply(plan, fields, checked)
        if schema.check is not None:
            schema.check(checked)
    except _Invalid as exc:
        raise ProtocolError(
            exc.status,
            f"op {op!r}: field {exc.path!r} {exc.problem}",
            req_id=req_id,
            field=exc.path,
        ) from None
    request: dict[str, Any] = {"v": PROTOCOL_VERSION, "op": op, "id": req_id}
    for name, value in fields.items():
        if value is not None:
            request[name] = value
    return request


def encode_request(op: str, req_id: int, /, **fields: Any) -> bytes:
    """``encode_frame(make_request(...))``."""
    return encode_frame(make_request(op, req_id, **fields))


def queue_for_key(key: bytes | str, queues: int) -> int:
    """The queue a keyed message goes to: CRC32C of the key (UTF-8 if text) modulo the queue count.

    Part of the protocol so that clients can predict placement and per-key
    order survives server upgrades; changing it would reshuffle every key.
    """
    if not 1 <= queues <= MAX_QUEUES:
        raise ValueError(f"queues must be between 1 and {MAX_QUEUES}, got {queues}")
    data = key.encode() if type(key) is str else cast(bytes, key)
    return crc32c(data) % queues


# ---- building responses ------------------------------------------------------------------


def make_response(
    req_id: int, status: Status = Status.OK, *, error: str | None = None, **fields: Any
) -> dict[str, Any]:
    """A response envelope; every status but OK needs an ``error`` sentence."""
    response: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": req_id, "status": status}
    if status is not Status.OK:
        if not error:
            raise ValueError(f"a {status} response needs an error sentence")
        response["error"] = error
    response.update(fields)
    return response


def error_response(req_id: int, status: Status, error: str, **details: Any) -> dict[str, Any]:
    """An error answer: ``status``, ``error`` and any status-specific ``details``."""
    if status is Status.OK:
        raise ValueError("an error response cannot have status OK")
    return make_response(req_id, status, error=error, **details)


def not_master_response(req_id: int, master: str | None) -> dict[str, Any]:
    """``NOT_MASTER`` with the master hint ("host:port", or None while none is known)."""
    if master is None:
        error = "this node is not the master and knows no master yet; retry after a pause"
    else:
        error = f"this node is not the master; resend to {master}"
    return error_response(req_id, Status.NOT_MASTER, error, master=master)


def send_result(queue: int, queue_offset: int, offset: int, store_us: int) -> dict[str, int]:
    """Where one message was stored: one entry of ``send_batch``'s ``results``."""
    return {"queue": queue, "queue_offset": queue_offset, "offset": offset, "store_us": store_us}


def send_response(
    req_id: int,
    topic: str,
    queue: int,
    queue_offset: int,
    offset: int,
    store_us: int,
    *,
    status: Status = Status.OK,
    error: str | None = None,
) -> dict[str, Any]:
    """Answer to ``send``; a flush or slave timeout still reports where the message went."""
    return make_response(
        req_id,
        status,
        error=error,
        topic=topic,
        **send_result(queue, queue_offset, offset, store_us),
    )


def send_batch_response(
    req_id: int,
    topic: str,
    queues: list[int],
    queue_offsets: list[int],
    offsets: list[int],
    store_us: int,
    *,
    status: Status = Status.OK,
    error: str | None = None,
) -> dict[str, Any]:
    """Answer to ``send_batch``: parallel arrays, entry ``i`` for ``messages[i]``.

    Arrays, not a map per message: for 64 messages cbor2 encodes this in 23 us
    against 72 us, decodes it in 7 us against 34 us, in 787 bytes against 3,624.
    """
    return make_response(
        req_id,
        status,
        error=error,
        topic=topic,
        store_us=store_us,
        queues=queues,
        queue_offsets=queue_offsets,
        offsets=offsets,
    )


def batch_results(response: Mapping[str, Any]) -> list[dict[str, int]]:
    """Per-message view of a ``send_batch`` answer: entry ``i`` is ``messages[i]``'s
    {queue, queue_offset, offset, store_us}, like a ``send`` result."""
    store_us = response["store_us"]
    return [
        {"queue": queue, "queue_offset": queue_offset, "offset": offset, "store_us": store_us}
        for queue, queue_offset, offset in zip(
            response["queues"], response["queue_offsets"], response["offsets"], strict=True
        )
    ]


def pulled_message(
    queue_offset: int,
    offset: int,
    body: bytes | bytearray | memoryview,
    born_us: int,
    store_us: int,
    *,
    tags: str | None = None,
    props: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """One message of a ``pull`` answer (or a ``read`` record); copies a view body into bytes."""
    message: dict[str, Any] = {
        "queue_offset": queue_offset,
        "offset": offset,
        "body": body if type(body) is bytes else bytes(body),
        "born_us": born_us,
        "store_us": store_us,
    }
    if tags is not None:
        message["tags"] = tags
    if props:
        message["props"] = dict(props)
    return message


def pull_response(
    req_id: int,
    messages: list[dict[str, Any]],
    next_offset: int,
    min_offset: int,
    max_offset: int,
) -> dict[str, Any]:
    """Answer to ``pull``; ``max_offset`` is one past the queue's last message."""
    return make_response(
        req_id,
        messages=messages,
        next_offset=next_offset,
        min_offset=min_offset,
        max_offset=max_offset,
    )


def read_response(req_id: int, topic: str, queue: int, record: dict[str, Any]) -> dict[str, Any]:
    """Answer to ``read``: the record (a :func:`pulled_message`) with its topic and queue."""
    return make_response(req_id, topic=topic, queue=queue, record=record)
