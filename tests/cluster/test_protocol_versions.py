"""Version negotiation (docs/protocol.md section 6): compact sends are protocol version 2.

A client sends CBOR maps of version 2 until an answer on the connection shows the node
speaks it, then sends plain sends compactly; against a node that speaks only version 1
it resends the refused request as a version-1 map and keeps to version 1; a node answers
every map in the version it came in.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import cbor2
import pytest
import trio

from cluster.client import Connection
from cluster.protocol import (
    HEADER,
    Acks,
    FrameDecoder,
    ProtocolError,
    ResponseDecoder,
    Status,
    encode_frame,
    make_response,
    send_response,
)
from cluster.protocol.compact import SEND_MARKER, encode_send
from cluster.protocol.limits import PROTOCOL_VERSION, SUPPORTED_VERSIONS
from cluster.server.tls import _answer_plain_client
from tests.cluster.client_harness import BACKENDS, NodesInTrioThread, nodes, run
from tests.cluster.test_server import client, node_config, running

__all__ = ["nodes"]  # the fixture, imported for the tests below

PLAIN = {"topic": "t", "body": b"x", "acks": "leader", "timeout_ms": 5000}


def bodies(raw: bytes | bytearray) -> list[bytes]:
    """The frame bodies in ``raw``, in order."""
    found = []
    at = 0
    while at < len(raw):
        (size,) = HEADER.unpack_from(raw, at)
        found.append(bytes(raw[at + HEADER.size : at + HEADER.size + size]))
        at += HEADER.size + size
    assert at == len(raw)
    return found


class Recording(anyio.abc.ByteStream):
    """A client's stream that keeps a copy of every byte the client sends."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.sent = bytearray()

    async def send(self, item: bytes) -> None:
        self.sent += item
        await self.stream.send(item)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.stream.receive(max_bytes)

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


@asynccontextmanager
async def connected(host: str, port: int) -> AsyncIterator[tuple[Connection, Recording]]:
    """A client connection to ``host:port`` in the running loop, recording what it sends."""
    stream = Recording(await anyio.connect_tcp(host, port))
    async with anyio.create_task_group() as group:
        connection = Connection(stream, f"{host}:{port}", 1 << 20)
        await connection.start(group)
        try:
            yield connection, stream
        finally:
            connection.close()
            group.cancel_scope.cancel()


@asynccontextmanager
async def version_1_node(received: list[bytes]) -> AsyncIterator[int]:
    """A node as releases before compact sends were: it reads frames with the protocol
    codec at version 1 only (version 2 is ``UNSUPPORTED_VERSION``, a compact send is
    malformed), answers every send ``OK`` at the next offset of queue 0 and any other op
    ``OK``, all in version 1, and adds each frame body it read to ``received``. Yields
    its port."""

    async def serve(stream: anyio.abc.SocketStream) -> None:
        decoder = FrameDecoder(versions=(1,))
        stored = 0
        async with stream:
            try:
                while data := await stream.receive(65536):
                    received.extend(bodies(data))  # the client writes whole frames
                    decoder.feed(data)
                    answers = bytearray()
                    for request in decoder:
                        if isinstance(request, ProtocolError):
                            answer = request.response()
                        elif request["op"] == "send":
                            answer = send_response(request["id"], "t", 0, stored, stored, 1)
                            stored += 1
                        else:
                            answer = make_response(request["id"])
                        answers += encode_frame({**answer, "v": 1})
                    await stream.send(bytes(answers))
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, serve)
        try:
            yield listener.extra(anyio.abc.SocketAttribute.local_port)
        finally:
            group.cancel_scope.cancel()


# ---- the client ------------------------------------------------------------------------------


@BACKENDS
def test_a_fresh_connection_sends_maps_until_an_answer_shows_version_2(
    backend: str, nodes: NodesInTrioThread, tmp_path: Path
) -> None:
    """Against this release's node: the first send is a CBOR map of version 2, the sends
    after its answer are compact. (Before compact sends were negotiated, the first send
    of a fresh connection went compact already.)"""
    node = nodes.start(tmp_path / "node")
    host, port = node.address.rsplit(":", 1)
    answers: list[dict[str, Any]] = []

    async def body() -> None:
        async with connected(host, int(port)) as (admin, _):
            created = await admin.request("create_topic", 10.0, topic="t", queues=1)
            assert created["status"] is Status.OK
        async with connected(host, int(port)) as (connection, sent):
            for _ in range(3):
                answers.append(await connection.request_fields("send", 10.0, PLAIN))
            first, *later = bodies(sent.sent)
        assert 0xA0 <= first[0] <= 0xBF and cbor2.loads(first)["v"] == PROTOCOL_VERSION
        assert [frame[0] for frame in later] == [SEND_MARKER, SEND_MARKER]

    run(backend, body)
    assert [answer["status"] for answer in answers] == [Status.OK] * 3
    assert [answer["queue_offset"] for answer in answers] == [0, 1, 2]
    assert all(answer["v"] == PROTOCOL_VERSION for answer in answers)


