"""What users of other logs' tools reach for first, through the real `tidelog` command:
consume with positions and a tag filter, status --watch with a write rate."""

from __future__ import annotations

import datetime
import json
import select
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import CLI, running_node, tidelog
from tools.cli_client import time_argument
from tools.process import NodeProcess

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    with running_node(tmp_path / "node") as process:
        yield process


def test_consume_meta_and_tag_filter(node: NodeProcess) -> None:
    b = node.address
    assert tidelog("topic", "create", "t", "--queues", "2", "-b", b).returncode == 0
    lines = [
        {"body": "a", "queue": 0, "tags": "red"},
        {"body": "b", "queue": 1, "tags": "blue", "props": {"k": "v"}},
        {"body": "c", "queue": 1, "tags": "red"},
    ]
    stdin = "".join(json.dumps(line) + "\n" for line in lines)
    assert tidelog("produce", "t", "--jsonl", "-b", b, stdin=stdin).returncode == 0
    meta = tidelog("consume", "t", "--meta", "-b", b).stdout.splitlines()
    assert sorted(meta) == [
        "queue=0 offset=0 tags=red  a",
        "queue=1 offset=0 tags=blue k=v  b",
        "queue=1 offset=1 tags=red  c",
    ]
    red = tidelog("consume", "t", "--tag", "red", "-b", b).stdout.split()
    assert sorted(red) == ["a", "c"]
    first = tidelog("consume", "t", "--count", "1", "--queue", "1", "-b", b).stdout.split()
    assert first == ["b"]


