"""The pure parts of a chaos run: the seeded schedule, the commit-log digest, the settings
and the command that reproduces a run, and the scenarios' fixed schedules."""

from __future__ import annotations

import hashlib
import shlex
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tools.chaos.nemesis import TARGET_ROLES, draw_schedule
from tools.chaos.runner import (
    FailoverCluster,
    RunSettings,
    StaticCluster,
    parse_kinds,
    run_chaos,
    settings_from_args,
    source_revision,
)
from tools.chaos.scenarios import SCENARIOS, required_kinds, scenario_settings
from tools.chaos.workload import commit_log_digest
from tools.cli import build_parser

KINDS = ("kill", "pause", "partition")


@given(
    seed=st.integers(0, 2**32),
    duration_s=st.floats(1.0, 600.0),
    kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=3, unique=True),
)
def test_a_schedule_is_quiet_fault_quiet_and_ends_healed_inside_the_run(
    seed: int, duration_s: float, kinds: list[str]
) -> None:
    schedule = draw_schedule(seed, duration_s, kinds, quiet_s=(2.0, 5.0), hold_s=(1.0, 6.0))
    assert schedule == draw_schedule(seed, duration_s, kinds, quiet_s=(2.0, 5.0), hold_s=(1.0, 6.0))
    previous_end_s = 0.0
    for planned in schedule:
        assert planned.kind in kinds and planned.target in TARGET_ROLES
        assert 1.0 <= planned.hold_s <= 6.0
        assert planned.at_s - previous_end_s >= 2.0 - 1e-3  # a quiet period before each fault
        previous_end_s = planned.at_s + planned.hold_s
        assert previous_end_s + 2.0 <= duration_s + 1e-3  # healed a quiet period before the end
    assert len({planned.fault_id for planned in schedule}) == len(schedule)


def test_a_long_schedule_mixes_every_kind_asked_for() -> None:
    schedule = draw_schedule(7, 600.0, KINDS)
    assert {planned.kind for planned in schedule} == set(KINDS)
    assert draw_schedule(8, 600.0, KINDS) != schedule


def test_a_schedule_needs_a_kind() -> None:
    with pytest.raises(ValueError, match="at least one fault kind"):
        draw_schedule(1, 60.0, [])


def _segment(directory: Path, base: int, data: bytes, size: int) -> None:
    (directory / f"{base:020d}").write_bytes(data.ljust(size, b"\0"))


def test_the_digest_hashes_log_bytes_across_segments_in_chunks(tmp_path: Path) -> None:
    directory = tmp_path / "store" / "commitlog"
    directory.mkdir(parents=True)
    first, second = bytes(range(256)) * 4, b"tail" * 100
    _segment(directory, 0, first, 1024)
    _segment(directory, 1024, second, 1024)
    log_bytes = first + second
    chunks, end = commit_log_digest(tmp_path, 100, 1300, chunk_bytes=500)
    assert end == 1300
    expected = [
        hashlib.sha256(log_bytes[a : min(a + 500, 1300)]).hexdigest() for a in (100, 600, 1100)
    ]
    assert chunks == expected
    # Bytes past what the files hold: the digest says where they ran out.
    chunks, end = commit_log_digest(tmp_path, 0, 4096, chunk_bytes=1500)
    assert end == 2048
    assert chunks == [
        hashlib.sha256(log_bytes.ljust(2048, b"\0")[:1500]).hexdigest(),
        hashlib.sha256(log_bytes.ljust(2048, b"\0")[1500:2048]).hexdigest(),
    ]


def test_the_recorded_command_reproduces_the_settings(tmp_path: Path) -> None:
    settings = settings_from_args(
        duration_s=90, nemesis="kill,pause", acks="durable", seed=11, out=None, bootstrap=None
    )
    command = settings.command(tmp_path / "run")
    words = shlex.split(command)
    assert words[:3] == ["tidelog", "chaos", "run"]
    args = build_parser().parse_args(words[1:])
    again = settings_from_args(
        duration_s=args.duration,
        nemesis=args.nemesis,
        acks=args.acks,
        seed=args.seed,
        out=args.out,
        bootstrap=args.bootstrap,
        producers=args.producers,
        queues=args.queues,
    )
    assert again == RunSettings(
        duration_s=90, nemesis=("kill", "pause"), acks="durable", seed=11, out=tmp_path / "run"
    )


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"duration_s": 0, "nemesis": "kill"}, "--duration must be positive"),
        ({"duration_s": 10, "nemesis": "kill,explode"}, "unknown nemesis 'explode'"),
        ({"duration_s": 10, "nemesis": "kill", "bootstrap": "127.0.0.1:7600"}, "--nemesis none"),
    ],
)
def test_bad_settings_are_refused_with_what_to_do(fields: dict[str, object], words: str) -> None:
    base: dict[str, object] = {"acks": "replicated", "seed": 1, "out": None, "bootstrap": None}
    with pytest.raises(ValueError, match=words):
        settings_from_args(**{**base, **fields})  # type: ignore[arg-type]


