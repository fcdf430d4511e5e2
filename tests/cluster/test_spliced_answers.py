"""Records answers written from the log's own buffers (``writev``): the same bytes as an
encoded frame, resumed after partial writes, and safe while the log is cut or its old
segments are deleted under a client that reads slowly."""

from __future__ import annotations

import itertools
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from cluster.client.consumer import consumed_messages
from cluster.node import Node
from cluster.protocol import (
    MAX_FRAME_SIZE_LIMIT,
    RECORDS_FORMAT,
    ResponseDecoder,
    encode_frame,
)
from cluster.protocol.spliced import SplicedBytes, cbor_head, encode_spliced_frame
from cluster.server.connection import _buffers
from storage.lent_views import LentViews
from storage.record_runs import RecordRuns
from tests.cluster.test_server import Raw, client, node_config, running

RECEIVE_BUFFER = 4096
"""The slow client's receive buffer: a page of records is many times this."""
BODY = 3000
MESSAGES = 120


def split(data: bytes, cuts: list[int]) -> list[Any]:
    """``data`` as views between the sorted ``cuts`` (empty pieces included)."""
    view = memoryview(data)
    points = [0, *sorted(min(cut, len(data)) for cut in cuts), len(data)]
    return [view[a:b] for a, b in itertools.pairwise(points)]


plain = st.one_of(st.integers(min_value=-(2**63), max_value=2**64 - 1), st.text(max_size=30))


@given(
    before=st.dictionaries(st.text(max_size=8).map(lambda k: "a" + k), plain, max_size=30),
    after=st.dictionaries(st.text(max_size=8).map(lambda k: "z" + k), plain, max_size=30),
    size=st.sampled_from([0, 1, 23, 24, 255, 256, 65535, 65536, 70_000]),
    cuts=st.lists(st.integers(min_value=0, max_value=70_000), max_size=5),
)
def test_a_spliced_frame_is_the_encoded_frame(
    before: dict[str, Any], after: dict[str, Any], size: int, cuts: list[int]
) -> None:
    """Head, bytes and tail are byte for byte what cbor2 encodes for the joined map,
    whatever the number of entries around the byte string and its length (each length
    form of a CBOR head)."""
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    whole = {**before, "records": data, **after}
    spliced = {**before, "records": SplicedBytes(split(data, cuts), size), **after}
    frame = encode_spliced_frame(spliced, "records", max_frame_size=MAX_FRAME_SIZE_LIMIT)
    assert frame.joined() == encode_frame(whole, max_frame_size=MAX_FRAME_SIZE_LIMIT)
    assert frame.size == len(frame.joined())
    assert encode_frame(spliced, max_frame_size=MAX_FRAME_SIZE_LIMIT) == frame.joined()


