"""The key layout in etcd and the records stored there (JSON).

Everything of one cluster lives under ``/tidelog/<cluster>/``::

    members/<node>          leased by the node: MemberInfo (addresses, log end, epoch, ...)
    groups/<g>/leader       leased by the master: LeaderValue; created only if absent
    groups/<g>/state        not leased, changed only by compare-and-swap: GroupState
    groups/<g>/switchover   leased briefly by a master handing over: SwitchoverValue
    topics/<t>              TopicRecord: topics live in etcd so a failover never forgets one

Values are JSON objects with a ``format`` version so later releases can read older
records; decoding refuses anything malformed with an error naming the key, because
acting on a half-understood coordination record could elect the wrong node.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any, Final, TypeVar

import attrs

from storage.names import TOPIC_RULE, is_valid_topic_name

__all__ = [
    "FORMAT_VERSION",
    "NAME_RULE",
    "ClusterKeys",
    "GroupState",
    "KeyRef",
    "LeaderValue",
    "MemberInfo",
    "RecordError",
    "SwitchoverValue",
    "TopicRecord",
    "check_name",
]

FORMAT_VERSION: Final = 1
ROOT: Final = "/tidelog"
NAME_RULE: Final = "1 to 64 characters from A-Z a-z 0-9 . _ - starting with a letter or digit"
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_R = TypeVar("_R")


class RecordError(ValueError):
    """A coordination record could not be decoded (names the key and what is wrong)."""


def check_name(kind: str, name: str) -> str:
    """``name`` if it may appear as one path component of a key, else ValueError."""
    if type(name) is not str or _NAME.fullmatch(name) is None:
        raise ValueError(f"{kind} name {name!r} is invalid: use {NAME_RULE}")
    return name


@attrs.frozen
class KeyRef:
    """What a key under the cluster prefix names: ``kind`` is member, leader, state or
    topic; ``name`` the node, group or topic."""

    kind: str
    name: str


@attrs.frozen
class ClusterKeys:
    """The keys of one cluster. Pure string building; names are validated here so a bad
    name can never address another cluster's or group's keys."""

    cluster: str = attrs.field(validator=lambda _i, _a, v: check_name("cluster", v))

    @property
    def prefix(self) -> str:
        return f"{ROOT}/{self.cluster}/"

    @property
    def members_prefix(self) -> str:
        return f"{self.prefix}members/"

    @property
    def groups_prefix(self) -> str:
        return f"{self.prefix}groups/"

    @property
    def topics_prefix(self) -> str:
        return f"{self.prefix}topics/"

    def member(self, node: str) -> str:
        return self.members_prefix + check_name("node", node)

    def group_prefix(self, group: str) -> str:
        return f"{self.groups_prefix}{check_name('group', group)}/"

    def leader(self, group: str) -> str:
        return self.group_prefix(group) + "leader"

    def state(self, group: str) -> str:
        return self.group_prefix(group) + "state"

    def switchover(self, group: str) -> str:
        """Names the node a planned switchover hands the group to (leased, short-lived)."""
        return self.group_prefix(group) + "switchover"

    def topic(self, topic: str) -> str:
        if not is_valid_topic_name(topic):
            raise ValueError(f"topic name {topic!r} is invalid: use {TOPIC_RULE}")
        return self.topics_prefix + topic

    def parse(self, key: str) -> KeyRef | None:
        """The meaning of ``key`` (e.g. from a watch of :attr:`prefix`), or None for a key
        this layout does not define (ignored, so newer releases may add keys)."""
        if not key.startswith(self.prefix):
            return None
        parts = key[len(self.prefix) :].split("/")
        match parts:
            case ["members", node] if _NAME.fullmatch(node):
                return KeyRef("member", node)
            case ["groups", group, ("leader" | "state" | "switchover") as kind] if _NAME.fullmatch(
                group
            ):
                return KeyRef(kind, group)
            case ["topics", topic] if is_valid_topic_name(topic):
                return KeyRef("topic", topic)
        return None


def _encode(kind: str, fields: dict[str, Any]) -> bytes:
    return json.dumps({"format": FORMAT_VERSION, "kind": kind, **fields}, sort_keys=True).encode()


def _decode(kind: str, key: str, raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise RecordError(f"{key}: not a JSON {kind} record ({error})") from error
    if not isinstance(body, dict):
        raise RecordError(f"{key}: a {kind} record must be a JSON object, got {raw[:80]!r}")
    if body.get("kind") != kind:
        raise RecordError(f"{key}: expected a {kind} record, got kind={body.get('kind')!r}")
    if body.get("format") != FORMAT_VERSION:
        raise RecordError(
            f"{key}: {kind} record format {body.get('format')!r} is not {FORMAT_VERSION}: "
            "upgrade this node to the release that wrote it"
        )
    return body


def _field(key: str, body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if type(value) is not kind:
        raise RecordError(f"{key}: field {name!r} must be {kind.__name__}, got {value!r}")
    return value


_SCALARS: Final[dict[str, type]] = {"str": str, "int": int, "bool": bool}
_ADDED_LATER: Final = frozenset({"vacant_state_revision"})
"""Fields added to format 1 after its release: a record without one takes the default,
so nodes of both releases read each other's records during an upgrade."""


