"""The node's role as one value, and the only ways it may change.

A node is exactly one of:

* :class:`Standalone`: a master without an HA port. It takes writes, serves no slaves,
  starts no epoch; ``acks=replicated`` is refused.
* :class:`Master`: a master serving slaves on its HA port, in its epoch.
* :class:`Slave`: follows ``master_ha``; refuses writes, naming ``master_client``.
* :class:`Stale`: a master a slave proved stale (a newer epoch exists). It refuses
  writes and names no master: it does not know the new one, and every record it
  took now could be cut on the slaves.

Transitions are pure functions from a role to the next (:func:`promote`,
:func:`repoint`, :func:`become_stale`); one that is not allowed raises
:class:`RoleError` with a sentence naming what was asked, what the node is, and what
to do. The node keeps the current value in one field and does the I/O around each
transition (stop following, save the epoch, open the HA port).

With etcd (``[coordination] etcd``) the HA loop decides and two more roles exist:

* :class:`Candidate`: no master known yet (starting, or an election under way); it
  takes no writes and names no master.
* :class:`Fenced`: a master that stopped acknowledging (its lease deadline passed, or
  it lost or handed over leadership). It takes no writes, keeps its HA port open and
  waits for the loop to make it a slave or, with the same lease, master again.

Their transitions (:func:`elected`, :func:`fence`, :func:`follow`, :func:`vacate`) are
the HA loop's decisions; :func:`promote` and :func:`repoint` stay the static ones.

Every role answers the same questions (:attr:`name` for ``status.role``,
:meth:`write_refusal`), so callers never test a role's class to decide.
"""

from __future__ import annotations

from typing import ClassVar, Final, TypeAlias

import attrs

from cluster.protocol.address import parse_address

__all__ = [
    "Candidate",
    "Fenced",
    "Master",
    "Role",
    "RoleError",
    "Slave",
    "Stale",
    "Standalone",
    "WriteRefusal",
    "become_stale",
    "configured",
    "elected",
    "fence",
    "follow",
    "promote",
    "repoint",
    "vacate",
]


class RoleError(ValueError):
    """A role change that is not allowed from the node's current role."""


@attrs.frozen
class WriteRefusal:
    """Why this node takes no writes now: the sentence, and the master to name in
    ``NOT_MASTER`` (None: unknown)."""

    message: str
    master: str | None


def _check_port(port: int) -> int:
    if not 0 <= port <= 65535:
        raise RoleError(f"an HA port is 0 (any free port) to 65535, got {port}")
    return port


def _check_address(field: str, address: str) -> str:
    try:
        parse_address(address)
    except ValueError as exc:
        raise RoleError(f"{field}: {exc}") from None
    return address


@attrs.frozen
class Standalone:
    """A master without an HA port: writable, replicates nothing, has no epoch."""

    name: ClassVar[str] = "master"
    serves_slaves: ClassVar[bool] = False

    def write_refusal(self, epoch: int | None) -> WriteRefusal | None:
        return None


@attrs.frozen
class Master:
    """A master serving slaves; ``ha_port`` as configured or asked for (0: any free)."""

    ha_port: int = attrs.field(converter=_check_port)
    name: ClassVar[str] = "master"
    serves_slaves: ClassVar[bool] = True

    def write_refusal(self, epoch: int | None) -> WriteRefusal | None:
        return None


@attrs.frozen
class Slave:
    """Follows the master at ``master_ha``; writes go to ``master_client`` (None:
    unknown, the refusal then names no address)."""

    master_ha: str
    master_client: str | None = None
    name: ClassVar[str] = "slave"
    serves_slaves: ClassVar[bool] = False

    def __attrs_post_init__(self) -> None:
        _check_address("master_ha", self.master_ha)
        if self.master_client is not None:
            _check_address("master_client", self.master_client)

    def write_refusal(self, epoch: int | None) -> WriteRefusal:
        where = self.master_client
        if where:
            return WriteRefusal(f"this node is a slave; resend to the master at {where}", where)
        return WriteRefusal(
            "this node is a slave and knows no master client address; resend to the master",
            None,
        )


@attrs.frozen
class Stale:
    """A master that learned a newer master exists (``evidence`` says who proved it).

    It keeps serving reads and its HA port (its slaves must learn the same), takes
    no writes, and leaves this role only by a restart (as a slave, or as a master
    starting a new term). ``status.role`` still says ``master``: what it was
    configured as; ``writable`` and ``replication.stale`` tell the rest.
    """

    ha_port: int
    evidence: str
    name: ClassVar[str] = "master"
    serves_slaves: ClassVar[bool] = True

    def write_refusal(self, epoch: int | None) -> WriteRefusal:
        return WriteRefusal(
            f"this master (epoch {epoch}) is stale, a newer master exists "
            f"({self.evidence}); nothing was written: resend to the new master",
            None,
        )


