"""TLS on the client port, the node's side: the handshake, or a clear answer to a client
that speaks plain TCP (the client's side is :mod:`cluster.client.tls`).

A TLS client's first byte is 22 (a handshake record); a tidelog frame starts with its
length prefix, whose first byte is 0 for any frame a node accepts. So the node peeks
at the first byte: a plain-TCP client gets its first request answered ``BAD_REQUEST``
saying the port needs TLS and how to connect, instead of a connection that hangs up
for no visible reason. The contexts come from :mod:`replication.tls`.
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Final

import trio

from cluster.protocol import FrameDecoder, ProtocolError, Status, encode_frame, error_response
from cluster.protocol.codec import COMPACT_ANSWER
from cluster.protocol.limits import PROTOCOL_VERSION
from cluster.server.streams import GONE, linger, peer_name
from replication.tls import HANDSHAKE_ERRORS, handshake_failure

__all__ = ["HANDSHAKE_TIMEOUT_S", "PLAIN_CLIENT_ERROR", "accept_tls"]

log = logging.getLogger(__name__)

TLS_HANDSHAKE_RECORD: Final = 0x16
HANDSHAKE_TIMEOUT_S: Final = 10.0
"""A client that has not finished its TLS handshake within this long is dropped."""
PLAIN_FRAME_LIMIT: Final = 64 * 1024
"""How much of a plain-TCP client's first frame the node reads to find its request id."""
PLAIN_CLIENT_ERROR: Final = (
    "this node's client port speaks TLS only: connect with TLS, trusting the cluster's CA "
    "(tidelog ... --tls-ca CA.pem; and --tls-cert/--tls-key if the node asks for a client "
    "certificate)"
)


async def accept_tls(
    stream: trio.SocketStream,
    context: ssl.SSLContext,
    *,
    timeout_s: float = HANDSHAKE_TIMEOUT_S,
) -> trio.SSLStream[trio.SocketStream] | None:
    """The TLS stream over the accepted ``stream``; None when there is none to serve (a
    plain-TCP client, answered with :data:`PLAIN_CLIENT_ERROR`; a failed or too slow
    handshake, logged with its reason), and then ``stream`` is closed."""
    peer = peer_name(stream)
    try:
        with trio.fail_after(timeout_s):
            first = await stream.socket.recv(1, socket.MSG_PEEK)
            if not first:  # connected and left (a port probe): nothing to say
                await trio.aclose_forcefully(stream)
                return None
            if first[0] != TLS_HANDSHAKE_RECORD:
                log.warning("tls_plain_client peer=%s: answered that this port needs TLS", peer)
                await _answer_plain_client(stream)
                return None
            secured = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
            await secured.do_handshake()
            return secured
    except trio.TooSlowError:
        log.info("tls_handshake_timeout peer=%s timeout_s=%g", peer, timeout_s)
    except HANDSHAKE_ERRORS as exc:
        log.warning("tls_handshake_failed peer=%s reason=%s", peer, handshake_failure(exc))
    await trio.aclose_forcefully(stream)
    return None


async def _answer_plain_client(stream: trio.SocketStream) -> None:
    """Answer the plain client's first request (by its id) with the error, then close."""
    decoder = FrameDecoder(PLAIN_FRAME_LIMIT)
    req_id = 0
    try:
        while data := await stream.receive_some(PLAIN_FRAME_LIMIT):
            decoder.feed(data)
            item = decoder.next_frame()
            if item is not None:
                req_id = item.req_id if isinstance(item, ProtocolError) else item["id"]
                break
    except ProtocolError as fatal:
        req_id = fatal.req_id
    except GONE:
        return
    response = error_response(req_id, Status.BAD_REQUEST, PLAIN_CLIENT_ERROR, tls=True)
    if decoder.answer_version not in (COMPACT_ANSWER, PROTOCOL_VERSION):
        response["v"] = decoder.answer_version  # in the version the client spoke
    try:
        await stream.send_all(encode_frame(response))
        await linger(stream)
    except GONE:
        return
    finally:
        await trio.aclose_forcefully(stream)
