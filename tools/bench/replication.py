"""Catch-up of a fresh slave: stream a whole commit log over loopback TCP, both send paths.

What is measured, and against what
    A log of ``size_bytes`` (fixed-size segment files of random bytes, written to
    the real disk) is streamed chunk by chunk to a receiver in a **separate
    process** (``python -m tools.bench.replication receive``), which reads the
    stream the way a slave does, through a :class:`replication.transfer.ChunkReader`
    (one ``readv`` takes whatever arrived; the chunks are cut out of its buffer), and
    reports when the last byte has landed. Each mode runs ``repeats`` times; every
    figure is the median over the repeats:

    - ``catchup_sendfile_*``: :func:`send_file_range` with ``os.sendfile`` on trio;
    - ``catchup_copy_*``: the same with ``preadv`` + ``write``;
    - ``raw_sendfile_*`` / ``raw_copy_*``: the same bytes and chunk headers sent by a
      tight blocking loop in a thread, no trio: the floor, so trio's share shows.

    MB/s is bytes / (time from the first byte sent to the receiver's report arriving).
    Master CPU is ``getrusage(RUSAGE_SELF)`` user + system over the same interval,
    per GiB moved; the receiver reports its own. ``max_loop_stall_ms`` is the worst
    lateness of a 5 ms timer task running beside the sender: how long other tasks
    on the master's event loop would wait.

Warm and cold
    The warm runs read from the page cache (the files were just written and read
    once). With ``cold=True`` each cold run first evicts *only our own* segment
    files (fsync, then ``posix_fadvise(DONTNEED)``; no system-wide cache drop), so
    every byte comes from the disk, and ``disk_read_cold_mb_per_s`` gives the disk's
    own sequential read rate as the floor for those.

Replication lag (:func:`run_lag_bench`)
    A master store and :class:`~replication.master.HAService` in this process, an
    :class:`~replication.slave.HAClient` with its own store in a **separate process**
    (``python -m tools.bench.replication lag-slave``), over loopback. A producer appends
    1 KiB messages at a steady ``rate`` (paced on a schedule, not back to back: lag
    under a sustainable load, not queueing under saturation) and a second task
    takes each message's end offset in order and waits for the confirm offset --
    the slave's ack -- to reach it: lag = ack arrival - append, per message.
    Reported: p50/p99/p999/max in microseconds and the achieved rate. A message whose
    ack came with a later one's is timed when that ack arrived (that is its lag).

Nothing here asserts a figure; the tests run it with a few MiB and check the keys.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import mmap
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from crc32c import crc32c

from replication.transfer import (
    DEFAULT_MAX_CALL,
    HEADER_SIZE,
    MSG_MORE,
    ChunkHeader,
    ChunkReader,
    recv_exactly_into,
    send_file_range,
)
from storage.mapped_file import fsync_directory, segment_name
from tools.bench.stats import percentile

if TYPE_CHECKING:
    from storage import StoreConfig

ProgressFn = Callable[[str], None]
MiB = 1 << 20
GiB = 1 << 30
DEFAULT_SIZE = 2 * GiB
DEFAULT_SEGMENT = GiB  # RocketMQ's commit-log file size
WRITE_BLOCK = 64 * MiB
STALL_PERIOD = 0.005
WARM_MODES = ("raw_sendfile", "sendfile", "copy", "raw_copy")
CHILD_TIMEOUT = 600.0


# ---- the log on disk -------------------------------------------------------------------------


def write_log(directory: Path, size_bytes: int, segment_size: int) -> list[tuple[Path, int]]:
    """Write ``size_bytes`` of random bytes as full-size segment files, like the store's.

    Returns (path, bytes of log in it) per segment; the last segment is allocated in
    full but only partly written, as the active segment of a live log is. Files are
    fsynced, so their cached pages are clean and can be evicted for the cold runs.
    """
    directory.mkdir(parents=True, exist_ok=True)
    block = os.urandom(min(WRITE_BLOCK, max(size_bytes, 1)))
    segments: list[tuple[Path, int]] = []
    base = 0
    while base < size_bytes or not segments:
        length = min(segment_size, size_bytes - base)
        path = directory / segment_name(base)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.posix_fallocate(fd, 0, segment_size)
            pos = 0
            while pos < length:
                # vary each block so no two stretches of the log are identical
                piece = (base + pos).to_bytes(8, "little") + block[
                    8 : min(len(block), length - pos)
                ]
                pos += os.pwrite(fd, piece, pos)
            os.fsync(fd)
        finally:
            os.close(fd)
        segments.append((path, length))
        base += segment_size
    fsync_directory(directory)
    return segments


def log_crc(fds: list[tuple[int, int]], chunk: int) -> int:
    """CRC32C of the whole log, to compare with the receiver's (``verify`` runs only)."""
    crc = 0
    for fd, length in fds:
        for pos in range(0, length, chunk):
            crc = crc32c(os.pread(fd, min(chunk, length - pos), pos), crc)
    return crc


