"""Grudges over a mesh of loopback proxies: the partitions of the root-free backend."""

from __future__ import annotations

import pytest
import trio

from tests.tools.test_faults_proxy import GREETING, Target, connect, receive_exactly, round_trip
from tools.faults.mesh import MeshPartition, ProxyMesh
from tools.faults.topology import isolate, one_way


async def start_mesh(
    nursery: trio.Nursery, names: list[str]
) -> tuple[dict[str, Target], ProxyMesh]:
    targets = {name: Target() for name in names}
    ports = {name: await nursery.start(target.serve) for name, target in targets.items()}
    mesh = ProxyMesh({name: ("127.0.0.1", port) for name, port in ports.items()})
    await mesh.start(nursery)
    return targets, mesh


def port(mesh: ProxyMesh, source: str, destination: str) -> int:
    return int(mesh.address(source, destination).rsplit(":", 1)[1])


async def test_isolating_a_node_holds_its_links_and_not_the_others() -> None:
    async with trio.open_nursery() as nursery:
        targets, mesh = await start_mesh(nursery, ["a", "b", "c"])
        to_a = await connect(port(mesh, "b", "a"))
        async with MeshPartition(mesh, isolate(["a", "b", "c"], "a")):
            await to_a.send_all(b"ping")
            with trio.fail_after(10):
                await mesh.proxy("b", "a").wait_held()
            assert targets["a"].received == b""
            c_to_b = await connect(port(mesh, "c", "b"))
            assert await round_trip(c_to_b, b"unaffected") == b"unaffected"
        assert await receive_exactly(to_a, 4) == b"ping"
        nursery.cancel_scope.cancel()


async def test_one_way_grudge_lets_the_receiver_still_talk() -> None:
    async with trio.open_nursery() as nursery:
        targets, mesh = await start_mesh(nursery, ["a", "b"])
        async with MeshPartition(mesh, one_way(["a"], ["b"])):  # b no longer hears a
            b_to_a = await trio.open_tcp_stream("127.0.0.1", port(mesh, "b", "a"))
            await b_to_a.send_all(b"from b")
            with trio.fail_after(10):
                await mesh.proxy("b", "a").wait_held()  # a's greeting and echo are held
            await targets["a"].wait_received(b"from b")  # a does hear b
            a_to_b = await trio.open_tcp_stream("127.0.0.1", port(mesh, "a", "b"))
            await a_to_b.send_all(b"from a")
            with trio.fail_after(10):
                await mesh.proxy("a", "b").wait_held()
            assert targets["b"].received == b""
        assert await receive_exactly(b_to_a, len(GREETING) + 6) == GREETING + b"from b"
        assert await receive_exactly(a_to_b, len(GREETING) + 6) == GREETING + b"from a"
        nursery.cancel_scope.cancel()


def test_links_must_name_known_targets() -> None:
    with pytest.raises(ValueError, match="no target named 'etcd'"):
        ProxyMesh({"a": ("127.0.0.1", 1)}, links=[("a", "etcd")])
