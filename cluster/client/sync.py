"""The blocking client, for scripts and notebooks: every call returns its result.

The async client runs in an event loop on a thread of its own (anyio's blocking portal);
each call hands its coroutine to that loop (through a :class:`Crossing`, a queue the loop
drains in one wakeup for many threads' calls) and blocks only the calling thread, so
sends from several threads still share batches (``linger_ms``) and connections::

    with connect("127.0.0.1:7600") as client:
        client.admin.create_topic("orders", 4, exist_ok=True)
        result = client.producer(acks="durable").send("orders", b"x")
        with client.consumer("orders", start="earliest") as consumer:
            for message in consumer:
                ...

Outcomes are the async client's own: :class:`SendResult` with ``ok``/``failed``/
``unknown``, the same errors raised (in the calling thread). A call made after the
``with`` block, or still pending (from another thread) when it exits, raises
:class:`ClientClosedError`; a call from the loop's own thread raises ``RuntimeError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Literal, TypeVar, cast

from anyio.from_thread import start_blocking_portal

from cluster.client.admin import Admin
from cluster.client.client import Client, open_client
from cluster.client.consumer import ConsumedMessage, Consumer
from cluster.client.crossing import ClientClosedError, Crossing, open_crossing
from cluster.client.group_consumer import GroupConsumer
from cluster.client.producer import Producer, SendResult

__all__ = [
    "ClientClosedError",
    "SyncAdmin",
    "SyncClient",
    "SyncConsumer",
    "SyncGroupConsumer",
    "SyncProducer",
    "connect",
]

T = TypeVar("T")


class _Bound:
    """Something living in the portal's event loop, called from other threads through its
    :class:`Crossing`."""

    def __init__(self, crossing: Crossing) -> None:
        self._crossing = crossing

    def _call(self, function: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        return cast(T, self._crossing.call(function, *args, **kwargs))

    def _call_sync(self, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        return cast(T, self._crossing.call(function, *args, **kwargs))


class SyncProducer(_Bound):
    """A :class:`Producer` whose sends block until their outcome is known. Any number of
    threads may send at once (their messages share batches)."""

    def __init__(self, crossing: Crossing, producer: Producer) -> None:
        super().__init__(crossing)
        self.producer = producer

    def send(self, topic: str, body: bytes, **options: Any) -> SendResult:
        """:meth:`Producer.send`: ``key``, ``queue``, ``tags``, ``props``, ``acks``."""
        return self._call(self.producer.send, topic, body, **options)

    def send_batch(self, topic: str, bodies: Sequence[bytes], **options: Any) -> list[SendResult]:
        """:meth:`Producer.send_batch`: appended together, all or nothing."""
        return self._call(self.producer.send_batch, topic, bodies, **options)

    @property
    def producer_id(self) -> int | None:
        return self.producer.producer_id


class _SyncIterating(_Bound):
    """A consumer used as a context manager and iterated from one thread."""

    def __init__(self, crossing: Crossing, consumer: Consumer | GroupConsumer) -> None:
        super().__init__(crossing)
        self._consumer = consumer
        self._context: AbstractContextManager[Any] | None = None
        self._messages: AsyncIterator[ConsumedMessage] | None = None

    def __enter__(self) -> Any:
        context = self._crossing.hold(self._consumer)
        context.__enter__()
        self._context = context
        self._messages = self._consumer.__aiter__()
        return self

    def __exit__(self, *exc_info: Any) -> bool | None:
        assert self._context is not None, "leave only a consumer that was entered"
        if self._messages is not None:
            try:
                self._call(self._close_messages)
            except ClientClosedError:  # the client closed: closing left the consumer
                self._messages = None
        return self._context.__exit__(*exc_info)

    async def _close_messages(self) -> None:
        messages, self._messages = self._messages, None
        close = getattr(messages, "aclose", None)
        if close is not None:
            await close()

    def __iter__(self) -> Iterator[ConsumedMessage]:
        return self

    def __next__(self) -> ConsumedMessage:
        assert self._messages is not None, "iterate a consumer inside its with block"
        try:
            return self._call(self._messages.__anext__)
        except StopAsyncIteration:
            raise StopIteration from None


class SyncConsumer(_SyncIterating):
    """A :class:`Consumer`: ``with`` starts its pullers, iteration blocks for the next
    message; :attr:`positions` as the async consumer's."""

    def __init__(self, crossing: Crossing, consumer: Consumer) -> None:
        super().__init__(crossing, consumer)
        self.consumer = consumer

    def __enter__(self) -> SyncConsumer:
        super().__enter__()
        return self

    @property
    def positions(self) -> dict[int, int]:
        return self.consumer.positions


