"""The operator's forget-member against a real etcd: it writes the rule's state by
compare-and-swap, and refuses when a node acted between its listing and its write."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from cluster.coordination.etcd import EtcdClient, PutOp, TxnResult
from cluster.coordination.keys import ClusterKeys, GroupState, MemberInfo
from cluster.coordination.operator import ForgetRefused, forget_member

GROUP = "g1"


def member(node: str) -> MemberInfo:
    return MemberInfo(
        node, GROUP, "127.0.0.1:1", "127.0.0.1:2", epoch=3, log_end=10, clean_start=False
    )


async def recorded(etcd: EtcdClient, keys: ClusterKeys, state: GroupState) -> None:
    await etcd.put(keys.state(GROUP), state.encode())


async def test_a_lost_member_leaves_the_recorded_set(
    etcd_endpoints: list[str], request: pytest.FixtureRequest
) -> None:
    keys = ClusterKeys(f"forget{abs(hash(request.node.name)) % 10**8}")
    async with EtcdClient(etcd_endpoints) as etcd:
        await recorded(etcd, keys, GroupState(3, "n1", frozenset({"n1", "n2", "n3"})))
        await etcd.put(keys.member("n2"), member("n2").encode())
        done = await forget_member(etcd, keys, GROUP, "n1")
        stored = await etcd.get(keys.state(GROUP))
        assert stored is not None
        assert GroupState.decode(stored.key, stored.value) == done.after
        assert done.after == GroupState(3, None, frozenset({"n2", "n3"}))
        with pytest.raises(ForgetRefused, match="n2 is live"):
            await forget_member(etcd, keys, GROUP, "n2")


class ComesBackBeforeTheWrite(EtcdClient):
    """An etcd client that lets the forgotten member return between the operator's
    listing and its transaction (the race the compare guards)."""

    returning: MemberInfo | None = None
    keys: ClusterKeys | None = None

    async def txn(
        self, compare: Sequence[Any], success: Sequence[Any], *args: Any, **kw: Any
    ) -> TxnResult:
        if (
            self.returning is not None
            and self.keys is not None
            and any(isinstance(op, PutOp) for op in success)
        ):
            await self.put(self.keys.member(self.returning.node), self.returning.encode())
            self.returning = None
        return await super().txn(compare, success, *args, **kw)


async def test_a_member_that_comes_back_meanwhile_is_not_forgotten(
    etcd_endpoints: list[str], request: pytest.FixtureRequest
) -> None:
    keys = ClusterKeys(f"comeback{abs(hash(request.node.name)) % 10**8}")
    before = GroupState(3, "n1", frozenset({"n1", "n2"}))
    etcd = ComesBackBeforeTheWrite(etcd_endpoints)
    async with etcd:
        await recorded(etcd, keys, before)
        etcd.returning, etcd.keys = member("n1"), keys
        with pytest.raises(ForgetRefused, match="n1 came back"):
            await forget_member(etcd, keys, GROUP, "n1")
        stored = await etcd.get(keys.state(GROUP))
        assert stored is not None and GroupState.decode(stored.key, stored.value) == before
