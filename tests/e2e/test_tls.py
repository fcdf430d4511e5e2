"""TLS end to end (issue 8): real ``tidelog node`` processes whose replication port uses
mutual TLS and whose client port uses TLS, with certificates of a throwaway CA made at
test time (``openssl``).

Replication over TLS (the copy path: no ``sendfile`` through encryption) leaves the
slave's segment files byte-identical to the master's; clients with TLS get their acks;
a slave whose certificate another CA signed is refused with a log line that says so;
a plain-TCP client on the TLS port is answered with an error naming ``--tls-ca``, and
a TLS client on a plain port is told the handshake failed.
"""

from __future__ import annotations

import argparse
import ssl
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import trio

from cluster.client import TidelogError, open_client
from cluster.client.tls import client_tls
from cluster.protocol import Status
from replication.wire import HAProtocolError, slave_handshake
from tests.helpers import tidelog
from tools.cli_client import _tls_context
from tools.launcher.pki import Pki, make_pki
from tools.process import NodeProcess, wait_until

TOPIC = "tls"
MESSAGES = 300


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), ("n1", "n2", "outsider"))


@pytest.fixture(scope="module")
def client_context(pki: Pki) -> ssl.SSLContext:
    return client_tls(str(pki.ca_file))


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as exits:
        yield exits


def _env(pki: Pki, name: str) -> dict[str, str]:
    """Both ports with TLS: the node's certificate; the HA port mutual (the cluster CA)."""
    cert, key = pki.ends[name]
    return {
        "TIDELOG_SERVER_TLS_CERT_FILE": str(cert),
        "TIDELOG_SERVER_TLS_KEY_FILE": str(key),
        "TIDELOG_REPLICATION_TLS_CERT_FILE": str(cert),
        "TIDELOG_REPLICATION_TLS_KEY_FILE": str(key),
        "TIDELOG_REPLICATION_TLS_CA_FILE": str(pki.ca_file),
    }


def _node(
    stack: ExitStack, root: Path, name: str, env: dict[str, str], args: list[str]
) -> NodeProcess:
    process = NodeProcess(root / name, name=name, extra_args=args, env=env)
    stack.callback(process.kill)
    return process.start()


async def _status(node: NodeProcess, tls: ssl.SSLContext | None) -> dict[str, Any]:
    async with open_client(node.address, tls=tls) as client:
        return await client.admin.status()


def _segments(node: NodeProcess, below: int) -> dict[str, bytes]:
    directory = node.data_dir / "store" / "commitlog"
    return {
        path.name: path.read_bytes()
        for path in sorted(directory.iterdir())
        if path.name.isdigit() and int(path.name) < below
    }


def _slave_args(master: NodeProcess, ha_address: str) -> list[str]:
    return ["--role", "slave", "--master-ha", ha_address, "--master-client", master.address]


async def test_replication_and_clients_over_tls(
    tmp_path: Path, stack: ExitStack, pki: Pki, client_context: ssl.SSLContext
) -> None:
    master = _node(stack, tmp_path, "n1", _env(pki, "n1"), ["--ha-port", "0"])
    ha_address = str((await _status(master, client_context))["replication"]["ha_address"])
    slave = _node(stack, tmp_path, "n2", _env(pki, "n2"), _slave_args(master, ha_address))

    async def connected() -> bool:
        return len((await _status(master, client_context))["replication"]["slaves"]) == 1

    await wait_until("n2 connected over TLS", connected)
    secured = (await _status(master, client_context))["tls"]
    assert secured == {"client": "tls", "ha": "mutual", "peer_names": False}
    async with open_client(master.address, tls=client_context) as client:
        await client.admin.create_topic(TOPIC, 2)
        producer = client.producer(acks="replicated", retries=0)
        results: list[Any] = []

        async def produce(task: int) -> None:
            for i in range(task, MESSAGES, 8):
                results.append(await producer.send(TOPIC, f"over tls {i} ".encode() * (i % 50)))

        async with trio.open_nursery() as nursery:
            for task in range(8):
                nursery.start_soon(produce, task)
    assert len(results) == MESSAGES and [r.status for r in results if not r.ok] == []
    end = (await _status(master, client_context))["max_offset"]

    async def caught_up() -> bool:
        return int((await _status(slave, client_context))["max_offset"]) >= end

    await wait_until("n2 to hold the master's log", caught_up)
    assert slave.stop() == 0 and master.stop() == 0
    expected = _segments(master, end)
    assert expected and _segments(slave, end) == expected
    assert "Traceback" not in master.stderr + slave.stderr


