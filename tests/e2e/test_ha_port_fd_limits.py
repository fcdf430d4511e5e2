"""Issue 8 point 4, replication port: a real master under ``ulimit -n 256`` meets 400
connections to its HA port that never say a word, keeps serving clients (its own files
included) and ends every silent peer within the peer timeout.

On the old code the flood took the last descriptors: ``accept`` raised EMFILE out of
the HA listener and the node died at once.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from cluster.client import open_client
from cluster.protocol import Status
from replication.wire import slave_handshake
from tests.cluster.test_server import open_files_limit
from tests.helpers import node_with_file_limit
from tools.process import wait_until

NODE_NOFILE = 256
FLOOD = 400
PEER_TIMEOUT_MS = 2_000
CLOSE_TIMEOUT_S = 20
ANSWER_TIMEOUT_S = 15


@pytest.fixture
def limited_master(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, list[str]]]:
    """A master with an HA port whose open-file limit is :data:`NODE_NOFILE` (set in the
    child before it runs), its client ``host:port`` and its stderr lines; killed by PID."""

    env = {"TIDELOG_REPLICATION_PEER_TIMEOUT_MS": str(PEER_TIMEOUT_MS)}
    with node_with_file_limit(
        tmp_path / "data", NODE_NOFILE, extra_args=("--ha-port", "0"), env=env
    ) as started:
        yield started


async def _closed_by_master(sock: trio.socket.SocketType) -> bool:
    """Whether the master ended this connection (EOF or reset) before the deadline."""
    with trio.move_on_after(CLOSE_TIMEOUT_S):
        try:
            while await sock.recv(4096):
                continue
        except OSError:
            return True
        return True
    return False


async def test_a_silent_flood_of_the_ha_port_under_a_low_fd_limit(
    limited_master: tuple[subprocess.Popen[str], str, list[str]],
) -> None:
    process, address, stderr = limited_master
    async with open_client(address) as client:
        ha_address = (await client.admin.status())["replication"]["ha_address"]
    host, _, port = ha_address.rpartition(":")
    with open_files_limit(FLOOD + 200):
        flood: list[trio.socket.SocketType] = []
        try:
            for _ in range(FLOOD):
                sock = trio.socket.socket()
                with contextlib.suppress(OSError):  # a full backlog may refuse or reset
                    await sock.connect((host, int(port)))
                flood.append(sock)

            # With the flood open, the node serves clients and writes its own files.
            async with open_client(address) as client:
                await client.admin.create_topic("while-flooded", 1)
                sent = await client.call(
                    "send", topic="while-flooded", body=b"kept", queue=0, acks="durable"
                )
                assert sent["status"] is Status.OK, sent
                status = await client.admin.status()
                assert status["writable"] is True
            assert process.poll() is None, "".join(stderr)

            # Every silent peer is ended: at once past the cap, after the peer timeout
            # (no hello) below it.
            closed = [False] * len(flood)

            async def watch(index: int, sock: trio.socket.SocketType) -> None:
                closed[index] = await _closed_by_master(sock)

            async with trio.open_nursery() as nursery:
                for index, sock in enumerate(flood):
                    nursery.start_soon(watch, index, sock)
            assert all(closed), f"{closed.count(False)} silent peers were never closed"
        finally:
            for sock in flood:
                sock.close()

    async with open_client(address) as client:
        assert (await client.admin.status())["writable"] is True
    process.terminate()
    assert process.wait(timeout=30) == 0, "".join(stderr)
    log = "".join(stderr)
    assert "ha_max_peers_lowered" in log and "ha_peers_full" in log
    assert "no authenticated slave hello within" in log
    assert "Traceback" not in log


ACCEPT_CHILD = """
import logging, os, resource, sys
from pathlib import Path

import trio

from replication.master import HAService
from replication.settings import ReplicationSettings
from storage import MessageStore, StoreConfig

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")


async def main() -> None:
    # No periodic checkpoint while the descriptors are all taken: this child tests the
    # HA accept path alone (a real node keeps a reserve for its own files).
    config = StoreConfig(
        data_dir=Path(sys.argv[1]),
        retention_check_interval_ms=3_600_000,
        flush_interval_ms=3_600_000,
        flush_thorough_interval_ms=3_600_000,
    )
    async with MessageStore.open(config) as store:
        settings = ReplicationSettings(heartbeat_ms=1_000, peer_timeout_ms=600_000)
        service = HAService(store, settings)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(service.serve, "127.0.0.1", 0)
            # Room for two more descriptors: one may go to the segment the store prepares
            # in the background; at least one waiting peer is accepted and one meets EMFILE.
            _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 2, hard))
            print(port, flush=True)
            await trio.sleep_forever()


trio.run(main)
"""


async def test_accept_failing_with_emfile_backs_off_and_recovers(tmp_path: Path) -> None:
    """The accept error path itself: a master whose descriptors run out while peers wait
    logs ``ha_accept_failing`` once, keeps running, and accepts a slave again once
    descriptors are free (the old listener raised EMFILE out of the service)."""
    process = subprocess.Popen(
        [sys.executable, "-c", ACCEPT_CHILD, str(tmp_path / "store")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stderr: list[str] = []
    assert process.stdout is not None and process.stderr is not None
    threading.Thread(target=lambda: stderr.extend(process.stderr or ()), daemon=True).start()
    try:
        port = int(process.stdout.readline() or 0)
        assert port, "the child did not start:\n" + "".join(stderr)
        waiting = []
        for _ in range(6):  # more peers than descriptors: accept fails for the rest
            sock = trio.socket.socket()
            await sock.connect(("127.0.0.1", port))
            waiting.append(sock)

        async def failing_logged() -> bool:
            return any("ha_accept_failing" in line for line in stderr)

        await wait_until("the accept failure logged", failing_logged)
        assert process.poll() is None, "".join(stderr)
        for sock in waiting:
            sock.close()

        async def recovered() -> bool:
            return any("ha_accept_recovered" in line for line in stderr)

        try:
            await wait_until("accepts recovering", recovered)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; the master's log:\n{''.join(stderr)}") from None
        sock = trio.socket.socket()
        with sock, trio.fail_after(ANSWER_TIMEOUT_S):
            await sock.connect(("127.0.0.1", port))
            hello, _name = await slave_handshake(sock, "after", 0)
            assert hello.stream_from == 0
        assert process.poll() is None
        # Once per burst of failures, not once per failed accept (every 10 ms at first).
        failing = sum("ha_accept_failing" in line for line in stderr)
        recovered_lines = sum("ha_accept_recovered" in line for line in stderr)
        assert failing <= recovered_lines + 1, "".join(stderr)
    finally:
        process.kill()
        process.wait()
