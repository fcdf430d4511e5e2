"""Cluster authentication of the HA handshake: the pure part (nonces, transcripts, proofs).

Both ends of a replication stream hold the same *cluster secret*. Each end sends a fresh
random nonce; each then proves it holds the secret with an HMAC-SHA256 over a transcript
of the handshake (protocol version, both nonces, both names) plus the hello it sends
next, under a label naming its role, so a proof can be neither replayed (fresh nonces),
reflected (the role label) nor moved to another hello (the hello is inside the MAC).
The slave proves first: a peer that merely dials the master's port never receives a
proof it could use to test guesses of the secret offline. Proofs are compared in
constant time (:func:`hmac.compare_digest`).

What this does not do: encrypt the stream or protect it from someone *on the path*
after the handshake (an attacker who can rewrite TCP segments can hijack an
authenticated connection). That needs TLS, which is not built; keep the HA port on a
network only the cluster reaches. See the threat model in ``docs/design.md``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from typing import Final

__all__ = [
    "MIN_SECRET_BYTES",
    "NONCE_SIZE",
    "NO_PROOF",
    "PROOF_SIZE",
    "check_secret",
    "new_nonce",
    "proof",
    "proof_matches",
    "read_secret_file",
    "transcript",
]

NONCE_SIZE: Final = 32
PROOF_SIZE: Final = 32
"""An HMAC-SHA256 digest."""
NO_PROOF: Final = bytes(PROOF_SIZE)
"""The proof field of an end without a secret (never accepted by an end that has one)."""
MIN_SECRET_BYTES: Final = 16
"""A shorter secret is refused: anyone who can dial the port could guess it."""
_LABEL: Final = b"tidelog-ha-auth"
_ROLES: Final = (b"slave", b"master")


def check_secret(secret: bytes) -> bytes:
    """``secret`` if it is usable, else :class:`ValueError` saying how to make one."""
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"cluster secret must be at least {MIN_SECRET_BYTES} bytes, got {len(secret)}: "
            'make one with: python3 -c "import secrets; print(secrets.token_hex(32))"'
        )
    return secret


def read_secret_file(path: str) -> bytes:
    """The secret stored in the file at ``path`` (blocking; call it at configuration
    time), surrounding whitespace (the final newline of an editor) removed."""
    try:
        with open(path, "rb") as file:
            secret = file.read(64 * 1024).strip()
    except OSError as exc:
        raise ValueError(f"cannot read the cluster secret file {path}: {exc.strerror}") from None
    return check_secret(secret)


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def _field(value: bytes) -> bytes:
    return struct.pack("!I", len(value)) + value


def transcript(
    version: int, slave_nonce: bytes, master_nonce: bytes, slave_name: str, master_name: str
) -> bytes:
    """What both proofs cover besides the hello: one unambiguous byte string (every
    variable-length field carries its length)."""
    assert len(slave_nonce) == NONCE_SIZE and len(master_nonce) == NONCE_SIZE
    return b"".join(
        (
            _LABEL,
            struct.pack("!H", version),
            slave_nonce,
            master_nonce,
            _field(slave_name.encode()),
            _field(master_name.encode()),
        )
    )


def proof(secret: bytes, role: str, handshake: bytes, hello: bytes) -> bytes:
    """The proof that the ``role`` end (``"slave"`` or ``"master"``) holds ``secret``
    for this ``handshake`` transcript and the ``hello`` bytes it sends with it."""
    label = role.encode()
    assert label in _ROLES, role
    return hmac.new(secret, _field(label) + handshake + _field(hello), hashlib.sha256).digest()


def proof_matches(secret: bytes, role: str, handshake: bytes, hello: bytes, got: bytes) -> bool:
    """Whether ``got`` is the ``role`` end's proof (constant-time comparison)."""
    return hmac.compare_digest(proof(secret, role, handshake, hello), got)
