"""TLS for the node's ports: contexts built from certificate files, and a trio socket that
runs over a TLS stream so the HA code's socket calls work unchanged.

The replication port uses *mutual* TLS: the master asks every peer for a certificate
and both ends verify the other's against the cluster's CA (``ca_file``); the slave also
checks that the master's certificate names the host it dialled. The client port uses
TLS with the same files; with a CA it asks clients for certificates too.

Why a socket and not a stream: the HA code reads and writes trio sockets directly
(``os.sendfile``, ``readv`` on the descriptor). Encrypted bytes must pass through user
space, so :mod:`replication.transfer` takes its copy path for a :class:`TlsSocket` and
every send and receive goes through the :class:`trio.SSLStream`; the call sites stay
as they are.
"""

from __future__ import annotations

import ssl
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

if TYPE_CHECKING:
    from typing import Self

    from typing_extensions import Buffer

__all__ = [
    "HANDSHAKE_ERRORS",
    "TlsFiles",
    "TlsSocket",
    "certificate_names",
    "check_files",
    "client_context",
    "handshake_failure",
    "server_context",
]

MIN_VERSION: Final = ssl.TLSVersion.TLSv1_2
HANDSHAKE_ERRORS: Final = (trio.BrokenResourceError, ssl.SSLError, OSError)
"""What a failed handshake raises (a refused certificate, a plaintext peer, a reset)."""
_NOT_TLS: Final = frozenset({"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL"})
"""OpenSSL's reasons when the first bytes are no TLS record at all."""


@attrs.frozen(kw_only=True)
class TlsFiles:
    """Where a node's TLS material is: its certificate chain and key (PEM), and the CA
    (PEM) it verifies peers against. Empty strings are unset."""

    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file or self.key_file or self.ca_file)


def _load_chain(context: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    try:
        context.load_cert_chain(cert_file, key_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"tls_cert_file {cert_file} with tls_key_file {key_file or cert_file} cannot be "
            f"loaded: {exc}: both must be PEM files, the key the certificate's own"
        ) from None


def _load_ca(context: ssl.SSLContext, ca_file: str) -> None:
    try:
        context.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"tls_ca_file {ca_file} cannot be loaded: {exc}: it must be PEM") from None


def server_context(files: TlsFiles, *, require_client_cert: bool) -> ssl.SSLContext:
    """The context of a listening port (blocking: reads the files; call it at start).
    ``require_client_cert``: refuse peers without a certificate signed by ``ca_file``."""
    if not files.cert_file or not files.key_file:
        raise ValueError(
            "tls_cert_file and tls_key_file must both be set for TLS (this node's "
            "certificate and its key, PEM)"
        )
    if require_client_cert and not files.ca_file:
        raise ValueError(
            "tls_ca_file must be set for mutual TLS: the CA that signs the peers' certificates"
        )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = MIN_VERSION
    _load_chain(context, files.cert_file, files.key_file)
    if files.ca_file:
        _load_ca(context, files.ca_file)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    ca_file: str, cert_file: str = "", key_file: str = "", *, check_hostname: bool = True
) -> ssl.SSLContext:
    """The context of a connecting end (blocking: reads the files): trusts ``ca_file``
    only (not the system's CAs: a cluster has its own), presents ``cert_file`` when set."""
    if not ca_file:
        raise ValueError("tls_ca_file must be set: the CA that signed the node's certificate")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = MIN_VERSION
    context.check_hostname = check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    _load_ca(context, ca_file)
    if cert_file:
        _load_chain(context, cert_file, key_file)
    return context


def check_files(files: TlsFiles, *, mutual: bool) -> None:
    """Load ``files`` as a listening port would (and, when ``mutual``, as a connecting
    end too), so a wrong path or a key of another certificate stops the start with a
    :class:`ValueError` that names the key, instead of failing every connection."""
    server_context(files, require_client_cert=mutual)
    if mutual:
        client_context(files.ca_file, files.cert_file, files.key_file)


def certificate_names(cert: Any) -> frozenset[str]:
    """The names a verified peer certificate gives its holder: its subject's common
    names and its DNS subject alternative names (as ``getpeercert()`` lists them)."""
    if not isinstance(cert, dict):
        return frozenset()
    names = {value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"}
    names.update(value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS")
    return frozenset(names)


def handshake_failure(exc: BaseException) -> str:
    """The reason of a failed handshake in words (trio wraps the ``ssl`` error)."""
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate refused: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        if cause.reason in _NOT_TLS:
            return f"the peer does not speak TLS ({cause.reason}): a plain-TCP client or node?"
        return cause.reason or str(cause)
    if cause is None:
        return "the peer closed the connection during the TLS handshake"
    return str(cause) or type(cause).__name__


def _broken(exc: trio.BrokenResourceError) -> OSError:
    """A broken TLS stream as the ``OSError`` the HA code handles for a broken socket."""
    return ConnectionResetError(f"TLS stream broken: {handshake_failure(exc)}")


class TlsSocket(trio.socket.SocketType):
    """A connected trio socket whose bytes go through TLS: the subset of the socket API
    the HA code uses (send, recv, recv_into, options, shutdown, close).

    One task may send while another receives (the master's sender and ack reader);
    concurrent sends are serialised by a lock, so a frame is never split by another.
    The raw socket stays the owner of the descriptor: closing either closes it.
    """

    def __init__(self, sock: trio.socket.SocketType, stream: trio.SSLStream[Any]) -> None:
        super().__init__()
        self._sock = sock
        self._stream = stream
        self._send_lock = trio.Lock()

    @classmethod
    async def wrap(
        cls,
        sock: trio.socket.SocketType,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> TlsSocket:
        """Run the handshake on the connected ``sock``; raises one of
        :data:`HANDSHAKE_ERRORS` when it fails (see :func:`handshake_failure`)."""
        stream = trio.SSLStream(
            trio.SocketStream(sock),
            context,
            server_side=server_side,
            server_hostname=server_hostname,
            https_compatible=True,  # a close without close_notify reads as the end
        )
        await stream.do_handshake()
        return cls(sock, stream)

    @property
    def peer_certificate(self) -> Any:
        """The peer's verified certificate (as :meth:`ssl.SSLSocket.getpeercert` gives it)."""
        return self._stream.getpeercert()

    def fileno(self) -> int:
        return self._sock.fileno()

    def getpeername(self) -> Any:
        return self._sock.getpeername()

    def getsockname(self) -> Any:
        return self._sock.getsockname()

    def setsockopt(self, level: int, optname: int, value: Any, optlen: int | None = None) -> None:
        if optlen is None:
            self._sock.setsockopt(level, optname, value)
        else:
            self._sock.setsockopt(level, optname, value, optlen)

    def shutdown(self, flag: int) -> None:
        self._sock.shutdown(flag)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    async def send(self, data: Buffer, flags: int = 0, /) -> int:
        """Send all of ``data`` (``flags`` such as ``MSG_MORE`` do not apply to TLS)."""
        view = memoryview(data)
        async with self._send_lock:
            try:
                await self._stream.send_all(view)
            except trio.BrokenResourceError as exc:
                raise _broken(exc) from exc
        return len(view)

    async def recv(self, buflen: int, flags: int = 0, /) -> bytes:
        try:
            return bytes(await self._stream.receive_some(buflen))
        except trio.BrokenResourceError as exc:
            raise _broken(exc) from exc

    async def recv_into(self, buffer: Buffer, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(buffer).cast("B")
        data = await self.recv(nbytes or len(view))
        view[: len(data)] = data
        return len(data)