@attrs.frozen
class Candidate:
    """With etcd: no master known (starting, or an election under way). Takes no
    writes and names no master: the client asks ``metadata`` again after a pause."""

    name: ClassVar[str] = "candidate"
    serves_slaves: ClassVar[bool] = False

    def write_refusal(self, epoch: int | None) -> WriteRefusal:
        return WriteRefusal(
            "this node is not the master and no master is elected yet; nothing was "
            "written: retry after a pause",
            None,
        )


@attrs.frozen
class Fenced:
    """With etcd: a master that stopped acknowledging (``reason``). Writes are refused
    before anything is appended; its HA port stays open until it follows a new master."""

    ha_port: int
    reason: str
    name: ClassVar[str] = "fenced"
    serves_slaves: ClassVar[bool] = True

    def write_refusal(self, epoch: int | None) -> WriteRefusal:
        return WriteRefusal(
            f"this node stopped acting as master (epoch {epoch}: {self.reason}); nothing was "
            "written: resend to the new master (ask metadata)",
            None,
        )


Role: TypeAlias = Standalone | Master | Slave | Stale | Candidate | Fenced
"""Every role a node can hold."""

ROLE_KINDS: Final = (Standalone, Master, Slave, Stale, Candidate, Fenced)


def configured(role: str, *, ha_port: int, master_ha: str, master_client: str | None) -> Role:
    """The role a node starts in, from its ``[replication]`` section (already valid)."""
    if role == "slave":
        return Slave(master_ha, master_client or None)
    if ha_port >= 0:
        return Master(ha_port)
    return Standalone()


def promote(role: Role, ha_port: int, epoch: int | None) -> Master:
    """A slave becomes a master serving slaves on ``ha_port``. Only a slave may."""
    if isinstance(role, Slave):
        return Master(ha_port)
    if isinstance(role, Stale):
        raise RoleError(
            f"this node is a stale master (epoch {epoch}, {role.evidence}); promote only a "
            "slave: restart this node as a slave of the new master"
        )
    if isinstance(role, Candidate | Fenced):
        raise RoleError(
            f"this node is {describe(role)} (epoch {epoch}) and etcd elects its master; "
            "promote only a slave of a static pair (use switchover with etcd)"
        )
    raise RoleError(f"this node is already a master (epoch {epoch}); promote only a slave")


def repoint(role: Role, master_ha: str, master_client: str | None) -> Slave:
    """A slave follows another master; ``master_client`` None keeps the one it knew."""
    if not isinstance(role, Slave):
        raise RoleError(
            f"this node is {describe(role)}; repoint only a slave (a master follows no one)"
        )
    client = master_client if master_client is not None else role.master_client
    return Slave(master_ha, client)


def become_stale(role: Role, evidence: str) -> Stale | Fenced:
    """A master serving slaves learns that a newer master exists.

    Only a master with slaves can learn it (the proof comes over its HA port); a
    stale master stays stale with the first evidence, a fenced one stays fenced (it
    takes no writes either, and the HA loop decides what it becomes).
    """
    if isinstance(role, Stale | Fenced):
        return role
    if isinstance(role, Master):
        return Stale(role.ha_port, evidence)
    raise RoleError(
        f"only a master serving slaves can be proved stale; this node is {describe(role)}"
    )


def elected(role: Role, ha_port: int) -> Master:
    """With etcd: this node won an election (or kept its lease after a fence) and serves
    as master on ``ha_port``. A master without an HA port never runs an election."""
    if isinstance(role, Standalone):
        raise RoleError("a master without an HA port cannot be elected; set ha_port")
    return Master(ha_port)


def fence(role: Role, reason: str) -> Fenced:
    """With etcd: a master stops acknowledging. Only a master (or a stale or already
    fenced one, which keeps its first reason) can be fenced."""
    if isinstance(role, Fenced):
        return role
    if isinstance(role, Master | Stale):
        return Fenced(role.ha_port, reason)
    raise RoleError(f"only a master can be fenced; this node is {describe(role)}")


def follow(role: Role, master_ha: str, master_client: str | None) -> Slave:
    """With etcd: follow the elected master. Any role but a master that is still
    acknowledging may (a master is fenced first, so it never acks while following)."""
    if isinstance(role, Master | Standalone):
        raise RoleError(f"this node is {describe(role)}; fence it before it follows another master")
    return Slave(master_ha, master_client)


def vacate(role: Role) -> Candidate:
    """With etcd: the master is gone and no new one is known. A slave or candidate
    waits as a candidate; a master must be fenced first (it may still hold acks)."""
    if isinstance(role, Slave | Candidate):
        return Candidate()
    raise RoleError(f"only a slave or a candidate waits for an election; this is {describe(role)}")


def describe(role: Role) -> str:
    """The role in a few words, for errors and logs."""
    if isinstance(role, Standalone):
        return "a master without an HA port"
    if isinstance(role, Master):
        return f"a master serving slaves on HA port {role.ha_port}"
    if isinstance(role, Slave):
        return f"a slave of {role.master_ha}"
    if isinstance(role, Stale):
        return f"a stale master ({role.evidence})"
    if isinstance(role, Candidate):
        return "a candidate waiting for an election"
    return f"a fenced master ({role.reason})"
