"""The ``status`` answer as typed values, and the one place they become the wire map.

The node, its ack policy and its replication each build a frozen value here;
:func:`to_wire` turns any of them into the map the protocol sends (field order is
wire order; tuples become lists, nested values maps). The wire format is the one
``docs/protocol.md`` documents: adding a field here adds it to the answer.
"""

from __future__ import annotations

from typing import Any

import attrs

__all__ = [
    "AckStatus",
    "ConnectedSlave",
    "MasterReplicationStatus",
    "NodeStatus",
    "SlaveLagStatus",
    "SlaveReplicationStatus",
    "TlsStatus",
    "tls_status",
    "to_wire",
]


def _tenths(ms: float) -> float:
    return round(ms, 1)


@attrs.frozen
class SlaveLagStatus:
    """One connected slave as the in-sync decision sees it."""

    name: str
    ack_offset: int
    lag_bytes: int
    lag_ms: float = attrs.field(converter=_tenths)


@attrs.frozen
class ConnectedSlave:
    name: str
    ack_offset: int


@attrs.frozen
class AckStatus:
    """What a master's :class:`~cluster.node.acks.ReplicatedAcks` reports: every
    connected slave under ``slaves`` (by name), and the same slaves split by the
    in-sync decision."""

    in_sync: tuple[SlaveLagStatus, ...]
    out_of_sync: tuple[SlaveLagStatus, ...]
    min_insync_replicas: int
    confirm_offset: int
    replicated_offset: int
    """What releases ``in_sync``/``replicated`` acks: the confirm offset while at least
    ``min_insync_replicas`` slaves are in sync, held back (below it) while fewer are."""
    slaves: tuple[ConnectedSlave, ...]


@attrs.frozen
class MasterReplicationStatus:
    """``status.replication`` on a master serving slaves (stale or not)."""

    role: str
    ha_address: str
    epoch: int | None
    epoch_start: int | None
    stale: str | None
    """Who proved a newer master exists; None while this master is current."""
    in_sync: tuple[SlaveLagStatus, ...]
    out_of_sync: tuple[SlaveLagStatus, ...]
    min_insync_replicas: int
    confirm_offset: int
    replicated_offset: int
    """As :attr:`AckStatus.replicated_offset`."""
    slaves: tuple[ConnectedSlave, ...]

    @classmethod
    def of(
        cls,
        acks: AckStatus,
        *,
        role: str,
        ha_address: str,
        epoch: int | None,
        epoch_start: int | None,
        stale: str | None,
    ) -> MasterReplicationStatus:
        return cls(
            role,
            ha_address,
            epoch,
            epoch_start,
            stale,
            acks.in_sync,
            acks.out_of_sync,
            acks.min_insync_replicas,
            acks.confirm_offset,
            acks.replicated_offset,
            acks.slaves,
        )


@attrs.frozen
class SlaveReplicationStatus:
    """``status.replication`` on a slave."""

    role: str
    epoch: int | None
    master_ha: str
    connected: bool
    acked_offset: int | None
    master_offset: int | None
    reconnects: int
    last_truncation: tuple[int, ...] | None
    """Where the last handshake cut this log and how much (None: never cut)."""
    confirm_offset: int = 0
    """The master's confirm offset as the stream carried it, capped at this log's end:
    reads on this slave stop here."""
    last_restart: tuple[int, ...] | None = None
    """(old end, new start) of the last full resync: the log restarted at the master's
    log start because it was behind it or new (None: never)."""
    last_error: str | None = None
    """Why the last connection to the master ended (None while the first one lasts)."""
    halted: str | None = None
    """Why this slave stopped following for good (its store failed), or None."""


@attrs.frozen
class NodeStatus:
    """The ``status`` op's result: the protocol's fields, then node and store detail."""

    role: str
    writable: bool
    min_offset: int
    max_offset: int
    flushed_offset: int
    replication: MasterReplicationStatus | SlaveReplicationStatus | None
    node: str
    address: str
    epoch: int | None
    topics: int
    connections: int
    uptime_ms: int
    store: dict[str, Any]
    """The store's own status map, passed through as it reports it."""
    coordination: dict[str, Any] | None = None
    """With etcd: the HA loop's view (role, epoch, master, lease deadline remaining,
    recorded and counted in-sync sets, etcd reachable); None without etcd."""
    tls: TlsStatus | None = None
    """How the client and HA ports are secured (:func:`tls_status`)."""


@attrs.frozen
class TlsStatus:
    """What an operator checks first when a client or a slave cannot connect."""

    client: str
    """``plain``, ``tls`` (server certificate) or ``mutual`` (client certificates too)."""
    ha: str
    """``plain`` (the cluster secret alone) or ``mutual``; ``none`` without an HA port."""
    peer_names: bool
    """HA certificates must name the node they belong to."""


def tls_status(
    *, client_tls: bool, client_certs_required: bool, ha_port: bool, ha_tls: bool, peer_names: bool
) -> TlsStatus:
    """The status's ``tls`` map from the node's settings."""
    client = "mutual" if client_tls and client_certs_required else "tls" if client_tls else "plain"
    ha = "none" if not ha_port else "mutual" if ha_tls else "plain"
    return TlsStatus(client=client, ha=ha, peer_names=peer_names)


def to_wire(
    status: NodeStatus | MasterReplicationStatus | SlaveReplicationStatus | AckStatus,
) -> dict[str, Any]:
    """The map the ``status`` op sends for ``status``."""
    wire = _wire(status)
    assert isinstance(wire, dict)
    return wire


def _wire(value: object) -> object:
    """Attrs values to maps (field order kept), tuples and lists to lists, maps copied."""
    if attrs.has(type(value)):
        fields: tuple[attrs.Attribute[Any], ...] = attrs.fields(type(value))  # type: ignore[arg-type]
        return {field.name: _wire(getattr(value, field.name)) for field in fields}
    if isinstance(value, tuple | list):
        return [_wire(item) for item in value]
    if isinstance(value, dict):
        return {key: _wire(item) for key, item in value.items()}
    return value
