"""`tidelog bench produce --trace`: where one acknowledged write's time goes, hop by hop.

The nodes start with :data:`replication.hop_trace.ENV` set, so each records when a
write passes each hop (see :mod:`replication.hop_trace`); the client sends one message
at a time at each ``acks`` level and notes when it sent and when the answer came. The
nodes write their hops at their clean exit; :func:`breakdown` joins them by log offset
and gives the median of every hop, in microseconds:

``client_to_admit``
    the request's way to the master: client encode, loopback, the node's read and decode,
    up to the ack policy's admit (the append comes right after).
``admit_to_wait``
    the append, its dispatch, and starting the ack wait.
``admit_to_arrival``
    up to the master's replication side hearing of the append.
``arrival_to_first_send`` / ``arrival_to_last_send``
    until the chunk's send to the first / the last slave began.
``first_send_call`` / ``last_send_call``
    how long the send to the first / the last slave took, call to return. On a machine
    with fewer cores than processes the first one can last as long as that slave's
    whole turn: the kernel may run the woken slave on the master's core before the
    call returns (a loopback wake-up is a "sync" one), and the next slave's bytes wait.
``send_to_slave_received``, ``slave_received_to_applied``, ``slave_applied_to_ack_sent``
    each slave (pooled): the send, loopback and wake-up; the append and dispatch; up to
    the ack's send.
``ack_sent_to_master_heard``
    the ack's way back, until the master's ack reader ran.
``last_heard_to_confirmed``
    the slowest slave's ack to the confirm offset moving.
``confirmed_to_released``
    the waiting write's task resuming.
``wait_to_fsynced``
    (``durable``, ``replicated``) the group commit's fsync as the write's wait saw it.
``admit_to_sync_began``, ``sync_call``, ``sync_ended_to_fsynced``
    (``durable``, ``replicated``) the same fsync from the commit log's sync thread: when
    its fdatasync began (after the append, the handler starting it, and the thread
    waking and taking the GIL, which the loop holds until it parks), how long the
    fdatasync and the file check took there, and from their end until the write's wait
    resumed (the thread retaking the GIL, waking the loop, the loop's callback and the
    waiting task's turn).
``released_to_client``
    the answer: encode, the connection's writer, loopback, the client's read and decode.
``total``
    the client's own round trip.
"""

from __future__ import annotations

import bisect
import os
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from cluster.client import open_client
from replication.hop_trace import ENV, load
from tools.process import NodeProcess

__all__ = ["ClientSend", "breakdown", "run_trace"]

ProgressFn = Callable[[str], None]
TRACE_SIZE = 1024
MASTER = "master"

ClientSend = tuple[int, float, float]
"""One traced send: (the record's log offset, sent at, answered at), ``perf_counter`` s."""
Hops = dict[str, dict[int, float]]
"""One process's hops: hop name -> log offset -> when (the first time it was seen)."""


def _index(records: Sequence[tuple[str, int, float]]) -> Hops:
    hops: Hops = defaultdict(dict)
    for hop, offset, at in records:
        hops[hop].setdefault(offset, at)
    return hops


def _write_end(starts: Mapping[int, float], ends: Sequence[int], offset: int) -> int | None:
    """The end offset of the write that starts at ``offset``: the first key past it among
    the waits' ends and the admits' starts (an ``acks=leader`` write has no wait: the
    next write, sent after its answer, starts where it ended)."""
    index = bisect.bisect_right(ends, offset)
    return ends[index] if index < len(ends) and offset in starts else None


