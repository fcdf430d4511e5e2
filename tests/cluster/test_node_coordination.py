"""A node with ``[coordination] etcd`` in this process, against a real etcd: it is elected,
saves its epoch before it serves, refuses ``replicated`` without recorded in-sync
slaves before appending, and a fence takes effect before the call returns."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

from cluster.coordination.etcd import EtcdClient
from cluster.coordination.ha_loop import HaRole
from cluster.coordination.keys import GroupState, LeaderValue, MemberInfo, TopicRecord
from cluster.coordination.settings import CoordinationSettings
from cluster.node import Node
from cluster.node.config import NodeConfig
from cluster.node.coordinated import CoordinatedAcks, Coordinator, wait_until
from replication.epochs import EpochFile, EpochHistory
from replication.master import HAService
from replication.settings import ReplicationSettings
from replication.slave import SlaveReplication
from replication.wire import slave_handshake
from storage import MessageStore, StoreConfig
from tests.e2e.test_failover import call


def _cluster_name(request: pytest.FixtureRequest) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)[:60]


@pytest.fixture
async def node(
    tmp_path: Path, etcd_endpoints: list[str], request: pytest.FixtureRequest
) -> AsyncIterator[Node]:
    extra = getattr(request, "param", {})  # more settings by section, indirect parametrize
    config = NodeConfig.create(
        tmp_path / "solo",
        node={"name": "solo", "port": 0, **extra.get("node", {})},
        replication={"ha_port": 0},
        coordination={
            "etcd": ",".join(etcd_endpoints),
            "cluster": _cluster_name(request),
            **extra.get("coordination", {}),
        },
        topics=extra.get("topics", {}),
    )
    node = Node(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        assert node.coordinator is not None
        with trio.fail_after(10):
            while node.coordinator.loop.role is not HaRole.MASTER:
                await node.coordinator.loop.wait_role_change()
        yield node
        node.request_shutdown()


async def test_the_epoch_is_saved_before_the_first_write(node: Node) -> None:
    assert node.coordinator is not None
    epoch = node.coordinator.loop.epoch
    saved = await trio.to_thread.run_sync(EpochFile.in_dir(node.config.data_dir).load)
    assert saved.current is not None and saved.current.epoch == epoch
    assert node.role.name == "master" and isinstance(node.acks, CoordinatedAcks)
    address = f"{node.address[0]}:{node.address[1]}" if node.address else ""
    created = await call(address, "create_topic", topic="t", queues=1)
    assert created["status"] == "OK"
    answer = await call(address, "send", topic="t", body=b"x", queue=0, acks="leader")
    assert answer["status"] == "OK"


async def test_replicated_is_refused_before_append_without_recorded_slaves(node: Node) -> None:
    assert node.address is not None and node.store is not None
    address = f"{node.address[0]}:{node.address[1]}"
    await call(address, "create_topic", topic="t", queues=1)
    end = node.store.commit_log.max_offset
    answer = await call(address, "send", topic="t", body=b"x", queue=0, acks="replicated")
    assert answer["status"] == "SLAVE_NOT_AVAILABLE", answer
    assert "recorded in-sync" in answer["error"]
    assert node.store.commit_log.max_offset == end


async def test_a_fence_refuses_writes_at_once_and_freezes_reads(node: Node) -> None:
    assert node.address is not None and node.coordinator is not None
    address = f"{node.address[0]}:{node.address[1]}"
    await call(address, "create_topic", topic="t", queues=1)
    assert (await call(address, "send", topic="t", body=b"a", queue=0))["status"] == "OK"
    acks = node.acks
    assert isinstance(acks, CoordinatedAcks)
    limit = acks.read_limit()
    node.coordinator.fence("a test fenced it")
    assert node.role.name == "fenced"
    refused = await call(address, "send", topic="t", body=b"b", queue=0, acks="leader")
    assert refused["status"] == "NOT_MASTER"
    assert "a test fenced it" in refused["error"]
    assert acks.read_limit() == limit
    status = await call(address, "status")
    assert status["writable"] is False and status["role"] == "fenced"


async def test_metadata_names_this_node_as_master(node: Node) -> None:
    assert node.address is not None and node.coordinator is not None
    address = f"{node.address[0]}:{node.address[1]}"
    answer = await call(address, "metadata")
    assert answer["status"] == "OK"
    assert answer["master"]["name"] == "solo" and answer["master"]["client"] == address
    assert answer["epoch"] == node.coordinator.loop.epoch
    assert [m["name"] for m in answer["members"]] == ["solo"]
    assert answer["members"][0]["ha"] == node.coordinator.ha_address


async def _join_group(coordinator: Coordinator, name: str) -> None:
    """Publish a member record for ``name`` (a slave run by the test, not a node), so
    the master's membership check lets it replicate; return once the master saw it."""
    info = MemberInfo(
        node=name,
        group=coordinator.settings.group,
        client_address="127.0.0.1:1",
        ha_address="127.0.0.1:1",
        epoch=0,
        log_end=0,
        clean_start=False,
    )
    await coordinator.etcd.put(coordinator.settings.keys.member(name), info.encode())
    with trio.fail_after(10):  # each next_view() waits for the watch to deliver a listing
        view = await coordinator.loop.next_view()
        while name not in view.members:
            view = await coordinator.loop.next_view()


