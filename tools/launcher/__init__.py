"""Local launchers: real child processes (etcd today; the broker group for `tidelog cluster up`
next) and the loopback TCP proxy that injects network faults between them."""

from tools.launcher.etcd import (
    EtcdCluster,
    EtcdLaunchError,
    EtcdMember,
    etcd_binary,
    free_loopback_port,
)
from tools.launcher.proxy import TcpProxy

__all__ = [
    "EtcdCluster",
    "EtcdLaunchError",
    "EtcdMember",
    "TcpProxy",
    "etcd_binary",
    "free_loopback_port",
]