def test_every_scenario_has_a_fixed_schedule_and_its_own_command(tmp_path: Path) -> None:
    assert len(SCENARIOS) == 10
    for name, scenario in SCENARIOS.items():
        settings = scenario_settings(name, out=tmp_path / name)
        assert settings.fixed_schedule == scenario.faults
        assert all(p.at_s + p.hold_s < scenario.duration_s for p in scenario.faults)
        assert settings.command(tmp_path / name).startswith(f"tidelog chaos scenario {name} ")
        assert settings.cluster == "failover"
    with pytest.raises(ValueError, match="unknown scenario 'nope'"):
        scenario_settings("nope")


def test_a_static_cluster_refuses_faults_it_cannot_make(tmp_path: Path) -> None:
    cluster = StaticCluster(tmp_path)
    assert required_kinds(cluster, "kill-master") == frozenset()
    assert required_kinds(cluster, "kill-etcd-leader") == {"kill-etcd-leader"}
    with pytest.raises(
        ValueError, match="not available on a static cluster; it supports corrupt, eio, kill"
    ):
        cluster.fault("power-loss", ["n1"], 0)  # no failover: its unsynced acks would go
    assert required_kinds(cluster, "power-loss-master") == {"power-loss"}


def test_both_local_clusters_are_one_launcher_with_each_node_s_fault_switch_on(
    tmp_path: Path,
) -> None:
    static = StaticCluster(tmp_path / "static")
    failover = FailoverCluster(tmp_path / "failover", etcd_members=1)
    assert static.local.coordination == "static" and failover.local.coordination == "etcd"
    for cluster in (static, failover):
        assert cluster.names == ["n1", "n2", "n3"]
        for name in cluster.names:
            env = cluster.local.node_settings[name].env
            assert env["TIDELOG_FAULT_SYNC_LOG"] == str(cluster.sync_log(name).absolute())
            assert env["TIDELOG_FAULT_DISK_CONTROL"] == str(cluster.disk_control(name).absolute())
    with pytest.raises(ValueError, match="needs a three-member etcd"):
        failover.fault("kill-etcd-leader", ["any"], 0)


async def test_a_run_folder_that_holds_a_run_is_refused_before_anything_starts(
    tmp_path: Path,
) -> None:
    """A second run into the same --out used to die on a FileExistsError traceback."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "history.jsonl").write_text("kept\n")
    settings = RunSettings(duration_s=5, nemesis=(), out=run_dir)
    with pytest.raises(ValueError, match=r"already holds a run.*give another --out"):
        await run_chaos(settings, live=False)
    assert (run_dir / "history.jsonl").read_text() == "kept\n"
    assert sorted(p.name for p in run_dir.iterdir()) == ["history.jsonl"]


async def test_a_fault_the_cluster_cannot_make_is_refused_before_anything_starts(
    tmp_path: Path,
) -> None:
    settings = RunSettings(
        duration_s=5, nemesis=("enospc",), cluster="failover", out=tmp_path / "run"
    )
    with pytest.raises(ValueError, match="enospc not available on the failover cluster"):
        await run_chaos(settings, live=False)
    assert not (tmp_path / "run").exists()


def test_the_nemesis_takes_the_cluster_level_kinds_too() -> None:
    assert parse_kinds("kill,kill-etcd-leader,process,switchover") == (
        "kill",
        "pause",
        "kill-etcd-leader",
        "switchover",
    )
    with pytest.raises(ValueError, match="unknown nemesis 'bogus'"):
        parse_kinds("kill-etcd-leader,bogus")


def test_a_run_records_the_revision_and_whether_the_tree_was_dirty_at_its_start() -> None:
    source = source_revision()
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:  # not a git checkout (an exported tree): nothing to record
        assert source == {"git_revision": None, "git_dirty": None}
        return
    assert source["git_revision"] == head.stdout.strip()
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert source["git_dirty"] is bool(status.strip())
