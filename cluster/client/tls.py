"""TLS on the client port, the client's side: a context trusting the cluster's CA (and a
client certificate when the nodes ask for one), and the handshake on a new connection.
The node's side is :mod:`cluster.server.tls`.

Self-contained (the stdlib ``ssl`` only): the client library stands on the wire
protocol alone, so it shares no module with the node's TLS (:mod:`replication.tls`).
"""

from __future__ import annotations

import ssl
from typing import Final

import anyio
import anyio.abc
from anyio.streams.tls import TLSStream

__all__ = ["TlsHandshakeError", "client_tls", "connect_tls"]

_NOT_TLS: Final = frozenset({"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL"})
"""OpenSSL's reasons when the node's first bytes are no TLS record at all."""


class TlsHandshakeError(ConnectionError):
    """The TLS handshake with a node failed; the message says why and what to check."""


def client_tls(ca_file: str, cert_file: str = "", key_file: str = "") -> ssl.SSLContext:
    """A client's TLS context: trust only ``ca_file`` (the CA that signed the nodes'
    certificates), check that a node's certificate names the host dialled, present
    ``cert_file`` with ``key_file`` when set (for nodes that ask for client
    certificates). Blocking (reads the files); ``ValueError`` names the wrong file."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"--tls-ca {ca_file} cannot be loaded: {exc}: it must be PEM") from None
    if cert_file:
        try:
            context.load_cert_chain(cert_file, key_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"--tls-cert {cert_file} with --tls-key {key_file or cert_file} cannot be "
                f"loaded: {exc}: both must be PEM, the key the certificate's own"
            ) from None
    return context


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, anyio.BrokenResourceError) else exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate refused: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError) and cause.reason in _NOT_TLS:
        return f"the node does not speak TLS ({cause.reason}) on this port"
    if isinstance(cause, ssl.SSLError):
        return cause.reason or str(cause)
    return str(cause) if cause is not None else "the node closed the connection"


async def connect_tls(
    stream: anyio.abc.SocketStream, context: ssl.SSLContext, host: str
) -> TLSStream:
    """The TLS stream over the connected ``stream``, the node's certificate checked
    against the CA and ``host``; :class:`TlsHandshakeError` (``stream`` closed) when the
    handshake fails."""
    try:
        secured = await TLSStream.wrap(
            stream, hostname=host, ssl_context=context, standard_compatible=True
        )
    except (anyio.BrokenResourceError, anyio.EndOfStream, ssl.SSLError, OSError) as exc:
        await anyio.aclose_forcefully(stream)
        raise TlsHandshakeError(
            f"{_reason(exc)}: does the node's client port use TLS, with a certificate "
            "signed by the CA given (--tls-ca) that names this host?"
        ) from None
    return secured
