#!/usr/bin/env bash
# Runs the whole sse-scale test suite on a fresh Debian machine.
#
# Installs what the tests need and the machine lacks (redis-server, haproxy,
# nginx, caddy, PostgreSQL, Node, Chromium, Prometheus, socat, systemd's
# tools; Debian packages), then runs every test of
# the workspace. The tests start their own redis-server, balancer, Unleash and
# server processes on free ports; the only shared service is PostgreSQL
# (Unleash's database), which this script starts if nothing listens on
# 127.0.0.1:5432.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null || need+=(nginx)
command -v caddy >/dev/null || need+=(caddy)
command -v envsubst >/dev/null || need+=(gettext-base)
command -v curl >/dev/null || need+=(curl)
# The documents' walk (tests/docs.rs): socat, openssl, ip, systemd-analyze.
command -v socat >/dev/null || need+=(socat)
command -v openssl >/dev/null || need+=(openssl)
command -v ip >/dev/null || need+=(iproute2)
command -v systemd-analyze >/dev/null || need+=(systemd)
# The browser tests (tests/browser.rs): Debian's Chromium, driven by
# playwright-core (installed by tests/browser/setup.sh).
command -v chromium >/dev/null || need+=(chromium)
# The operations tests (tests/ops.rs): a real Prometheus and promtool.
command -v prometheus >/dev/null || need+=(prometheus)
# The seeded faults (tests/chaos): one instance's clock off, by libfaketime.
command -v faketime >/dev/null || need+=(faketime)
command -v jq >/dev/null || need+=(jq)
command -v psql >/dev/null || need+=(postgresql-client)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
# A local PostgreSQL server only when none answers already (CI, a fresh box).
pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # The packages start system services we do not use; the tests run their own.
    for svc in redis-server haproxy nginx caddy prometheus; do
        $sudo service "$svc" stop >/dev/null 2>&1 || true
    done
fi

# PostgreSQL for Unleash: the flag tests connect as postgres@127.0.0.1:5432
# without a password (or to SSE_SCALE_PG_URL when set).
if [ -z "${SSE_SCALE_PG_URL:-}" ] && ! psql -qXtAc 'select 1' "postgres://postgres@127.0.0.1:5432/postgres" >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    if ! pg_isready -q -h 127.0.0.1 -p 5432; then
        version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
        if ! pg_lsclusters -h 2>/dev/null | awk -v v="$version" '$1 == v && $2 == "main"' | grep -q .; then
            $sudo pg_createcluster "$version" main >/dev/null
        fi
        echo "starting PostgreSQL $version (cluster main)"
        $sudo pg_ctlcluster "$version" main start
        for _ in $(seq 1 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
    fi
    as_postgres() {
        if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi
    }
    # Let the local tests in as postgres without a password, over loopback
    # only; added once, at the top so it takes precedence.
    hba=$(as_postgres psql -qXtAc 'show hba_file')
    if ! $sudo grep -q 'sse-scale tests' "$hba"; then
        echo "allowing postgres@127.0.0.1 without a password in $hba (sse-scale tests)"
        $sudo sed -i '1i host all postgres 127.0.0.1/32 trust # sse-scale tests' "$hba"
        as_postgres psql -qXtAc 'select pg_reload_conf()' >/dev/null
    fi
fi

# The Unleash server for the flag tests, and playwright-core for the
# browser tests, cached outside the repository.
tests/unleash/setup.sh >/dev/null
tests/browser/setup.sh >/dev/null

if ! command -v cargo >/dev/null; then
    echo "error: cargo not found; install Rust 1.83 or newer (https://rustup.rs)" >&2
    exit 1
fi

# The library's documentation builds without a broken or private link: what
# docs.rs would show a user is what docs/library.md describes.
RUSTDOCFLAGS="-D warnings" cargo doc -p sse-scale --no-deps --locked -q
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
