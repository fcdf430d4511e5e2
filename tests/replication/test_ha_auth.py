"""Issue 8 points 7 and 8: peers on the HA port prove they hold the cluster secret before
anything they say counts (HA protocol 4). In one process: the proofs themselves
(hypothesis), then a real master service and slave client over loopback sockets, and
hand-made peers that lack the secret (an old-protocol hello claiming a newer epoch, a
fake slave that acks everything).

The real-process versions are in ``tests/e2e/test_ha_port_auth.py``.
"""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from replication.auth import (
    MIN_SECRET_BYTES,
    NO_PROOF,
    NONCE_SIZE,
    check_secret,
    new_nonce,
    proof,
    proof_matches,
    read_secret_file,
    transcript,
)
from replication.epochs import EpochHistory
from replication.master import HAService
from replication.settings import ReplicationSettings
from replication.slave import HAClient
from replication.transfer import recv_exactly_into
from replication.wire import (
    HA_VERSION,
    MASTER_HELLO_SIZE,
    HAAuthError,
    pack_ack,
    pack_challenge,
    pack_master_hello,
    pack_proof,
    read_proof_and_slave_hello,
    read_slave_challenge,
    send_all,
    slave_handshake,
)
from storage import MessageStore
from tests.replication.test_ha_stream import config_at, fill, messages

SECRET = b"0123456789abcdef-the-cluster"
OTHER = b"fedcba9876543210-another-one"
SHORT_S = 10


async def answer_as_master(
    sock: trio.socket.SocketType,
    end: int,
    stream_from: int,
    *,
    secret: bytes | None = None,
    name: str = "fake-master",
) -> None:
    """Play the master's side of the handshake on ``sock`` (for tests that fake a master
    to see what a slave does next)."""
    challenge = await read_slave_challenge(sock)
    nonce = new_nonce()
    await send_all(sock, pack_challenge(name, nonce, secret is not None, master=True))
    _theirs, _raw = await read_proof_and_slave_hello(sock)
    hello = pack_master_hello(end, stream_from)
    handshake = transcript(HA_VERSION, challenge.nonce, nonce, challenge.name, name)
    mine = NO_PROOF if secret is None else proof(secret, "master", handshake, hello)
    await send_all(sock, pack_proof(mine) + hello)


# ---- the proofs ------------------------------------------------------------------------------


NONCES = st.binary(min_size=NONCE_SIZE, max_size=NONCE_SIZE)
NAMES = st.text(min_size=1, max_size=20)


@given(NONCES, NONCES, NAMES, NAMES, st.binary(max_size=64), st.integers(0, 5))
def test_a_proof_covers_every_field(
    slave_nonce: bytes, master_nonce: bytes, slave: str, master: str, hello: bytes, which: int
) -> None:
    """Change any one input (a nonce, a name, the hello, the role, the secret) and the
    proof no longer matches: none can be replayed, reflected or moved to another hello."""
    handshake = transcript(HA_VERSION, slave_nonce, master_nonce, slave, master)
    good = proof(SECRET, "slave", handshake, hello)
    assert proof_matches(SECRET, "slave", handshake, hello, good)
    flipped = bytes([slave_nonce[0] ^ 1]) + slave_nonce[1:]
    changed = [
        (SECRET, "slave", transcript(HA_VERSION, flipped, master_nonce, slave, master), hello),
        (SECRET, "slave", transcript(HA_VERSION, master_nonce, slave_nonce, slave, master), hello),
        (
            SECRET,
            "slave",
            transcript(HA_VERSION, slave_nonce, master_nonce, slave + "x", master),
            hello,
        ),
        (SECRET, "slave", handshake, hello + b"\x00"),
        (SECRET, "master", handshake, hello),
        (OTHER, "slave", handshake, hello),
    ][which]
    if changed[2] == handshake and changed[3] == hello and changed[:2] == (SECRET, "slave"):
        return  # swapping equal nonces changes nothing
    assert not proof_matches(*changed, good)


def test_secrets_are_checked_and_read_from_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"at least {MIN_SECRET_BYTES} bytes"):
        check_secret(b"short")
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    assert read_secret_file(str(path)) == SECRET
    with pytest.raises(ValueError, match="cannot read the cluster secret file"):
        read_secret_file(str(tmp_path / "missing"))
    assert "0123" not in repr(ReplicationSettings(cluster_secret=SECRET))  # never in logs