@BACKENDS
def test_against_a_version_1_node_the_client_resends_in_version_1_and_keeps_to_it(
    backend: str,
) -> None:
    """A node from before compact sends refuses the first map (version 2) with
    ``UNSUPPORTED_VERSION``, supported [1]: the client resends it as a version-1 map,
    its caller sees the send succeed, and every later request on the connection is a
    version-1 map, never a compact send. (Before negotiation, the client's sends went
    compact, the node answered ``MALFORMED_FRAME`` with id 0, and each send waited for
    its timeout.)"""
    received: list[bytes] = []
    answers: list[dict[str, Any]] = []

    async def body() -> None:
        async with (
            version_1_node(received) as port,
            connected("127.0.0.1", port) as (
                connection,
                _,
            ),
        ):
            for _ in range(3):
                answers.append(await connection.request_fields("send", 5.0, PLAIN))
            answers.append(await connection.request("status", 5.0))

    run(backend, body)
    assert [answer["status"] for answer in answers] == [Status.OK] * 4
    assert [answer["queue_offset"] for answer in answers[:3]] == [0, 1, 2]
    assert all(0xA0 <= frame[0] <= 0xBF for frame in received)  # maps only
    decoded = [cbor2.loads(frame) for frame in received]
    assert [request["v"] for request in decoded] == [2, 1, 1, 1, 1]
    assert [request["op"] for request in decoded] == ["send"] * 4 + ["status"]
    assert decoded[0] == {**decoded[1], "v": 2, "id": 1}  # the refused send, resent


# ---- the node --------------------------------------------------------------------------------


async def test_a_node_answers_each_map_in_the_version_it_came_in(tmp_path: Path) -> None:
    """Version-1 maps get version-1 answers (at once, after an ack wait, and errors), a
    version-2 map a version-2 answer, an unknown version ``UNSUPPORTED_VERSION`` listing
    1 and 2 in version 1 (the version every client reads); a compact send a compact
    answer. (Before, every answer said version 1 and version 2 was refused.)"""
    async with running(node_config(tmp_path / "node")) as node, client(node) as raw:
        await raw.ok("create_topic", topic="t", queues=1)
        plain_send = {"op": "send", "topic": "t", "body": b"b"}
        maps = [
            {"v": 1, "id": 11, "op": "status"},
            {"v": 1, "id": 12, **plain_send},
            {"v": 1, "id": 13, **plain_send, "acks": "durable"},
            {"v": 1, "id": 14, "op": "send", "topic": "nope", "body": b"b"},
            {"v": 2, "id": 21, "op": "status"},
            {"v": 2, "id": 22, **plain_send, "acks": "durable"},
            {"v": 3, "id": 31, "op": "status"},
        ]
        compact = encode_send(41, "t", b"c", None, None, Acks.LEADER, 5000)
        assert compact is not None
        await raw.send_raw(b"".join(encode_frame(request) for request in maps) + compact)
        answers: dict[int, dict[str, Any]] = {}
        compactly: dict[int, bool] = {}
        for _ in range(len(maps) + 1):
            answer = await raw.recv()
            assert answer is not None
            answers[answer["id"]] = answer
            compactly[answer["id"]] = raw.decoder.compact
    versions = {req_id: answer["v"] for req_id, answer in answers.items()}
    assert versions == {11: 1, 12: 1, 13: 1, 14: 1, 21: 2, 22: 2, 31: 1, 41: 2}
    statuses = {req_id: answer["status"] for req_id, answer in answers.items()}
    assert statuses[14] is Status.UNKNOWN_TOPIC and statuses[31] is Status.UNSUPPORTED_VERSION
    assert all(statuses[req_id] is Status.OK for req_id in (11, 12, 13, 21, 22, 41))
    assert answers[31]["supported"] == [1, 2]
    assert compactly == {req_id: req_id == 41 for req_id in answers}


def test_a_version_1_decoder_refuses_version_2_and_compact_sends_as_an_old_node_did() -> None:
    decoder = FrameDecoder(versions=(1,))
    compact = encode_send(5, "t", b"c", None, None, Acks.LEADER, 5000)
    assert compact is not None
    decoder.feed(encode_frame({"v": 2, "id": 4, "op": "status"}) + compact)
    refused, malformed = decoder.next_frame(), decoder.next_frame()
    assert isinstance(refused, ProtocolError) and refused.status is Status.UNSUPPORTED_VERSION
    assert refused.response()["supported"] == [1] and refused.req_id == 4
    assert isinstance(malformed, ProtocolError) and malformed.status is Status.MALFORMED_FRAME
    assert malformed.req_id == 0
    with pytest.raises(ValueError, match="versions"):
        FrameDecoder(versions=(3,))
    assert SUPPORTED_VERSIONS == (1, 2)


@pytest.mark.parametrize("version", [1, 2])
async def test_a_plain_client_on_a_tls_port_is_answered_in_the_version_it_spoke(
    version: int,
) -> None:
    """The TLS port's answer to a plain-TCP client (it speaks TLS only) is in the version
    of the client's request, like every other answer. (It said version 2 to everyone.)"""
    client_socket, node_socket = trio.socket.socketpair()
    client_stream, node_stream = trio.SocketStream(client_socket), trio.SocketStream(node_socket)
    async with client_stream, trio.open_nursery() as nursery:
        nursery.start_soon(_answer_plain_client, node_stream)
        await client_stream.send_all(encode_frame({"v": version, "id": 7, "op": "status"}))
        decoder = ResponseDecoder()
        answer = None
        with trio.fail_after(10):
            while answer is None:
                decoder.feed(await client_stream.receive_some())
                answer = decoder.next_frame()
            await client_stream.send_eof()
    assert isinstance(answer, dict), answer
    assert answer["id"] == 7 and answer["status"] is Status.BAD_REQUEST and answer["tls"]
    assert answer["v"] == version