async def test_a_slave_far_behind_is_recorded_only_once_it_holds_every_acked_record(
    node: Node, tmp_path: Path, store_config: StoreConfig
) -> None:
    """A recorded member may be elected, so it must hold every acked record: a slave that
    connects far behind counts for the confirm offset at once (acks wait for it) but
    joins the recorded in-sync set only once its ack reaches the confirm offset. The
    old rule recorded every slave the replication layer judged in sync."""
    assert node.address is not None and node.coordinator is not None
    coordinator, loop = node.coordinator, node.coordinator.loop
    address = f"{node.address[0]}:{node.address[1]}"
    await call(address, "create_topic", topic="t", queues=1)
    (tmp_path / "fast").mkdir()
    await _join_group(coordinator, "fast")
    await _join_group(coordinator, "behind")
    async with MessageStore.open(store_config) as store:
        follower = SlaveReplication(
            store,
            "fast",
            coordinator.ha_address,
            ReplicationSettings(),
            history=EpochHistory(),
            epoch_file=EpochFile.in_dir(tmp_path / "fast"),
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follower.run)
            with trio.fail_after(10):
                while loop.in_sync is None or "fast" not in loop.in_sync.recorded:
                    await loop.next_view()
            for body in (b"a", b"b", b"c"):
                answer = await call(
                    address, "send", topic="t", body=body, queue=0, acks="replicated"
                )
                assert answer["status"] == "OK", answer
            ha = node.ha
            assert ha is not None and ha.confirm_offset > 0
            behind = trio.socket.socket()
            with behind:
                host, port = coordinator.ha_address.rsplit(":", 1)
                await behind.connect((host, int(port)))
                await slave_handshake(behind, "behind", 0)
                with trio.fail_after(10):
                    assert await wait_until(
                        coordinator.progress,
                        lambda: "behind" in ha.in_sync_slaves(),
                        trio.current_time() + 10,
                    )
                assert "behind" not in coordinator.in_sync_members()
                for _ in range(2):  # a whole step after the membership change
                    await loop.next_view()
                assert "behind" not in loop.counted_in_sync()
                assert "fast" in coordinator.in_sync_members()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "node", [{"topics": {"auto_create": True, "default_queues": 3}}], indirect=True
)
async def test_an_auto_created_topic_is_recorded_in_etcd(node: Node) -> None:
    """A topic a write creates lives in etcd like one the admin op creates, so the next
    master knows it (it used to exist on this node only)."""
    assert node.address is not None and node.coordinator is not None
    coordinator = node.coordinator
    address = f"{node.address[0]}:{node.address[1]}"
    answer = await call(address, "send", topic="auto", body=b"x", acks="leader")
    assert answer["status"] == "OK", answer
    stored = await coordinator.etcd.get(coordinator.settings.keys.topic("auto"))
    assert stored is not None
    assert TopicRecord.decode(stored.key, stored.value).queues == 3
    # recorded elsewhere first (another master, not applied here yet): etcd's count wins
    record = TopicRecord("elsewhere", 5, 0)
    await coordinator.etcd.put(coordinator.settings.keys.topic("elsewhere"), record.encode())
    answer = await call(address, "send", topic="elsewhere", body=b"y", acks="leader")
    assert answer["status"] == "OK", answer
    assert node.topics is not None
    topic = node.topics.get("elsewhere")
    assert topic is not None and topic.queues == 5


