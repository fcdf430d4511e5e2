"""Mutual TLS on the replication port (issue 8), in one process: a real master service
and slave client over loopback, certificates made at test time by a throwaway CA.

The stream takes the copy path over TLS (no ``sendfile``: the bytes are encrypted in
user space) and the slave's log ends byte-identical to the master's. A peer whose
certificate another CA signed, a peer without TLS, and a TLS slave against a plain
master are each refused, with the reason in the master's status and log.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from replication.master import HAService
from replication.settings import ReplicationSettings
from replication.slave import HAClient
from replication.tls import TlsFiles
from replication.wire import HAAuthError, HAProtocolError
from storage import MessageStore
from tests.replication.test_ha_stream import config_at, fill, log_bytes, messages
from tools.launcher.pki import Pki, make_pki

SECRET = b"0123456789abcdef-the-cluster"
SHORT_S = 10


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), ("master", "slave", "outsider"))


def _settings(tls: TlsFiles | None) -> ReplicationSettings:
    return ReplicationSettings(cluster_secret=SECRET, tls=tls, max_chunk=64 * 1024)


async def test_replication_over_mutual_tls_gives_a_byte_identical_log(
    tmp_path: Path, pki: Pki
) -> None:
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "slave")) as slave,
    ):
        await fill(master, messages(300, seed=11))  # several segments, many chunks
        end = master.commit_log.max_offset
        service = HAService(master, _settings(pki.files("master")), name="m1")
        async with trio.open_nursery() as nursery:
            port = await nursery.start(service.serve, "127.0.0.1", 0)
            client = HAClient(slave, "slave-1", _settings(pki.files("slave")))
            nursery.start_soon(client.run, "127.0.0.1", port)
            assert await service.wait_replicated(end, trio.current_time() + SHORT_S)
            await fill(master, messages(40, seed=12))  # and what arrives while streaming
            end = master.commit_log.max_offset
            assert await service.wait_replicated(end, trio.current_time() + SHORT_S)
            assert service.status().auth_refusals == 0
            nursery.cancel_scope.cancel()
        assert len(master.commit_log.files.segments) > 1
        assert log_bytes(slave) == log_bytes(master)


@pytest.mark.parametrize(
    ("slave_end", "master_says", "slave_says"),
    [
        (
            "outsider",
            "TLS handshake failed: certificate refused",
            "how a master refuses a certificate",
        ),
        (None, "the peer does not speak TLS", "master closed the connection"),
    ],
    ids=["certificate-of-another-ca", "plain-tcp"],
)
async def test_a_peer_without_a_certificate_of_the_cluster_ca_is_refused(
    tmp_path: Path,
    pki: Pki,
    slave_end: str | None,
    master_says: str,
    slave_says: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "slave")) as slave,
    ):
        await fill(master, messages(10, seed=13))
        service = HAService(master, _settings(pki.files("master")), name="m1")
        tls = None
        if slave_end is not None:  # signed by another CA; it trusts the cluster's
            cert, key = pki.ends[slave_end]
            tls = TlsFiles(cert_file=str(cert), key_file=str(key), ca_file=str(pki.ca_file))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(service.serve, "127.0.0.1", 0)
            with trio.fail_after(SHORT_S), pytest.raises(HAProtocolError, match=slave_says):
                await HAClient(slave, "slave-1", _settings(tls)).run("127.0.0.1", port)
            await trio.testing.wait_all_tasks_blocked()
            status = service.status()
            assert status.auth_refusals == 1, status
            assert status.last_auth_refusal is not None
            assert master_says in status.last_auth_refusal, status.last_auth_refusal
            assert "signed by the cluster's CA" in status.last_auth_refusal
            assert service.ack_offsets == {} and service.confirm_offset == 0
            nursery.cancel_scope.cancel()
        assert slave.commit_log.max_offset == 0
    assert any("ha_peer_refused" in r.getMessage() for r in caplog.records)


async def test_a_tls_slave_refuses_a_master_without_tls(tmp_path: Path, pki: Pki) -> None:
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "slave")) as slave,
    ):
        await fill(master, messages(10, seed=14))
        service = HAService(master, _settings(None), name="m1")
        async with trio.open_nursery() as nursery:
            port = await nursery.start(service.serve, "127.0.0.1", 0)
            client = HAClient(slave, "slave-1", _settings(pki.files("slave")))
            with trio.fail_after(SHORT_S), pytest.raises(HAAuthError, match="TLS handshake"):
                await client.run("127.0.0.1", port)
            nursery.cancel_scope.cancel()
        assert slave.commit_log.max_offset == 0


async def test_with_tls_peer_names_a_certificate_vouches_for_one_node_name_only(
    tmp_path: Path, pki: Pki
) -> None:
    """A member's certificate (CN ``slave``) cannot stand for another member's name."""
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "slave")) as slave,
    ):
        await fill(master, messages(10, seed=15))
        end = master.commit_log.max_offset
        named = ReplicationSettings(
            cluster_secret=SECRET, tls=pki.files("master"), tls_peer_names=True
        )
        service = HAService(master, named, name="m1")
        async with trio.open_nursery() as nursery:
            port = await nursery.start(service.serve, "127.0.0.1", 0)
            impostor = HAClient(slave, "slave-1", _settings(pki.files("slave")))
            with (
                trio.fail_after(SHORT_S),
                pytest.raises(HAAuthError, match="names localhost, slave, not slave-1"),
            ):
                await impostor.run("127.0.0.1", port)
            assert service.ack_offsets == {}
            nursery.start_soon(
                HAClient(slave, "slave", _settings(pki.files("slave"))).run, "127.0.0.1", port
            )
            assert await service.wait_replicated(end, trio.current_time() + SHORT_S)
            nursery.cancel_scope.cancel()
    with pytest.raises(ValueError, match="tls_peer_names needs TLS"):
        ReplicationSettings(tls_peer_names=True)


def test_tls_settings_are_checked_at_start_naming_the_key(pki: Pki) -> None:
    """A partial or unreadable TLS setting stops the node's start, naming the key; the
    HA port's TLS is mutual, so it needs all three files."""
    from cluster.node.config import ConfigError, load_node_config

    cert, key = (str(path) for path in pki.ends["master"])
    ca = str(pki.ca_file)
    config = load_node_config(
        None,
        {
            "replication.tls_cert_file": cert,
            "replication.tls_key_file": key,
            "replication.tls_ca_file": ca,
            "server.tls_cert_file": cert,
            "server.tls_key_file": key,
        },
        environ={},
    )
    assert config.replication.settings.tls == TlsFiles(cert_file=cert, key_file=key, ca_file=ca)
    assert config.server.tls == TlsFiles(cert_file=cert, key_file=key)
    named = load_node_config(
        None,
        {
            "replication.tls_cert_file": cert,
            "replication.tls_key_file": key,
            "replication.tls_ca_file": ca,
            "replication.tls_peer_names": "true",
        },
        environ={},
    )
    assert named.replication.settings.tls_peer_names is True
    assert load_node_config(None, environ={}).replication.settings.tls is None
    for overrides, key_name, says in [
        ({"replication.tls_cert_file": cert}, "replication.tls_cert_file", "must both be set"),
        (
            {"replication.tls_cert_file": cert, "replication.tls_key_file": key},
            "replication.tls_ca_file",
            "mutual TLS",
        ),
        ({"replication.tls_peer_names": "true"}, "replication.tls_peer_names", "needs TLS"),
        (
            {"server.tls_cert_file": cert, "server.tls_key_file": ca},
            "server.tls_cert_file",
            "cannot be loaded",
        ),
        (
            {"server.tls_cert_file": cert, "server.tls_key_file": key, "server.tls_ca_file": key},
            "server.tls_ca_file",
            "cannot be loaded",
        ),
    ]:
        with pytest.raises(ConfigError) as info:
            load_node_config(None, overrides, environ={})
        assert info.value.key == key_name, info.value
        assert says in str(info.value)