# ---- master and slave over sockets -----------------------------------------------------------


async def _serve(
    master: MessageStore, secret: bytes | None, nursery: trio.Nursery, **kwargs: object
) -> tuple[HAService, int]:
    history = kwargs.pop("history", None)
    settings = ReplicationSettings(cluster_secret=secret, **kwargs)  # type: ignore[arg-type]
    service = HAService(master, settings, history=history, name="m1")  # type: ignore[arg-type]
    port = await nursery.start(service.serve, "127.0.0.1", 0)
    return service, port


def _client(store: MessageStore, name: str, secret: bytes | None) -> HAClient:
    return HAClient(store, name, ReplicationSettings(cluster_secret=secret))


async def test_slave_with_the_right_secret_replicates(tmp_path: Path) -> None:
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "slave")) as slave,
    ):
        await fill(master, messages(30, seed=1))
        end = master.commit_log.max_offset
        async with trio.open_nursery() as nursery:
            service, port = await _serve(master, SECRET, nursery)
            client = _client(slave, "slave-1", SECRET)
            nursery.start_soon(client.run, "127.0.0.1", port)
            assert await service.wait_replicated(end, trio.current_time() + SHORT_S)
            assert client.master_name == "m1"
            status = service.status()
            assert status.auth == "cluster_secret" and status.auth_refusals == 0
            nursery.cancel_scope.cancel()
        assert slave.commit_log.max_offset == end