def test_cbor_heads_are_cbor2s() -> None:
    """Every length form: an unsigned integer's head (major 0) with the major type's
    bits set, as cbor2 writes it; and a byte string's head as cbor2 writes the string."""
    for length in (0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32):
        probe = cbor2.dumps(length)
        for major in (2, 5):
            assert cbor_head(major, length) == bytes([probe[0] | major << 5]) + probe[1:]
    for length in (0, 23, 24, 255, 256, 65535, 65536):
        assert cbor2.dumps(bytes(length)) == cbor_head(2, length) + bytes(length)


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=8),
    skip=st.integers(min_value=0, max_value=400),
    limit=st.integers(min_value=1, max_value=5),
)
def test_resuming_after_a_partial_write_lists_the_unsent_bytes(
    sizes: list[int], skip: int, limit: int
) -> None:
    """What the writer lists after ``skip`` bytes went out: exactly the rest, in order,
    up to ``limit`` buffers (spliced pieces interleaved with encoded ones)."""
    pieces: list[Any] = []
    for index, size in enumerate(sizes):
        data = bytes([index]) * size
        pieces.append(SplicedBytes(split(data, [size // 3]), size) if index % 2 else data)
    flat = b"".join(p.joined() if isinstance(p, SplicedBytes) else p for p in pieces)
    skip = min(skip, len(flat))
    index, rest = 0, skip
    while index < len(pieces) and rest >= len(pieces[index]):
        rest -= len(pieces[index])
        index += 1
    every = _buffers(pieces, index, rest, limit=None)
    assert b"".join(every) == flat[skip:]
    assert all(len(buffer) for buffer in every)
    assert _buffers(pieces, index, rest, limit=limit) == every[:limit]


def test_a_cut_copies_the_lent_views_past_it() -> None:
    """``copy_from`` turns the views reaching past the cut into copies (same bytes), leaves
    the others lent, and the views are released when the loan is given back."""
    log = bytearray(b"".join(bytes([n]) * 10 for n in range(6)))
    view = memoryview(log)
    runs = RecordRuns([(0, view[0:20]), (30, view[30:40]), (50, view[50:60])], 3, 40, 3, 0, 3)
    lender = LentViews()
    loan = lender.lend(runs)
    lender.copy_from(35)
    assert [type(part) for part in loan.parts] == [memoryview, bytes, bytes]
    log[30:] = bytes(30)  # what the cut's zeroing does
    assert b"".join(loan.parts) == b"".join(bytes([n]) * 10 for n in (0, 1, 3, 5))
    lent_view = runs.runs[0][1]
    loan.give_back()
    assert len(lender) == 0
    with pytest.raises(ValueError, match="released"):
        len(lent_view)


# ---- a real node, a client that reads slowly ---------------------------------------------


@asynccontextmanager
async def slow_client(node: Node) -> AsyncIterator[Raw]:
    """A client whose socket takes little at a time: the node's answers wait in its
    out queue and go out in many partial writes."""
    assert node.address is not None
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    await sock.connect(node.address[:2])
    raw = Raw(trio.SocketStream(sock))
    try:
        yield raw
    finally:
        await raw.aclose()


async def filled(node: Node) -> list[bytes]:
    """Topic ``t`` (one queue) with :data:`MESSAGES` bodies that span several segments."""
    bodies = [bytes([index % 251]) * BODY for index in range(MESSAGES)]
    async with client(node) as c:
        await c.ok("create_topic", topic="t", queues=1)
        for start in range(0, MESSAGES, 10):
            batch = [{"body": body} for body in bodies[start : start + 10]]
            await c.ok("send_batch", topic="t", messages=batch, acks="leader")
    return bodies


async def pulls_waiting(node: Node, slow: Raw, offsets: list[int]) -> None:
    """Send a records pull per offset, then wait until their answers sit lent in the
    node's out queue (the client reads nothing meanwhile)."""
    assert node.store is not None
    for offset in offsets:
        await slow.send(
            "pull", topic="t", queue=0, offset=offset, max_messages=1024, format=RECORDS_FORMAT
        )
    with trio.fail_after(15):
        while len(node.store.lent) < len(offsets):
            await trio.testing.wait_all_tasks_blocked()


async def read_pages(slow: Raw, count: int) -> list[dict[str, Any]]:
    """The next ``count`` answers, read a little at a time."""
    slow.decoder = ResponseDecoder(max_frame_size=MAX_FRAME_SIZE_LIMIT)
    pages: list[dict[str, Any]] = []
    with trio.fail_after(30):
        while len(pages) < count:
            data = await slow.stream.receive_some(RECEIVE_BUFFER)
            assert data, "the node closed the connection"
            slow.decoder.feed(data)
            for page in slow.decoder:
                assert isinstance(page, dict), page
                pages.append(page)
    return pages


def messages_of(page: dict[str, Any]) -> list[bytes]:
    """The bodies of a records answer, every record's CRC checked by the client's decoder."""
    return [message.body for message in consumed_messages("t", 0, page)]


async def test_a_cut_under_a_slow_reader_sends_what_was_read(tmp_path: Path) -> None:
    """Answers lent from the log wait for a slow client while the log is cut inside them:
    they still arrive whole, with the bytes they were read with, and the node serves on.
    Without the copy before the cut the client gets zeroed records (CorruptRecordError)."""
    async with running(node_config(tmp_path)) as node, slow_client(node) as slow:
        bodies = await filled(node)
        assert node.store is not None
        await pulls_waiting(node, slow, [0, 40])
        cut_at = node.store.get_messages("t", 0, 60, max_messages=1).records[0][1].physical_offset
        await node.store.truncate(cut_at)
        pages = await read_pages(slow, 2)
        assert [messages_of(page) for page in pages] == [bodies[0:], bodies[40:]]
        assert len(node.store.lent) == 0
        after = await slow.ok(
            "pull", topic="t", queue=0, offset=0, max_messages=99, format=RECORDS_FORMAT
        )
        assert messages_of(after) == bodies[:60]


async def test_retention_under_a_slow_reader_sends_what_was_read(tmp_path: Path) -> None:
    """Old segments deleted while answers lent from them wait: the views keep the maps,
    the answers arrive whole, and the maps go once the answers are sent."""
    async with running(node_config(tmp_path)) as node, slow_client(node) as slow:
        bodies = await filled(node)
        assert node.store is not None
        await pulls_waiting(node, slow, [0, 10])
        segments = len(node.store.commit_log.files.segments)
        assert await node.store.delete_oldest_segments(segments - 1) == segments - 1
        pages = await read_pages(slow, 2)
        assert [messages_of(page) for page in pages] == [bodies, bodies[10:]]
        assert len(node.store.lent) == 0


async def test_a_client_gone_gives_its_lent_views_back(tmp_path: Path) -> None:
    """A client that leaves with answers unsent: the node lets go of their views."""
    async with running(node_config(tmp_path)) as node:
        await filled(node)
        assert node.store is not None
        async with slow_client(node) as slow:
            await pulls_waiting(node, slow, [0, 0, 0])
        with trio.fail_after(15):
            while len(node.store.lent):
                await trio.testing.wait_all_tasks_blocked()
        async with client(node) as c:
            page = await c.ok(
                "pull", topic="t", queue=0, offset=5, max_messages=999, format=RECORDS_FORMAT
            )
            assert page["next_offset"] == MESSAGES