def read_through(fds: list[tuple[int, int]], chunk: int) -> float:
    """Read every byte of the log once; return seconds taken (warms the cache too)."""
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    start = time.perf_counter()
    for fd, length in fds:
        pos = 0
        while pos < length:
            got = os.preadv(fd, [view[: min(chunk, length - pos)]], pos)
            if got == 0:
                raise OSError(f"segment shorter than the {length} bytes written")
            pos += got
    return time.perf_counter() - start


def evict(fds: list[tuple[int, int]]) -> None:
    """Drop our own files' pages from the page cache (clean pages: they were fsynced)."""
    for fd, _ in fds:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


# ---- the master's send loops -----------------------------------------------------------------


def _chunks(
    fds: list[tuple[int, int]], segment_size: int, chunk: int
) -> Iterator[tuple[int, int, int, bytes]]:
    """(fd, position in the file, length, packed header) for every chunk of the log."""
    for index, (fd, length) in enumerate(fds):
        base = index * segment_size
        for pos in range(0, length, chunk):
            count = min(chunk, length - pos)
            yield fd, pos, count, ChunkHeader(offset=base + pos, length=count).pack()


async def _trio_send(
    sock: trio.socket.SocketType,
    fds: list[tuple[int, int]],
    segment_size: int,
    chunk: int,
    max_call: int,
    use_sendfile: bool,
) -> None:
    buffer = None if use_sendfile else bytearray(HEADER_SIZE + max_call)
    for fd, pos, count, header in _chunks(fds, segment_size, chunk):
        await send_file_range(
            sock,
            fd,
            pos,
            count,
            header,
            use_sendfile=use_sendfile,
            max_call=max_call,
            buffer=buffer,
        )


def _raw_send(
    sock_fd: int,
    fds: list[tuple[int, int]],
    segment_size: int,
    chunk: int,
    max_call: int,
    use_sendfile: bool,
) -> None:
    """The floor: the same chunks from a blocking socket in a tight loop, no event loop."""
    os.set_blocking(sock_fd, True)
    sock = socket.socket(fileno=sock_fd)  # borrowed: detached below, never closed here
    buffer = bytearray(HEADER_SIZE + max_call)
    view = memoryview(buffer)
    try:
        for fd, pos, count, header in _chunks(fds, segment_size, chunk):
            end = pos + count
            if use_sendfile:
                sock.sendall(header, MSG_MORE)
                while pos < end:
                    pos += os.sendfile(sock_fd, fd, pos, min(end - pos, max_call))
                continue
            head = len(header)
            view[:head] = header
            fill = head
            while True:  # read + sendall, header in the first buffer
                got = os.preadv(fd, [view[fill : fill + min(max_call, end - pos)]], pos)
                pos += got
                sock.sendall(view[: fill + got])
                fill = 0
                if pos >= end:
                    break
    finally:
        view.release()
        sock.detach()
        os.set_blocking(sock_fd, False)


