"""Coordination through etcd: the client, the key layout, the pure HA decisions and settings.

etcd transactions are the only arbiter of leadership and of the recorded in-sync set
(Patroni's model); this package holds the parts that do not depend on the node.
"""
