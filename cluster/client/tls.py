"""TLS on the client port, the client's side: a context trusting the cluster's CA (and a
client certificate when the nodes ask for one), and the handshake on a new connection.
The node's side is :mod:`cluster.server.tls`."""

from __future__ import annotations

import ssl

import trio

from replication.tls import HANDSHAKE_ERRORS, client_context, handshake_failure

__all__ = ["TlsHandshakeError", "client_tls", "connect_tls"]


class TlsHandshakeError(ConnectionError):
    """The TLS handshake with a node failed; the message says why and what to check."""


def client_tls(ca_file: str, cert_file: str = "", key_file: str = "") -> ssl.SSLContext:
    """A client's TLS context: trust ``ca_file`` (the CA that signed the nodes'
    certificates), present ``cert_file`` with ``key_file`` when the nodes ask for one.
    Blocking (reads the files); ``ValueError`` names the file that is wrong."""
    return client_context(ca_file, cert_file, key_file)


async def connect_tls(
    stream: trio.SocketStream, context: ssl.SSLContext, host: str
) -> trio.SSLStream[trio.SocketStream]:
    """The TLS stream over the connected ``stream``, the node's certificate checked
    against the CA and ``host``; :class:`TlsHandshakeError` (``stream`` closed) when the
    handshake fails."""
    secured = trio.SSLStream(stream, context, server_hostname=host, https_compatible=True)
    try:
        await secured.do_handshake()
    except HANDSHAKE_ERRORS as exc:
        await trio.aclose_forcefully(stream)
        raise TlsHandshakeError(
            f"{handshake_failure(exc)}: does the node's client port use TLS, with a "
            "certificate signed by the CA given (--tls-ca) that names this host?"
        ) from None
    return secured