async def _stall_monitor(worst: list[float]) -> None:
    """Record how late a periodic timer fires: what other tasks would suffer."""
    while True:
        due = time.perf_counter() + STALL_PERIOD
        await trio.sleep(STALL_PERIOD)
        worst[0] = max(worst[0], time.perf_counter() - due)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _one_run(
    mode: str,
    fds: list[tuple[int, int]],
    segment_size: int,
    chunk: int,
    max_call: int,
    total: int,
    *,
    sndbuf: int | None,
    rcvbuf: int | None,
    verify: bool,
) -> dict[str, float]:
    """Stream the whole log once to a fresh receiver process; return this run's figures."""
    listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        command = [
            sys.executable,
            "-m",
            "tools.bench.replication",
            "receive",
            "--port",
            str(listener.getsockname()[1]),
            "--buffer",
            str(chunk),
        ]
        if rcvbuf:
            command += ["--rcvbuf", str(rcvbuf)]
        if verify:
            command.append("--verify")
        async with trio.open_nursery() as nursery:
            # run_process kills the child if anything here fails or is cancelled
            nursery.start_soon(partial(trio.run_process, command, check=True))
            with trio.fail_after(CHILD_TIMEOUT):
                conn, _ = await listener.accept()
            with conn:
                if sndbuf:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
                use_sendfile = mode.endswith("sendfile")
                worst = [0.0]
                cpu0, start = _cpu_seconds(), time.perf_counter()
                with trio.fail_after(CHILD_TIMEOUT):
                    if mode.startswith("raw_"):
                        await trio.to_thread.run_sync(
                            _raw_send,
                            conn.fileno(),
                            fds,
                            segment_size,
                            chunk,
                            max_call,
                            use_sendfile,
                        )
                    else:
                        async with trio.open_nursery() as inner:
                            inner.start_soon(_stall_monitor, worst)
                            await _trio_send(conn, fds, segment_size, chunk, max_call, use_sendfile)
                            inner.cancel_scope.cancel()
                    conn.shutdown(socket.SHUT_WR)
                    report = await _read_report(conn)
                elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
    if report["bytes"] != total:
        raise RuntimeError(f"receiver got {report['bytes']} bytes, {total} were sent")
    gib = total / GiB
    figures = {
        "mb_per_s": total / elapsed / 1e6,
        "master_cpu_s_per_gib": cpu / gib,
        "receiver_cpu_s_per_gib": report["cpu_s"] / gib,
        "receiver_crc": float(report["crc"]),
    }
    if not mode.startswith("raw_"):
        figures["max_loop_stall_ms"] = worst[0] * 1e3
    return figures


async def _read_report(conn: trio.socket.SocketType) -> dict[str, float]:
    data = bytearray()
    while piece := await conn.recv(65_536):
        data += piece
    return json.loads(data)


# ---- the bench -------------------------------------------------------------------------------


async def run_catchup_bench(
    directory: Path,
    size_bytes: int = DEFAULT_SIZE,
    *,
    chunk: int = DEFAULT_MAX_CALL,
    progress: ProgressFn = lambda _msg: None,
    segment_size: int = DEFAULT_SEGMENT,
    max_call: int | None = None,
    repeats: int = 3,
    sndbuf: int | None = None,
    rcvbuf: int | None = None,
    cold: bool = False,
    verify: bool = False,
    keep_files: bool = False,
) -> dict[str, float]:
    """Write a ``size_bytes`` log into ``directory`` and stream it with every mode.

    ``chunk`` is the data bytes per chunk header, ``max_call`` the bytes per
    syscall (default: ``min(chunk, DEFAULT_MAX_CALL)``). ``sndbuf``/``rcvbuf`` set
    the socket buffers (kernel autotuning otherwise). With ``verify`` the receiver
    checksums what it got and a mismatch raises. The segment files are removed
    afterwards unless ``keep_files``.
    """
    if size_bytes <= 0 or chunk <= 0 or repeats <= 0:
        raise ValueError("size_bytes, chunk and repeats must be positive")
    max_call = max_call or min(chunk, DEFAULT_MAX_CALL)
    segment_size = min(segment_size, max(size_bytes, mmap.PAGESIZE))
    segment_size += -segment_size % mmap.PAGESIZE
    progress(f"writing a {size_bytes / MiB:.0f} MiB log in {segment_size / MiB:.0f} MiB segments")
    segments = await trio.to_thread.run_sync(write_log, directory, size_bytes, segment_size)
    fds: list[tuple[int, int]] = []
    try:
        for path, length in segments:
            fds.append((os.open(path, os.O_RDONLY), length))
        expected_crc = await trio.to_thread.run_sync(log_crc, fds, 4 * MiB) if verify else None
        figures: dict[str, float] = {
            "catchup_bytes": float(size_bytes),
            "catchup_chunk_bytes": float(chunk),
            "catchup_max_call_bytes": float(max_call),
        }
        runs: dict[str, list[dict[str, float]]] = {}
        plan = [(mode, False) for mode in WARM_MODES]
        if cold:
            plan += [("sendfile", True), ("copy", True)]
            evict(fds)
            seconds = await trio.to_thread.run_sync(read_through, fds, 4 * MiB)
            figures["disk_read_cold_mb_per_s"] = size_bytes / seconds / 1e6
        await trio.to_thread.run_sync(read_through, fds, 4 * MiB)  # warm every page
        for repeat in range(repeats):
            for mode, is_cold in plan:  # interleaved, so drift on a shared box hits all alike
                name = f"{mode}_cold" if is_cold else mode
                progress(f"{name} run {repeat + 1}/{repeats}")
                if is_cold:
                    evict(fds)
                run = await _one_run(
                    mode,
                    fds,
                    segment_size,
                    chunk,
                    max_call,
                    size_bytes,
                    sndbuf=sndbuf,
                    rcvbuf=rcvbuf,
                    verify=verify,
                )
                if is_cold:
                    await trio.to_thread.run_sync(read_through, fds, 4 * MiB)  # warm again
                crc = run.pop("receiver_crc")
                if expected_crc is not None and int(crc) != expected_crc:
                    raise RuntimeError(f"{name}: receiver's CRC {crc:.0f} != {expected_crc}")
                runs.setdefault(name, []).append(run)
        for name, results in runs.items():
            prefix = name if name.startswith("raw_") else f"catchup_{name}"
            for key in results[0]:
                figures[f"{prefix}_{key}"] = statistics.median(r[key] for r in results)
        return figures
    finally:
        for fd, _ in fds:
            os.close(fd)
        if not keep_files:
            for path, _ in segments:
                path.unlink(missing_ok=True)


