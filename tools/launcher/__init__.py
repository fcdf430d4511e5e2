"""Local launchers: real child processes (etcd, and the broker group of `tidelog cluster up`:
LocalCluster). The proxy that injects network faults is tools.faults.proxy.FaultProxy."""

from tools.launcher.cluster import (
    ClusterLaunchError,
    LocalCluster,
    NodeSettings,
    NodeTarget,
    NodeView,
)
from tools.launcher.etcd import (
    EtcdCluster,
    EtcdLaunchError,
    EtcdMember,
    etcd_binary,
    free_loopback_port,
)

__all__ = [
    "ClusterLaunchError",
    "EtcdCluster",
    "EtcdLaunchError",
    "EtcdMember",
    "LocalCluster",
    "NodeSettings",
    "NodeTarget",
    "NodeView",
    "etcd_binary",
    "free_loopback_port",
]
