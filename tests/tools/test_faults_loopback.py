"""Partitions in the run's private network namespace (:mod:`tools.faults.loopback`), on
real processes: each node sends from its own loopback address, a partition cuts exactly
the grudge's links, the harness still reaches everyone, and heal restores the link.

Everything runs in a child started by ``private_network_command`` (``unshare --net``), so
the host's network and firewall are never touched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tools.faults.loopback import CHAIN, private_network_command

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "ip", "iptables", "setpriv")),
    reason="needs root, unshare, ip, iptables and setpriv",
)

CHILD = textwrap.dedent(
    """
    import json, sys, trio
    from tools.faults.loopback import LoopbackNetwork, LoopbackPartition
    from tools.faults.topology import isolate

    SERVER = '''
    import socket, sys
    s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen()
    print(s.getsockname()[1], flush=True)
    while True:
        c, peer = s.accept(); c.sendall(peer[0].encode()); c.close()
    '''
    CLIENT = '''
    import socket, sys
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0)
        print(c.recv(64).decode())
    except OSError as exc:
        print("cut:" + type(exc).__name__)
    '''

    async def main():
        net = LoopbackNetwork(["a", "b"])
        await net.setup()
        server = await trio.lowlevel.open_process(
            [*net.command_prefix("b"), sys.executable, "-c", SERVER, net.address("b")],
            stdout=-1,
        )
        try:
            port = int((await server.stdout.receive_some(64)).decode())
            async def from_a():
                done = await trio.run_process(
                    [*net.command_prefix("a"), sys.executable, "-c", CLIENT, net.address("b"),
                     str(port)], capture_stdout=True)
                return done.stdout.decode().strip()
            async def from_harness():
                done = await trio.run_process(
                    [sys.executable, "-c", CLIENT, net.address("b"), str(port)],
                    capture_stdout=True)
                return done.stdout.decode().strip()
            seen = {"before": await from_a()}
            cut = LoopbackPartition(net, isolate(["a", "b"], "a"))
            await cut.inject()
            seen["partitioned"] = await from_a()
            seen["harness"] = await from_harness()
            await cut.heal()
            seen["healed"] = await from_a()
            seen["fields"] = cut.fields()
        finally:  # also on failure: the server would keep the namespace alive
            server.kill()
            await server.wait()
        print(json.dumps(seen))

    trio.run(main)
    """
)


def test_a_partition_cuts_only_the_grudge_and_heals() -> None:
    command = private_network_command([sys.executable, "-c", CHILD])
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["before"] == "127.0.1.1"  # node a's own address, not 127.0.0.1
    assert seen["partitioned"].startswith("cut:")
    assert seen["harness"] == "127.0.0.1"  # the harness is never cut
    assert seen["healed"] == "127.0.1.1"
    assert seen["fields"] == {"backend": "loopback", "drops": "a<-b;b<-a"}
    # The host's own firewall never saw our chain.
    host = subprocess.run(["iptables", "-w", "-S"], capture_output=True, text=True, check=False)
    assert CHAIN not in host.stdout