# ---- replication lag under a steady load ---------------------------------------------------


def _lag_store_config(directory: Path) -> StoreConfig:
    from storage import StoreConfig

    return StoreConfig(data_dir=directory, segment_size=64 * MiB)


async def run_lag_bench(
    directory: Path,
    *,
    seconds: float = 5.0,
    rate: float = 2_000.0,
    message_size: int = 1024,
    progress: ProgressFn = lambda _msg: None,
) -> dict[str, float]:
    """Append ``message_size`` B messages at ``rate``/s for ``seconds`` on a master with
    one slave process; return the append-to-ack lag percentiles (see module doc)."""
    from replication.master import HAService
    from storage import Message, MessageStore

    if seconds <= 0 or rate <= 0 or message_size <= 0:
        raise ValueError("seconds, rate and message_size must be positive")
    body = os.urandom(message_size)
    pending: trio.MemorySendChannel[tuple[int, float]]
    pending, arrivals = trio.open_memory_channel[tuple[int, float]](math.inf)
    lags: list[float] = []
    async with MessageStore.open(_lag_store_config(directory / "master")) as master:
        service = HAService(master)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(service.serve, "127.0.0.1", 0)
            command = [
                sys.executable, "-m", "tools.bench.replication", "lag-slave",
                "--port", str(port), "--dir", str(directory / "slave"),
            ]  # fmt: skip
            # run_process kills the child when the nursery is cancelled below
            nursery.start_soon(partial(trio.run_process, command, check=False))
            progress("waiting for the slave process")
            with trio.fail_after(CHILD_TIMEOUT):
                while not service.in_sync_slaves():
                    await service.wait_membership_change()

            measured = trio.Event()

            async def measure() -> None:
                async for end, appended in arrivals:
                    await service.wait_replicated(end)
                    lags.append(time.perf_counter() - appended)
                measured.set()

            nursery.start_soon(measure)
            progress(f"{rate:.0f} msgs/s of {message_size} B for {seconds:.0f} s")
            interval = 1 / rate
            start = trio.current_time()
            sent = 0
            while (now := trio.current_time()) - start < seconds:
                due = start + sent * interval
                if due > now:
                    await trio.sleep_until(due)
                await master.put(Message("lag", body, 0))
                await pending.send((master.commit_log.max_offset, time.perf_counter()))
                sent += 1
            elapsed = trio.current_time() - start
            await pending.aclose()
            with trio.fail_after(CHILD_TIMEOUT):
                await measured.wait()
            nursery.cancel_scope.cancel()
    lags.sort()
    return {
        "lag_message_bytes": float(message_size),
        "lag_target_msgs_per_s": rate,
        "lag_achieved_msgs_per_s": sent / elapsed,
        "lag_messages": float(sent),
        "lag_p50_us": percentile(lags, 0.5) * 1e6,
        "lag_p99_us": percentile(lags, 0.99) * 1e6,
        "lag_p999_us": percentile(lags, 0.999) * 1e6,
        "lag_max_us": lags[-1] * 1e6,
    }


