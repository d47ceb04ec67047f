#!/usr/bin/env bash
# Runs the whole sse-scale test suite on a fresh Debian machine.
#
# Installs what the tests need and the machine lacks (redis-server, haproxy,
# nginx, caddy; Debian packages), then runs every test of the workspace. The
# tests start their own redis-server, balancer and server processes on free
# ports, so nothing needs to be running beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null || need+=(nginx)
command -v caddy >/dev/null || need+=(caddy)
command -v envsubst >/dev/null || need+=(gettext-base)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # The packages start system services we do not use; the tests run their own.
    for svc in redis-server haproxy nginx caddy; do
        $sudo service "$svc" stop >/dev/null 2>&1 || true
    done
fi

if ! command -v cargo >/dev/null; then
    echo "error: cargo not found; install Rust 1.83 or newer (https://rustup.rs)" >&2
    exit 1
fi

# Streams and test processes need many descriptors; take what the hard limit allows.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One summary line over every test binary.
awk '/^test result:/ { p += $4; f += $6; s += $8 }
     END { printf "\nsse-scale: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
