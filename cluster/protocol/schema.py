"""The request validation engine and the schema table: one declarative schema per op."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final, TypeAlias

import attrs

from cluster.protocol.address import parse_address
from cluster.protocol.limits import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_MESSAGES,
    DEFAULT_TIMEOUT_MS,
    DEFAULT_WAIT_MS,
    MAX_BATCH_MESSAGES,
    MAX_OFFSET,
    MAX_PRODUCER_EPOCH,
    MAX_PRODUCER_ID,
    MAX_PULL_BYTES,
    MAX_PULL_MESSAGES,
    MAX_QUEUES,
    MAX_TIMEOUT_MS,
    MAX_WAIT_MS,
)
from cluster.protocol.messages import BatchMessage
from cluster.protocol.records import FORMATS, MESSAGES_FORMAT
from cluster.protocol.statuses import ACKS_BY_VALUE, Acks, Status
from cluster.protocol.wording import clip, describe, expected
from storage.names import TOPIC_RULE, is_valid_topic_name

__all__ = [
    "KNOWN_TOPIC_PLANS",
    "PLANS",
    "SCHEMAS",
    "Field",
    "Invalid",
    "KnownTopics",
    "OpSchema",
    "Plan",
    "apply_steps",
    "validate",
]


class Invalid(Exception):
    """A field failed validation; ``path`` grows as the error leaves nested values."""

    def __init__(self, path: str, problem: str, status: Status = Status.BAD_REQUEST) -> None:
        super().__init__(problem)
        self.path = path
        self.problem = problem
        self.status = status

    def under(self, prefix: str) -> Invalid:
        """Prefix the path with the field that holds the failing value."""
        if not self.path:
            self.path = prefix
        elif self.path.startswith("["):
            self.path = prefix + self.path
        else:
            self.path = f"{prefix}.{self.path}"
        return self

    def sentence(self, op: str) -> str:
        """The error sentence a client sees for this op."""
        return f"op {op!r}: field {self.path!r} {self.problem}"


@attrs.frozen
class Field:
    """One request field: wire type(s), whether it is required, its default and extra checks.

    An absent field and an explicit CBOR null mean the same thing. ``low`` and
    ``high`` bound integers; ``check`` validates (and may convert) the value and
    raises ``Invalid``.
    """

    types: tuple[type, ...]
    required: bool = False
    default: Any = None
    low: int | None = None
    high: int | None = None
    check: Callable[[Any], Any] | None = None
    doc: str = ""


def _read_only(fields: Mapping[str, Field]) -> Mapping[str, Field]:
    return MappingProxyType(dict(fields))


@attrs.frozen
class OpSchema:
    """An op's fields, a cross-field check run after them, and whether it writes.

    Writes are what a slave refuses with ``NOT_MASTER``; reads may be served anywhere.
    """

    op: str
    fields: Mapping[str, Field] = attrs.field(converter=_read_only)
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
            expected(f.types),
        )
        for name, f in fields.items()
    )


def apply_steps(plan: tuple[_Step, ...], raw: Mapping[Any, Any], out: dict[str, Any]) -> None:
    """Copy the schema's fields from ``raw`` into ``out``, validated; unknown keys are ignored."""
    for name, types, required, default, low, high, check, wanted in plan:
        value = raw.get(name)
        if value is None:
            if required:
                raise Invalid(name, f"is required ({wanted}) but missing or null")
            value = default
        else:
            if type(value) not in types:
                raise Invalid(name, f"must be {wanted}, got {describe(value)}")
            if low is not None and not low <= value <= high:
                raise Invalid(name, f"must be between {low} and {high}, got {value}")
            if check is not None:
                try:
                    value = check(value)
                except Invalid as exc:
                    raise exc.under(name) from None
        out[name] = value


def _check_topic(name: str) -> str:
    if not is_valid_topic_name(name):
        raise Invalid("", f"must be {TOPIC_RULE}, got {describe(name)}", Status.INVALID_TOPIC)
    return name


