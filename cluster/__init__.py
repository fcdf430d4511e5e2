"""tidelog's cluster layer: the wire protocol, and later the node and its replication."""
