"""Local launchers: real child processes (etcd today; the broker group for `tidelog cluster up` next)."""

from tools.launcher.etcd import (
    EtcdCluster,
    EtcdLaunchError,
    EtcdMember,
    etcd_binary,
    free_loopback_port,
)

__all__ = ["EtcdCluster", "EtcdLaunchError", "EtcdMember", "etcd_binary", "free_loopback_port"]
