"""The image's health check: exit 0 when the node at HOST:PORT answers ``status`` with OK.

Docker runs it in every node container every few seconds, so it must be cheap: it speaks
the wire protocol directly (a length-prefixed CBOR map, docs/protocol.md) with the
standard library and cbor2, instead of starting the ``tidelog`` CLI, whose imports cost
ten times the CPU (seven containers checked every 2 s kept a core of a 2-core machine
busy, and the nodes' etcd lease renewals missed their deadlines).

    healthcheck.py HOST PORT [TIMEOUT_S]
"""

import socket
import struct
import sys

import cbor2

_HEADER = struct.Struct(">I")
_MAX_ANSWER_BYTES = 16 * 1024 * 1024


def _read_exactly(connection: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = connection.recv(min(size, 65536))
        if not chunk:
            raise ConnectionError("the node closed the connection before answering")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def check(host: str, port: int, timeout_s: float) -> str:
    """The status the node answered (``OK`` when healthy)."""
    body = cbor2.dumps({"v": 1, "op": "status", "id": 1})
    with socket.create_connection((host, port), timeout=timeout_s) as connection:
        connection.settimeout(timeout_s)
        connection.sendall(_HEADER.pack(len(body)) + body)
        (size,) = _HEADER.unpack(_read_exactly(connection, _HEADER.size))
        if size > _MAX_ANSWER_BYTES:
            raise ValueError(f"an answer of {size} bytes is not a status answer")
        answer = cbor2.loads(_read_exactly(connection, size))
    return str(answer.get("status")) if isinstance(answer, dict) else repr(answer)


def main(argv: list[str]) -> int:
    host, port = argv[1], int(argv[2])
    timeout_s = float(argv[3]) if len(argv) > 3 else 4.0
    try:
        status = check(host, port, timeout_s)
    except (OSError, ValueError, cbor2.CBORDecodeError) as error:
        print(f"node {host}:{port} did not answer status: {error}", file=sys.stderr)
        return 1
    if status != "OK":
        print(f"node {host}:{port} answered status {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
