"""Chunk transfer: file ranges arrive byte-identical over both send paths, under back-pressure,
and a cancelled or failed send is impossible for either side to miss."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Protocol

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from replication import transfer
from replication.transfer import (
    HEADER_SIZE,
    ChunkHeader,
    ChunkHeaderError,
    ChunkReader,
    ChunkTooLargeError,
    ShortFileError,
    TransferError,
    TruncatedChunkError,
    receive_chunk_into,
    recv_exactly_into,
    send_file_range,
)

FILE_SIZE = 300_000  # not a multiple of any page or call size
PATHS = pytest.mark.parametrize("use_sendfile", [True, False], ids=["sendfile", "copy"])


class HasFileno(Protocol):
    """What trio's wait_writable accepts besides a bare descriptor."""

    def fileno(self) -> int: ...


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, bytes]]:
    """A file of random bytes, open for the whole module (hypothesis reuses it per example)."""
    content = os.urandom(FILE_SIZE)
    path: Path = tmp_path_factory.mktemp("transfer") / "segment"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd, content
    finally:
        os.close(fd)


@asynccontextmanager
async def tcp_pair(
    *, rcvbuf: int | None = None, sndbuf: int | None = None
) -> AsyncIterator[tuple[trio.socket.SocketType, trio.socket.SocketType]]:
    """A real loopback TCP connection (sender, receiver); buffers set before the handshake."""
    listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sender = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    receiver = None
    try:
        if rcvbuf is not None:  # the window scale is fixed at the handshake: set it first
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sndbuf is not None:
            sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        await sender.connect(listener.getsockname())
        receiver, _ = await listener.accept()
        yield sender, receiver
    finally:
        for sock in (listener, sender, receiver):
            if sock is not None:
                sock.close()