async def test_peers_and_clients_without_the_right_tls_are_refused_clearly(
    tmp_path: Path, stack: ExitStack, pki: Pki, client_context: ssl.SSLContext
) -> None:
    master = _node(stack, tmp_path, "n1", _env(pki, "n1"), ["--ha-port", "0"])
    ha_address = str((await _status(master, client_context))["replication"]["ha_address"])

    # A slave whose certificate another CA signed (it trusts the cluster's CA); its own
    # client port is plain, to read its status.
    outsider_env = {k: v for k, v in _env(pki, "outsider").items() if "_SERVER_" not in k}
    outsider = _node(stack, tmp_path, "outsider", outsider_env, _slave_args(master, ha_address))

    async def refused() -> bool:
        status = await _status(outsider, None)
        assert status["tls"] == {"client": "plain", "ha": "mutual", "peer_names": False}
        error = status["replication"]["last_error"]
        return error is not None and "certificate" in error

    await wait_until("the outsider's status to say it was refused", refused)
    assert (await _status(master, client_context))["replication"]["slaves"] == []

    # A replication peer without TLS at all.
    host, _, port = ha_address.rpartition(":")
    sock = trio.socket.socket()
    with sock:
        await sock.connect((host, int(port)))
        with trio.fail_after(10), pytest.raises(HAProtocolError):
            await slave_handshake(sock, "plain", 0)

    # A plain-TCP client on the TLS client port: its request is answered, saying why.
    async with open_client(master.address) as plain:
        with pytest.raises(TidelogError, match=r"speaks TLS only.*--tls-ca"):
            await plain.admin.status()
    async with open_client(master.address) as plain:
        answer = await plain.call("status")
    assert answer["status"] is Status.BAD_REQUEST and answer["tls"] is True, answer

    # A TLS client on a plain client port: the handshake fails, and says so at once.
    plain_node = _node(stack, tmp_path, "plain", {}, [])
    with pytest.raises(TidelogError, match=r"TLS handshake with .* failed.*does not speak TLS"):
        await _status(plain_node, client_context)

    # The CLI: --tls-ca speaks TLS; without it, the node's answer says what to add.
    async with open_client(master.address, tls=client_context) as client:
        await client.admin.create_topic(TOPIC, 1)
    ca = str(pki.ca_file)
    produced = tidelog(
        "produce", TOPIC, "-b", master.address, "--tls-ca", ca, "--acks", "durable",
        stdin="one\ntwo\n",
    )  # fmt: skip
    assert produced.returncode == 0, produced.stderr
    plain_cli = tidelog("status", "-b", master.address)
    assert plain_cli.returncode == 2
    assert "speaks TLS only" in plain_cli.stderr and "--tls-ca" in plain_cli.stderr

    assert outsider.stop() == 0 and master.stop() == 0
    log = master.stderr
    assert "ha_peer_refused" in log and "TLS handshake failed: certificate refused" in log
    assert "the peer does not speak TLS" in log
    assert "tls_plain_client" in log


def test_the_cli_refuses_a_client_certificate_without_a_ca() -> None:
    args = argparse.Namespace(tls_ca=None, tls_cert="client.pem", tls_key="client.key")
    with pytest.raises(ValueError, match="need --tls-ca"):
        _tls_context(args)
