#!/usr/bin/env bash
# Restarts sse-scale instances one at a time, waiting for each to be ready
# again before the next, so the fleet never loses more than one instance.
#
#   docs/deploy/rolling-restart.sh host1:3000 host2:3000 host3:3000
#
# Each HOST:PORT is an instance (not the balancer); RESTART (default
# `ssh HOST sudo systemctl restart sse-scale`) restarts one, with {host}
# replaced by the host name. systemd's SIGTERM drains the instance: it turns
# unready, leaves the balancer, then closes its streams over
# SHUTDOWN_DRAIN_SECS; clients reconnect elsewhere with Last-Event-ID.
# READY_TIMEOUT (default 120) is how many seconds an instance has to answer
# /readyz with 200 again; the script stops with exit code 1 at the first
# that does not, leaving the rest untouched.
set -euo pipefail
restart=${RESTART:-'ssh {host} sudo systemctl restart sse-scale'}
ready_timeout=${READY_TIMEOUT:-120}
[ $# -gt 0 ] || { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
for target in "$@"; do
    host=${target%:*}
    echo "restarting $target"
    eval "${restart//\{host\}/$host}"
    for _ in $(seq 1 "$ready_timeout"); do
        if curl -fsS -o /dev/null "http://$target/readyz"; then
            echo "$target is ready"
            # Let the balancer's checks (rise 2 x 1 s in the shipped files)
            # take it back before the next one leaves.
            sleep 3
            continue 2
        fi
        sleep 1
    done
    echo "error: $target did not become ready within $ready_timeout s; stopping here" >&2
    exit 1
done
