"""Master-to-slave replication (streaming with sendfile, acks, in-sync set, epochs): see the replication issue."""
