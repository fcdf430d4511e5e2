"""The tidelog client library (trio or asyncio, through anyio; a blocking wrapper in
``sync``): connections, producer, consumer, admin.

The common path::

    async with open_client("127.0.0.1:7600") as client:
        await client.admin.create_topic("orders", queues=4)
        result = await client.producer().send("orders", b"hello", key="customer-7")
        if result.outcome == "ok": ...          # stored at result.offset / result.queue_offset
        async with client.consumer("orders", start="earliest") as consumer:
            async for message in consumer:
                handle(message.body)

The same code runs under trio and asyncio (it is written on anyio). Plain synchronous
code (scripts, notebooks) uses the blocking client, whose calls return their result::

    with connect("127.0.0.1:7600") as client:
        result = client.producer(acks="durable").send("orders", b"hello")

Every write answers with a :class:`SendResult` whose ``outcome`` says what is
known: ``"ok"`` (acknowledged at the requested level), ``"failed"`` (nothing was
written) or ``"unknown"`` (a timeout or a lost connection: it may or may not be
stored, so resending may duplicate it). The library never reports an unknown
outcome as a failure or as a success.

Modules: ``connection`` (one pipelined TCP connection), ``client`` (connections and
reconnects), ``producer``, ``consumer``, ``group_consumer`` (a member of a consumer
group: shared queues, positions committed to the cluster), ``admin``, ``errors``, ``sync``
(the blocking client: the async one in an event loop on a thread of its own). The
client depends on the wire protocol only, never on the storage engine.
"""

from cluster.client.admin import Admin
from cluster.client.client import Client, ClientConfig, open_client
from cluster.client.connection import Connection
from cluster.client.consumer import ConsumedMessage, Consumer
from cluster.client.errors import (
    ConnectFailedError,
    ConnectionLostError,
    RequestTimeoutError,
    TidelogError,
)
from cluster.client.group_consumer import GroupConsumer
from cluster.client.producer import Outcome, Producer, SendResult
from cluster.client.sync import SyncClient, connect
from cluster.protocol.address import parse_address

__all__ = [
    "Admin",
    "Client",
    "ClientConfig",
    "ConnectFailedError",
    "Connection",
    "ConnectionLostError",
    "ConsumedMessage",
    "Consumer",
    "GroupConsumer",
    "Outcome",
    "Producer",
    "RequestTimeoutError",
    "SendResult",
    "SyncClient",
    "TidelogError",
    "connect",
    "open_client",
    "parse_address",
]
