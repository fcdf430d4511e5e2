"""Local launchers: real child processes (etcd, and the broker group of `tidelog cluster up`:
LocalCluster) and the throwaway PKI of `cluster up --tls` (make_pki). The proxy that injects
network faults is tools.faults.proxy.FaultProxy."""

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
from tools.launcher.pki import Pki, PkiError, make_pki

__all__ = [
    "ClusterLaunchError",
    "EtcdCluster",
    "EtcdLaunchError",
    "EtcdMember",
    "LocalCluster",
    "NodeSettings",
    "NodeTarget",
    "NodeView",
    "Pki",
    "PkiError",
    "etcd_binary",
    "free_loopback_port",
    "make_pki",
]