@asynccontextmanager
async def unix_pair() -> AsyncIterator[tuple[trio.socket.SocketType, trio.socket.SocketType]]:
    a, b = trio.socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def count_waits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the sender's EAGAIN waits (the transfer module's calls to wait_writable)."""
    calls: list[int] = []
    real = trio.lowlevel.wait_writable

    async def counting(sock: int | HasFileno) -> None:
        calls.append(1)
        await real(sock)

    monkeypatch.setattr(transfer.trio.lowlevel, "wait_writable", counting)
    return calls


# ---- header --------------------------------------------------------------------------------


@given(
    offset=st.integers(0, (1 << 64) - 1),
    length=st.integers(0, (1 << 32) - 1),
    flags=st.integers(0, (1 << 16) - 1),
)
def test_header_round_trip(offset: int, length: int, flags: int) -> None:
    header = ChunkHeader(offset=offset, length=length, flags=flags)
    packed = header.pack()
    assert len(packed) == HEADER_SIZE == 24
    assert ChunkHeader.unpack(packed) == header
    assert ChunkHeader.unpack(memoryview(bytearray(packed))) == header


@given(bit=st.integers(0, HEADER_SIZE * 8 - 1))
def test_any_flipped_header_bit_is_rejected(bit: int) -> None:
    packed = bytearray(ChunkHeader(offset=123_456_789, length=4096, flags=3).pack())
    packed[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(ChunkHeaderError):
        ChunkHeader.unpack(packed)


def test_header_rejects_wrong_size_and_out_of_range_fields() -> None:
    packed = ChunkHeader(offset=1, length=2).pack()
    with pytest.raises(ChunkHeaderError):
        ChunkHeader.unpack(packed[:-1])
    with pytest.raises(ChunkHeaderError, match="magic"):
        ChunkHeader.unpack(bytes(HEADER_SIZE))
    for bad in ({"offset": -1, "length": 0}, {"offset": 1 << 64, "length": 0}):
        with pytest.raises(ValueError):
            ChunkHeader(**bad)
    with pytest.raises(ValueError):
        ChunkHeader(offset=0, length=1 << 32)
    with pytest.raises(ValueError):
        ChunkHeader(offset=0, length=0, flags=1 << 16)


# ---- byte-identical ranges -----------------------------------------------------------------


def _transfer_ranges(
    fd: int,
    ranges: list[tuple[int, int]],
    *,
    use_sendfile: bool,
    max_call: int,
    pair: Callable[[], object],
) -> list[tuple[ChunkHeader, bytes]]:
    """Send each range as one chunk on one connection; return what the receiver got."""

    async def main() -> list[tuple[ChunkHeader, bytes]]:
        received: list[tuple[ChunkHeader, bytes]] = []
        async with pair() as (sender, receiver):  # type: ignore[attr-defined]

            async def send_all() -> None:
                buffer = bytearray(max_call + HEADER_SIZE)  # reused across chunks
                for index, (offset, length) in enumerate(ranges):
                    header = ChunkHeader(offset=offset, length=length, flags=index).pack()
                    sent = await send_file_range(
                        sender,
                        fd,
                        offset,
                        length,
                        header,
                        use_sendfile=use_sendfile,
                        max_call=max_call,
                        buffer=buffer,
                    )
                    assert sent == HEADER_SIZE + length
                sender.shutdown(socket.SHUT_WR)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all)
                area = bytearray(FILE_SIZE)
                view = memoryview(area)
                while (header := await receive_chunk_into(receiver, view)) is not None:
                    received.append((header, bytes(view[: header.length])))
        return received

    return trio.run(main)


@PATHS
@given(
    ranges=st.lists(
        st.integers(0, FILE_SIZE).flatmap(
            lambda start: st.tuples(
                st.just(start),
                st.one_of(st.just(0), st.integers(0, FILE_SIZE - start)),
            )
        ),
        min_size=1,
        max_size=4,
    ),
    max_call=st.sampled_from([1, 7, 4096, 65_537, 1 << 20]),
)
def test_random_ranges_arrive_byte_identical(
    data_file: tuple[int, bytes],
    use_sendfile: bool,
    ranges: list[tuple[int, int]],
    max_call: int,
) -> None:
    fd, content = data_file
    if max_call < 4096:  # one byte per syscall: keep the example small
        ranges = [(start, min(length, 5000)) for start, length in ranges]
    received = _transfer_ranges(
        fd, ranges, use_sendfile=use_sendfile, max_call=max_call, pair=unix_pair
    )
    assert len(received) == len(ranges)
    for index, ((offset, length), (header, data)) in enumerate(zip(ranges, received, strict=True)):
        assert header == ChunkHeader(offset=offset, length=length, flags=index)
        assert data == content[offset : offset + length]


@PATHS
def test_whole_file_over_real_tcp_in_uneven_chunks(
    data_file: tuple[int, bytes], use_sendfile: bool
) -> None:
    fd, content = data_file
    ranges, pos = [], 0
    for size in (0, 1, 4095, 4097, 65_536, 100_000):
        ranges.append((pos, size))
        pos += size
    ranges.append((pos, FILE_SIZE - pos))  # to the very end of the file
    received = _transfer_ranges(
        fd, ranges, use_sendfile=use_sendfile, max_call=32_768, pair=tcp_pair
    )
    assert b"".join(data for _, data in received) == content
    assert [h.offset for h, _ in received] == [start for start, _ in ranges]


# ---- back-pressure -------------------------------------------------------------------------


@PATHS
async def test_slow_receiver_forces_eagain_and_the_send_still_completes(
    data_file: tuple[int, bytes], use_sendfile: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, content = data_file
    waits = count_waits(monkeypatch)
    first_block = trio.Event()
    real_counting = transfer.trio.lowlevel.wait_writable

    async def signalling(sock: int | HasFileno) -> None:
        first_block.set()
        await real_counting(sock)

    monkeypatch.setattr(transfer.trio.lowlevel, "wait_writable", signalling)
    async with tcp_pair(rcvbuf=8192, sndbuf=8192) as (sender, receiver):
        result: list[int] = []

        async def send() -> None:
            header = ChunkHeader(offset=0, length=FILE_SIZE).pack()
            result.append(
                await send_file_range(sender, fd, 0, FILE_SIZE, header, use_sendfile=use_sendfile)
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            await first_block.wait()  # the buffers are full: the sender met EAGAIN
            raw = bytearray(HEADER_SIZE)
            assert await recv_exactly_into(receiver, memoryview(raw)) == HEADER_SIZE
            assert ChunkHeader.unpack(raw).length == FILE_SIZE
            area = bytearray(FILE_SIZE)
            view = memoryview(area)
            pos = 0
            while pos < FILE_SIZE:  # read a little, then let the sender run until it blocks
                step = min(16_384, FILE_SIZE - pos)
                assert await recv_exactly_into(receiver, view[pos : pos + step]) == step
                pos += step
                await trio.testing.wait_all_tasks_blocked()
        assert result == [HEADER_SIZE + FILE_SIZE]
        assert area == content
        assert len(waits) > 3, "the slow reader should have made the sender wait repeatedly"


# ---- cancellation and failure --------------------------------------------------------------


@PATHS
async def test_cancelled_mid_send_shuts_the_stream_and_the_receiver_sees_a_torn_chunk(
    data_file: tuple[int, bytes], use_sendfile: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, _ = data_file
    blocked = trio.Event()
    real = trio.lowlevel.wait_writable

    async def signalling(sock: int | HasFileno) -> None:
        blocked.set()
        await real(sock)

    monkeypatch.setattr(transfer.trio.lowlevel, "wait_writable", signalling)
    async with tcp_pair(rcvbuf=8192, sndbuf=8192) as (sender, receiver):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    header = ChunkHeader(offset=7, length=FILE_SIZE).pack()
                    await send_file_range(
                        sender, fd, 0, FILE_SIZE, header, use_sendfile=use_sendfile
                    )
                    pytest.fail("a send with no reader cannot have completed")

                nursery.start_soon(send)
                await blocked.wait()  # part of the chunk is out, the rest is stuck
                scope.cancel()
        assert scope.cancelled_caught
        with pytest.raises(BrokenPipeError):  # the contract: nothing more can go out
            await sender.send(b"x")
        with pytest.raises(TruncatedChunkError):
            await receive_chunk_into(receiver, memoryview(bytearray(FILE_SIZE)))


@PATHS
async def test_cancelled_before_sending_leaves_a_clean_end_of_stream(
    data_file: tuple[int, bytes], use_sendfile: bool
) -> None:
    fd, _ = data_file
    async with unix_pair() as (sender, receiver):
        with trio.CancelScope() as scope:
            scope.cancel()
            await send_file_range(
                sender, fd, 0, 100, ChunkHeader(0, 100).pack(), use_sendfile=use_sendfile
            )
        assert scope.cancelled_caught
        assert await receive_chunk_into(receiver, memoryview(bytearray(100))) is None
        with pytest.raises(BrokenPipeError):
            await send_file_range(
                sender, fd, 0, 100, ChunkHeader(0, 100).pack(), use_sendfile=use_sendfile
            )


@PATHS
async def test_a_range_past_the_end_of_the_file_fails_loudly_on_both_sides(
    data_file: tuple[int, bytes], use_sendfile: bool
) -> None:
    fd, content = data_file
    start, length = FILE_SIZE - 1000, 5000
    async with unix_pair() as (sender, receiver):
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                with pytest.raises(ShortFileError):
                    await send_file_range(
                        sender,
                        fd,
                        start,
                        length,
                        ChunkHeader(start, length).pack(),
                        use_sendfile=use_sendfile,
                    )

            nursery.start_soon(send)
            area = bytearray(length)
            with pytest.raises(TruncatedChunkError, match="1000 of 5000"):
                await receive_chunk_into(receiver, memoryview(area))
        assert area[:1000] == content[start:]


async def test_a_second_concurrent_sender_on_one_socket_is_refused(
    data_file: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, content = data_file
    blocked = trio.Event()
    real = trio.lowlevel.wait_writable

    async def signalling(sock: int | HasFileno) -> None:
        blocked.set()
        await real(sock)

    monkeypatch.setattr(transfer.trio.lowlevel, "wait_writable", signalling)
    async with tcp_pair(rcvbuf=8192, sndbuf=8192) as (sender, receiver):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                send_file_range, sender, fd, 0, FILE_SIZE, ChunkHeader(0, FILE_SIZE).pack()
            )
            await blocked.wait()
            with pytest.raises(trio.BusyResourceError):
                await send_file_range(sender, fd, 0, 10, ChunkHeader(0, 10).pack())
            area = bytearray(FILE_SIZE)  # the refused call did not disturb the first chunk
            header = await receive_chunk_into(receiver, memoryview(area))
        assert header == ChunkHeader(0, FILE_SIZE)
        assert area == content


async def test_receiver_rejects_garbage_and_oversized_chunks() -> None:
    async with unix_pair() as (sender, receiver):
        await sender.send(b"not a chunk header at all")
        with pytest.raises(ChunkHeaderError):
            await receive_chunk_into(receiver, memoryview(bytearray(10)))
    async with unix_pair() as (sender, receiver):
        await sender.send(ChunkHeader(offset=0, length=11).pack())
        with pytest.raises(ChunkTooLargeError):
            await receive_chunk_into(receiver, memoryview(bytearray(10)))
    async with unix_pair() as (sender, receiver):
        await sender.send(ChunkHeader(offset=0, length=1).pack()[:5])
        sender.shutdown(socket.SHUT_WR)
        with pytest.raises(TruncatedChunkError, match="header"):
            await receive_chunk_into(receiver, memoryview(bytearray(10)))


async def test_bad_arguments_are_refused_before_anything_is_sent(
    data_file: tuple[int, bytes],
) -> None:
    fd, _ = data_file
    async with unix_pair() as (sender, receiver):
        for file_offset, count in ((-1, 1), (0, -1)):
            with pytest.raises(ValueError):
                await send_file_range(sender, fd, file_offset=file_offset, count=count, header=b"")
        with pytest.raises(ValueError):
            await send_file_range(sender, fd, 0, 1, b"", max_call=0)
        # the stream is still usable: refused arguments do not shut it down
        assert await send_file_range(sender, fd, 0, 3, ChunkHeader(0, 3).pack()) == 27
        assert await receive_chunk_into(receiver, memoryview(bytearray(3))) == ChunkHeader(0, 3)


# ---- scheduling ----------------------------------------------------------------------------


@PATHS
async def test_every_send_is_a_checkpoint_and_long_sends_keep_yielding(
    data_file: tuple[int, bytes], use_sendfile: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver fast enough never to cause EAGAIN must not starve the loop."""
    fd, content = data_file
    yields: list[int] = []
    real = trio.lowlevel.cancel_shielded_checkpoint

    async def counting() -> None:
        yields.append(1)
        await real()

    async with unix_pair() as (sender, receiver):
        with trio.testing.assert_checkpoints():
            await send_file_range(sender, fd, 0, 10, b"", use_sendfile=use_sendfile)
        assert await recv_exactly_into(receiver, memoryview(bytearray(10))) == 10
        monkeypatch.setattr(transfer, "YIELD_BYTES", 1000)
        monkeypatch.setattr(transfer.trio.lowlevel, "cancel_shielded_checkpoint", counting)
        header = ChunkHeader(0, 5000).pack()  # fits the socket buffer: no EAGAIN at all
        await send_file_range(sender, fd, 0, 5000, header, use_sendfile=use_sendfile, max_call=500)
        area = bytearray(5000)
        assert await receive_chunk_into(receiver, memoryview(area)) == ChunkHeader(0, 5000)
        assert area == content[:5000]
        assert len(yields) >= 4


