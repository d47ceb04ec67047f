#!/usr/bin/env bash
# Walks the operator's documents as an operator would: runs the shell blocks
# of docs/migration.md, lb-config/README.md and docs/flags.md marked
# ```sh walk:NAME, exactly as written and in the order of the runbook,
# against real instances, balancers, Redis and Unleash, and after each step
# checks that it did what the document says.
#
#   tests/docs/walk.sh haproxy | nginx | caddy | flags | deploy
#
# The documents use an example fleet (instances at 10.0.0.11-13:3000, the
# balancer on :8080, Unleash at unleash:4242). The walk runs in a private
# network, mount and process namespace (unshare) in which those addresses
# are its own loopback, /etc/hosts names unleash, and /tmp and /run are
# private, so it collides with nothing else on the machine and every process
# it started ends with it. It needs root (or sudo).
#
# Environment: SSE_SCALE_BIN, the server binary. For `flags`: UNLEASH_PORT
# (an Unleash server on 127.0.0.1, bridged into the namespace as
# unleash:4242), UNLEASH_ADMIN_TOKEN and UNLEASH_CLIENT_TOKEN (a backend
# token of its production environment).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
self=$repo/tests/docs/walk.sh
cd "$repo"

if [ -z "${WALK_INSIDE:-}" ]; then
    [ $# -eq 1 ] || { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
    : "${SSE_SCALE_BIN:?set SSE_SCALE_BIN to the sse-scale binary}"
    work=$(mktemp -d /var/tmp/sse-scale-walk.XXXXXX)
    bridge=
    cleanup() {
        [ -z "$bridge" ] || kill "$bridge" 2>/dev/null || true
        rm -rf "$work"
    }
    trap cleanup EXIT
    if [ -n "${UNLEASH_PORT:-}" ]; then
        # Unix sockets cross network namespaces: Unleash's port reaches the
        # inside through one.
        socat "UNIX-LISTEN:$work/unleash.sock,fork" "TCP:127.0.0.1:$UNLEASH_PORT" &
        bridge=$!
    fi
    sudo=
    [ "$(id -u)" -eq 0 ] || sudo="sudo --preserve-env"
    set +e
    WALK_INSIDE=1 WALK_WORK=$work $sudo unshare --net --mount --propagation private --pid --fork --mount-proc -- bash "$self" "$@"
    status=$?
    set -e
    exit "$status"
fi

work=$WALK_WORK
bin=$SSE_SCALE_BIN
secret=walk-session-secret-0123456789abcdef0123456789
export ADMIN_TOKEN=walk-admin-token-0123456789

fail() {
    echo "FAIL: $*" >&2
    for f in "$work"/*.log; do
        [ -f "$f" ] || continue
        echo "--- $f (last 30 lines)" >&2
        tail -n 30 "$f" >&2
    done
    exit 1
}

# wait_for SECONDS 'CONDITION': true once the shell condition (evaluated
# afresh each time) holds.
wait_for() {
    local tries=$(($1 * 10))
    shift
    for _ in $(seq 1 "$tries"); do
        eval "$1" && return 0
        sleep 0.1
    done
    return 1
}

code() { curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$@" || true; }

# instance URL [CURL ARGS]: the X-Instance-Id that answered.
instance() {
    curl -s -D - -o /dev/null --max-time 2 "$@" | tr -d '\r' |
        awk -F': ' 'tolower($1) == "x-instance-id" { print $2 }'
}

# --- the process manager: instances app1..app3 at 10.0.0.11..13:3000 ------

# launch N: starts instance N detached, as `systemctl start` does: it
# returns at once, without waiting for the instance to be ready.
launch() {
    local n=$1
    (
        set -a
        # shellcheck disable=SC1090
        . "$work/app$n.env"
        set +a
        "$bin" >>"$work/app$n.log" 2>&1 &
        echo $! >"$work/app$n.pid"
    )
}

# up N: launches instance N and waits until it is ready.
up() {
    local n=$1
    launch "$n"
    wait_for 20 'ready "$n"' || fail "app$n did not become ready"
}

ready() { [ "$(code "http://10.0.0.1$1:3000/readyz")" = 200 ]; }

# stop N: SIGTERM (the drain) and wait for the exit.
stop() {
    local pid
    pid=$(cat "$work/app$1.pid")
    kill -TERM "$pid"
    wait_for 40 'gone "$pid"' || fail "app$1 did not exit after SIGTERM"
}

# gone PID: the process has exited (a zombie not yet reaped counts).
gone() { ! kill -0 "$1" 2>/dev/null || grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }

# `walk.sh restart HOST`, the RESTART command the rolling-restart script
# runs here: what `systemctl restart sse-scale` does on a host.
if [ "${1:-}" = restart ]; then
    n=${2#10.0.0.1}
    echo "restart of $2 (app$n)" >>"$work/restarts"
    stop "$n"
    launch "$n"
    exit 0
fi

# --- the documents' blocks --------------------------------------------------

ran=()

# block FILE NAME: the text of the ```sh walk:NAME block in FILE.
block() {
    local text
    text=$(awk -v open='```sh walk:'"$2" '$0 == open { on = 1; next } on && /^```/ { exit } on { print }' "$1")
    [ -n "$text" ] || fail "$1 has no \`\`\`sh walk:$2 block"
    printf '%s\n' "$text"
}

# run FILE NAME: runs the block in this shell, as an operator's shell would
# (its exports stay for the next blocks).
run() {
    local text
    text=$(block "$1" "$2")
    echo "== $1 walk:$2"
    printf '%s\n' "$text" | sed 's/^/   $ /'
    eval "$text" >"$work/out" 2>&1 || { cat "$work/out"; fail "walk:$2 in $1 failed"; }
    head -n 20 "$work/out" | sed 's/^/   > /'
    ran+=("$2")
}

# start FILE NAME LOG: runs a block that stays in the foreground (a
# balancer) in the background of this shell.
start() {
    local text
    text=$(block "$1" "$2")
    echo "== $1 walk:$2 (in the background)"
    printf '%s\n' "$text" | sed 's/^/   $ /'
    eval "$text" >>"$work/$3.log" 2>&1 &
    ran+=("$2")
}

# --- the namespace ----------------------------------------------------------

ip link set lo up
for a in 11 12 13 20; do ip addr add "10.0.0.$a/32" dev lo; done
printf '127.0.0.1 localhost\n::1 localhost\n10.0.0.20 unleash\n' >"$work/hosts"
mount --bind "$work/hosts" /etc/hosts
# A private /tmp, unless the checkout or the binary lives there (a clone in
# /tmp): then the walk uses the machine's /tmp and removes what the
# documents' commands put there.
leftover=
case "$repo:$bin" in
/tmp/* | *:/tmp/*)
    [ -e /tmp/sse-nginx ] || leftover=/tmp/sse-nginx
    ;;
*) mount -t tmpfs tmpfs /tmp ;;
esac
mount -t tmpfs tmpfs /run
# The installed binary, as the documents call it.
mkdir -p "$work/bin"
ln -s "$bin" "$work/bin/sse-scale"
export PATH=$work/bin:$PATH
# What the balancers keep in $HOME (Caddy's autosave) stays in the walk.
export HOME=$work/home
mkdir -p "$HOME"

pids=()
cleanup_inside() {
    local status=$?
    set +e
    [ -z "$leftover" ] || rm -rf "$leftover"
    for n in 1 2 3; do
        [ -f "$work/app$n.pid" ] && kill -KILL "$(cat "$work/app$n.pid")" 2>/dev/null
    done
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    kill $(jobs -p) 2>/dev/null
    wait 2>/dev/null
    exit "$status"
}
trap cleanup_inside EXIT

fleet() {
    for n in 1 2 3; do
        {
            echo "HOST=10.0.0.1$n"
            echo "PORT=3000"
            echo "INSTANCE_ID=app$n"
            echo "SESSION_SECRET=$secret"
            echo "ADMIN_TOKEN=$ADMIN_TOKEN"
            echo "TRUSTED_PROXIES=10.0.0.0/24,127.0.0.1"
            echo "SHUTDOWN_DRAIN_SECS=2"
            echo "RUST_LOG=warn"
            printf '%s\n' "$@"
        } >"$work/app$n.env"
        launch "$n"
    done
    for n in 1 2 3; do
        wait_for 20 'ready "$n"' || fail "app$n did not become ready"
    done
}

lb=http://127.0.0.1:8080

# spread: the instances that answer 12 fresh clients (no cookie).
spread() {
    for _ in $(seq 1 12); do instance "$lb/readyz"; done | sort -u | tr '\n' ' '
}

# pinned JAR: a client with a cookie jar; every answer from one instance.
pinned() {
    local jar=$1 first ids
    curl -s -c "$jar" -b "$jar" -o /dev/null -X POST --max-time 2 "$lb/sessions"
    ids=$(for _ in $(seq 1 10); do instance "$lb/readyz" -c "$jar" -b "$jar"; done | sort -u)
    [ "$(echo "$ids" | wc -l)" = 1 ] || fail "a client with cookies reached several instances: $ids"
    echo "$ids"
}

# --- scenarios --------------------------------------------------------------

scenario_haproxy() {
    local readme=lb-config/README.md
    fleet
    run $readme haproxy-check
    [ "$HAPROXY_SOCKET" = /run/haproxy/sse.sock ] || fail "HAPROXY_SOCKET was not exported"
    start $readme haproxy-start haproxy
    wait_for 10 '[ "$(code $lb/readyz)" = 200 ]' || fail "HAProxy does not answer on :8080"
    wait_for 10 '[ -S "$HAPROXY_SOCKET" ]' || fail "no runtime socket at $HAPROXY_SOCKET"
    echo "   fresh clients reach: $(spread)"
    [ "$(spread | wc -w)" -ge 2 ] || fail "fresh clients do not spread"
    local home
    home=$(pinned "$work/jar")
    echo "   a client with cookies stays on $home"

    # A client pinned to app1 before the drain keeps it.
    local pin1=
    for i in $(seq 1 30); do
        if [ "$(pinned "$work/jar$i")" = app1 ]; then pin1=$work/jar$i; break; fi
    done
    [ -n "$pin1" ] || fail "no client was pinned to app1 in 30 tries"
    run $readme haproxy-drain
    grep -q DRAIN "$work/out" || fail "show stat does not say DRAIN"
    for _ in $(seq 1 12); do
        [ "$(instance "$lb/readyz")" != app1 ] || fail "a new client reached the drained app1"
    done
    [ "$(instance "$lb/readyz" -b "$pin1")" = app1 ] || fail "a client pinned to app1 left it during the drain"
    echo "   drained: new clients avoid app1, pinned ones stay"

    # Step 2 and 3: SIGTERM, deploy, start with the same INSTANCE_ID.
    stop 1
    wait_for 10 '[ "$(instance "$lb/readyz" -b "$pin1")" != app1 ]' || fail "the pinned client was not moved off the stopped app1"
    up 1
    run $readme haproxy-ready
    wait_for 10 'echo "show stat" | socat stdio "unix-connect:$HAPROXY_SOCKET" | grep "^app,app1," | grep -q ",UP,"' ||
        fail "app1 is not UP after 'state ready'"
    wait_for 10 'spread | grep -qw app1' ||
        fail "new clients do not reach app1 after 'state ready'"
    echo "   ready: app1 takes new clients again"
}

scenario_nginx() {
    local readme=lb-config/README.md
    fleet
    run $readme nginx-check
    start $readme nginx-start nginx
    wait_for 10 '[ "$(code $lb/readyz)" = 200 ]' || fail "nginx does not answer on :8080"
    echo "   fresh clients reach: $(spread)"
    [ "$(spread | wc -w)" -ge 2 ] || fail "fresh clients do not spread"
    local pin1=
    for i in $(seq 1 30); do
        if [ "$(pinned "$work/jar$i")" = app1 ]; then pin1=$work/jar$i; break; fi
    done
    [ -n "$pin1" ] || fail "no client was pinned to app1 in 30 tries"
    run $readme nginx-drain
    grep -q 'server 10.0.0.11:3000 down' /tmp/sse-nginx/nginx.conf || fail "the edit did not mark app1 down"
    [ "$(grep -c 'server 10.0.0.11:3000 down' /tmp/sse-nginx/nginx.conf)" = 2 ] || fail "the edit touched more than sse_any and sse_any_stream"
    sleep 1
    for _ in $(seq 1 12); do
        [ "$(instance "$lb/readyz")" != app1 ] || fail "a new client reached app1 after the reload"
    done
    [ "$(instance "$lb/readyz" -b "$pin1")" = app1 ] || fail "a client pinned to app1 left it after the reload"
    echo "   drained: new clients avoid app1, pinned ones stay"
    stop 1
    wait_for 10 '[ "$(instance "$lb/readyz" -b "$pin1")" != app1 ]' || fail "the pinned client was not moved off the stopped app1"
    up 1
    run $readme nginx-ready
    grep -q 'server 10.0.0.11:3000 down' /tmp/sse-nginx/nginx.conf && fail "app1 is still marked down"
    wait_for 10 'spread | grep -qw app1' ||
        fail "new clients do not reach app1 after the restore"
    echo "   ready: app1 takes new clients again"
}

scenario_caddy() {
    local readme=lb-config/README.md
    fleet
    run $readme caddy-check
    start $readme caddy-start caddy
    wait_for 15 '[ "$(code $lb/readyz)" = 200 ]' || fail "Caddy does not answer on :8080"
    echo "   fresh clients reach: $(spread)"
    [ "$(spread | wc -w)" -ge 2 ] || fail "fresh clients do not spread"
    pinned "$work/jar" >/dev/null

    # A browser pinned to an instance that stays, with its stream open.
    local jar= holder session token
    for i in $(seq 1 30); do
        if [ "$(pinned "$work/jar$i")" != app1 ]; then jar=$work/jar$i; break; fi
    done
    [ -n "$jar" ] || fail "every client was pinned to app1"
    session=$(curl -s -b "$jar" -c "$jar" -X POST "$lb/sessions")
    token=$(echo "$session" | jq -r .token)
    session=$(echo "$session" | jq -r .id)
    curl -sN -b "$jar" --max-time 60 "$lb/sessions/$session/events?token=$token" >"$work/stream" &
    local stream=$!
    wait_for 5 'grep -q "event: connected" "$work/stream"' || fail "the stream did not open through Caddy"
    holder=$(grep -o '"instance_id":"[^"]*"' "$work/stream" | head -n 1 | cut -d'"' -f4)
    local seen
    seen=$(sed -n 's/^id: //p' "$work/stream" | tail -n 1)

    run $readme caddy-drain
    grep -q '10.0.0.11:3000' "$work/out" || fail "the upstream list does not show app1"
    sleep 1
    for _ in $(seq 1 12); do
        [ "$(instance "$lb/readyz")" != app1 ] || fail "a new client reached app1 after the DELETE"
    done
    # What the README says about the change: it closes the streams open
    # through Caddy, and their reconnects resume on their instance.
    wait_for 5 '! kill -0 $stream 2>/dev/null' || fail "the stream through Caddy outlived the admin API change; update the README"
    curl -sf -X POST -H "Authorization: Bearer $token" -d '{"type":"walk","data":1}' \
        "$lb/sessions/$session/events" -b "$jar" >/dev/null || fail "publish through Caddy failed"
    curl -sN -b "$jar" --max-time 3 -H "Last-Event-ID: $seen" "$lb/sessions/$session/events?token=$token" >"$work/resumed" || true
    grep -q 'event: walk' "$work/resumed" || fail "the reconnect after the change did not resume: $(cat "$work/resumed")"
    grep -q "\"instance_id\":\"$holder\"" "$work/resumed" || fail "the reconnect left $holder"
    echo "   drained: new clients avoid app1; open streams were cut and resumed on $holder"
    run $readme caddy-ready
    for route in 0 1; do
        wait_for 5 'curl -s localhost:2019/config/apps/http/servers/srv0/routes/'$route'/handle/0/upstreams | jq -e ".[0].dial == \"10.0.0.11:3000\" and length == 3" >/dev/null' ||
            fail "app1 is not back first in the upstream list of route $route"
    done
    wait_for 10 'spread | grep -qw app1' ||
        fail "new clients do not reach app1 after the PUT"
    echo "   ready: app1 takes new clients again"
}

flag_on() { # N SESSION: whether instance N puts the session on Redis
    curl -s -H "Authorization: Bearer $ADMIN_TOKEN" "http://10.0.0.1$1:3000/flags?sessions=$2" |
        jq -r '.checked[0].redis'
}

# shares N IDS...: how many of the ids instance N puts on Redis
shares() {
    local n=$1
    shift
    curl -s -H "Authorization: Bearer $ADMIN_TOKEN" "http://10.0.0.1$n:3000/flags?sessions=$(IFS=,; echo "$*")" |
        jq '[.checked[] | select(.redis)] | length'
}

scenario_flags() {
    : "${UNLEASH_ADMIN_TOKEN:?}" "${UNLEASH_CLIENT_TOKEN:?}"
    redis-server --port 6379 --bind 127.0.0.1 --save '' --appendonly no >"$work/redis.log" 2>&1 &
    pids+=($!)
    socat TCP-LISTEN:4242,bind=10.0.0.20,fork,reuseaddr "UNIX-CONNECT:$work/unleash.sock" &
    pids+=($!)
    wait_for 10 'redis-cli -p 6379 ping >/dev/null' || fail "redis-server did not start"
    fleet REDIS_URL=redis://127.0.0.1:6379 UNLEASH_URL=http://unleash:4242/api \
        "UNLEASH_API_TOKEN=$UNLEASH_CLIENT_TOKEN" UNLEASH_REFRESH_SECS=1
    local ids=()
    for _ in $(seq 1 40); do ids+=("$(openssl rand -hex 16)"); done

    run docs/flags.md flags-env
    run docs/flags.md flags-rollout
    grep -q '"enabled": true' "$work/out" || fail "status does not say enabled after 'on'"
    wait_for 10 '[ "$(curl -s -H "Authorization: Bearer $ADMIN_TOKEN" http://10.0.0.12:3000/flags | jq -r .state.source)" = unleash ]' ||
        fail "app2 does not follow Unleash"
    wait_for 10 '[ "$(shares 1 "${ids[@]}")" = 40 ]' || fail "at 100 % not every session is on Redis"
    for n in 2 3; do
        wait_for 10 '[ "$(shares "$n" "${ids[@]}")" = 40 ]' || fail "app$n disagrees at 100 %"
    done
    echo "   rollout 100: all 40 sessions on Redis on every instance"

    export SESSION_A=${ids[0]} SESSION_B=${ids[1]}
    run docs/flags.md flags-inspect
    head -c 2000 "$work/out" | grep -q '"source":"unleash"' || fail "/flags does not name the source"
    tail -n 1 "$work/out" | jq -e --arg a "$SESSION_A" '.checked | any(.session == $a and .redis)' >/dev/null ||
        fail "/flags?sessions= does not check SESSION_A"

    run docs/flags.md flags-rollback
    grep -q 'warning: .*round-robin' "$work/out" || fail "'off' does not warn about non-sticky balancers"
    grep -q '"enabled": false' "$work/out" || fail "status does not say disabled after 'off'"
    for n in 1 2 3; do
        wait_for 10 '[ "$(shares "$n" "${ids[@]}")" = 0 ]' || fail "app$n still puts sessions on Redis after 'off'"
    done
    echo "   off: every instance back on the local path"
}

scenario_deploy() {
    # The systemd unit, as shipped, in a root with the binary and the
    # settings where it expects them.
    local root=$work/root
    mkdir -p "$root/usr/local/bin" "$root/etc/sse-scale" "$root/etc/systemd/system"
    cp "$bin" "$root/usr/local/bin/sse-scale"
    install -m 0600 /dev/null "$root/etc/sse-scale/env"
    cp docs/deploy/sse-scale.service "$root/etc/systemd/system/"
    mkdir -p "$root/usr/lib/systemd"
    cp -r /lib/systemd/system "$root/usr/lib/systemd/"   # the targets it is wanted by
    echo "== systemd-analyze verify docs/deploy/sse-scale.service"
    # verify exits 0 on settings it ignores; any word from it is a defect.
    systemd-analyze verify --root="$root" sse-scale.service >"$work/out" 2>&1 || true
    [ ! -s "$work/out" ] || fail "the systemd unit does not verify: $(cat "$work/out")"
    local nofile max_streams stop grace
    nofile=$(sed -n 's/^LimitNOFILE=//p' docs/deploy/sse-scale.service)
    stop=$(sed -n 's/^TimeoutStopSec=//p' docs/deploy/sse-scale.service)
    max_streams=$("$bin" --help | tr -s ' \n' ' ' | grep -o 'MAX_STREAMS=\] \[default: [0-9]*' | grep -o '[0-9]*$' || true)
    grace=$("$bin" --help | tr -s ' \n' ' ' | grep -o 'SHUTDOWN_GRACE_SECS=\] \[default: [0-9]*' | grep -o '[0-9]*$' || true)
    [ -n "$max_streams" ] && [ -n "$grace" ] || fail "--help does not show the MAX_STREAMS and SHUTDOWN_GRACE_SECS defaults"
    [ "$nofile" -gt "$max_streams" ] || fail "LimitNOFILE=$nofile does not cover MAX_STREAMS=$max_streams"
    [ "$stop" -gt "$grace" ] || fail "TimeoutStopSec=$stop is not above SHUTDOWN_GRACE_SECS=$grace"
    echo "   LimitNOFILE=$nofile > MAX_STREAMS=$max_streams; TimeoutStopSec=$stop > SHUTDOWN_GRACE_SECS=$grace"

    run docs/migration.md help
    grep -q 'FF_REDIS_SSE_BROADCAST' "$work/out" || fail "--help does not list FF_REDIS_SSE_BROADCAST"

    fleet
    local before=()
    for n in 1 2 3; do before+=("$(cat "$work/app$n.pid")"); done
    export RESTART="bash $self restart {host}"
    run docs/migration.md rolling-restart
    [ "$(cat "$work/restarts" | tr '\n' ';')" = "restart of 10.0.0.11 (app1);restart of 10.0.0.12 (app2);restart of 10.0.0.13 (app3);" ] ||
        fail "the instances were not restarted one by one in order: $(cat "$work/restarts")"
    for n in 1 2 3; do
        [ "$(cat "$work/app$n.pid")" != "${before[$((n - 1))]}" ] || fail "app$n runs the same process"
        ready "$n" || fail "app$n is not ready after the rolling restart"
    done
    echo "   every instance restarted in turn and ready"
    # An instance that does not come back stops the script with exit 1.
    echo "HOST=10.0.0.99" >>"$work/app2.env"
    set +e
    RESTART="bash $self restart {host}" READY_TIMEOUT=5 docs/deploy/rolling-restart.sh 10.0.0.12:3000 10.0.0.13:3000 >"$work/out" 2>&1
    local status=$?
    set -e
    [ "$status" = 1 ] || { cat "$work/out"; fail "rolling-restart.sh went on past an instance that did not come back (exit $status)"; }
    grep -q 'did not become ready within 5 s' "$work/out" || fail "rolling-restart.sh does not say which instance failed: $(cat "$work/out")"
    [ "$(grep -c 'restart of 10.0.0.13' "$work/restarts")" = 1 ] || fail "rolling-restart.sh restarted app3 after app2 failed"
    echo "   an instance that does not come back stops the script (exit 1)"
}

case "$1" in
haproxy | nginx | caddy | flags | deploy) "scenario_$1" ;;
*) fail "unknown scenario $1" ;;
esac
echo "walked: ${ran[*]}"
