"""NodeConfig loading: defaults, TOML, environment, flags, precedence, and every error path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest

from cluster.node.config import (
    ConfigError,
    NodeConfig,
    NodeSection,
    ServerSection,
    TopicsSection,
    load_node_config,
)
from storage import StoreConfig


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def load(
    path: Path | None = None, env: dict[str, str] | None = None, **flags: object
) -> NodeConfig:
    return load_node_config(path, flags, environ=env or {})


def test_defaults() -> None:
    config = load()
    assert config.node == NodeSection()
    assert (config.node.name, config.node.host, config.node.port) == ("node-1", "127.0.0.1", 7600)
    assert config.node.data_dir == Path("data")
    assert config.server == ServerSection()
    assert config.server.max_frame_size == 16 * 1024 * 1024
    assert config.server.max_connections == 10_000
    assert config.server.max_inflight_per_connection == 1024
    assert config.server.shutdown_grace_ms == 5000
    assert config.topics == TopicsSection(auto_create=False, default_queues=4)
    assert config.store == StoreConfig(data_dir=Path("data/store"))
    assert config.topics_path == Path("data/topics.json")


def test_every_store_field_but_data_dir_is_configurable(tmp_path: Path) -> None:
    names = {f.name for f in attrs.fields(StoreConfig)} - {"data_dir"}
    values: dict[str, Any] = {
        "segment_size": 1 << 20,
        "max_message_size": 1 << 16,
        "consume_queue_entries": 128,
        "flush_interval_ms": 7,
        "flush_least_pages": 0,
        "flush_thorough_interval_ms": 70,
        "preallocate": False,
        "warm_segments": False,
        "retention_hours": 1.5,
        "disk_max_used_ratio": 0.5,
        "retention_check_interval_ms": 99,
        "delete_unexpired_under_pressure": True,
    }
    assert set(values) == names, "a StoreConfig field is missing from this test"
    lines = "\n".join(
        f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()
    )
    config = load(write(tmp_path, f"[node]\ndata_dir = '{tmp_path}'\n[store]\n{lines}\n"))
    assert config.store == StoreConfig(data_dir=tmp_path / "store", **values)
    with pytest.raises(ConfigError) as caught:
        load_node_config(None, {"store.data_dir": "/elsewhere"}, environ={})
    assert caught.value.key == "store.data_dir"


def test_toml_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [node]
        name = "n1"
        host = "0.0.0.0"
        port = 0
        data_dir = "/var/tidelog"
        [server]
        max_connections = 5
        shutdown_grace_ms = 0
        [topics]
        auto_create = true
        default_queues = 8
        [store]
        retention_hours = 2      # an integer for a float field is fine
        """,
    )
    config = load(path)
    assert config.node == NodeSection(name="n1", host="0.0.0.0", port=0, data_dir="/var/tidelog")
    assert (config.server.max_connections, config.server.shutdown_grace_ms) == (5, 0)
    assert config.topics == TopicsSection(auto_create=True, default_queues=8)
    assert config.store.retention_hours == 2.0
    assert config.store.data_dir == Path("/var/tidelog/store")


def test_environment_values_are_parsed_to_the_field_type() -> None:
    env = {
        "TIDELOG_NODE_PORT": "7700",
        "TIDELOG_NODE_DATA_DIR": "/srv/t",
        "TIDELOG_SERVER_MAX_INFLIGHT_PER_CONNECTION": " 64 ",
        "TIDELOG_TOPICS_AUTO_CREATE": "Yes",
        "TIDELOG_STORE_WARM_SEGMENTS": "off",
        "TIDELOG_STORE_DISK_MAX_USED_RATIO": "0.75",
        "TIDELOG_STORE_SEGMENT_SIZE": "8_388_608",
        "TIDELOG_LOG_LEVEL": "DEBUG",  # not a config section: left to whoever reads it
        "PATH": "/bin",
    }
    config = load(env=env)
    assert config.node.port == 7700
    assert config.node.data_dir == Path("/srv/t")
    assert config.server.max_inflight_per_connection == 64
    assert config.topics.auto_create is True
    assert config.store.warm_segments is False
    assert config.store.disk_max_used_ratio == 0.75
    assert config.store.segment_size == 8 << 20


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "[node]\nport = 1111\nhost = '10.0.0.1'\nname = 'from-file'\n")
    env = {"TIDELOG_NODE_PORT": "2222", "TIDELOG_NODE_HOST": "10.0.0.2"}
    config = load(path, env, **{"node.port": 3333})
    assert config.node.port == 3333  # flag
    assert config.node.host == "10.0.0.2"  # environment
    assert config.node.name == "from-file"  # file
    assert config.server.max_connections == 10_000  # default
    # Flags may arrive as text too (argparse without a type).
    assert load(path, env, **{"node.port": "4444"}).node.port == 4444


