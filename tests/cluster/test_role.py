"""The node's role: every transition from every role, allowed or refused with a reason."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.node.role import (
    ROLE_KINDS,
    Candidate,
    Fenced,
    Master,
    Role,
    RoleError,
    Slave,
    Stale,
    Standalone,
    become_stale,
    configured,
    describe,
    elected,
    fence,
    follow,
    promote,
    repoint,
    vacate,
)

hosts = st.sampled_from(["127.0.0.1", "localhost", "node-2.example", "[::1]"])
ports = st.integers(1, 65535)
addresses = st.builds(lambda host, port: f"{host}:{port}", hosts, ports)
ha_ports = st.integers(0, 65535)
epochs = st.none() | st.integers(1, 10**6)
evidence = st.text(min_size=1, max_size=40)

roles: st.SearchStrategy[Role] = st.one_of(
    st.just(Standalone()),
    st.builds(Master, ha_ports),
    st.builds(Slave, addresses, st.none() | addresses),
    st.builds(Stale, ha_ports, evidence),
    st.just(Candidate()),
    st.builds(Fenced, ha_ports, evidence),
)


def test_the_strategy_covers_every_role() -> None:
    assert set(ROLE_KINDS) == {Standalone, Master, Slave, Stale, Candidate, Fenced}


@given(roles, ha_ports, epochs)
def test_only_a_slave_is_promoted(role: Role, ha_port: int, epoch: int | None) -> None:
    if isinstance(role, Slave):
        assert promote(role, ha_port, epoch) == Master(ha_port)
        return
    with pytest.raises(RoleError, match="promote only a slave") as refused:
        promote(role, ha_port, epoch)
    assert f"epoch {epoch}" in str(refused.value)


@given(roles, addresses, st.none() | addresses)
def test_only_a_slave_is_repointed(role: Role, master_ha: str, master_client: str | None) -> None:
    if not isinstance(role, Slave):
        with pytest.raises(RoleError, match="repoint only a slave"):
            repoint(role, master_ha, master_client)
        return
    moved = repoint(role, master_ha, master_client)
    assert moved.master_ha == master_ha
    # A repoint that names no client address keeps the one the slave knew.
    assert moved.master_client == (master_client or role.master_client)


@given(roles, evidence)
def test_only_a_master_serving_slaves_becomes_stale(role: Role, proof: str) -> None:
    if isinstance(role, Master):
        assert become_stale(role, proof) == Stale(role.ha_port, proof)
    elif isinstance(role, Stale | Fenced):
        assert become_stale(role, proof) is role  # the first evidence (or the fence) stays
    else:
        with pytest.raises(RoleError, match="only a master serving slaves") as refused:
            become_stale(role, proof)
        assert describe(role) in str(refused.value)


@given(roles, epochs)
def test_exactly_the_writable_roles_take_writes(role: Role, epoch: int | None) -> None:
    refusal = role.write_refusal(epoch)
    if isinstance(role, Standalone | Master):
        assert refusal is None
    elif isinstance(role, Slave):
        assert refusal is not None and refusal.master == role.master_client
        assert "slave" in refusal.message
        if role.master_client:
            assert role.master_client in refusal.message
    elif isinstance(role, Candidate):
        assert refusal is not None and refusal.master is None
        assert "no master is elected" in refusal.message
    elif isinstance(role, Fenced):
        assert refusal is not None and refusal.master is None
        assert f"epoch {epoch}" in refusal.message and role.reason in refusal.message
    else:
        assert refusal is not None and refusal.master is None
        assert f"epoch {epoch}" in refusal.message and role.evidence in refusal.message


@given(roles)
def test_status_names_and_what_each_role_serves(role: Role) -> None:
    if isinstance(role, Candidate | Fenced):
        assert role.name == ("candidate" if isinstance(role, Candidate) else "fenced")
    else:
        assert role.name == ("slave" if isinstance(role, Slave) else "master")
    assert role.serves_slaves == isinstance(role, Master | Stale | Fenced)


@given(roles, st.lists(st.tuples(st.sampled_from("prs"), addresses, ha_ports, evidence)))
def test_any_sequence_of_changes_keeps_a_valid_role(
    role: Role, steps: list[tuple[str, str, int, str]]
) -> None:
    """Whatever is asked in whatever order, the role is always one of the kinds, a
    refused change leaves it as it was (values are frozen), and a stale master never
    becomes writable again without a restart."""
    was_stale = isinstance(role, Stale)
    for kind, address, port, proof in steps:
        before = role
        try:
            if kind == "p":
                role = promote(role, port, 1)
            elif kind == "r":
                role = repoint(role, address, None)
            else:
                role = become_stale(role, proof)
        except RoleError:
            assert role is before
        assert isinstance(role, ROLE_KINDS)
        was_stale = was_stale or isinstance(role, Stale)
        if was_stale:
            assert isinstance(role, Stale)


def test_roles_are_frozen_values() -> None:
    role = Slave("127.0.0.1:7700", "127.0.0.1:7600")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        role.master_ha = "elsewhere:1"  # type: ignore[misc]
    assert role == Slave("127.0.0.1:7700", "127.0.0.1:7600")


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: Slave("no-port"), "master_ha"),
        (lambda: Slave("h:1", "h:0"), "master_client"),
        (lambda: Master(70000), "HA port"),
        (lambda: Master(-1), "HA port"),
    ],
)
def test_invalid_roles_are_refused_naming_the_field(make: object, fragment: str) -> None:
    with pytest.raises(RoleError, match=fragment):
        make()  # type: ignore[operator]


@given(ha_ports | st.just(-1), addresses, st.none() | st.just("") | addresses)
def test_the_configured_role(ha_port: int, master_ha: str, master_client: str | None) -> None:
    slave = configured("slave", ha_port=-1, master_ha=master_ha, master_client=master_client)
    assert slave == Slave(master_ha, master_client or None)
    master = configured("master", ha_port=ha_port, master_ha="", master_client=None)
    assert master == (Master(ha_port) if ha_port >= 0 else Standalone())


# ---- the HA loop's transitions (with etcd) ---------------------------------------------------


@given(roles, ha_ports)
def test_any_role_with_an_ha_port_can_be_elected(role: Role, ha_port: int) -> None:
    if isinstance(role, Standalone):
        with pytest.raises(RoleError, match="without an HA port"):
            elected(role, ha_port)
        return
    assert elected(role, ha_port) == Master(ha_port)


@given(roles, evidence)
def test_only_a_master_is_fenced_and_the_first_reason_stays(role: Role, reason: str) -> None:
    if isinstance(role, Master | Stale):
        fenced = fence(role, reason)
        assert fenced == Fenced(role.ha_port, reason)
        assert fenced.write_refusal(3) is not None  # fenced means no write is taken
    elif isinstance(role, Fenced):
        assert fence(role, reason) is role
    else:
        with pytest.raises(RoleError, match="only a master can be fenced") as refused:
            fence(role, reason)
        assert describe(role) in str(refused.value)


@given(roles, addresses, st.none() | addresses)
def test_an_acknowledging_master_never_follows(
    role: Role, master_ha: str, master_client: str | None
) -> None:
    """A master must be fenced before it follows: it could otherwise ack a write the
    new master never sees."""
    if isinstance(role, Master | Standalone):
        with pytest.raises(RoleError, match="fence it before"):
            follow(role, master_ha, master_client)
        return
    assert follow(role, master_ha, master_client) == Slave(master_ha, master_client)


@given(roles)
def test_only_a_slave_or_candidate_waits_for_an_election(role: Role) -> None:
    if isinstance(role, Slave | Candidate):
        assert vacate(role) == Candidate()
    else:
        with pytest.raises(RoleError, match="waits for an election"):
            vacate(role)


@given(
    roles,
    st.lists(st.tuples(st.sampled_from("efvs"), addresses, ha_ports, evidence), max_size=30),
)
def test_ha_loop_sequences_never_ack_while_following(
    role: Role, steps: list[tuple[str, str, int, str]]
) -> None:
    """Whatever the loop decides in whatever order: a refused change leaves the role as
    it was, and only a master (elected, not fenced since) takes writes."""
    for kind, address, port, reason in steps:
        before = role
        try:
            if kind == "e":
                role = elected(role, port)
            elif kind == "f":
                role = fence(role, reason)
            elif kind == "v":
                role = vacate(role)
            else:
                role = follow(role, address, address)
        except RoleError:
            assert role is before
        assert isinstance(role, ROLE_KINDS)
        takes_writes = role.write_refusal(1) is None
        assert takes_writes == isinstance(role, Master | Standalone)
