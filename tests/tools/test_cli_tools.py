"""The quickstart's main job and the benchmark commands keep working (figures are not judged)."""

from __future__ import annotations

import json
import re
import subprocess
import sys


def _tidelog(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_demo_survives_crashes_and_says_so() -> None:
    run = _tidelog("demo", "--rounds", "2", "--acks-per-round", "300")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count(", 0 lost; clean stop exit code 0") == 2, run.stdout
    assert "verdict: every acknowledged message survived" in run.stdout
    # Part 2: the master is lost, a slave is promoted, every replicated ack is on both.
    assert run.stdout.count("0 acknowledged ones missing") == 2, run.stdout
    assert "a write after the failover: ok" in run.stdout
    assert "verdict: every replicated ack survived the loss of the master" in run.stdout
    # The counts on screen add up, and the demo says where its data went and what next.
    for line in run.stdout.splitlines():
        if "messages readable = " in line:
            numbers = re.findall(
                r"(\d+) (?:messages readable|acknowledged \+|written|in flight)", line
            )
            readable, acked, after, in_flight = map(int, numbers)
            assert readable == acked + after + in_flight, line
    assert "where the data went:" in run.stdout and "now removed" in run.stdout
    assert "tidelog node --data-dir" in run.stdout


def test_demo_keeps_the_old_acks_flag() -> None:
    run = _tidelog("demo", "--help")
    assert "--acks-per-round" in run.stdout and "--acks N" in run.stdout
    assert "Part 2" in run.stdout  # the help describes both halves of the demo


def test_bench_storage_reports_every_figure_with_its_floor() -> None:
    run = _tidelog("bench", "storage", "--seconds", "0.05", "--json")
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout)
    for key in (
        "disk_fsync_p99_us",
        "copy_floor_128B_records_per_s",
        "append_128B_records_per_s",
        "append_batch64_128B_records_per_s",
        "group_commit_64w_1024B_p99_us",
        "async_flush_64w_1024B_records_per_s",
        "rollover_with_allocator_max_stall_ms",
        "rollover_without_allocator_max_stall_ms",
    ):
        assert figures[key] > 0, key


def test_bench_produce_reports_rates_with_cpu_per_message_and_floors() -> None:
    run = _tidelog("bench", "produce", "--seconds", "0.05", "--json")
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout)
    for workload in (
        "sequential_1024B_leader",
        "batch64_inflight64_128B_durable",
        "batch64_inflight64_1024B_leader_idempotent",
        "linger_64_senders_1024B_leader",
        "pipelined_64_128B_leader",
    ):
        assert figures[f"{workload}_msgs_per_s"] > 0, workload
        for side in ("client", "node"):  # CPU ticks are 10 ms: a short run may count none
            assert figures[f"{workload}_{side}_cpu_us_per_msg"] >= 0, (workload, side)
    assert figures["sequential_128B_durable_p99_us"] > 0
    assert figures["echo_pipelined_1024B_round_trips_per_s"] > 0


def test_help_names_every_command() -> None:
    run = _tidelog("--help")
    assert run.returncode == 0
    for command in ("node", "topic", "produce", "consume", "status", "demo", "bench"):
        assert command in run.stdout
    kinds = _tidelog("bench", "--help")
    for kind in ("storage", "produce", "consume", "replication"):
        assert kind in kinds.stdout
    produce = _tidelog("bench", "produce", "--help")
    assert "--bootstrap BOOTSTRAP, -b BOOTSTRAP" in produce.stdout
