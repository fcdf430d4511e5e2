"""The ``[coordination]`` section and its flags: etcd with a static role is refused
naming both, etcd needs an HA port, and the member name defaults to the data dir's."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.node.config import ConfigError, NodeConfig, load_node_config

ETCD = "http://127.0.0.1:2379"


def test_without_etcd_nothing_changes() -> None:
    config = load_node_config(None, {}, {})
    assert not config.coordinated
    assert config.node.name == "node-1"


def test_with_etcd_the_name_defaults_to_the_data_dir(tmp_path: Path) -> None:
    config = load_node_config(
        None,
        {"coordination.etcd": ETCD, "replication.ha_port": "0", "node.data_dir": tmp_path / "n-2"},
        {},
    )
    assert config.coordinated and config.node.name == "n-2"
    settings = config.coordination.settings
    assert settings.etcd_endpoints == (ETCD,) and settings.lease_ttl_s == 2


def test_an_explicit_name_wins(tmp_path: Path) -> None:
    config = load_node_config(
        None,
        {"coordination.etcd": f"{ETCD}, http://127.0.0.1:2380", "replication.ha_port": "0"},
        {"TIDELOG_NODE_NAME": "alpha"},
    )
    assert config.node.name == "alpha"
    assert config.coordination.endpoints == (ETCD, "http://127.0.0.1:2380")


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"replication.role": "slave", "replication.master_ha": "h:1"}, "--master-ha"),
        ({"replication.role": "master"}, "--role"),
        (
            {
                "replication.master_client": "h:1",
                "replication.role": "slave",
                "replication.master_ha": "h:2",
            },
            "--master-client",
        ),
    ],
)
def test_etcd_and_a_static_role_are_refused_naming_both(
    overrides: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        load_node_config(None, {"coordination.etcd": ETCD, **overrides}, {})
    message = str(refused.value)
    assert "--etcd" in message and named in message and "contradict" in message


def test_etcd_needs_an_ha_port() -> None:
    with pytest.raises(ConfigError, match="--ha-port"):
        load_node_config(None, {"coordination.etcd": ETCD}, {})


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("coordination.etcd", "ftp://x", "http://host:port"),
        ("coordination.lease_ttl_s", "1", "lease_ttl_s"),
        ("coordination.request_timeout_s", "5", "request_timeout_s"),
        ("coordination.group", "bad/group", "group name"),
    ],
)
def test_bad_coordination_values_name_the_key(key: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_node_config(
            None, {"coordination.etcd": ETCD, "replication.ha_port": "0", key: value}, {}
        )
    assert fragment in str(refused.value)


def test_environment_variables_reach_the_section() -> None:
    config = load_node_config(
        None,
        {"replication.ha_port": "0"},
        {"TIDELOG_COORDINATION_ETCD": ETCD, "TIDELOG_COORDINATION_PRIORITY": "7"},
    )
    assert config.coordination.priority == 7


def test_create_checks_the_same_rule(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--ha-port"):
        NodeConfig.create(tmp_path, coordination={"etcd": ETCD})


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"node.host": "0.0.0.0"}, "node.host (--host) is '0.0.0.0'"),
        ({"node.host": "::"}, "node.host (--host) is '::'"),
        ({"replication.ha_host": "0.0.0.0"}, "replication.ha_host (--ha-host)"),
        (
            {"node.host": "0.0.0.0", "coordination.advertise_host": "::"},
            "coordination.advertise_host (--advertise-host) is '::'",
        ),
    ],
)
def test_with_etcd_a_wildcard_address_is_not_published(
    overrides: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        load_node_config(
            None, {"coordination.etcd": ETCD, "replication.ha_port": "0", **overrides}, {}
        )
    assert named in str(refused.value)
    assert "--advertise-host" in str(refused.value)


def test_the_advertised_host_defaults_to_the_listen_host() -> None:
    config = load_node_config(
        None,
        {"coordination.etcd": ETCD, "replication.ha_port": "0", "node.host": "10.1.2.3"},
        {},
    )
    assert config.advertised_host == config.advertised_ha_host == "10.1.2.3"
    split = load_node_config(
        None,
        {"coordination.etcd": ETCD, "replication.ha_port": "0", "replication.ha_host": "10.9.9.9"},
        {},
    )
    assert (split.advertised_host, split.advertised_ha_host) == ("127.0.0.1", "10.9.9.9")


def test_a_wildcard_listener_publishes_the_advertised_host() -> None:
    config = load_node_config(
        None,
        {"coordination.etcd": ETCD, "replication.ha_port": "0", "node.host": "0.0.0.0"},
        {"TIDELOG_COORDINATION_ADVERTISE_HOST": "node7.example"},
    )
    assert config.node.host == "0.0.0.0" and config.ha_host == "0.0.0.0"
    assert config.advertised_host == config.advertised_ha_host == "node7.example"
    without_etcd = load_node_config(None, {"node.host": "0.0.0.0"}, {})
    assert without_etcd.node.host == "0.0.0.0"  # no etcd: nothing is published
