"""`tidelog bench produce`: each ack level is measured on nodes of its own, as the peers
get a fresh server per level, so no level pays for the writeback of the one before (the
figures themselves are not judged: the machine is shared)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tools.bench.produce import IN_FLIGHT, _nodes_for, _senders, run_bench


async def test_each_ack_level_runs_on_fresh_nodes() -> None:
    said: list[str] = []
    figures = await run_bench(
        "produce", None, seconds=0.01, acks_levels=("leader", "durable"), progress=said.append
    )
    assert said.count("starting a node") == 2  # one per level, not one for the run
    starts = [i for i, line in enumerate(said) if line == "starting a node"]
    durable_work = [i for i, line in enumerate(said) if "_durable:" in line]
    leader_work = [i for i, line in enumerate(said) if "_leader:" in line]
    assert max(leader_work) < starts[1] < min(durable_work)  # the second node after leader's
    for acks in ("leader", "durable"):
        for size in (128, 1024):
            assert figures[f"pipelined_64_{size}B_{acks}_msgs_per_s"] > 0
            assert figures[f"sequential_{size}B_{acks}_p50_us"] > 0


async def test_fresh_nodes_are_stopped_and_their_directory_removed(tmp_path: Path) -> None:
    directory = tmp_path / "level-0"
    async with _nodes_for(None, directory, 0, lambda _: None) as (address, pids):
        assert address and len(pids) == 1 and directory.is_dir()
        os.kill(pids[0], 0)  # alive while measured
    assert not directory.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)


async def test_a_given_node_is_measured_as_it_is(tmp_path: Path) -> None:
    async with _nodes_for("127.0.0.1:1", tmp_path / "unused", 0, lambda _: None) as found:
        assert found == ("127.0.0.1:1", [])  # no PIDs: its CPU is not ours to count
    assert not (tmp_path / "unused").exists()


async def test_a_window_over_before_the_senders_ran_still_measures_each_once() -> None:
    steps: list[int] = []

    async def step(index: int) -> int:
        steps.append(index)
        return 1

    rate = await _senders(0.0, step)  # a loaded machine: the window passed before any ran
    assert sorted(steps) == list(range(IN_FLIGHT)) and rate > 0