def test_status_watch_prints_lines_until_ctrl_c(node: NodeProcess) -> None:
    watcher = subprocess.Popen(
        [*CLI, "status", "--watch", "0.05", "--json", "-b", node.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None
        seen = []
        for _ in range(2):
            ready, _, _ = select.select([watcher.stdout], [], [], 30)
            assert ready, "status --watch printed nothing"
            seen.append(json.loads(watcher.stdout.readline()))
        watcher.send_signal(signal.SIGINT)
        _rest, err = watcher.communicate(timeout=30)
    finally:
        watcher.kill()
        watcher.wait()
    assert watcher.returncode == 130 and err == ""
    assert all(line["role"] == "master" and "write_bytes_per_s" in line for line in seen)
    assert all("confirm_offset" in line and "replicated_offset" in line for line in seen)


def test_status_watch_refuses_a_silly_interval() -> None:
    run = tidelog("status", "--watch", "0")
    assert run.returncode == 2 and "positive number of seconds" in run.stderr


def test_debug_level_logs_every_request(node: NodeProcess) -> None:
    run = tidelog("topic", "list", "--log-level", "debug", "-b", node.address)
    assert run.returncode == 0
    assert "request op=list_topics" in run.stderr and "answer=OK" in run.stderr


def test_consume_from_an_offset_past_the_end_reads_from_the_earliest(node: NodeProcess) -> None:
    """The same reset the library's consumer makes, said on stderr."""
    b = node.address
    assert tidelog("topic", "create", "r", "--queues", "1", "-b", b).returncode == 0
    assert tidelog("produce", "r", "-b", b, stdin="a\nb\n").returncode == 0
    run = tidelog("consume", "r", "--from", "7", "-b", b)
    assert run.returncode == 0 and run.stdout.split() == ["a", "b"]
    assert "queue 0 holds offsets 0 to 2, not 7" in run.stderr
    later = tidelog("consume", "r", "--from", "1", "-b", b)
    assert later.stdout.split() == ["b"] and later.stderr == ""


def test_consume_from_a_time(node: NodeProcess) -> None:
    """``--from-time`` with an ISO 8601 time, a relative one and one after everything."""
    b = node.address
    assert tidelog("topic", "create", "ft", "--queues", "2", "-b", b).returncode == 0
    assert tidelog("produce", "ft", "-b", b, stdin="a\nb\n").returncode == 0
    assert tidelog("produce", "ft", "-b", b, stdin="c\n").returncode == 0
    stored = [
        json.loads(line) for line in tidelog("consume", "ft", "--json", "-b", b).stdout.splitlines()
    ]
    c_us = next(m["store_us"] for m in stored if m["body"] == "c")
    assert all(m["store_us"] < c_us for m in stored if m["body"] != "c")
    at_c = EPOCH + datetime.timedelta(microseconds=c_us)
    iso = tidelog("consume", "ft", "--from-time", at_c.isoformat(), "-b", b)
    assert (iso.returncode, iso.stdout.split(), iso.stderr) == (0, ["c"], "")
    naive = at_c.replace(tzinfo=None).isoformat()  # no zone: UTC
    assert tidelog("consume", "ft", "--from-time", naive, "-b", b).stdout.split() == ["c"]
    recent = tidelog("consume", "ft", "--from-time", "-1h", "-b", b).stdout.split()
    assert sorted(recent) == ["a", "b", "c"]
    later = at_c + datetime.timedelta(seconds=1)
    assert tidelog("consume", "ft", "--from-time", later.isoformat(), "-b", b).stdout == ""


@pytest.mark.parametrize("value", ["yesterday", "-10x", "--5m", "2026-13-01"])
def test_consume_from_time_refuses_what_is_not_a_time(value: str) -> None:
    run = tidelog("consume", "t", "--from-time", value)
    assert run.returncode == 2 and "is not a time: use ISO 8601" in run.stderr
    assert "Traceback" not in run.stderr


def test_from_and_from_time_together_are_refused() -> None:
    run = tidelog("consume", "t", "--from", "0", "--from-time", "-1m")
    assert run.returncode == 2 and "not allowed with argument" in run.stderr


def test_relative_times_count_back_from_now() -> None:
    now_s = 1_000_000.0
    assert time_argument("-10m", now_s=now_s) == (now_s - 600) * 1_000_000
    assert time_argument("-1.5h", now_s=now_s) == (now_s - 5400) * 1_000_000
    assert time_argument("-0s", now_s=now_s) == now_s * 1_000_000
    assert time_argument("1970-01-01T00:00:01.000002") == 1_000_002
    assert time_argument("1970-01-01T01:00:01+01:00") == 1_000_000


def test_topic_alter_grows_and_refuses_to_shrink(node: NodeProcess) -> None:
    b = node.address
    assert tidelog("topic", "create", "g", "--queues", "2", "-b", b).returncode == 0
    grown = tidelog("topic", "alter", "g", "--queues", "4", "-b", b)
    assert (grown.returncode, grown.stdout) == (0, "topic g has 4 queues\n")
    described = json.loads(tidelog("topic", "describe", "g", "--json", "-b", b).stdout)
    assert described["queues"] == 4 and len(described["offsets"]) == 4
    shrink = tidelog("topic", "alter", "g", "--queues", "1", "-b", b)
    assert shrink.returncode == 2 and "Traceback" not in shrink.stderr
    assert "BAD_REQUEST" in shrink.stderr and "can only grow" in shrink.stderr
    missing = tidelog("topic", "alter", "nope", "--queues", "3", "-b", b)
    assert missing.returncode == 2 and "tidelog topic create nope" in missing.stderr


def test_node_request_log_writes_a_line_per_request(tmp_path: Path) -> None:
    log_path = tmp_path / "node.log"
    with NodeProcess(tmp_path / "node", extra_args=["--request-log"], log_path=log_path) as node:
        assert tidelog("topic", "list", "-b", node.address).returncode == 0
        # Logged before the answer is sent, into a file the node writes straight to.
        written = log_path.read_text()
    assert " request peer=127.0.0.1:" in written
    assert "op=list_topics topic=- status=OK bytes=" in written and "duration_us=" in written


def test_topic_delete_then_create_starts_empty(node: NodeProcess) -> None:
    b = node.address
    assert tidelog("topic", "create", "d", "--queues", "1", "-b", b).returncode == 0
    assert tidelog("produce", "d", "-b", b, stdin="old\n").returncode == 0
    deleted = tidelog("topic", "delete", "d", "-b", b)
    assert (deleted.returncode, deleted.stdout) == (0, "topic d deleted\n")
    gone = tidelog("consume", "d", "-b", b)
    assert gone.returncode == 2 and "UNKNOWN_TOPIC" in gone.stderr
    assert "tidelog topic create d" in gone.stderr and "Traceback" not in gone.stderr
    again = tidelog("topic", "delete", "d", "-b", b)
    assert again.returncode == 2 and "UNKNOWN_TOPIC" in again.stderr
    assert tidelog("topic", "create", "d", "--queues", "1", "-b", b).returncode == 0
    assert tidelog("produce", "d", "-b", b, stdin="new\n").returncode == 0
    read = tidelog("consume", "d", "--meta", "-b", b)
    assert read.stdout.splitlines() == ["queue=0 offset=0  new"]


def test_an_idempotent_produce_prints_its_id_and_a_restart_with_it_bumps_the_epoch(
    node: NodeProcess,
) -> None:
    b = node.address
    assert tidelog("topic", "create", "ids", "-b", b).returncode == 0
    first = tidelog("produce", "ids", "--idempotent", "--json", "-b", b, stdin="one\n")
    assert first.returncode == 0, first.stderr
    started = json.loads(first.stdout)
    assert started["ok"] == 1 and started["producer_id"] > 0
    again = tidelog(
        "produce", "ids", "--idempotent", "--producer-id", str(started["producer_id"]),
        "--json", "-b", b, stdin="two\n",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    restarted = json.loads(again.stdout)
    assert restarted["producer_id"] == started["producer_id"]
    assert restarted["producer_epoch"] > started["producer_epoch"]
    plain = tidelog("produce", "ids", "--producer-id", "7", "-b", b, stdin="x\n")
    assert plain.returncode == 2 and "--producer-id needs --idempotent" in plain.stderr