async def lag_slave(port: int, directory: Path) -> None:
    """Child side of the lag bench: a plain HA slave until the master goes away."""
    from replication.slave import HAClient
    from replication.transfer import TransferError
    from replication.wire import HAProtocolError
    from storage import MessageStore

    async with MessageStore.open(_lag_store_config(directory)) as store:
        # the master ending the bench may cut the stream anywhere: that is the exit
        with contextlib.suppress(OSError, HAProtocolError, TransferError):
            await HAClient(store, "bench-slave").run("127.0.0.1", port)


# ---- the receiver process --------------------------------------------------------------------


async def receive(port: int, buffer_size: int, rcvbuf: int | None, verify: bool) -> None:
    """Child side: read chunks as a slave does (a :class:`ChunkReader` taking chunks of
    up to ``buffer_size`` bytes) until the master ends the stream.

    Checks that chunks arrive in offset order with no gap, then writes a JSON report
    (bytes, seconds, its CPU seconds, CRC32C when ``verify``) back on the socket.
    """
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", port))
        reader = ChunkReader(sock, buffer_size)
        expected, crc = 0, 0
        cpu0 = time.process_time()
        start = math.nan
        while (header := await reader.next_chunk()) is not None:
            if math.isnan(start):
                start = time.perf_counter()
            if header.offset != expected:
                raise RuntimeError(f"chunk at {header.offset}, expected {expected}")
            if verify:
                crc = crc32c(reader.data, crc)
            expected += header.length
        report = {
            "bytes": expected,
            "seconds": time.perf_counter() - start if expected else 0.0,
            "cpu_s": time.process_time() - cpu0,
            "crc": crc,
        }
        out = memoryview(json.dumps(report).encode())
        while out:
            out = out[await sock.send(out) :]
        await recv_exactly_into(sock, memoryview(bytearray(1)))  # master closes: done


# ---- command line ----------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``2GiB``, ``512MiB``, ``64KiB`` or a plain byte count."""
    for suffix, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.replication", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("receive", help="(internal) the receiver process")
    child.add_argument("--port", type=int, required=True)
    child.add_argument("--buffer", type=int, required=True)
    child.add_argument("--rcvbuf", type=int)
    child.add_argument("--verify", action="store_true")
    slave = sub.add_parser("lag-slave", help="(internal) the lag bench's slave process")
    slave.add_argument("--port", type=int, required=True)
    slave.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--size", type=parse_size, default=DEFAULT_SIZE)
    parser.add_argument("--chunk", type=parse_size, default=DEFAULT_MAX_CALL)
    parser.add_argument("--max-call", type=parse_size)
    parser.add_argument("--segment-size", type=parse_size, default=DEFAULT_SEGMENT)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sndbuf", type=parse_size)
    parser.add_argument("--rcvbuf", type=parse_size)
    parser.add_argument("--cold", action="store_true", help="add runs from evicted files")
    parser.add_argument(
        "--sweep", help="comma-separated chunk sizes: one bench per size (max_call = chunk)"
    )
    parser.add_argument("--dir", type=Path, help="where to write the log (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.command == "receive":
        trio.run(receive, args.port, args.buffer, args.rcvbuf, args.verify)
        return
    if args.command == "lag-slave":
        trio.run(lag_slave, args.port, args.dir)
        return
    chunks = [parse_size(c) for c in args.sweep.split(",")] if args.sweep else [args.chunk]
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="catchup-") as tmp:
        for chunk in chunks:
            figures = trio.run(
                partial(
                    run_catchup_bench,
                    Path(tmp),
                    args.size,
                    chunk=chunk,
                    progress=lambda msg: print(f"# {msg}", file=sys.stderr, flush=True),
                    segment_size=args.segment_size,
                    max_call=args.max_call or (chunk if args.sweep else None),
                    repeats=args.repeats,
                    sndbuf=args.sndbuf,
                    rcvbuf=args.rcvbuf,
                    cold=args.cold,
                )
            )
            for key, value in figures.items():
                print(f"{key:48s} {value:12.2f}")
            print(flush=True)


if __name__ == "__main__":
    main()
