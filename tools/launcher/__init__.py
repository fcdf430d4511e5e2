"""Local launchers: real child processes (etcd, and the broker group of `tidelog cluster up`:
LocalCluster) and the loopback TCP proxy that injects network faults between them."""

from tools.launcher.cluster import ClusterLaunchError, LocalCluster, NodeView
from tools.launcher.etcd import (
    EtcdCluster,
    EtcdLaunchError,
    EtcdMember,
    etcd_binary,
    free_loopback_port,
)
from tools.launcher.proxy import TcpProxy

__all__ = [
    "ClusterLaunchError",
    "EtcdCluster",
    "EtcdLaunchError",
    "EtcdMember",
    "LocalCluster",
    "NodeView",
    "TcpProxy",
    "etcd_binary",
    "free_loopback_port",
]
