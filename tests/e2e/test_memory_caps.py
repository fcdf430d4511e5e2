"""Issue 8 point 5 against a real ``tidelog node``: its resident memory stays within what
its byte caps allow while clients try to make it buffer without limit.

The attacks are the issue's: many connections each sending a maximal length prefix and
most of the body, in pieces, never finishing the frame; and connections that pipeline
large pulls and never read the answers. Meanwhile a well-behaved producer gets its
durable acks. The node's ``VmRSS`` (``/proc/<pid>/status``) is sampled throughout and
must stay under a bound computed from the configured caps (twice each cap, for the
copies a frame goes through, plus a fixed allowance), not under a measured figure.

On the code before the caps (no request-byte budget, answers buffered per in-flight
slot) the same attacks make the node hold every body and every answer: with the
numbers below about 140 MiB of request bodies and 400 MiB of answers, far past the
bound (checked by running this test with the caps raised to their maxima).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest
import trio

from cluster.client import open_client
from cluster.protocol import Status
from tools.process import NodeProcess

MiB = 1 << 20
MAX_FRAME = 4 * MiB
REQUEST_BUDGET = 16 * MiB
CONNECTION_ANSWERS = 4 * MiB
NODE_ANSWERS = 64 * MiB
MAX_PULL = MAX_FRAME // 2
"""What the node serves per pull at most (half its frame size)."""
SLOW_SENDERS = 40
"""Connections each sending a maximal length prefix and all but a little of the body."""
GRANTED = REQUEST_BUDGET // MAX_FRAME
"""Slow senders whose bodies the request budget lets the node read at once."""
PIPELINERS = 2
PIPELINED_PULLS = 100
"""Pulls of up to :data:`MAX_PULL` each pipeline writes and never reads the answers of."""
DURABLE_SENDS = 40
ALLOWANCE = 48 * MiB
"""Interpreter, allocator slack and the producer's own traffic."""
TOPIC = "memory"


def _rss_bytes(pid: int) -> int:
    """The process's resident set size now, from ``/proc/<pid>/status``."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS line in /proc/{pid}/status")


def _rss_bound(baseline: int) -> int:
    """What the caps let the node hold on top of ``baseline``: every cap twice (a body
    is in the receive buffer and in the decoder; an answer in its frame and the send
    buffer), the request budget plus the one frame granted past it, and each pipelining
    connection's answer cap plus the one answer admitted under it."""
    requests = 2 * (REQUEST_BUDGET + MAX_FRAME)
    answers = 2 * min(NODE_ANSWERS, PIPELINERS * (CONNECTION_ANSWERS + MAX_FRAME))
    return baseline + requests + answers + ALLOWANCE


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    env = {
        "TIDELOG_SERVER_MAX_FRAME_SIZE": str(MAX_FRAME),
        "TIDELOG_SERVER_MAX_BUFFERED_REQUEST_BYTES": str(REQUEST_BUDGET),
        "TIDELOG_SERVER_MAX_CONNECTION_RESPONSE_BYTES": str(CONNECTION_ANSWERS),
        "TIDELOG_SERVER_MAX_BUFFERED_RESPONSE_BYTES": str(NODE_ANSWERS),
    }
    process = NodeProcess(tmp_path / "node", name="capped", env=env)
    try:
        yield process.start()
    finally:
        process.kill()


def _frame(request: dict[str, object]) -> bytes:
    body = cbor2.dumps(request)
    return struct.pack("!I", len(body)) + body


async def _connect(address: str) -> trio.SocketStream:
    host, _, port = address.rpartition(":")
    return await trio.open_tcp_stream(host, int(port))


async def _slow_sender(address: str, sent: trio.MemorySendChannel[str]) -> None:
    """A maximal length prefix, then all but 64 KiB of the body in 64 KiB pieces; the
    frame never completes. Reports once the node took every piece (a sender the node
    does not read stays blocked, the TCP window closed); holds its connection open
    until cancelled."""
    async with sent, await _connect(address) as stream:
        await stream.send_all(struct.pack("!I", MAX_FRAME))
        piece = bytes(64 * 1024)
        for _ in range(MAX_FRAME // len(piece) - 1):
            await stream.send_all(piece)
        await sent.send("slow")
        await trio.sleep_forever()


async def _pipeliner(address: str, sent: trio.MemorySendChannel[str]) -> None:
    """:data:`PIPELINED_PULLS` pulls of the whole queue in one write; never reads."""
    async with sent, await _connect(address) as stream:
        pull = {"v": 1, "op": "pull", "topic": TOPIC, "queue": 0, "offset": 0}
        pull |= {"max_messages": 1000, "max_bytes": MAX_PULL}
        pulls = b"".join(_frame({**pull, "id": i + 1}) for i in range(PIPELINED_PULLS))
        await stream.send_all(pulls)
        await sent.send("pipeline")
        await trio.sleep_forever()


async def _sample_peak(pid: int, peak: list[int]) -> None:
    """Keep ``peak[0]`` at the highest RSS seen until cancelled (a sampler, not a wait)."""
    while True:
        peak[0] = max(peak[0], _rss_bytes(pid))
        await trio.sleep(0.01)


async def test_rss_stays_within_the_caps_under_slow_frames_and_unread_pipelines(
    node: NodeProcess,
) -> None:
    assert node.pid is not None
    async with open_client(node.address) as client:
        await client.admin.create_topic(TOPIC, 1)
        body = bytes(256 * 1024)
        for _ in range(2 * MAX_PULL // len(body)):  # every pull answer is a full one
            answer = await client.call("send", topic=TOPIC, body=body, queue=0, acks="durable")
            assert answer["status"] is Status.OK, answer
        baseline = _rss_bytes(node.pid)
        bound = _rss_bound(baseline)
        peak = [baseline]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_sample_peak, node.pid, peak)
            sent, done = trio.open_memory_channel[str](0)
            async with sent:
                for _ in range(PIPELINERS):
                    nursery.start_soon(_pipeliner, node.address, sent.clone())
                for _ in range(SLOW_SENDERS):
                    nursery.start_soon(_slow_sender, node.address, sent.clone())
            # The attack is on once the pipelines are written and as many slow senders
            # as the request budget grants have had their bodies read (the others wait,
            # unread: that is the cap at work; without it every one would be read).
            finished = {"pipeline": 0, "slow": 0}
            with trio.fail_after(60):
                while finished["pipeline"] < PIPELINERS or finished["slow"] < GRANTED:
                    finished[await done.receive()] += 1
            for index in range(DURABLE_SENDS):
                with trio.fail_after(10):
                    answer = await client.call(
                        "send",
                        topic=TOPIC,
                        body=b"well-behaved %d" % index,
                        queue=0,
                        acks="durable",
                    )
                assert answer["status"] is Status.OK, answer
            peak[0] = max(peak[0], _rss_bytes(node.pid))
            nursery.cancel_scope.cancel()
    assert node.is_running()
    assert peak[0] <= bound, (
        f"node RSS peaked at {peak[0] / MiB:.0f} MiB, over the {bound / MiB:.0f} MiB its caps "
        f"allow (baseline {baseline / MiB:.0f} MiB)"
    )
    assert node.stop() == 0
    assert "Traceback" not in node.stderr
