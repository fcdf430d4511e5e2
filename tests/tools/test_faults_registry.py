"""The fault vocabulary: every word has implementations, every implementation speaks it."""

from __future__ import annotations

import pytest

from tools.faults import FAULTS, NEMESIS_GROUPS, fault_kind, parse_nemesis

VOCABULARY = (
    "kill", "pause", "partition", "partition-etcd", "loss", "reset", "slow",
    "power-loss", "corrupt", "enospc",
)  # fmt: skip
SUB_KINDS = {
    "restart": "kill",
    "pause-then-kill": "kill",
    "bandwidth": "slow",
    "truncate": "corrupt",
}


def test_the_vocabulary_is_complete_and_each_implementation_names_its_word() -> None:
    assert tuple(FAULTS) == VOCABULARY
    for name, kind in FAULTS.items():
        assert kind.implementations, name
        for implementation in kind.implementations:
            spoken = implementation.kind
            assert spoken == name or SUB_KINDS.get(spoken) == name or name == "partition-etcd"
    assert all(word in FAULTS for group in NEMESIS_GROUPS.values() for word in group)


def test_parse_nemesis_expands_groups_and_refuses_unknown_words() -> None:
    assert parse_nemesis("kill, pause,power-loss,disk") == (
        "kill", "pause", "power-loss", "corrupt", "enospc",
    )  # fmt: skip
    assert parse_nemesis("kill,process") == ("kill", "pause")
    with pytest.raises(ValueError, match=r"'flood'.*choose from: kill"):
        parse_nemesis("kill,flood")
    with pytest.raises(ValueError, match="no fault named"):
        parse_nemesis(" , ")
    with pytest.raises(ValueError, match="known faults"):
        fault_kind("meteor")