def _check_acks(value: str) -> Acks:
    acks = ACKS_BY_VALUE.get(value)
    if acks is None:
        choices = ", ".join(repr(a.value) for a in Acks)
        raise Invalid("", f"must be one of {choices}, got {describe(value)}")
    return acks


def _check_pull_format(value: str) -> str:
    if value not in FORMATS:
        choices = ", ".join(repr(name) for name in FORMATS)
        raise Invalid("", f"must be one of {choices}, got {describe(value)}")
    return value


def _check_props(props: dict[Any, Any]) -> dict[str, str]:
    for key, value in props.items():
        if type(key) is not str or not key:
            raise Invalid(
                "", f"keys must be non-empty text strings, got a key that is {describe(key)}"
            )
        if type(value) is not str:
            raise Invalid(f"[{clip(key)}]", f"must be a text string, got {describe(value)}")
    return props


def _check_route(fields: dict[str, Any]) -> None:
    if fields["queue"] is not None and fields["key"] is not None:
        raise Invalid(
            "queue", "cannot be combined with 'key': send an explicit queue or a key to hash"
        )


def _check_producer(fields: dict[str, Any]) -> None:
    if (fields["producer"] is None) is not (fields["sequence"] is None):
        raise Invalid(
            "sequence" if fields["sequence"] is None else "producer",
            "is required with 'producer' and 'sequence' together (an idempotent send "
            "names both), got only one of them",
        )
    if fields["epoch"] is not None and fields["producer"] is None:
        raise Invalid("epoch", "is for idempotent sends: it needs 'producer' and 'sequence'")


def _check_init_producer(fields: dict[str, Any]) -> None:
    if fields["epoch"] is not None and fields["producer"] is None:
        raise Invalid("epoch", "is the epoch of a producer restarting: it needs 'producer'")


def _check_send(fields: dict[str, Any]) -> None:
    _check_route(fields)
    _check_producer(fields)


def _check_host_port(value: str) -> str:
    try:
        parse_address(value)
    except ValueError as exc:
        raise Invalid("", f"must be host:port with a port in 1..65535 ({exc})") from None
    return value


def _int_field(default: Any, low: int, high: int, doc: str, *, required: bool = False) -> Field:
    return Field((int,), required=required, default=default, low=low, high=high, doc=doc)