@pytest.mark.parametrize(
    "node",
    [{"node": {"host": "0.0.0.0"}, "coordination": {"advertise_host": "127.0.0.1"}}],
    indirect=True,
)
async def test_a_node_listening_on_every_interface_publishes_its_advertised_host(
    node: Node,
) -> None:
    assert node.address is not None and node.coordinator is not None
    coordinator = node.coordinator
    assert node.address[0] == "0.0.0.0"
    address = f"127.0.0.1:{node.address[1]}"
    answer = await call(address, "metadata")
    assert answer["master"]["client"] == address
    assert answer["master"]["ha"] == f"127.0.0.1:{coordinator.ha_port}"
    stored = await coordinator.etcd.get(coordinator.settings.keys.member("solo"))
    assert stored is not None
    info = MemberInfo.decode(stored.key, stored.value)
    assert (info.client_address, info.ha_address) == (address, answer["master"]["ha"])


WAIT_S = 10
"""A bound on waits for events; never a figure the tests assert."""


@asynccontextmanager
async def _dead_master_group(
    tmp_path: Path,
    etcd_endpoints: list[str],
    store_config: StoreConfig,
    request: pytest.FixtureRequest,
    *,
    serving: bool = True,
) -> AsyncIterator[tuple[_TestMaster, Node]]:
    """A group elected before node ``x`` starts (so ``x``, empty, did not start clean),
    led by master ``m`` that this test plays (its HA port on a real store, its keys in a
    real etcd), and ``x``: a real node following it (trying to: not ``serving``, the HA
    port is closed before ``x`` starts)."""
    cluster = _cluster_name(request)
    settings = CoordinationSettings(etcd_endpoints=etcd_endpoints, cluster=cluster)
    history = EpochHistory()
    history.append(1, 0, led=True)
    async with (
        EtcdClient(etcd_endpoints) as etcd,
        MessageStore.open(store_config) as store,
        trio.open_nursery() as nursery,
    ):
        master = _TestMaster(settings, etcd, HAService(store, history=history, name="m"))
        await master.start(nursery)
        if not serving:
            master.scope.cancel()
        config = NodeConfig.create(
            tmp_path / "x",
            node={"name": "x", "port": 0},
            replication={"ha_port": 0},
            coordination={"etcd": ",".join(etcd_endpoints), "cluster": cluster},
        )
        node = Node(config)
        await nursery.start(node.run)
        yield master, node
        node.request_shutdown()
        nursery.cancel_scope.cancel()