def breakdown(
    sends: Sequence[ClientSend],
    master: Sequence[tuple[str, int, float]],
    slaves: Mapping[str, Sequence[tuple[str, int, float]]],
) -> dict[str, float]:
    """The median of each hop (module doc) over ``sends``, in microseconds, from the
    master's and each slave's recorded hops; a hop no send passed is left out. Sends
    whose write cannot be matched (a chunk carrying two writes) drop out of the hops
    they cannot be placed in, not out of the others."""
    m = _index(master)
    s = {name: _index(records) for name, records in slaves.items()}
    ends = sorted(set(m.get("m.wait", {})) | set(m.get("m.admit", {})))
    samples: dict[str, list[float]] = defaultdict(list)

    def add(name: str, later: float | None, earlier: float | None) -> None:
        if later is not None and earlier is not None:
            samples[name].append((later - earlier) * 1e6)

    for offset, sent_at, answered_at in sends:
        samples["total"].append((answered_at - sent_at) * 1e6)
        end = _write_end(m.get("m.admit", {}), ends, offset)
        if end is None:
            continue
        admit = m["m.admit"][offset]
        wait = m.get("m.wait", {}).get(end)
        add("client_to_admit", admit, sent_at)
        add("admit_to_wait", wait, admit)
        arrival = m.get("m.arrival", {}).get(end)
        add("admit_to_arrival", arrival, admit)
        calls = sorted(  # (send started, send call returned) per slave, first send first
            (
                (started, m.get(f"m.sent:{name}", {}).get(end))
                for name in s
                if (started := m.get(f"m.send:{name}", {}).get(end)) is not None
            ),
            key=lambda call: call[0],
        )
        if calls and len(calls) == len(s):
            add("arrival_to_first_send", calls[0][0], arrival)
            add("arrival_to_last_send", calls[-1][0], arrival)
            add("first_send_call", calls[0][1], calls[0][0])
            add("last_send_call", calls[-1][1], calls[-1][0])
        heard = []
        for name, hops in s.items():
            received = hops.get("s.received", {}).get(end)
            applied = hops.get("s.applied", {}).get(end)
            acked = hops.get("s.ack", {}).get(end)
            master_heard = m.get(f"m.acked:{name}", {}).get(end)
            add("send_to_slave_received", received, m.get(f"m.send:{name}", {}).get(end))
            add("slave_received_to_applied", applied, received)
            add("slave_applied_to_ack_sent", acked, applied)
            add("ack_sent_to_master_heard", master_heard, acked)
            heard.append(master_heard)
        confirmed = m.get("m.confirmed", {}).get(end)
        if heard and None not in heard:
            add("last_heard_to_confirmed", confirmed, max(h for h in heard if h is not None))
        released = m.get("m.released", {}).get(end)
        fsynced = m.get("m.fsynced", {}).get(end)
        add("confirmed_to_released", released, confirmed)
        add("wait_to_fsynced", fsynced, wait)
        sync_began = m.get("m.sync_began", {}).get(end)
        sync_ended = m.get("m.sync_ended", {}).get(end)
        add("admit_to_sync_began", sync_began, admit)
        add("sync_call", sync_ended, sync_began)
        add("sync_ended_to_fsynced", fsynced, sync_ended)
        add("released_to_client", answered_at, released if released is not None else fsynced)
    return {f"{name}_p50_us": statistics.median(values) for name, values in samples.items()}


async def _traced_sends(address: str, acks: str, seconds: float) -> list[ClientSend]:
    body = os.urandom(TRACE_SIZE)
    topic = "bench-trace"
    sends: list[ClientSend] = []
    async with open_client(address) as client:
        await client.admin.create_topic(topic, 1, exist_ok=True)
        producer = client.producer(acks=acks, batch_size=1)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            sent_at = time.perf_counter()
            result = (await producer.send(topic, body, queue=0)).raise_for_outcome()
            answered_at = time.perf_counter()
            assert result.offset is not None
            sends.append((result.offset, sent_at, answered_at))
    return sends


async def run_trace(
    replicas: int, acks_levels: tuple[str, ...], seconds: float, progress: ProgressFn
) -> dict[str, float]:
    """Start traced nodes (a master and ``replicas`` slaves, or one node), send 1 KiB
    messages one at a time for ``seconds`` at each level, stop the nodes, and return
    ``trace_{size}B_{acks}_{hop}_p50_us`` for every hop (see the module doc)."""
    from tools.bench.produce import start_replicated

    root = Path(tempfile.mkdtemp(prefix="tidelog-trace-"))
    processes: list[NodeProcess] = []
    sends: dict[str, list[ClientSend]] = {}
    try:

        def traced(name: str) -> dict[str, str]:
            return {ENV: str(root / f"{name}.hops")}

        if replicas > 0:
            address = await start_replicated(root, replicas, processes, progress, node_env=traced)
        else:
            progress("starting a node")
            node = NodeProcess(root / MASTER, name=MASTER, env=traced(MASTER))
            processes.append(node)
            address = node.start().address
        for acks in acks_levels:
            progress(f"trace: {acks}, one {TRACE_SIZE} B message at a time")
            sends[acks] = await _traced_sends(address, acks, seconds)
        for process in reversed(processes):  # slaves first; each writes its hops at exit
            process.stop()
        hops = {process.name: load(root / f"{process.name}.hops") for process in processes}
        master = hops.pop(MASTER)
        figures: dict[str, float] = {}
        for acks, traced_sends in sends.items():
            for name, value in breakdown(traced_sends, master, hops).items():
                figures[f"trace_{TRACE_SIZE}B_{acks}_{name}"] = value
        return figures
    finally:
        for process in reversed(processes):
            if process.is_running():
                process.kill()
        shutil.rmtree(root, ignore_errors=True)
