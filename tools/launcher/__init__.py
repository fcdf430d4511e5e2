"""Local launchers: real child processes (etcd, and the broker group of `tidelog cluster up`:
LocalCluster) and the loopback TCP proxy that injects network faults between them."""

from tools.faults.proxy import FaultProxy
from tools.launcher.cluster import ClusterLaunchError, LocalCluster, NodeView
from tools.launcher.etcd import (
    EtcdCluster,
    EtcdLaunchError,
    EtcdMember,
    etcd_binary,
    free_loopback_port,
)

TcpProxy = FaultProxy
"""The former name of the launcher's proxy: one proxy (with the fault vocabulary) serves both."""

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