_TOPIC: Final = Field((str,), required=True, check=_check_topic, doc="topic name")
_ACKS: Final = Field(
    (str,), default=Acks.DURABLE, check=_check_acks, doc="leader | durable | in_sync | replicated"
)
_PULL_FORMAT: Final = Field(
    (str,),
    default=MESSAGES_FORMAT,
    check=_check_pull_format,
    doc="messages (a map each) | records (their stored bytes, for the client to decode)",
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
_PRODUCER: Final = _int_field(
    None, 1, MAX_PRODUCER_ID, "idempotent sends: the id init_producer handed out"
)
_SEQUENCE: Final = _int_field(
    None, 0, MAX_OFFSET, "idempotent sends: the first message's sequence (one per message)"
)
_EPOCH: Final = _int_field(
    None, 0, MAX_PRODUCER_EPOCH, "idempotent sends: the epoch init_producer handed out"
)


def _check_group(name: str) -> str:
    if not is_valid_topic_name(name):
        raise Invalid("", f"must be {TOPIC_RULE} (the topic rule), got {describe(name)}")
    return name


def _check_topic_list(topics: list[Any]) -> list[str]:
    if not 1 <= len(topics) <= MAX_GROUP_TOPICS:
        raise Invalid("", f"must hold 1 to {MAX_GROUP_TOPICS} topic names, got {len(topics)}")
    for index, name in enumerate(topics):
        try:
            _check_topic(name)
        except Invalid as exc:
            raise exc.under(f"[{index}]") from None
    return sorted(set(topics))


_POSITION_PLAN: Final = _plan(
    {
        "topic": Field((str,), required=True, check=_check_topic),
        "queue": Field((int,), required=True, low=0, high=MAX_QUEUES - 1),
        "offset": Field((int,), required=True, low=0, high=MAX_OFFSET),
    }
)


def _check_positions(positions: list[Any]) -> list[dict[str, Any]]:
    if not 1 <= len(positions) <= MAX_QUEUES:
        raise Invalid("", f"must hold 1 to {MAX_QUEUES} positions, got {len(positions)}")
    out: list[dict[str, Any]] = []
    for index, raw in enumerate(positions):
        if type(raw) is not dict:
            raise Invalid(f"[{index}]", f"must be a map, got {describe(raw)}")
        position: dict[str, Any] = {}
        try:
            apply_steps(_POSITION_PLAN, raw, position)
        except Invalid as exc:
            raise exc.under(f"[{index}]") from None
        out.append(position)
    return out


MAX_GROUP_TOPICS: Final = 64
"""Topics one consumer group may consume."""
_GROUP: Final = Field((str,), required=True, check=_check_group, doc="consumer group name")
_MEMBER: Final = Field(
    (str,), required=True, check=_check_group, doc="member id (the client makes a unique one)"
)
_GENERATION: Final = _int_field(
    None, 0, MAX_OFFSET, "the generation join_group answered", required=True
)


def _check_messages(messages: list[Any]) -> list[BatchMessage]:
    if not 1 <= len(messages) <= MAX_BATCH_MESSAGES:
        raise Invalid(
            "",
            f"must hold 1 to {MAX_BATCH_MESSAGES} messages, got {len(messages)}; "
            "split larger batches",
        )
    out: list[Any] = []
    append = out.append
    for index, raw in enumerate(messages):
        if type(raw) is not dict:
            raise Invalid(f"[{index}]", f"must be a map, got {describe(raw)}")
        message: dict[str, Any] = {}
        try:
            apply_steps(_MESSAGE_PLAN, raw, message)
            _check_route(message)
        except Invalid as exc:
            raise exc.under(f"[{index}]") from None
        append(message)
    return out


SCHEMAS: Final[Mapping[str, OpSchema]] = MappingProxyType(
    {
        schema.op: schema
        for schema in (
            OpSchema(
                "send",
                {
                    "topic": _TOPIC,
                    **_MESSAGE_FIELDS,
                    "acks": _ACKS,
                    "timeout_ms": _TIMEOUT,
                    "producer": _PRODUCER,
                    "sequence": _SEQUENCE,
                    "epoch": _EPOCH,
                },
                writes=True,
                check=_check_send,
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
                    "producer": _PRODUCER,
                    "sequence": _SEQUENCE,
                    "epoch": _EPOCH,
                },
                writes=True,
                check=_check_producer,
                doc="append many messages to one topic, all or nothing",
            ),
            OpSchema(
                "init_producer",
                {
                    "producer": _int_field(
                        None, 1, MAX_PRODUCER_ID, "restart this producer: fence its older copies"
                    ),
                    "epoch": _int_field(
                        None, 0, MAX_PRODUCER_EPOCH, "with producer: the epoch it last had"
                    ),
                },
                writes=True,
                check=_check_init_producer,
                doc="an id for an idempotent producer, or a new epoch for one (the master's)",
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
                    "format": _PULL_FORMAT,
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
                "offsets_for_time",
                {
                    "topic": _TOPIC,
                    "time_us": _int_field(
                        None, 0, MAX_OFFSET, "store time, us since the epoch", required=True
                    ),
                    "queue": _int_field(None, 0, MAX_QUEUES - 1, "one queue (default: all)"),
                },
                doc="per queue, the first queue offset stored at or after a time",
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
            OpSchema(
                "alter_topic",
                {
                    "topic": _TOPIC,
                    "queues": _int_field(
                        None, 1, MAX_QUEUES, "the new number of queues (grow only)", required=True
                    ),
                },
                writes=True,
                doc="grow a topic's queue count",
            ),
            OpSchema(
                "delete_topic",
                {"topic": _TOPIC},
                writes=True,
                doc="delete a topic: its queues go, its records stay until retention",
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
            OpSchema(
                "metadata",
                {},
                doc="the group as this node sees it: master, epoch, members, topics",
            ),
            OpSchema(
                "switchover",
                {
                    "group": Field((str,), required=True, doc="the group to hand over"),
                    "to": Field((str,), doc="the node to hand over to (default: the best)"),
                    "timeout_ms": _int_field(
                        10_000, 1, 600_000, "how long to wait for the target and the election"
                    ),
                },
                doc="admin (master, with etcd): hand mastership over without losing a write",
            ),
            OpSchema(
                "join_group",
                {
                    "group": _GROUP,
                    "member": _MEMBER,
                    "topics": Field(
                        (list,), required=True, check=_check_topic_list, doc="topics to consume"
                    ),
                    "session_timeout_ms": _int_field(
                        10_000, 100, 600_000, "silent this long, the member is dropped"
                    ),
                },
                writes=True,
                doc="consumer groups: join (or re-join); answers the generation and queues",
            ),
            OpSchema(
                "heartbeat",
                {"group": _GROUP, "member": _MEMBER, "generation": _GENERATION},
                writes=True,
                doc="consumer groups: stay live; REJOIN_GROUP when the generation moved on",
            ),
            OpSchema(
                "leave_group",
                {"group": _GROUP, "member": _MEMBER},
                writes=True,
                doc="consumer groups: leave now (the queues move at once)",
            ),
            OpSchema(
                "commit_offsets",
                {
                    "group": _GROUP,
                    "member": attrs.evolve(_MEMBER, required=False),
                    "generation": attrs.evolve(_GENERATION, required=False),
                    "offsets": Field(
                        (list,),
                        required=True,
                        check=_check_positions,
                        doc="[{topic, queue, offset}]",
                    ),
                    "acks": _ACKS,
                    "timeout_ms": _TIMEOUT,
                },
                writes=True,
                doc="consumer groups: store the next offset to read per queue",
            ),
            OpSchema(
                "fetch_offsets",
                {"group": _GROUP},
                doc="consumer groups: the committed offsets of a group",
            ),
            OpSchema("list_groups", {}, doc="consumer groups: every group with offsets or members"),
            OpSchema(
                "describe_group",
                {"group": _GROUP},
                doc="consumer groups: members, assignment, committed offsets and lag",
            ),
        )
    }
)
"""Every op this protocol version defines. Ops named ``repl_*`` are reserved for replication."""

Plan: TypeAlias = tuple[OpSchema, tuple[_Step, ...]]
"""An op's schema with its flattened validation steps."""

PLANS: Final[dict[str, Plan]] = {
    op: (schema, _plan(schema.fields)) for op, schema in SCHEMAS.items()
}
"""A plain dict: looking up a mappingproxy costs a wrapper call on every frame."""

KNOWN_TOPIC_PLANS: Final[dict[str, Plan]] = {
    op: (schema, _plan({**schema.fields, "topic": attrs.evolve(_TOPIC, check=None)}))
    for op, schema in SCHEMAS.items()
    if "topic" in schema.fields
}
"""The plans of the ops with a topic, for a topic name already known to follow the rule."""


class KnownTopics(set[str]):
    """Topic names a peer sent before and the rule accepted: at most ``capacity`` of them.

    The name rule is a regex (about 150 ns) and a connection sends the same few topics
    over and over; a set lookup costs a tenth of that (a ``set`` subclass, so ``in``
    stays in C). Each :class:`~cluster.protocol.FrameDecoder` owns one, so it lives and
    dies with its connection; not shared between tasks.
    """

    def __init__(self, capacity: int = 1024) -> None:
        assert capacity > 0
        super().__init__()
        self.capacity = capacity

    def add(self, name: str) -> None:
        """Remember a name the rule accepted, unless the set is full (then it just stays slower)."""
        if len(self) < self.capacity:
            super().add(name)


def validate(entry: Plan, raw: Mapping[Any, Any], out: dict[str, Any]) -> None:
    """Fill ``out`` with the op's fields from ``raw``, validated and defaulted; raises :class:`Invalid`."""
    schema, plan = entry
    apply_steps(plan, raw, out)
    if schema.check is not None:
        schema.check(out)