@attrs.define
class _TestMaster:
    """Master ``m`` of epoch 1, played by the test: its lease, member, leader and state
    keys, and its HA port serving an empty log."""

    settings: CoordinationSettings
    etcd: EtcdClient
    ha: HAService
    lease_id: int = 0
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)

    async def start(self, nursery: trio.Nursery) -> None:
        keys, group = self.settings.keys, self.settings.group

        async def serve(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
            with self.scope:
                await self.ha.serve("127.0.0.1", 0, task_status=task_status)

        ha_address = f"127.0.0.1:{await nursery.start(serve)}"
        self.lease_id = (await self.etcd.lease_grant(self.settings.lease_ttl_s)).id
        member = MemberInfo("m", group, "127.0.0.1:1", ha_address, 1, 0, True)
        await self.etcd.put(keys.member("m"), member.encode(), lease=self.lease_id)
        await self.record(frozenset({"m"}))
        leader = LeaderValue("m", 1, "127.0.0.1:1", ha_address)
        await self.etcd.put(keys.leader(group), leader.encode(), lease=self.lease_id)

    async def record(self, in_sync: frozenset[str]) -> None:
        state = GroupState(1, "m", in_sync)
        await self.etcd.put(self.settings.keys.state(self.settings.group), state.encode())

    async def die(self) -> None:
        """SIGKILL, as etcd sees it: the lease goes, and with it the leader key."""
        await self.etcd.lease_revoke(self.lease_id)


async def _wait_disconnected(node: Node) -> None:
    assert node.coordinator is not None
    with trio.fail_after(WAIT_S):
        while node.slave is not None and node.slave.connected:
            await node.coordinator.loop.next_view()


async def test_a_slave_recorded_in_sync_is_elected_though_its_master_died_before_it_looked(
    tmp_path: Path,
    etcd_endpoints: list[str],
    store_config: StoreConfig,
    request: pytest.FixtureRequest,
) -> None:
    """A node that started empty into an elected group must catch up before it may lead
    (KIP-966). It did: it followed ``m`` to ``m``'s log end, and ``m`` recorded it in
    sync, but ``m`` died (its stream ended) before this node looked at the recorded
    state again. It must still be elected: the old code asked for a live connection at
    the moment the node saw itself recorded, so the group stayed without a master for
    good (both slaves 'candidate', refused CRASHED_NOT_CAUGHT_UP); this test failed."""
    async with _dead_master_group(tmp_path, etcd_endpoints, store_config, request) as (m, x):
        assert x.coordinator is not None
        loop = x.coordinator.loop
        with trio.fail_after(WAIT_S):
            while "x" not in m.ha.in_sync_slaves():  # caught up: m's log is empty
                await m.ha.wait_membership_change()
        m.scope.cancel()  # m is killed: x's stream ends ...
        await _wait_disconnected(x)
        await m.record(frozenset({"m", "x"}))  # ... and m's record of x lands after that
        await m.die()
        with trio.fail_after(WAIT_S):
            while loop.role is not HaRole.MASTER:
                await loop.wait_role_change()
        assert loop.epoch == 2
        assert x.coordinator.status()["caught_up"] is True
        stored = await m.etcd.get(m.settings.keys.state(m.settings.group))
        assert stored is not None
        state = GroupState.decode(stored.key, stored.value)
        assert (state.epoch, state.master, state.in_sync) == (2, "x", frozenset({"x"}))


async def test_a_node_named_in_sync_that_never_caught_up_since_its_start_is_not_elected(
    tmp_path: Path,
    etcd_endpoints: list[str],
    store_config: StoreConfig,
    request: pytest.FixtureRequest,
) -> None:
    """The safety side: the recorded set names ``x`` from before its restart (a shrink
    ``m`` did not record before it died), but ``x`` never followed ``m`` to its log end
    since: it may lack acked records, so it must not lead, however long it waits."""
    async with _dead_master_group(
        tmp_path, etcd_endpoints, store_config, request, serving=False
    ) as (m, x):
        assert x.coordinator is not None
        loop = x.coordinator.loop
        await m.record(frozenset({"m", "x"}))
        await m.die()
        with trio.fail_after(WAIT_S):
            view = await loop.next_view()
            while view.leader is not None or "m" in view.members:
                view = await loop.next_view()
            for _ in range(3):  # vacancy seen, final log ends published, judged
                await loop.next_view()
        assert loop.role is HaRole.CANDIDATE
        assert x.coordinator.status()["caught_up"] is False
        assert x.slave is None or x.slave.client.caught_up_epoch is None
        assert await m.etcd.get(m.settings.keys.leader(m.settings.group)) is None
