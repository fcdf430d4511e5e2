"""The node's request handler: the server's ops plus the role gate and the admin ops."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from cluster.node.acks import AckPolicy
from cluster.node.groups import GroupService
from cluster.node.topic_changes import alter_in_etcd, delete_in_etcd, etcd_for_topic_change
from cluster.node.topics import Topic, TopicExistsError, UnknownTopicError
from cluster.protocol import (
    SCHEMAS,
    AlterTopicRequest,
    CreateTopicRequest,
    DeleteTopicRequest,
    MetadataRequest,
    PromoteRequest,
    RepointRequest,
    Request,
    Status,
    SwitchoverRequest,
    make_response,
)
from cluster.server import Deferred, Reply, RequestError, RequestHandler, Wakeups

if TYPE_CHECKING:
    from cluster.node.lifecycle import Node

__all__ = ["NodeRequestHandler"]


class NodeRequestHandler(RequestHandler):
    """The node's request handler: the common ops, plus the role checks and admin ops
    that need the :class:`Node` (whose role can change while it serves).

    Writes are checked before the op runs, using the protocol's own list of writes
    (``OpSchema.writes``): a slave or a stale master answers ``NOT_MASTER`` and nothing
    reaches the store or the topic registry (not even ``auto_create``), so the refusal
    is safe to resend. On a slave, a read naming a topic it does not know yet first
    asks the master for its topic list (the topic may be younger than the last sync).
    """

    def __init__(self, *args: Any, node: Node, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._node = node
        if node.metrics is not None:  # each write's ack wait, timed where it is answered
            self.on_ack_answered = node.metrics.ack_waited
        self._ops["promote"] = self._promote
        self._ops["repoint"] = self._repoint
        self._ops["metadata"] = self._metadata
        self._ops["switchover"] = self._switchover
        self._plain_create_topic = self._ops["create_topic"]
        self._ops["create_topic"] = self._create_topic_anywhere
        self._plain_alter_topic = self._ops["alter_topic"]
        self._ops["alter_topic"] = self._alter_topic_anywhere
        self._ops["delete_topic"] = self._delete_topic_anywhere
        self.groups = GroupService(
            self._store,
            self._topics,
            lambda: self._acks,
            self._group_read_limit,
            ack_timer=self.on_ack_answered,
        )
        """Consumer groups: membership (on the master) and committed offsets."""
        self._ops.update(self.groups.ops())

    def set_acks(self, acks: AckPolicy) -> None:
        """Switch the ack policy (on promotion); requests already waiting keep theirs.
        The role changed, so the log may have too: idempotent sends re-read it first."""
        self._acks = acks
        self.idempotence.forget()
        self.groups.forget()
        self._store.read_limit_reset()  # polls waiting for the old limit re-check

    def _group_read_limit(self) -> int | None:
        """A master reads its whole log for group offsets; anything else stops where its
        reads stop (a slave: the master's confirm offset)."""
        try:
            self._node.check_writable()
        except RequestError:
            return self._acks.read_limit()
        return None

    async def handle(self, request: Request, polls: Wakeups) -> Reply | Deferred:
        try:
            op = request["op"]
            if op in _WRITES:
                self._node.check_writable()
            elif op in _TOPIC_READS and self._topics.get(request["topic"]) is None:  # type: ignore[typeddict-item]
                await self._node.sync_topics_now()
            return await super().handle(request, polls)
        except Exception as exc:
            if self._node.metrics is not None:
                self._node.metrics.request_failed(exc)
            raise

    async def _promote(self, req: PromoteRequest, _polls: Wakeups) -> Reply:
        return make_response(req["id"], **await self._node.promote(req["ha_port"]))

    async def _metadata(self, req: MetadataRequest, _polls: Wakeups) -> Reply:
        return make_response(req["id"], **self._node.metadata())

    async def _switchover(self, req: SwitchoverRequest, _polls: Wakeups) -> Reply:
        coordinator = self._node.coordinator
        if coordinator is None:
            raise RequestError(
                Status.BAD_REQUEST,
                "switchover needs automatic failover (start the nodes with --etcd); without "
                "etcd use promote and repoint",
            )
        result = await coordinator.switchover(req["group"], req["to"], req["timeout_ms"])
        return make_response(req["id"], **result)

    async def _create_topic_anywhere(self, req: CreateTopicRequest, polls: Wakeups) -> Reply:
        """With etcd a topic is recorded there first (every node applies it, so a
        failover never forgets one); without, in the local registry only."""
        coordinator = self._node.coordinator
        if coordinator is None:
            return await self._plain_create_topic(req, polls)  # type: ignore[return-value]
        name, queues = await coordinator.create_topic(req["topic"], req["queues"])
        return make_response(req["id"], topic=name, queues=queues)

    async def _alter_topic_anywhere(self, req: AlterTopicRequest, polls: Wakeups) -> Reply:
        """With etcd the new queue count is recorded there first (every node applies
        it), then here; without, in the local registry (slaves follow its listing)."""
        coordinator = self._node.coordinator
        if coordinator is None:
            return await self._plain_alter_topic(req, polls)  # type: ignore[return-value]
        async with etcd_for_topic_change(f"altering topic {req['topic']!r}"):
            record = await alter_in_etcd(
                coordinator.etcd, coordinator.settings.keys, req["topic"], req["queues"]
            )
        try:
            topic = await self._topics.alter(record.name, record.queues)
        except UnknownTopicError:  # in etcd, not applied here yet
            try:
                topic = await self._topics.create(record.name, record.queues)
            except TopicExistsError as exc:  # applied meanwhile, from the same record
                topic = exc.topic
        return make_response(req["id"], topic=topic.name, queues=topic.queues)

    async def _delete_topic_anywhere(self, req: DeleteTopicRequest, _polls: Wakeups) -> Reply:
        """With etcd the topic leaves etcd first (every node's registry follows; the
        slaves' queues go with the marker they replicate), then this node's."""
        coordinator = self._node.coordinator
        name = req["topic"]
        if coordinator is not None:
            try:
                async with etcd_for_topic_change(f"deleting topic {name!r}"):
                    await delete_in_etcd(coordinator.etcd, coordinator.settings.keys, name)
            except RequestError as exc:
                # gone from etcd already (an earlier try that timed out did land, and this
                # registry may have followed etcd since): finish the deletion here
                here = self._topics.get(name) is not None or self._store.holds_topic(name)
                if exc.status is not Status.UNKNOWN_TOPIC or not here:
                    raise
        queues, offset = await self.delete_topic_here(name, forgotten_ok=coordinator is not None)
        return make_response(req["id"], topic=name, queues=queues, offset=offset)

    async def _topic_for_write(self, name: str) -> Topic:
        """With etcd an auto-created topic goes through etcd like an admin-created one
        (without, the local registry only)."""
        coordinator = self._node.coordinator
        if (
            coordinator is None
            or not self._settings.auto_create
            or self._topics.get(name) is not None
        ):
            return await super()._topic_for_write(name)
        return await coordinator.auto_create_topic(name, self._settings.default_queues)

    async def _repoint(self, req: RepointRequest, _polls: Wakeups) -> Reply:
        result = await self._node.repoint(req["master_ha"], req["master_client"])
        return make_response(req["id"], **result)


_WRITES: Final = frozenset(op for op, schema in SCHEMAS.items() if schema.writes)
"""The ops a slave refuses (``OpSchema.writes``), as a set: asked on every request."""
_TOPIC_READS: Final = frozenset({"pull", "get_offsets", "offsets_for_time", "describe_topic"})
"""Reads naming a topic: on a slave, an unknown one triggers a topic sync first."""
