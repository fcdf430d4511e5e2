"""Issue 8 point 4, client port: a real node under a low ``ulimit -n`` meets a flood of
connections and keeps serving, its own files included; it exits cleanly afterwards.

On the old code the flood took every descriptor: accepts failed with EMFILE (logged ten
times a second), connections waited in the backlog unanswered, and a topic created
meanwhile could not be saved.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from cluster.protocol import Status
from tests.cluster.test_server import Raw, open_files_limit
from tests.helpers import node_with_file_limit

NODE_NOFILE = 256
FLOOD = 400
ANSWER_TIMEOUT_S = 15


@pytest.fixture
def limited_node(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, list[str]]]:
    """A ``tidelog node`` whose open-file limit is :data:`NODE_NOFILE` (set in the child
    before it runs), its ``host:port`` and its stderr lines; killed by PID at the end."""

    with node_with_file_limit(tmp_path / "data", NODE_NOFILE) as started:
        yield started


async def _first_answer(raw: Raw) -> dict[str, object] | None:
    """A ``status`` answer, the refusal frame, or None at EOF (a refused connection)."""
    try:
        await raw.send("status")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return None
    return await raw.recv()


async def test_a_connection_flood_under_a_low_fd_limit(
    limited_node: tuple[subprocess.Popen[str], str, list[str]],
) -> None:
    process, address, stderr = limited_node
    host, port = address.rsplit(":", 1)
    with open_files_limit(FLOOD + 200):
        flood = [Raw(await trio.open_tcp_stream(host, int(port))) for _ in range(FLOOD)]
        answers: dict[int, dict[str, object] | None] = {}

        async def ask(index: int, raw: Raw) -> None:
            answers[index] = await _first_answer(raw)

        with trio.move_on_after(ANSWER_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                for index, raw in enumerate(flood):
                    nursery.start_soon(ask, index, raw)
        assert len(answers) == FLOOD, f"{FLOOD - len(answers)} connections never answered"
        served = [flood[i] for i, a in answers.items() if a and a["status"] is Status.OK]
        refused = [a for a in answers.values() if a and a["status"] is not Status.OK]
        assert served, "no connection was served"
        assert len(served) < FLOOD - 100  # the cap sits well below the descriptor limit
        assert all(a["status"] is Status.TOO_MANY_CONNECTIONS for a in refused if a)

        # With the flood still open, the node's own files still open: a topic is saved
        # and a durable write is fsynced.
        worker = served[0]
        await worker.ok("create_topic", topic="while-flooded", queues=1)
        sent = await worker.ok("send", topic="while-flooded", body=b"kept", acks="durable")
        assert sent["offset"] == 0
        assert process.poll() is None
        for raw in flood:
            await raw.aclose()

    process.terminate()
    assert process.wait(timeout=30) == 0, "".join(stderr)
    log = "".join(stderr)
    assert "max_connections_lowered" in log
    assert "Traceback" not in log
