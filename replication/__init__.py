"""Master-to-slave replication: streaming with sendfile, epochs, the in-sync set and the confirm offset."""