def test_create_builds_a_consistent_config(tmp_path: Path) -> None:
    config = NodeConfig.create(tmp_path, node={"port": 0}, store={"segment_size": 8 << 20})
    assert config.store.data_dir == tmp_path / "store"
    assert config.node.port == 0
    with pytest.raises(ValueError, match=r"store\.data_dir"):
        NodeConfig(node=NodeSection(data_dir=tmp_path), store=StoreConfig(data_dir=tmp_path))


# ---- errors: each names its source and the full dotted key -------------------------------------


def raises(*args: object, **kwargs: object) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(*args, **kwargs)  # type: ignore[arg-type]
    return caught.value


def test_unknown_key_in_file_suggests_the_close_one(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nmax_conections = 5\n")
    error = raises(path)
    assert error.key == "server.max_conections"
    assert str(path) in str(error)
    assert "did you mean 'server.max_connections'?" in str(error)


def test_key_in_the_wrong_section_suggests_the_right_one(tmp_path: Path) -> None:
    error = raises(write(tmp_path, "[node]\nmax_connections = 5\n"))
    assert error.key == "node.max_connections"
    assert "did you mean 'server.max_connections'?" in str(error)


def test_unknown_section(tmp_path: Path) -> None:
    error = raises(write(tmp_path, "[nodes]\nport = 1\n"))
    assert error.key == "nodes.port"
    assert "unknown section [nodes]" in str(error) and "'node.port'" in str(error)
    empty = raises(write(tmp_path, "[metrics]\n"))  # an empty unknown section is refused too
    assert "unknown section [metrics]" in str(empty)


def test_top_level_key_must_be_in_a_section(tmp_path: Path) -> None:
    error = raises(write(tmp_path, "port = 1\n"))
    assert error.key == "port"
    assert "did you mean 'node.port'?" in str(error)


def test_unknown_key_without_a_close_match_lists_the_known_ones() -> None:
    error = raises(**{"topics.zzzzzz": 1})
    assert "known keys:" in str(error) and "topics.auto_create" in str(error)


@pytest.mark.parametrize(
    ("toml", "key", "expected"),
    [
        ("[node]\nport = '7600'", "node.port", "must be an integer, got '7600'"),
        ("[node]\nport = true", "node.port", "must be an integer, got True"),
        ("[topics]\nauto_create = 1", "topics.auto_create", "must be a boolean"),
        ("[store]\nretention_hours = 'x'", "store.retention_hours", "must be a number"),
        ("[store]\nretention_hours = nan", "store.retention_hours", "must be a number"),
        ("[node]\ndata_dir = 3", "node.data_dir", "must be a path"),
        ("[node]\nname = 7", "node.name", "must be a string"),
        ("[node]\nport = 70000", "node.port", "between 0 and 65535, got 70000"),
        ("[node]\nname = '-x'", "node.name", "starting with a letter or digit"),
        ("[node]\nhost = ''", "node.host", "must not be empty"),
        ("[server]\nmax_frame_size = 10", "server.max_frame_size", "between 1024 and"),
        ("[server]\nmax_connections = 0", "server.max_connections", "between 1 and"),
        ("[topics]\ndefault_queues = 2000", "topics.default_queues", "between 1 and 1024"),
        ("[store]\nsegment_size = 5000", "store.segment_size", "multiple of the page size"),
        ("[store]\nflush_interval_ms = 0", "store.flush_interval_ms", "must be > 0"),
        ("[store]\ndisk_max_used_ratio = 1.5", "store.disk_max_used_ratio", "in (0, 1]"),
    ],
)
def test_bad_values_in_the_file_name_file_key_value_and_what_is_allowed(
    tmp_path: Path, toml: str, key: str, expected: str
) -> None:
    path = write(tmp_path, toml + "\n")
    error = raises(path)
    assert error.key == key
    assert error.source == f"config file {path}"
    assert expected in str(error)


def test_cross_field_store_rule_names_the_key(tmp_path: Path) -> None:
    error = raises(write(tmp_path, "[store]\nsegment_size = 65536\nmax_message_size = 65536\n"))
    assert error.key == "store.max_message_size"
    assert "must leave" in str(error)


@pytest.mark.parametrize(
    ("name", "value", "key", "expected"),
    [
        ("TIDELOG_NODE_PORT", "seventy", "node.port", "must be an integer, got 'seventy'"),
        ("TIDELOG_TOPICS_AUTO_CREATE", "maybe", "topics.auto_create", "true/false"),
        ("TIDELOG_STORE_RETENTION_HOURS", "inf", "store.retention_hours", "must be a number"),
        ("TIDELOG_NODE_DATA_DIR", " ", "node.data_dir", "must be a path"),
        ("TIDELOG_SERVER_MAX_CONECTIONS", "5", "server.max_conections", "did you mean"),
        ("TIDELOG_SERVER_MAX_CONNECTIONS", "-1", "server.max_connections", "between 1 and"),
    ],
)
def test_bad_environment_values_name_the_variable(
    name: str, value: str, key: str, expected: str
) -> None:
    error = raises(env={name: value})
    assert error.key == key
    assert error.source == f"environment variable {name}"
    assert name in str(error) and expected in str(error)


def test_bad_flags_name_the_key() -> None:
    error = raises(**{"node.port": "http"})
    assert error.key == "node.port" and error.source == "override node.port"
    assert "must be an integer, got 'http'" in str(error)
    assert raises(**{"nodes.port": 1}).key == "nodes.port"


def test_range_error_blames_the_layer_that_set_the_value(tmp_path: Path) -> None:
    path = write(tmp_path, "[node]\nport = 99999\n")
    assert raises(path).source == f"config file {path}"
    error = raises(path, {"TIDELOG_NODE_PORT": "123456"})
    assert error.source == "environment variable TIDELOG_NODE_PORT"
    assert load(path, {"TIDELOG_NODE_PORT": "80"}).node.port == 80


def test_file_problems_name_the_file(tmp_path: Path) -> None:
    missing = raises(tmp_path / "nope.toml")
    assert "nope.toml" in str(missing) and "no such file" in str(missing)
    broken = raises(write(tmp_path, "[node\n"))
    assert str(tmp_path / "node.toml") in str(broken) and "not valid TOML" in str(broken)


# ---- [replication] operational knobs ---------------------------------------------------------


def test_replication_knob_defaults() -> None:
    replication = load().replication
    assert replication.use_sendfile is True
    assert replication.max_lag_bytes == 268_435_456
    assert replication.max_lag_ms == 10_000
    assert replication.heartbeat_ms == 1000
    assert replication.peer_timeout_ms == 5000
    assert replication.slave_ack == "write"


def test_replication_knobs_from_file_environment_and_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[replication]\nuse_sendfile = false\nmax_lag_bytes = 1048576\nmax_lag_ms = 500\n"
        'slave_ack = "durable"\n',
    )
    env = {"TIDELOG_REPLICATION_HEARTBEAT_MS": "200", "TIDELOG_REPLICATION_MAX_LAG_MS": "700"}
    replication = load(path, env, **{"replication.peer_timeout_ms": "900"}).replication
    assert replication.use_sendfile is False
    assert replication.max_lag_bytes == 1 << 20
    assert replication.max_lag_ms == 700  # the environment beats the file
    assert replication.heartbeat_ms == 200
    assert replication.peer_timeout_ms == 900
    assert replication.slave_ack == "durable"


