"""The README's client examples, run as written (trio, asyncio, blocking) against a real
node process: the address is the only thing changed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tools.process import NodeProcess

TRIO = """
import trio
from cluster.client import open_client

async def main() -> None:
    async with open_client("127.0.0.1:7600") as client:
        await client.admin.create_topic("orders", queues=4, exist_ok=True)
        result = await client.producer(acks="durable").send("orders", b"hello", key="customer-7")
        print(result.outcome, result.queue, result.queue_offset)
        async with client.consumer("orders", start="earliest") as consumer:
            async for message in consumer:
                print(message.queue, message.queue_offset, message.body)
                break

trio.run(main)
"""

ASYNCIO = """
import asyncio
from cluster.client import open_client

async def main() -> None:
    async with open_client("127.0.0.1:7600") as client:
        await client.admin.create_topic("orders", queues=4, exist_ok=True)
        result = await client.producer(acks="durable").send("orders", b"hello", key="customer-7")
        print(result.outcome, result.queue, result.queue_offset)
        async with client.consumer("orders", start="earliest") as consumer:
            async for message in consumer:
                print(message.queue, message.queue_offset, message.body)
                break

asyncio.run(main())
"""

BLOCKING = """
from cluster.client.sync import connect

with connect("127.0.0.1:7600") as client:
    client.admin.create_topic("orders", queues=4, exist_ok=True)
    result = client.producer(acks="durable").send("orders", b"hello", key="customer-7")
    print(result.outcome, result.queue, result.queue_offset)
    with client.consumer("orders", start="earliest") as consumer:
        for message in consumer:
            print(message.queue, message.queue_offset, message.body)
            break
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One ``tidelog node`` process for the module; killed by its PID at the end."""
    process = NodeProcess(tmp_path_factory.mktemp("node")).start()
    try:
        yield process
    finally:
        process.kill()


@pytest.mark.parametrize("example", [TRIO, ASYNCIO, BLOCKING], ids=["trio", "asyncio", "blocking"])
def test_the_readme_example_runs(
    example: str, node: NodeProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    code = compile(example.replace("127.0.0.1:7600", node.address), "<example>", "exec")
    exec(code, {"__name__": "__main__"})
    sent, read = capsys.readouterr().out.splitlines()
    outcome, queue, queue_offset = sent.split()
    assert outcome == "ok"
    assert 0 <= int(queue) < 4
    assert int(queue_offset) >= 0  # the examples share the node: later ones append
    assert read == f"{queue} 0 b'hello'"  # the key's queue, read from its start
