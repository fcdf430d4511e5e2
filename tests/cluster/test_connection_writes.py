"""How the client connection groups frames into writes: requests that one receive's
answers woke together go out in one write (one read and one answer write on the node
instead of two each), while a lone request is written on its own."""

from __future__ import annotations

import anyio.abc
import trio
import trio.testing

from cluster.client import Connection
from cluster.protocol import FrameDecoder, encode_frame


class ScriptedPeer(anyio.abc.ByteStream):
    """A node stand-in in memory: records the request ids of each write, and answers only
    the ids the test names, all in one receive."""

    def __init__(self) -> None:
        self.writes: list[list[int]] = []
        self._decoder = FrameDecoder()
        self._answers = bytearray()
        self._answered = trio.Event()

    async def send(self, item: bytes) -> None:
        self._decoder.feed(item)
        self.writes.append([request["id"] for request in self._decoder])  # type: ignore[index]
        await trio.lowlevel.checkpoint()  # a socket send yields too

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while not self._answers:
            self._answered = trio.Event()
            await self._answered.wait()
        data, self._answers = bytes(self._answers), bytearray()
        return data

    def answer(self, ids: list[int]) -> None:
        for req_id in ids:
            self._answers += encode_frame({"v": 1, "id": req_id, "status": "OK"})
        self._answered.set()

    async def send_eof(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def test_requests_woken_by_one_receive_go_out_in_one_write() -> None:
    """Fails on the old code: the first woken request was written alone, the other seven
    in a second write."""
    peer = ScriptedPeer()
    async with trio.open_nursery() as nursery:
        connection = Connection(peer, "scripted:1", 1 << 20)
        await connection.start(nursery)
        answers = []

        async def twice() -> None:
            for _ in range(2):
                answers.append(await connection.request("status", 5.0))

        async with trio.open_nursery() as senders:
            for _ in range(8):
                senders.start_soon(twice)
            await trio.testing.wait_all_tasks_blocked()
            first_round = [req_id for write in peer.writes for req_id in write]
            assert sorted(first_round) == list(range(1, 9))
            writes_before = len(peer.writes)
            peer.answer(first_round)
            await trio.testing.wait_all_tasks_blocked()
            assert peer.writes[writes_before:] == [list(range(9, 17))]
            peer.answer(list(range(9, 17)))
        assert len(answers) == 16
        connection.close()


async def test_a_lone_request_is_written_on_its_own() -> None:
    """Also one that follows the answer of one request: gathering never holds it back."""
    peer = ScriptedPeer()
    async with trio.open_nursery() as nursery:
        connection = Connection(peer, "scripted:1", 1 << 20)
        await connection.start(nursery)
        for req_id in (1, 2):
            async with trio.open_nursery() as senders:
                senders.start_soon(connection.request, "status", 5.0)
                await trio.testing.wait_all_tasks_blocked()
                assert peer.writes == [[n] for n in range(1, req_id + 1)]
                peer.answer([req_id])
        connection.close()
