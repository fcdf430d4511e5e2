"""The cluster layer: the wire protocol, the node (server, role, topics, config) and the client library."""
