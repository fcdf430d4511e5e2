"""`tidelog produce --idempotent` through the real command against a node process: the
messages are stored once each, and a consumer sees its own properties only."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import running_node, tidelog


def test_produce_idempotent_stores_each_line_once(tmp_path: Path) -> None:
    with running_node(tmp_path / "node") as node:
        b = node.address
        assert tidelog("topic", "create", "t", "--queues", "1", "-b", b).returncode == 0
        lines = [json.dumps({"body": f"m{i}", "props": {"n": str(i)}}) for i in range(20)]
        sent = tidelog("produce", "t", "--jsonl", "--idempotent", "-b", b, stdin="\n".join(lines))
        assert sent.returncode == 0, sent.stderr
        read = tidelog("consume", "t", "--json", "-b", b)
        assert read.returncode == 0, read.stderr
        messages = [json.loads(line) for line in read.stdout.splitlines()]
        assert sorted(m["body"] for m in messages) == sorted(f"m{i}" for i in range(20))
        assert all(m["props"] == {"n": m["body"][1:]} for m in messages)