@pytest.mark.parametrize(
    ("master_secret", "slave_secret", "slave_says", "master_says"),
    [
        (SECRET, OTHER, "master refused this slave: authentication failed", "secrets differ"),
        (
            SECRET,
            None,
            "master refused this slave: slave slave-1 has no cluster secret",
            "no cluster secret",
        ),
        (None, SECRET, "master m1 has no cluster secret and this slave has one", None),
    ],
    ids=["wrong-secret", "slave-without", "master-without"],
)
async def test_a_peer_without_the_secret_is_refused_on_both_sides(
    tmp_path: Path,
    master_secret: bytes | None,
    slave_secret: bytes | None,
    slave_says: str,
    master_says: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Both ends say why; nothing is streamed, nothing counts for the confirm offset."""
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "slave")) as slave,
    ):
        await fill(master, messages(10, seed=2))
        async with trio.open_nursery() as nursery:
            service, port = await _serve(master, master_secret, nursery)
            with pytest.raises(HAAuthError, match=slave_says):
                await _client(slave, "slave-1", slave_secret).run("127.0.0.1", port)
            await trio.testing.wait_all_tasks_blocked()
            assert service.ack_offsets == {} and service.confirm_offset == 0
            assert slave.commit_log.max_offset == 0
            if master_says is not None:
                status = service.status()
                assert status.auth_refusals == 1
                assert status.last_auth_refusal is not None
                assert "peer=127.0.0.1:" in status.last_auth_refusal
                assert "claimed_name=slave-1" in status.last_auth_refusal
                assert master_says in status.last_auth_refusal
                assert any(
                    "ha_peer_refused" in r.getMessage() and "peer=127.0.0.1:" in r.getMessage()
                    for r in caplog.records
                )
            nursery.cancel_scope.cancel()


async def test_an_old_hello_claiming_a_newer_epoch_does_not_make_the_master_stale(
    tmp_path: Path,
) -> None:
    """Point 7: the 40-byte version-3 hello that claimed epoch 99999 stopped all writes.
    Now the master answers it with a header an old slave refuses by version, and stays
    current; a version-4 handshake claiming the same without the secret is refused too."""
    async with MessageStore.open(config_at(tmp_path / "master")) as master:
        await fill(master, messages(5, seed=3))
        async with trio.open_nursery() as nursery:
            service, port = await _serve(master, SECRET, nursery, history=EpochHistory())
            service.history.append(1, 0)  # type: ignore[union-attr]
            old_hello = (
                struct.pack("!IHHQHHI", 0x544C4853, 3, 1, 0, 4, 1, 99999)
                + b"evil"
                + struct.pack("!IQ", 99999, 0)
            )
            assert len(old_hello) == 40  # the packet of the issue
            sock = trio.socket.socket()
            with sock:
                await sock.connect(("127.0.0.1", port))
                await sock.send(old_hello)
                answer = bytearray(MASTER_HELLO_SIZE)
                with trio.fail_after(SHORT_S):
                    assert await recv_exactly_into(sock, memoryview(answer)) == MASTER_HELLO_SIZE
                # A version-3 slave checks the master hello's version against its own and
                # stops with "unsupported master hello version 4 ... run the same version".
                assert struct.unpack_from("!IH", answer) == (0x544C484D, 4)
            history = EpochHistory()
            history.append(99999, 0)
            sock = trio.socket.socket()
            with sock:
                await sock.connect(("127.0.0.1", port))
                with (
                    trio.fail_after(SHORT_S),
                    pytest.raises(HAAuthError, match="no cluster secret"),
                ):
                    await slave_handshake(sock, "evil", 0, history)
            await trio.testing.wait_all_tasks_blocked()
            assert service.stale is None
            assert await service.wait_replicated(0)
            assert service.status().auth_refusals == 2
            nursery.cancel_scope.cancel()


async def test_a_fake_slave_with_a_wrong_secret_cannot_confirm_writes(tmp_path: Path) -> None:
    """Point 8: a peer named like the real slave that acks everything it is sent; with a
    wrong secret it never registers, so the confirm offset does not move for it."""
    async with MessageStore.open(config_at(tmp_path / "master")) as master:
        await fill(master, messages(5, seed=4))
        end = master.commit_log.max_offset
        async with trio.open_nursery() as nursery:
            service, port = await _serve(master, SECRET, nursery)
            sock = trio.socket.socket()
            with sock:
                await sock.connect(("127.0.0.1", port))
                with trio.fail_after(SHORT_S), pytest.raises(HAAuthError):
                    await slave_handshake(sock, "slave-1", end, secret=OTHER)
                # The connection is over: acks go nowhere (a reset, or the close).
                with trio.fail_after(SHORT_S), contextlib.suppress(OSError):
                    await send_all(sock, pack_ack(end))
                    assert await sock.recv(64) == b""
            assert not await service.wait_replicated(end, trio.current_time() + 0.2)
            assert "slave-1" not in service.ack_offsets
            nursery.cancel_scope.cancel()


def test_the_secret_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    """``[replication] cluster_secret``, ``TIDELOG_REPLICATION_CLUSTER_SECRET`` or
    ``cluster_secret_file``; a short one, a missing file or both at once stop the start
    naming the key; the secret never shows in the config's repr."""
    from cluster.node.config import ConfigError, load_node_config

    secret = SECRET.decode()
    config = load_node_config(None, environ={"TIDELOG_REPLICATION_CLUSTER_SECRET": secret})
    assert config.replication.settings.cluster_secret == SECRET
    assert secret not in repr(config)
    path = tmp_path / "secret"
    path.write_text(secret + "\n")
    from_file = load_node_config(None, {"replication.cluster_secret_file": str(path)}, environ={})
    assert from_file.replication.settings.cluster_secret == SECRET
    assert load_node_config(None, environ={}).replication.settings.cluster_secret is None
    for overrides, key in [
        ({"replication.cluster_secret": "short"}, "replication.cluster_secret"),
        (
            {"replication.cluster_secret_file": str(tmp_path / "no")},
            "replication.cluster_secret_file",
        ),
        (
            {"replication.cluster_secret": secret, "replication.cluster_secret_file": str(path)},
            "replication.cluster_secret_file",
        ),
    ]:
        with pytest.raises(ConfigError) as info:
            load_node_config(None, overrides, environ={})
        assert info.value.key == key


async def test_what_an_unauthenticated_peer_says_cannot_forge_log_lines(tmp_path: Path) -> None:
    """The name a refused peer claims goes into the log and the status: printable only."""
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        trio.open_nursery() as nursery,
    ):
        service, port = await _serve(master, SECRET, nursery)
        sock = trio.socket.socket()
        with sock:
            await sock.connect(("127.0.0.1", port))
            forged = "evil\nha_slave_connected slave=slave-1\x1b[2J"
            with trio.fail_after(SHORT_S), pytest.raises(HAAuthError):
                await slave_handshake(sock, forged, 0)
        await trio.testing.wait_all_tasks_blocked()
        refusal = service.status().last_auth_refusal
        assert refusal is not None and "claimed_name=evil?ha_slave_connected" in refusal
        assert "\n" not in refusal and "\x1b" not in refusal
        nursery.cancel_scope.cancel()
