"""What users of other logs' tools reach for first, through the real `tidelog` command:
consume with positions and a tag filter, status --watch with a write rate."""

from __future__ import annotations

import json
import select
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import CLI, running_node, tidelog
from tools.process import NodeProcess


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