def _decode_scalars(cls: type[_R], kind: str, key: str, raw: bytes) -> _R:
    """Decode a record whose every attrs field is a ``str``, ``int`` or ``bool``: each field
    read from the JSON body with its declared type checked, in declaration order."""
    body = _decode(kind, key, raw)
    fields = {}
    for field in attrs.fields(cls):  # type: ignore[arg-type]  # _R is always an attrs class
        assert field.type in _SCALARS, f"{cls.__name__}.{field.name} is not a scalar field"
        if field.name in _ADDED_LATER and field.name not in body:
            continue  # written by an older release of this format: the default holds
        fields[field.name] = _field(key, body, field.name, _SCALARS[field.type])
    return _build(key, cls, **fields)


def _build(key: str, cls: type[_R], **fields: Any) -> _R:
    """``cls(**fields)`` with a refused value reported as a RecordError naming ``key``."""
    try:
        return cls(**fields)
    except ValueError as error:
        raise RecordError(f"{key}: {error}") from error


def _non_negative(_inst: Any, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


@attrs.frozen
class MemberInfo:
    """What a live node publishes about itself under ``members/<node>`` (leased, so it
    vanishes when the node dies). Election reads ``epoch``, ``log_end``, ``priority``,
    ``clean_start`` and ``caught_up``; clients and the status view read the addresses.

    ``clean_start``: the node's last start found a clean-shutdown mark. ``caught_up``:
    since this start a master has admitted the node to the in-sync set; a node with
    neither may hold a log missing acked records and must not campaign.
    """

    node: str = attrs.field(validator=lambda _i, _a, v: check_name("node", v))
    group: str = attrs.field(validator=lambda _i, _a, v: check_name("group", v))
    client_address: str
    ha_address: str
    epoch: int = attrs.field(validator=_non_negative)
    log_end: int = attrs.field(validator=_non_negative)
    clean_start: bool
    caught_up: bool = False
    priority: int = 0
    vacant_state_revision: int = attrs.field(default=0, validator=_non_negative)
    """The revision of the group state this node saw with no leader key when it wrote
    the record (0: it saw a leader). Records of older releases lack it (read as 0)."""

    def encode(self) -> bytes:
        return _encode("member", attrs.asdict(self))

    @classmethod
    def decode(cls, key: str, raw: bytes) -> MemberInfo:
        return _decode_scalars(cls, "member", key, raw)


@attrs.frozen
class LeaderValue:
    """The value of ``groups/<g>/leader``: who is master in which epoch and where to find
    it (for ``NOT_MASTER`` hints). The key is leased to the master's lease."""

    node: str = attrs.field(validator=lambda _i, _a, v: check_name("node", v))
    epoch: int = attrs.field(validator=_non_negative)
    client_address: str
    ha_address: str

    def encode(self) -> bytes:
        return _encode("leader", attrs.asdict(self))

    @classmethod
    def decode(cls, key: str, raw: bytes) -> LeaderValue:
        return _decode_scalars(cls, "leader", key, raw)


def _names(value: Iterable[str]) -> frozenset[str]:
    return frozenset(value)


def _in_sync_members(
    _inst: Any, _attribute: attrs.Attribute[frozenset[str]], value: frozenset[str]
) -> None:
    for node in value:
        check_name("in-sync member", node)


@attrs.frozen
class GroupState:
    """The recorded state of a group (``groups/<g>/state``), changed only by CAS.

    ``in_sync`` is the recorded in-sync set, master included: only its members may be
    elected and (after a recorded shrink) only they count for acks.
    ``min_insync_replicas`` counts in-sync *slaves* (the master not included), as the
    node's ``[replication] min_insync_replicas`` does. Invariants: the master, when set,
    is in ``in_sync``; ``min_insync_replicas >= 1``; epochs only grow (checked by the
    transitions, not here).
    """

    epoch: int = attrs.field(validator=_non_negative)
    master: str | None
    in_sync: frozenset[str] = attrs.field(converter=_names, validator=_in_sync_members)
    min_insync_replicas: int = 1

    def __attrs_post_init__(self) -> None:
        if self.master is not None:
            check_name("master", self.master)
            if self.master not in self.in_sync:
                raise ValueError(
                    f"group state: master {self.master!r} must be in the in-sync set "
                    f"{sorted(self.in_sync)}"
                )
        if self.min_insync_replicas < 1:
            raise ValueError(
                f"group state: min_insync_replicas must be >= 1, got {self.min_insync_replicas}"
            )

    def encode(self) -> bytes:
        return _encode(
            "group_state",
            {
                "epoch": self.epoch,
                "master": self.master,
                "in_sync": sorted(self.in_sync),
                "min_insync_replicas": self.min_insync_replicas,
            },
        )

    @classmethod
    def decode(cls, key: str, raw: bytes) -> GroupState:
        body = _decode("group_state", key, raw)
        master = body.get("master")
        in_sync = body.get("in_sync")
        if master is not None and type(master) is not str:
            raise RecordError(f"{key}: field 'master' must be a node name or null, got {master!r}")
        if not isinstance(in_sync, list) or not all(type(n) is str for n in in_sync):
            raise RecordError(
                f"{key}: field 'in_sync' must be a list of node names, got {in_sync!r}"
            )
        return _build(
            key,
            cls,
            epoch=_field(key, body, "epoch", int),
            master=master,
            in_sync=frozenset(in_sync),
            min_insync_replicas=_field(key, body, "min_insync_replicas", int),
        )


@attrs.frozen
class TopicRecord:
    """A topic as the cluster knows it (``topics/<t>``): name, queue count, creation time."""

    name: str
    queues: int
    created_us: int

    def __attrs_post_init__(self) -> None:
        if not is_valid_topic_name(self.name):
            raise ValueError(f"topic name {self.name!r} is invalid: use {TOPIC_RULE}")
        if self.queues < 1:
            raise ValueError(f"topic {self.name!r}: queues must be >= 1, got {self.queues}")

    def encode(self) -> bytes:
        return _encode("topic", attrs.asdict(self))

    @classmethod
    def decode(cls, key: str, raw: bytes) -> TopicRecord:
        return _decode_scalars(cls, "topic", key, raw)


@attrs.frozen
class SwitchoverValue:
    """The value of ``groups/<g>/switchover``: the node a master hands over to. While it
    exists (its own short lease) the other members defer to ``target`` in the election."""

    target: str = attrs.field(validator=lambda _i, _a, v: check_name("node", v))

    def encode(self) -> bytes:
        return _encode("switchover", attrs.asdict(self))

    @classmethod
    def decode(cls, key: str, raw: bytes) -> SwitchoverValue:
        return _decode_scalars(cls, "switchover", key, raw)
