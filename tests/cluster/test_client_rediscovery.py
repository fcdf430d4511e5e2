"""The client finding its way in a cluster: connections it leaves behind are closed, and
(once nodes serve ``metadata``) a lost or demoted master is found again.

Pure routing decisions with hypothesis; the behaviour against in-process nodes under both
anyio backends: the nodes run in a trio loop on a thread of their own, the client in the
test's loop, trio or asyncio (see :mod:`tests.cluster.client_harness`). Tests synchronise
on events and answers, never on sleeps.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from hypothesis import given
from hypothesis import strategies as st

from cluster.client import ConsumedMessage, open_client
from cluster.client.routing import (
    Attempt,
    ClusterView,
    Step,
    best_view,
    next_step,
    view_from_metadata,
    view_from_status,
)
from cluster.protocol import Status, encode_frame
from cluster.protocol.address import format_address
from cluster.protocol.codec import FrameDecoder
from tests.cluster.client_harness import (
    BACKENDS,
    NodesInTrioThread,
    ThreadNode,
    nodes,
    run,
    take,
)
from tests.cluster.test_node import no_garbage_collection
from tests.cluster.test_server import until

__all__ = ["nodes"]

# ---- connections left behind ---------------------------------------------------------------


@BACKENDS
def test_leaving_an_open_client_closes_its_socket(
    backend: str, nodes: NodesInTrioThread, tmp_path: Path
) -> None:
    """Leaving ``open_client`` cancels the client's nursery and its connections at once; the
    reader's socket used to stay open until garbage collection (the close came after the
    cancelled read loop and never ran). Fails on the old code: 5 connections stay open."""
    running = nodes.start(tmp_path / "node")
    server = running.node.server
    assert server is not None

    async def closed() -> None:  # in the node's loop, where its count changes
        await until(lambda: server.connections == 0)

    async def body() -> None:
        for _ in range(5):
            async with open_client(running.address) as client:
                await client.admin.status()
        await anyio.to_thread.run_sync(nodes.call, closed)

    with no_garbage_collection():
        run(backend, body)


# ---- routing decisions (pure) ---------------------------------------------------------------

STATUSES = st.sampled_from(list(Status))
ADDRESSES = st.sampled_from(["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"])


@st.composite
def attempts(draw: st.DrawFn) -> Attempt:
    sent = draw(st.booleans())
    status = draw(st.none() | STATUSES) if sent else None
    return Attempt(
        sent=sent,
        status=status,
        address=draw(st.none() | ADDRESSES),
        hint=draw(st.none() | ADDRESSES),
    )


@given(attempts(), st.booleans(), st.booleans(), st.booleans(), st.booleans())
def test_next_step_resends_only_what_was_certainly_not_applied(
    attempt: Attempt, resends_left: bool, time_left: bool, followed: bool, may_wait: bool
) -> None:
    step = next_step(
        attempt,
        resends_left=resends_left,
        time_left=time_left,
        followed_hint_last=followed,
        may_wait_for_nodes=may_wait,
    )
    maybe_applied = attempt.sent and (attempt.status is None or not attempt.status.retryable)
    if maybe_applied or not (resends_left and time_left):
        assert step is Step.DONE
    if step is Step.FOLLOW_HINT:
        assert attempt.status is Status.NOT_MASTER and attempt.hint != attempt.address
        assert not followed  # two hints in a row: ask the nodes instead
    if not attempt.sent and resends_left and time_left:
        assert step is (Step.REDISCOVER if may_wait else Step.DONE)


def test_next_step_cases() -> None:
    here, there = "127.0.0.1:7001", "127.0.0.1:7002"
    budget = {"resends_left": True, "time_left": True}
    not_master = Attempt(sent=True, status=Status.NOT_MASTER, address=here, hint=there)
    assert next_step(not_master, **budget) is Step.FOLLOW_HINT
    assert next_step(not_master, **budget, followed_hint_last=True) is Step.REDISCOVER
    no_hint = Attempt(sent=True, status=Status.NOT_MASTER, address=here)
    assert next_step(no_hint, **budget) is Step.REDISCOVER
    busy = Attempt(sent=True, status=Status.SLAVE_NOT_AVAILABLE, address=here)
    assert next_step(busy, **budget) is Step.PAUSE
    lost = Attempt(sent=True, status=None, address=here)
    assert next_step(lost, **budget) is Step.DONE
    refused = Attempt(sent=False, status=None, address=here)
    assert next_step(refused, **budget) is Step.REDISCOVER
    assert next_step(refused, **budget, may_wait_for_nodes=False) is Step.DONE


VIEWS = st.builds(
    ClusterView,
    source=ADDRESSES,
    epoch=st.none() | st.integers(0, 5),
    master=st.none() | ADDRESSES,
    members=st.tuples(ADDRESSES),
)


@given(st.lists(VIEWS, max_size=6), st.randoms())
def test_best_view_names_the_master_of_the_highest_epoch_whatever_the_order(
    views: list[ClusterView], rng: random.Random
) -> None:
    best = best_view(views)
    naming = [view for view in views if view.master is not None]
    if not naming:
        assert best is None
        return
    assert best is not None and best in naming
    top = max(-1 if view.epoch is None else view.epoch for view in naming)
    assert (-1 if best.epoch is None else best.epoch) == top
    shuffled = list(views)
    rng.shuffle(shuffled)
    reordered = best_view(shuffled)
    assert (
        reordered is not None
        and (reordered.epoch, reordered.master)
        == (
            best.epoch,
            best.master,
        )
    ) or any(  # same epoch, different masters: only possible in made-up views
        view.epoch == best.epoch and view.master != best.master for view in naming
    )


def test_views_from_metadata_and_status() -> None:
    answer = {
        "status": Status.OK,
        "epoch": 4,
        "master": {"name": "node-2", "client": "127.0.0.1:7002", "ha": "127.0.0.1:8002"},
        "members": [
            {"name": "node-1", "client": "127.0.0.1:7001"},
            {"name": "node-2", "client": "127.0.0.1:7002"},
            {"name": "odd", "client": "not an address"},
        ],
    }
    view = view_from_metadata("127.0.0.1:7001", answer)
    assert view == ClusterView(
        "127.0.0.1:7001", 4, "127.0.0.1:7002", ("127.0.0.1:7001", "127.0.0.1:7002")
    )
    assert view_from_metadata("127.0.0.1:7001", {"master": None}).master is None
    master = view_from_status("127.0.0.1:7001", {"role": "master", "writable": True, "epoch": 2})
    assert (master.master, master.epoch) == ("127.0.0.1:7001", 2)
    assert view_from_status("127.0.0.1:7001", {"role": "slave", "epoch": 2}).master is None


# ---- failover against in-process nodes -------------------------------------------------------


def master_and_slave(nodes: NodesInTrioThread, tmp_path: Path) -> tuple[ThreadNode, ThreadNode]:
    master = nodes.start(tmp_path / "a", name="node-a", ha_port=0)
    assert master.node.ha_address is not None
    slave = nodes.start(
        tmp_path / "b",
        name="node-b",
        role="slave",
        master_ha=format_address(*master.node.ha_address),
        master_client=master.address,
    )
    return master, slave


async def promote(address: str) -> dict[str, Any]:
    async with open_client(address) as admin:
        return await admin.checked("promote", ha_port=0)


@BACKENDS
def test_a_producer_finds_the_new_master_after_the_old_one_is_gone(
    backend: str, nodes: NodesInTrioThread, tmp_path: Path
) -> None:
    master, slave = master_and_slave(nodes, tmp_path)

    async def body() -> None:
        async with open_client([slave.address, master.address]) as client:
            await client.admin.create_topic("t", 1)  # the slave's hint names the master
            assert client.master == master.address
            producer = client.producer(acks="replicated", retry_backoff_ms=1)
            first = await producer.send("t", b"before")
            assert (first.outcome, first.queue_offset) == ("ok", 0)
            await anyio.to_thread.run_sync(nodes.stop, master)
            await promote(slave.address)
            after = await producer.send("t", b"after", acks="durable")  # no slave left
            assert (after.outcome, after.status, after.queue_offset) == ("ok", Status.OK, 1)
            assert client.master == slave.address
            assert client.rediscoveries >= 1

    run(backend, body)


@BACKENDS
def test_a_write_without_an_answer_is_never_resent(
    backend: str, nodes: NodesInTrioThread, tmp_path: Path
) -> None:
    """A master that takes the request and hangs up: the outcome is unknown, and the
    client does not resend it elsewhere even with resends and a new master to hand."""
    other = nodes.start(tmp_path / "other", name="other")
    received = 0

    async def swallow(stream: anyio.abc.SocketStream) -> None:
        nonlocal received
        async with stream:
            if await stream.receive(65536):
                received += 1

    async def body() -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        silent = f"127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"
        async with listener, anyio.create_task_group() as group:
            group.start_soon(listener.serve, swallow)
            async with open_client([other.address, silent]) as client:
                await client.admin.create_topic("t", 1)  # on "other", the first address
                client.master = silent  # as a hint would have said
                result = await client.producer(retries=10, retry_backoff_ms=1).send("t", b"m")
                assert (result.outcome, result.status) == ("unknown", None)
                assert received == 1
                described = await client.admin.offsets("t", 0)
                assert described[0]["max_offset"] == 0  # not resent to the other node
            group.cancel_scope.cancel()

    run(backend, body)


@BACKENDS
def test_a_read_answered_shutting_down_goes_to_another_node(
    backend: str, nodes: NodesInTrioThread, tmp_path: Path
) -> None:
    """A node going away stops accepting, then answers new requests ``SHUTTING_DOWN``
    (nothing done) and closes. A read it answered so is read again from another node,
    as when the connection broke. Fails on the old code: the answer was final, so a
    consumer's pull raised ``SHUTTING_DOWN`` while its master shut down gracefully (seen
    in the consumer failover test below once the node ran in a thread of its own)."""
    node = nodes.start(tmp_path)
    answered: list[str] = []

    async def shut_down(listener: anyio.abc.SocketListener) -> None:
        stream = await listener.accept()
        await listener.aclose()  # like a node shutting down: accepts no more
        async with stream:
            decoder = FrameDecoder()
            while not answered:
                decoder.feed(await stream.receive(65536))
                for request in decoder:
                    assert isinstance(request, dict)
                    answered.append(request["op"])
                    reply = {"v": 1, "id": request["id"], "status": "SHUTTING_DOWN"}
                    await stream.send(encode_frame(reply))

    async def body() -> None:
        async with open_client(node.address) as admin:
            await admin.admin.create_topic("t", 1)
            assert (await admin.producer(acks="durable").send("t", b"m")).ok
        [listener] = (await anyio.create_tcp_listener(local_host="127.0.0.1")).listeners
        assert isinstance(listener, anyio.abc.SocketListener)
        going = f"127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"
        async with anyio.create_task_group() as group:
            group.start_soon(shut_down, listener)
            async with open_client([going, node.address]) as client:
                offsets = await client.admin.offsets("t")
        assert answered == ["get_offsets"]
        assert [entry["max_offset"] for entry in offsets] == [1]

    run(backend, body)


@BACKENDS
def test_a_consumer_continues_at_its_offsets_on_the_new_master(
    backend: str, nodes: NodesInTrioThread, tmp_path: Path
) -> None:
    """A master and two slaves; the consumer reads from the master, which goes away; a
    slave is promoted and the other follows it; the consumer reads on from the same
    positions (the new master serves what its slave confirmed)."""
    master, slave = master_and_slave(nodes, tmp_path)
    assert master.node.ha_address is not None
    other = nodes.start(
        tmp_path / "c",
        name="node-c",
        role="slave",
        master_ha=format_address(*master.node.ha_address),
        master_client=master.address,
    )
    taken: list[ConsumedMessage] = []

    async def body() -> None:
        async with open_client([master.address, slave.address]) as client:
            await client.admin.create_topic("t", 1)
            producer = client.producer(acks="replicated", retry_backoff_ms=1)
            for i in range(3):
                assert (await producer.send("t", b"m%d" % i)).ok
            async with client.consumer("t", start="earliest", wait_ms=200) as consumer:
                taken.extend(await take(consumer, 3))
                await anyio.to_thread.run_sync(nodes.stop, master)
                promoted = await promote(slave.address)
                async with open_client(other.address) as admin:
                    await admin.checked(
                        "repoint", master_ha=promoted["ha_address"], master_client=slave.address
                    )
                for i in range(3, 5):
                    assert (await producer.send("t", b"m%d" % i)).ok
                taken.extend(await take(consumer, 2))
                assert consumer.positions == {0: 5}

    run(backend, body)
    assert [(m.queue_offset, m.body) for m in taken] == [(i, b"m%d" % i) for i in range(5)]
