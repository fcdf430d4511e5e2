"""`tidelog bench produce --client trio,asyncio,blocking`: the same workloads from each kind
of client against one real node process, named apart, with their ratios to trio (the
figures themselves are not judged: the machine is shared)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.bench.clients import bench_clients_on, client_ratios, parse_clients, ratios_to_trio
from tools.cli import main
from tools.process import NodeProcess


def test_the_client_list_is_checked_and_kept_in_order() -> None:
    assert parse_clients("trio") == ("trio",)
    assert parse_clients(" blocking, trio ,blocking,asyncio") == ("blocking", "trio", "asyncio")
    with pytest.raises(ValueError, match=r"unknown client curio: use .*trio, asyncio, blocking"):
        parse_clients("trio,curio")
    with pytest.raises(ValueError, match="unknown client"):
        parse_clients(" , ")


def test_an_unknown_client_is_refused_by_the_command_naming_the_choices() -> None:
    with pytest.raises(SystemExit) as refused:
        main(["bench", "produce", "--client", "trio,gevent"])
    assert "--client: unknown client gevent" in str(refused.value.code)
    assert "trio, asyncio, blocking" in str(refused.value.code)


def test_ratios_are_geometric_means_of_matching_workloads_only() -> None:
    trio_run = {
        "a_128B_leader_msgs_per_s": 100.0,
        "a_128B_leader_client_cpu_us_per_msg": 10.0,
        "b_128B_leader_msgs_per_s": 100.0,
        "b_128B_leader_client_cpu_us_per_msg": 10.0,
        "b_128B_leader_node_cpu_us_per_msg": 5.0,
    }
    asyncio_run = {
        "a_128B_leader_asyncio_msgs_per_s": 50.0,  # x0.5
        "a_128B_leader_asyncio_client_cpu_us_per_msg": 40.0,  # x4
        "b_128B_leader_asyncio_msgs_per_s": 200.0,  # x2
        "b_128B_leader_asyncio_client_cpu_us_per_msg": 10.0,  # x1
        "b_128B_leader_asyncio_node_cpu_us_per_msg": 50.0,  # the node's: not the client's
        "c_128B_leader_asyncio_msgs_per_s": 1.0,  # trio has no such workload
    }
    ratios = ratios_to_trio("asyncio", asyncio_run, trio_run)
    assert ratios["client_asyncio_vs_trio_rate_ratio"] == pytest.approx(1.0)  # sqrt(0.5 * 2)
    assert ratios["client_asyncio_vs_trio_client_cpu_ratio"] == pytest.approx(2.0)  # sqrt(4 * 1)
    assert math.isnan(
        ratios_to_trio("blocking", {}, trio_run)["client_blocking_vs_trio_rate_ratio"]
    )


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    process = NodeProcess(tmp_path / "node").start()
    try:
        yield process
    finally:
        process.kill()


async def test_each_client_runs_every_workload_against_the_same_node(node: NodeProcess) -> None:
    assert node.pid is not None
    figures = await bench_clients_on(
        node.address, 0.02, lambda _: None, ("leader",), [node.pid], ("trio", "asyncio", "blocking")
    )
    summary = {key for key in figures if key.startswith("client_")}
    assert summary == {
        f"client_{client}_vs_trio_{figure}"
        for client in ("asyncio", "blocking")
        for figure in ("rate_ratio", "client_cpu_ratio")
    }
    by_client: dict[str, set[str]] = {"trio": set(), "asyncio": set(), "blocking": set()}
    for key in set(figures) - summary:
        client = next((c for c in ("asyncio", "blocking") if f"_leader_{c}" in key), "trio")
        by_client[client].add(key.replace(f"_{client}", "", 1) if client != "trio" else key)
    assert "pipelined_64_128B_leader_msgs_per_s" in by_client["trio"]  # trio's names unchanged
    assert "sequential_1024B_leader_node_cpu_us_per_msg" in by_client["trio"]
    assert by_client["asyncio"] == by_client["trio"]  # the same workloads, the same figures
    assert by_client["blocking"] == by_client["trio"]
    rates = [value for key, value in figures.items() if key.endswith("_msgs_per_s")]
    assert len(rates) == 3 * len([k for k in by_client["trio"] if k.endswith("_msgs_per_s")])
    assert all(rate > 0 for rate in rates)
    assert all(figures[key] > 0 for key in summary)


def test_summary_ratios_cover_every_ack_level_of_a_run() -> None:
    figures = {
        "a_128B_leader_msgs_per_s": 100.0,
        "a_128B_leader_asyncio_msgs_per_s": 50.0,  # x0.5
        "a_128B_durable_msgs_per_s": 10.0,
        "a_128B_durable_asyncio_msgs_per_s": 20.0,  # x2
        "client_asyncio_vs_trio_rate_ratio": 0.5,  # one level's summary: replaced
    }
    ratios = client_ratios(figures, ("trio", "asyncio"))
    assert ratios["client_asyncio_vs_trio_rate_ratio"] == pytest.approx(1.0)  # sqrt(0.5 * 2)
    assert client_ratios(figures, ("asyncio",)) == {}  # nothing to compare with