class SyncGroupConsumer(_SyncIterating):
    """A :class:`GroupConsumer`: one member of a consumer group, iterated from one thread."""

    def __init__(self, crossing: Crossing, consumer: GroupConsumer) -> None:
        super().__init__(crossing, consumer)
        self.consumer = consumer

    def __enter__(self) -> SyncGroupConsumer:
        super().__enter__()
        return self

    def commit(self) -> int:
        return self._call(self.consumer.commit)

    def processed(self, message: ConsumedMessage) -> None:
        self._call_sync(self.consumer.processed, message)


class SyncAdmin(_Bound):
    """The :class:`Admin` operations, blocking."""

    def __init__(self, crossing: Crossing, admin: Admin) -> None:
        super().__init__(crossing)
        self.admin = admin

    def create_topic(self, topic: str, queues: int, *, exist_ok: bool = False) -> int:
        return self._call(self.admin.create_topic, topic, queues, exist_ok=exist_ok)

    def alter_topic(self, topic: str, queues: int) -> int:
        return self._call(self.admin.alter_topic, topic, queues)

    def delete_topic(self, topic: str) -> None:
        self._call(self.admin.delete_topic, topic)

    def list_topics(self) -> list[dict[str, Any]]:
        return self._call(self.admin.list_topics)

    def describe_topic(self, topic: str) -> dict[str, Any]:
        return self._call(self.admin.describe_topic, topic)

    def offsets(self, topic: str, queue: int | None = None) -> list[dict[str, int]]:
        return self._call(self.admin.offsets, topic, queue)

    def status(self) -> dict[str, Any]:
        return self._call(self.admin.status)


class SyncClient(_Bound):
    """A :class:`Client` in a portal's event loop. Any thread may call any method; each
    call blocks its caller only."""

    def __init__(self, crossing: Crossing, client: Client) -> None:
        super().__init__(crossing)
        self.client = client
        self.admin = SyncAdmin(crossing, client.admin)

    @property
    def master(self) -> str | None:
        return self.client.master

    def producer(self, **options: Any) -> SyncProducer:
        """:meth:`Client.producer` (``acks``, ``linger_ms``, ``idempotent``, ...)."""
        producer = self._call_sync(lambda: self.client.producer(**options))
        return SyncProducer(self._crossing, producer)

    def consumer(self, topic: str, **options: Any) -> SyncConsumer:
        """:meth:`Client.consumer`; use it in a ``with`` block and iterate it."""
        consumer = self._call_sync(lambda: self.client.consumer(topic, **options))
        return SyncConsumer(self._crossing, consumer)

    def group_consumer(
        self, group: str, topics: Sequence[str], **options: Any
    ) -> SyncGroupConsumer:
        """A member of consumer group ``group`` (:class:`GroupConsumer`); ``with`` and iterate."""
        member = self._call_sync(lambda: GroupConsumer(self.client, group, topics, **options))
        return SyncGroupConsumer(self._crossing, member)

    def call(self, op: str, /, **fields: Any) -> dict[str, Any]:
        """:meth:`Client.call`: one request, its answer with any status."""
        return self._call(self.client.call, op, **fields)

    def checked(self, op: str, /, **fields: Any) -> dict[str, Any]:
        """:meth:`Client.checked`: raises :class:`TidelogError` unless ``OK``."""
        return self._call(self.client.checked, op, **fields)


@contextmanager
def connect(
    bootstrap: str | Sequence[str],
    *,
    backend: Literal["asyncio", "trio"] = "asyncio",
    **options: Any,
) -> Iterator[SyncClient]:
    """A blocking client whose connections live for the ``with`` block; ``options`` as
    :func:`open_client`'s (``request_timeout``, ``tls``, ...). ``backend``: the event loop
    the portal thread runs (the behaviour is the same on both). Leaving the block ends the
    calls still pending in other threads first (:class:`ClientClosedError`), then closes
    the client."""
    with (
        start_blocking_portal(backend=backend) as portal,
        portal.wrap_async_context_manager(open_client(bootstrap, **options)) as client,
        portal.wrap_async_context_manager(open_crossing()) as crossing,
    ):
        yield SyncClient(crossing, client)