def _read_through_chunk_reader(
    stream: bytes, pieces: list[int], max_length: int
) -> tuple[list[tuple[ChunkHeader, bytes]], list[bool], BaseException | None]:
    """Write ``stream`` in pieces of the given sizes (the rest at once), a scheduling
    point between them, and read it with a :class:`ChunkReader`: the frames, whether a
    whole frame was buffered after each, and the error that ended the stream (if any)."""

    async def main() -> tuple[list[tuple[ChunkHeader, bytes]], list[bool], BaseException | None]:
        frames: list[tuple[ChunkHeader, bytes]] = []
        buffered: list[bool] = []
        left, right = trio.socket.socketpair()
        with left, right:

            async def write() -> None:
                at = 0
                for size in [*pieces, len(stream)]:
                    await left.send(stream[at : at + size])
                    at += size
                    if at >= len(stream):
                        break
                    await trio.lowlevel.checkpoint()
                left.shutdown(socket.SHUT_WR)

            reader = ChunkReader(right, max_length)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)
                try:
                    while (header := await reader.next_chunk()) is not None:
                        frames.append((header, bytes(reader.data)))
                        buffered.append(reader.buffered())
                except TransferError as exc:
                    return frames, buffered, exc
        return frames, buffered, None

    return trio.run(main)


