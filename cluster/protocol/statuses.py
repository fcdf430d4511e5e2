"""Response statuses and what each one means to a client (retry? outcome unknown?), and ack levels."""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["ACKS_BY_VALUE", "STATUS_BY_VALUE", "Acks", "Status"]


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
    REJOIN_GROUP = "REJOIN_GROUP"
    GROUP_HAS_MEMBERS = "GROUP_HAS_MEMBERS"
    SEQUENCE_TOO_OLD = "SEQUENCE_TOO_OLD"
    PRODUCER_FENCED = "PRODUCER_FENCED"
    COORDINATION_UNAVAILABLE = "COORDINATION_UNAVAILABLE"

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
        Status.COORDINATION_UNAVAILABLE,
    }
)
_CLOSES_CONNECTION: Final = frozenset({Status.FRAME_TOO_LARGE, Status.TOO_MANY_CONNECTIONS})
_OUTCOME_UNKNOWN: Final = frozenset(
    {
        Status.FLUSH_DISK_TIMEOUT,
        Status.FLUSH_SLAVE_TIMEOUT,
        Status.STORAGE_FAILED,
        Status.INTERNAL_ERROR,
        Status.SEQUENCE_TOO_OLD,
    }
)
_HAS_RESULT: Final = frozenset({Status.OK, Status.FLUSH_DISK_TIMEOUT, Status.FLUSH_SLAVE_TIMEOUT})
STATUS_BY_VALUE: Final[dict[str, Status]] = {s.value: s for s in Status}


class Acks(enum.StrEnum):
    """How much durability a write waits for before the server answers."""

    LEADER = "leader"
    """Appended to the master's log (page cache); lost if the master's machine crashes."""
    DURABLE = "durable"
    """Fsynced on the master (group commit); otherwise ``FLUSH_DISK_TIMEOUT``."""
    IN_SYNC = "in_sync"
    """Held in memory (page cache) by the master and by every counted in-sync slave,
    fsynced nowhere yet (Kafka's ``acks=all``, NATS R3, Redis ``WAIT``): survives the
    master's crash while an in-sync slave lives, not a power loss of all of them at
    once; otherwise ``FLUSH_SLAVE_TIMEOUT``."""
    REPLICATED = "replicated"
    """Fsynced on the master and acknowledged by an in-sync slave; otherwise ``FLUSH_SLAVE_TIMEOUT``."""

    @property
    def needs_slaves(self) -> bool:
        """Waits for in-sync slaves (``in_sync``, ``replicated``): refused before append
        without enough of them, and answered ``FLUSH_SLAVE_TIMEOUT`` when they are late."""
        return self is Acks.IN_SYNC or self is Acks.REPLICATED


ACKS_BY_VALUE: Final[dict[str, Acks]] = {a.value: a for a in Acks}