@pytest.mark.parametrize(
    ("flags", "key", "fragment"),
    [
        ({"replication.use_sendfile": "maybe"}, "replication.use_sendfile", "true/false"),
        ({"replication.max_lag_bytes": "-1"}, "replication.max_lag_bytes", "between"),
        ({"replication.max_lag_ms": "0"}, "replication.max_lag_ms", "between"),
        ({"replication.heartbeat_ms": "0"}, "replication.heartbeat_ms", "between"),
        ({"replication.peer_timeout_ms": "1000"}, "replication.peer_timeout_ms", "exceed"),
        (
            {"replication.heartbeat_ms": "6000"},
            "replication.peer_timeout_ms",
            "exceed heartbeat_ms (6000)",
        ),
        ({"replication.slave_ack": "fsync"}, "replication.slave_ack", "write, durable"),
        ({"replication.slave_acks": "durable"}, "replication.slave_acks", "replication.slave_ack"),
    ],
)
def test_replication_knob_errors_name_the_key(
    flags: dict[str, str], key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(None, None, **flags)
    assert info.value.key == key
    assert fragment in info.value.problem


def test_replication_knob_type_errors_in_a_file_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[replication]\nmax_lag_ms = "500"\n')
    with pytest.raises(ConfigError) as info:
        load(path)
    assert (info.value.key, info.value.source) == ("replication.max_lag_ms", f"config file {path}")
    assert "integer" in info.value.problem


async def test_node_passes_the_knobs_to_its_ha_service(tmp_path: Path) -> None:
    """A knob that loads but never reaches HAService would be silently ignored."""
    from cluster.node import Node
    from storage import MessageStore

    config = NodeConfig.create(
        tmp_path,
        replication={
            "ha_port": 0,
            "use_sendfile": False,
            "max_lag_bytes": 4096,
            "max_lag_ms": 300,
            "heartbeat_ms": 50,
            "peer_timeout_ms": 400,
        },
    )
    async with MessageStore.open(config.store) as store:
        service = Node(config)._ha_service(store)
        assert service.settings.use_sendfile is False
        assert (service.insync.max_lag_bytes, service.insync.max_lag_ms) == (4096, 300)
        assert (service.settings.heartbeat_ms, service.settings.peer_timeout_ms) == (50, 400)
