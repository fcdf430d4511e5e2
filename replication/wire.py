"""The HA frames on the wire (sans-IO codecs plus the thin socket readers that use them).

One connection per slave, in order (see ``docs/protocol.md`` for the byte layouts):

0. Authentication (:mod:`replication.auth`): slave -> master a *slave challenge*
   (magic, version, flags, a nonce, its name); master -> slave a *master challenge*
   (the same fields) or a *refusal* (text); slave -> master its *proof* frame directly
   followed by its hello; the master checks the proof before it looks at the hello,
   then answers with its own proof frame directly followed by its hello (or a
   refusal), which the slave checks before it trusts anything the master says. An end
   without a cluster secret sends a zero proof, which an end with one never accepts.
1. slave -> master: a *slave hello*: magic, version, the slave's log end, its name and
   its epoch history (count, then u32 epoch + u64 start offset per entry).
2. master -> slave: a *master hello*: magic, version, the master's log end, where the
   stream starts (``stream_from``, the master's one decision, see
   :func:`replication.state.stream_start`) and the master's epoch history.
3. master -> slave: chunks (:mod:`replication.transfer`), one range of one segment each.
   A chunk with :data:`CHUNK_CONFIRM` in its flags carries no data: its offset is the
   master's confirm offset. An empty chunk without flags is the master's heartbeat.
4. slave -> master: 16-byte *ack* frames carrying the slave's visible log end, or a
   *refusal* (:data:`ACK_REFUSED`): the slave could not apply what it was sent and
   closes; the master logs why and drops the connection.

There is one parse path per frame: the socket readers (:func:`read_slave_hello`,
:func:`read_master_hello`) read the fixed part, ask the codec how many bytes follow,
read those and hand the whole frame to the same ``unpack_*`` function the tests call.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

import attrs
import trio

from replication.auth import (
    NO_PROOF,
    NONCE_SIZE,
    PROOF_SIZE,
    new_nonce,
    proof,
    proof_matches,
    transcript,
)
from replication.epochs import EpochEntry, EpochHistory, EpochHistoryError, followed_epoch
from replication.transfer import recv_exactly_into

__all__ = [
    "ACK_SIZE",
    "CHUNK_CONFIRM",
    "EPOCH_ENTRY_SIZE",
    "HA_VERSION",
    "MASTER_HELLO_SIZE",
    "MAX_EPOCH_ENTRIES",
    "SLAVE_HELLO_FIXED",
    "Ack",
    "AckDecoder",
    "AckKind",
    "Challenge",
    "HAAuthError",
    "HAProtocolError",
    "MasterHello",
    "NotAnHAPortError",
    "OldVersionError",
    "SlaveHello",
    "answered_like_a_client_port",
    "epochs_text",
    "master_hello_remaining",
    "pack_ack",
    "pack_challenge",
    "pack_epochs",
    "pack_handshake_refusal",
    "pack_master_hello",
    "pack_old_version_refusal",
    "pack_proof",
    "pack_refusal",
    "pack_slave_hello",
    "printable",
    "read_master_challenge",
    "read_master_hello",
    "read_proof_and_master_hello",
    "read_proof_and_slave_hello",
    "read_slave_challenge",
    "read_slave_hello",
    "send_all",
    "set_no_delay",
    "slave_handshake",
    "slave_hello_remaining",
    "unpack_epochs",
    "unpack_master_hello",
    "unpack_slave_hello",
]

HA_VERSION: Final = 4
"""2: the hellos carry epoch histories. 3: the master's hello names where the stream
starts, acks may be refusals, and confirm-offset chunks exist. 4: the cluster
authentication (challenges, proofs, refusals) comes first."""
SLAVE_HELLO_MAGIC: Final = 0x544C4853  # "TLHS": tidelog hello (and challenge) from a slave
MASTER_HELLO_MAGIC: Final = 0x544C484D  # "TLHM": tidelog hello from the master
ACK_MAGIC: Final = 0x544C4841  # "TLHA": tidelog HA ack
MASTER_CHALLENGE_MAGIC: Final = 0x544C484E  # "TLHN": the master's nonce
PROOF_MAGIC: Final = 0x544C4850  # "TLHP": a proof of the cluster secret
REFUSAL_MAGIC: Final = 0x544C4858  # "TLHX": the master refuses this peer, with the reason

_CHALLENGE = struct.Struct(f"!IHH{NONCE_SIZE}sH")
"""magic u32, version u16, flags u16 (:data:`_AUTH`), nonce, name length u16; then the
name (1..255 UTF-8 bytes)."""
_AUTH = 0x0001
"""Challenge flag: this end holds a cluster secret and will prove it."""
_PROOF = struct.Struct(f"!IHH{PROOF_SIZE}s")
"""magic u32, version u16, reserved u16, HMAC-SHA256 proof: 40 bytes."""
_REFUSAL = struct.Struct("!IHH")
"""magic u32, version u16, reason length u16; then the reason (UTF-8)."""
MAX_REFUSAL_TEXT: Final = 1024

_SLAVE_HELLO = struct.Struct("!IHHQHHI")
"""magic u32, version u16, flags u16, slave log end u64, name length u16, epoch count
u16, followed epoch u32 (valid when flags has :data:`_FOLLOWED`); then the name, then
the epoch entries."""
_FOLLOWED = 0x0001
_MASTER_HELLO = struct.Struct("!IHHQQH")
"""magic u32, version u16, reserved u16, master log end u64, stream start u64, epoch
count u16; then the epoch entries."""
_EPOCH_ENTRY = struct.Struct("!IQ")
"""epoch u32, start offset u64 (the epoch file's field widths)."""
_ACK = struct.Struct("!IHHQ")
"""magic u32, version u16, kind u16, offset u64: 16 bytes."""

SLAVE_HELLO_FIXED: Final = _SLAVE_HELLO.size
MASTER_HELLO_SIZE: Final = _MASTER_HELLO.size
"""The fixed part of the master's hello: all of it when the master has no history."""
EPOCH_ENTRY_SIZE: Final = _EPOCH_ENTRY.size
ACK_SIZE: Final = _ACK.size
MAX_NAME: Final = 255
MAX_EPOCH_ENTRIES: Final = 4096
"""Bound on a hello's history (48 KiB of entries): a peer cannot make us allocate more.
A history only grows by one entry per master election, so this is decades of them."""

CHUNK_CONFIRM: Final = 0x0001
"""Chunk flag: no data follows; the header's offset is the master's confirm offset."""


class HAProtocolError(Exception):
    """The peer sent something that is not this protocol (or not this version): close."""


class HAAuthError(HAProtocolError):
    """The handshake refused a peer: a missing or different cluster secret, or an older
    protocol version. The message says which end lacks what and what to change."""


class NotAnHAPortError(HAProtocolError):
    """The master's address answered like a tidelog client port: ``master_ha`` names a
    node's client port instead of its HA port."""


def answered_like_a_client_port(head: bytes | bytearray) -> bool:
    """The first bytes a tidelog client port sends a slave: it takes the challenge's magic
    for the length of a frame far too large and answers ``FRAME_TOO_LARGE`` in a frame of
    its own, a 4-byte big-endian length then a CBOR map (major type 5)."""
    length = int.from_bytes(head[:4], "big")
    return len(head) > 4 and 0 < length < 1 << 24 and 0xA0 <= head[4] <= 0xBF


@attrs.frozen
class Challenge:
    """One end's opening of the authentication: who it says it is and its nonce."""

    name: str
    nonce: bytes
    authenticated: bool
    """The end holds a cluster secret and will send a real proof."""


class AckKind(enum.IntEnum):
    """What a slave's 16-byte frame says about its offset."""

    ACK = 0
    """The slave's visible log ends at the offset (also sent as its heartbeat)."""
    REFUSED = 1
    """The slave could not apply the bytes sent at the offset and closes the stream."""


ACK_REFUSED: Final = AckKind.REFUSED


@attrs.frozen
class Ack:
    kind: AckKind
    offset: int


@attrs.frozen
class SlaveHello:
    name: str
    max_offset: int
    epochs: tuple[EpochEntry, ...] = ()
    """The slave's epoch history, oldest first (empty for an epoch-unaware slave)."""
    followed_epoch: int | None = None
    """The newest epoch the slave learned from a master (not one it led itself): what
    its history proves about which masters exist (see ``epochs.leader_is_stale``)."""

    @property
    def history(self) -> EpochHistory:
        return EpochHistory(self.epochs)


@attrs.frozen
class MasterHello:
    max_offset: int
    stream_from: int
    """Where the master's first chunk starts: the slave's end, lower when the slave's tail
    diverged (the slave cuts there), higher when the slave is behind the master's log
    start (the slave restarts its log there)."""
    epochs: tuple[EpochEntry, ...] = ()
    """The master's epoch history, oldest first (empty for an epoch-unaware master)."""

    @property
    def history(self) -> EpochHistory:
        return EpochHistory(self.epochs)


def printable(text: str) -> str:
    """``text`` safe for one log line: what an unauthenticated peer sent (a claimed name,
    a refusal's reason) must not forge lines or control the terminal."""
    return "".join(c if c.isprintable() else "?" for c in text)


def epochs_text(entries: tuple[EpochEntry, ...]) -> str:
    """``1@0,2@150``: a history as one log field."""
    return ",".join(f"{e.epoch}@{e.start_offset}" for e in entries) or "-"


def _check_magic(magic: int, version: int, want: int, what: str) -> None:
    if magic != want:
        raise HAProtocolError(f"bad {what} magic {magic:#010x} (want {want:#010x})")
    if version != HA_VERSION:
        raise HAProtocolError(
            f"unsupported {what} version {version} (want {HA_VERSION}): run the same "
            "tidelog version on master and slaves"
        )


def _check_epoch_count(count: int, what: str) -> None:
    if count > MAX_EPOCH_ENTRIES:
        raise HAProtocolError(f"{what} carries {count} epochs, more than {MAX_EPOCH_ENTRIES}")


def pack_epochs(history: EpochHistory | None) -> bytes:
    """The entries of ``history`` as a hello carries them (nothing for None)."""
    if history is None:
        return b""
    if len(history) > MAX_EPOCH_ENTRIES:
        raise ValueError(f"{len(history)} epochs do not fit a hello (max {MAX_EPOCH_ENTRIES})")
    try:
        return b"".join(_EPOCH_ENTRY.pack(e.epoch, e.start_offset) for e in history.entries)
    except struct.error as exc:
        raise ValueError(f"an epoch entry does not fit u32 epoch / u64 offset: {exc}") from exc


def unpack_epochs(data: bytes | bytearray | memoryview, count: int) -> tuple[EpochEntry, ...]:
    """Parse ``count`` entries that must fill ``data`` exactly and form a valid history
    (epochs increasing, starts not decreasing): a peer's history we cannot trust must
    not decide what the slave deletes."""
    _check_epoch_count(count, "hello")
    if len(data) != count * EPOCH_ENTRY_SIZE:
        raise HAProtocolError(
            f"{count} epochs need {count * EPOCH_ENTRY_SIZE} bytes, got {len(data)}"
        )
    entries = tuple(EpochEntry(*fields) for fields in _EPOCH_ENTRY.iter_unpack(data))
    try:
        EpochHistory(entries)
    except EpochHistoryError as exc:
        raise HAProtocolError(f"epoch history out of order: {exc}") from exc
    return entries


# ---- authentication frames --------------------------------------------------------------------


def pack_challenge(name: str, nonce: bytes, authenticated: bool, *, master: bool) -> bytes:
    raw = name.encode()
    if not 0 < len(raw) <= MAX_NAME:
        raise ValueError(f"an HA peer name must be 1..{MAX_NAME} UTF-8 bytes, got {len(raw)}")
    assert len(nonce) == NONCE_SIZE
    magic = MASTER_CHALLENGE_MAGIC if master else SLAVE_HELLO_MAGIC
    flags = _AUTH if authenticated else 0
    return _CHALLENGE.pack(magic, HA_VERSION, flags, nonce, len(raw)) + raw


def pack_proof(proof: bytes) -> bytes:
    assert len(proof) == PROOF_SIZE
    return _PROOF.pack(PROOF_MAGIC, HA_VERSION, 0, proof)


def pack_handshake_refusal(reason: str) -> bytes:
    """The master's last word to a peer it refuses during the handshake."""
    text = reason.encode()[:MAX_REFUSAL_TEXT]
    return _REFUSAL.pack(REFUSAL_MAGIC, HA_VERSION, len(text)) + text


def pack_old_version_refusal() -> bytes:
    """What the master answers a slave of an older protocol: the fixed part of a
    master hello of this version, which every older slave refuses with "unsupported
    master hello version ...: run the same tidelog version on master and slaves"."""
    return _MASTER_HELLO.pack(MASTER_HELLO_MAGIC, HA_VERSION, 0, 0, 0, 0)


def _challenge_fields(
    fixed: bytes | bytearray | memoryview, want: int, what: str
) -> tuple[bytes, bool, int]:
    magic, version, flags, nonce, name_len = _CHALLENGE.unpack(fixed)
    _check_magic(magic, version, want, what)
    if not 0 < name_len <= MAX_NAME:
        raise HAProtocolError(f"{what} name length {name_len} outside 1..{MAX_NAME}")
    return bytes(nonce), bool(flags & _AUTH), name_len


def _decode_name(raw: bytes | bytearray, what: str) -> str:
    try:
        return bytes(raw).decode()
    except UnicodeDecodeError as exc:
        raise HAProtocolError(f"{what} name is not UTF-8: {exc}") from exc


# ---- slave hello ------------------------------------------------------------------------------


def pack_slave_hello(name: str, max_offset: int, history: EpochHistory | None = None) -> bytes:
    raw = name.encode()
    if not 0 < len(raw) <= MAX_NAME:
        raise ValueError(f"slave name must be 1..{MAX_NAME} UTF-8 bytes, got {len(raw)}")
    epochs = pack_epochs(history)
    count = len(epochs) // EPOCH_ENTRY_SIZE
    followed = followed_epoch(history) if history is not None else None
    flags, followed_field = (0, 0) if followed is None else (_FOLLOWED, followed)
    fixed = _SLAVE_HELLO.pack(
        SLAVE_HELLO_MAGIC, HA_VERSION, flags, max_offset, len(raw), count, followed_field
    )
    return fixed + raw + epochs


def _slave_hello_fields(
    fixed: bytes | bytearray | memoryview,
) -> tuple[int, int, int, int | None]:
    """(slave log end, name length, epoch count, followed epoch) of a slave hello's
    checked fixed part."""
    magic, version, flags, max_offset, name_len, count, followed = _SLAVE_HELLO.unpack(fixed)
    _check_magic(magic, version, SLAVE_HELLO_MAGIC, "slave hello")
    if not 0 < name_len <= MAX_NAME:
        raise HAProtocolError(f"slave name length {name_len} outside 1..{MAX_NAME}")
    _check_epoch_count(count, "slave hello")
    return max_offset, name_len, count, followed if flags & _FOLLOWED else None


def slave_hello_remaining(fixed: bytes | bytearray | memoryview) -> int:
    """How many bytes follow the fixed part ``fixed`` of a slave hello (checks it)."""
    _max_offset, name_len, count, _followed = _slave_hello_fields(fixed)
    return name_len + count * EPOCH_ENTRY_SIZE


def unpack_slave_hello(data: bytes | bytearray | memoryview) -> SlaveHello:
    """Parse a whole slave hello, which must be exactly ``data``."""
    view = memoryview(data)
    if len(view) < SLAVE_HELLO_FIXED:
        raise HAProtocolError(f"slave hello of {len(view)} B is shorter than its fixed part")
    max_offset, name_len, count, followed = _slave_hello_fields(view[:SLAVE_HELLO_FIXED])
    name_end = SLAVE_HELLO_FIXED + name_len
    if len(view) < name_end:
        raise HAProtocolError(f"slave hello of {len(view)} B ends inside the name")
    try:
        name = bytes(view[SLAVE_HELLO_FIXED:name_end]).decode()
    except UnicodeDecodeError as exc:
        raise HAProtocolError(f"slave name is not UTF-8: {exc}") from exc
    return SlaveHello(name, max_offset, unpack_epochs(view[name_end:], count), followed)


# ---- master hello -----------------------------------------------------------------------------


def pack_master_hello(
    max_offset: int, stream_from: int, history: EpochHistory | None = None
) -> bytes:
    epochs = pack_epochs(history)
    count = len(epochs) // EPOCH_ENTRY_SIZE
    fixed = _MASTER_HELLO.pack(MASTER_HELLO_MAGIC, HA_VERSION, 0, max_offset, stream_from, count)
    return fixed + epochs


def _master_hello_fields(fixed: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    magic, version, _reserved, max_offset, stream_from, count = _MASTER_HELLO.unpack(fixed)
    _check_magic(magic, version, MASTER_HELLO_MAGIC, "master hello")
    _check_epoch_count(count, "master hello")
    if stream_from > max_offset:
        raise HAProtocolError(f"master hello streams from {stream_from}, past its end {max_offset}")
    return max_offset, stream_from, count


def master_hello_remaining(fixed: bytes | bytearray | memoryview) -> int:
    """How many bytes follow the fixed part ``fixed`` of a master hello (checks it)."""
    _max_offset, _stream_from, count = _master_hello_fields(fixed)
    return count * EPOCH_ENTRY_SIZE


def unpack_master_hello(data: bytes | bytearray | memoryview) -> MasterHello:
    """Parse a whole master hello, which must be exactly ``data``."""
    view = memoryview(data)
    if len(view) < MASTER_HELLO_SIZE:
        raise HAProtocolError(f"master hello of {len(view)} B is shorter than its fixed part")
    max_offset, stream_from, count = _master_hello_fields(view[:MASTER_HELLO_SIZE])
    return MasterHello(max_offset, stream_from, unpack_epochs(view[MASTER_HELLO_SIZE:], count))


# ---- acks -------------------------------------------------------------------------------------


def pack_ack(offset: int) -> bytes:
    return _ACK.pack(ACK_MAGIC, HA_VERSION, AckKind.ACK, offset)


def pack_refusal(offset: int) -> bytes:
    """The slave's last word: it could not apply the chunk at ``offset`` and closes."""
    return _ACK.pack(ACK_MAGIC, HA_VERSION, AckKind.REFUSED, offset)


class AckDecoder:
    """Turn the slave's byte stream into :class:`Ack` frames, whatever the read boundaries
    are. One reader task owns an instance."""

    def __init__(self) -> None:
        self._pending = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Ack]:
        """Add received bytes; return the frames they completed, in order."""
        self._pending += data
        frames = []
        whole = len(self._pending) - len(self._pending) % ACK_SIZE
        for start in range(0, whole, ACK_SIZE):
            magic, version, kind, offset = _ACK.unpack_from(self._pending, start)
            _check_magic(magic, version, ACK_MAGIC, "ack")
            try:
                frames.append(Ack(AckKind(kind), offset))
            except ValueError:
                raise HAProtocolError(f"unknown ack kind {kind}") from None
        del self._pending[:whole]
        return frames

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held back (non-zero at EOF means a torn frame)."""
        return len(self._pending)


# ---- socket readers (thin: the codecs above decide) -------------------------------------------


async def recv_exactly(sock: trio.socket.SocketType, size: int, what: str) -> bytearray:
    """``size`` bytes, or :class:`HAProtocolError` naming ``what`` if the stream ends."""
    buf = bytearray(size)
    got = await recv_exactly_into(sock, memoryview(buf))
    if got < size:
        raise HAProtocolError(f"stream ended after {got} of {size} bytes of the {what}")
    return buf


_MAGIC_AND_VERSION: Final = struct.Struct("!IH")


class OldVersionError(HAAuthError):
    """The peer speaks an older HA protocol (its version is in :attr:`version`)."""

    def __init__(self, message: str, version: int) -> None:
        super().__init__(message)
        self.version = version


async def read_slave_challenge(sock: trio.socket.SocketType) -> Challenge:
    """The slave's opening. The magic and version are checked as soon as they arrive: a
    peer that is not a slave (a client that dialled the replication port) is refused at
    once, and a slave of an older protocol raises :class:`OldVersionError` (the caller
    answers it with :func:`pack_old_version_refusal`)."""
    head = await recv_exactly(sock, _MAGIC_AND_VERSION.size, "slave challenge")
    magic, version = _MAGIC_AND_VERSION.unpack(head)
    if magic == SLAVE_HELLO_MAGIC and version < HA_VERSION:
        raise OldVersionError(
            f"slave speaks HA protocol {version}, this master {HA_VERSION} (cluster "
            "authentication): run the same tidelog version on master and slaves",
            version,
        )
    _check_magic(magic, version, SLAVE_HELLO_MAGIC, "slave challenge")
    fixed = head + await recv_exactly(sock, _CHALLENGE.size - len(head), "slave challenge")
    nonce, authenticated, name_len = _challenge_fields(fixed, SLAVE_HELLO_MAGIC, "slave")
    name = _decode_name(await recv_exactly(sock, name_len, "slave challenge"), "slave")
    return Challenge(name, nonce, authenticated)


async def _read_magic_or_refusal(sock: trio.socket.SocketType, what: str) -> bytearray:
    """The next frame's magic; a refusal frame instead raises :class:`HAAuthError` with
    the master's reason. EOF is the master closing without a word."""
    head = bytearray(_MAGIC_AND_VERSION.size)
    got = await recv_exactly_into(sock, memoryview(head))
    if got == 0:
        raise HAProtocolError(
            f"master closed the connection instead of sending its {what}: it refused this "
            "slave (stale master, unverifiable log, or an older tidelog; its log says which)"
        )
    if got < len(head):
        raise HAProtocolError(f"stream ended after {got} bytes of the master's {what}")
    magic, _version = _MAGIC_AND_VERSION.unpack(head)
    if answered_like_a_client_port(head):
        raise NotAnHAPortError(
            "answered like a tidelog client port, not an HA port: point master_ha at the "
            "master's HA port (replication.ha_port)"
        )
    if magic == REFUSAL_MAGIC:
        rest = await recv_exactly(sock, _REFUSAL.size - len(head), "master's refusal")
        _magic, _version, length = _REFUSAL.unpack(head + rest)
        text = await recv_exactly(sock, min(length, MAX_REFUSAL_TEXT), "master's refusal")
        reason = printable(bytes(text).decode(errors="replace"))
        raise HAAuthError(f"master refused this slave: {reason}")
    return head


async def read_master_challenge(sock: trio.socket.SocketType) -> Challenge:
    head = await _read_magic_or_refusal(sock, "challenge")
    fixed = head + await recv_exactly(sock, _CHALLENGE.size - len(head), "master challenge")
    nonce, authenticated, name_len = _challenge_fields(
        fixed, MASTER_CHALLENGE_MAGIC, "master challenge"
    )
    name = _decode_name(await recv_exactly(sock, name_len, "master challenge"), "master")
    return Challenge(name, nonce, authenticated)


def _proof_of(frame: bytes | bytearray) -> bytes:
    magic, version, _reserved, proof = _PROOF.unpack(frame)
    _check_magic(magic, version, PROOF_MAGIC, "proof")
    return bytes(proof)


async def read_proof_and_slave_hello(sock: trio.socket.SocketType) -> tuple[bytes, bytes]:
    """The slave's proof and the raw bytes of the hello it covers (parsed, bounded and
    checked for shape here; trusted only once the caller verified the proof)."""
    proof = _proof_of(await recv_exactly(sock, _PROOF.size, "slave proof"))
    fixed = await recv_exactly(sock, SLAVE_HELLO_FIXED, "slave hello")
    rest = await recv_exactly(sock, slave_hello_remaining(fixed), "slave hello")
    return proof, bytes(fixed + rest)


async def read_proof_and_master_hello(sock: trio.socket.SocketType) -> tuple[bytes, bytes]:
    """The master's proof and the raw bytes of the hello it covers (or
    :class:`HAAuthError` if the master refused this slave instead)."""
    head = await _read_magic_or_refusal(sock, "hello")
    frame = head + await recv_exactly(sock, _PROOF.size - len(head), "master proof")
    proof = _proof_of(frame)
    fixed = await recv_exactly(sock, MASTER_HELLO_SIZE, "master hello")
    rest = await recv_exactly(sock, master_hello_remaining(fixed), "master epochs")
    return proof, bytes(fixed + rest)


async def slave_handshake(
    sock: trio.socket.SocketType,
    name: str,
    end: int,
    history: EpochHistory | None = None,
    secret: bytes | None = None,
) -> tuple[MasterHello, str]:
    """The slave's side of the handshake (no deadline: the caller's): authenticate both
    ways, send the hello, and return the master's hello and name once its proof checks
    (:mod:`replication.auth`). With a ``secret``, nothing a master says is believed before
    it proved it holds the same one, and a master without one is refused
    (:class:`HAAuthError`)."""
    nonce = new_nonce()
    await send_all(sock, pack_challenge(name, nonce, secret is not None, master=False))
    challenge = await read_master_challenge(sock)
    if secret is not None and not challenge.authenticated:
        raise HAAuthError(
            f"master {challenge.name} has no cluster secret and this slave has one: it "
            "cannot prove it belongs to the cluster, so this slave does not follow it; "
            "set the same [replication] cluster_secret on the master"
        )
    handshake = transcript(HA_VERSION, nonce, challenge.nonce, name, challenge.name)
    hello = pack_slave_hello(name, end, history)
    mine = NO_PROOF if secret is None else proof(secret, "slave", handshake, hello)
    await send_all(sock, pack_proof(mine) + hello)
    theirs, raw_hello = await read_proof_and_master_hello(sock)
    if secret is not None and not proof_matches(secret, "master", handshake, raw_hello, theirs):
        raise HAAuthError(
            f"authentication failed: the proof of master {challenge.name} does not match "
            "this slave's cluster secret (the secrets differ): set the same "
            "cluster_secret on master and slaves"
        )
    return unpack_master_hello(raw_hello), challenge.name


async def read_slave_hello(sock: trio.socket.SocketType) -> SlaveHello:
    """The magic and version are checked as soon as they arrive: a peer that is not a
    slave (a client that dialled the replication port) is refused at once, even if
    what it sent is shorter than a hello."""
    head = await recv_exactly(sock, _MAGIC_AND_VERSION.size, "slave hello")
    magic, version = _MAGIC_AND_VERSION.unpack(head)
    _check_magic(magic, version, SLAVE_HELLO_MAGIC, "slave hello")
    fixed = head + await recv_exactly(sock, SLAVE_HELLO_FIXED - len(head), "slave hello")
    rest = await recv_exactly(sock, slave_hello_remaining(fixed), "slave hello")
    return unpack_slave_hello(fixed + rest)


async def read_master_hello(sock: trio.socket.SocketType) -> MasterHello:
    fixed = bytearray(MASTER_HELLO_SIZE)
    got = await recv_exactly_into(sock, memoryview(fixed))
    if got == 0:
        raise HAProtocolError(
            "master closed the connection instead of answering the hello: it refused "
            "this slave (stale master or unverifiable log; its log says which)"
        )
    if got < MASTER_HELLO_SIZE:
        raise HAProtocolError(f"stream ended after {got} of the master hello's bytes")
    rest = await recv_exactly(sock, master_hello_remaining(fixed), "master epochs")
    return unpack_master_hello(fixed + rest)


def set_no_delay(sock: trio.socket.SocketType) -> None:
    """Turn Nagle off: acks and heartbeats are 16-byte frames often sent while the
    previous one is unacknowledged, which Nagle would hold back until the peer's
    (delayed) ACK. Chunk headers are still coalesced with their data by ``MSG_MORE``."""
    sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]
