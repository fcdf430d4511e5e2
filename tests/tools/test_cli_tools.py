"""The quickstart's main job and the benchmark commands keep working (figures are not judged)."""

from __future__ import annotations

import json
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
    run = _tidelog("demo", "--rounds", "2", "--acks", "300")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count(", 0 lost; clean stop exit code 0") == 2, run.stdout
    assert "verdict: every acknowledged message survived" in run.stdout
    # Part 2: the master is lost, a slave is promoted, every replicated ack is on both.
    assert run.stdout.count("0 acknowledged ones missing") == 2, run.stdout
    assert "a write after the failover: ok" in run.stdout
    assert "verdict: every replicated ack survived the loss of the master" in run.stdout


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


def test_help_names_every_command() -> None:
    run = _tidelog("--help")
    assert run.returncode == 0
    for command in ("node", "topic", "produce", "consume", "status", "demo", "bench"):
        assert command in run.stdout
    kinds = _tidelog("bench", "--help")
    for kind in ("storage", "produce", "consume", "replication"):
        assert kind in kinds.stdout