@given(
    chunks=st.lists(st.tuples(st.integers(0, 2), st.binary(max_size=300)), min_size=0, max_size=6),
    pieces=st.lists(st.integers(1, 400), max_size=8),
    room=st.integers(0, 200),
    cut=st.one_of(st.none(), st.integers(1, 10_000)),
)
def test_a_chunk_reader_returns_the_frames_sent_however_they_arrive(
    chunks: list[tuple[int, bytes]], pieces: list[int], room: int, cut: int | None
) -> None:
    """Frames written in any pieces come out of :class:`ChunkReader` whole and in order,
    and :meth:`ChunkReader.buffered` false after the last whole one (the slave acks
    then, before it reads again); a stream cut inside a frame raises
    :class:`TruncatedChunkError` after the whole frames before the cut."""
    max_length = max((len(data) for _, data in chunks), default=0) + room
    sent: list[tuple[ChunkHeader, bytes]] = []
    offset = 0
    for flags, data in chunks:
        sent.append((ChunkHeader(offset=offset, length=len(data), flags=flags), data))
        offset += len(data)
    stream = b"".join(header.pack() + data for header, data in sent)
    if cut is not None and cut < len(stream):
        stream = stream[:cut]
    frames, buffered, error = _read_through_chunk_reader(stream, pieces, max_length)
    whole, at = 0, 0
    for _, data in sent:
        if at + HEADER_SIZE + len(data) > len(stream):
            break
        at += HEADER_SIZE + len(data)
        whole += 1
    assert frames == sent[:whole]
    if whole < len(sent):
        assert isinstance(error, TruncatedChunkError)
    else:
        assert error is None
    assert not buffered or not buffered[-1]


def test_a_chunk_reader_refuses_a_chunk_longer_than_its_buffer() -> None:
    stream = ChunkHeader(offset=0, length=11).pack() + bytes(11)
    frames, _, error = _read_through_chunk_reader(stream, [], 10)
    assert frames == [] and isinstance(error, ChunkTooLargeError)
