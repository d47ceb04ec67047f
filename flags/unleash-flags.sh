#!/usr/bin/env bash
# Operates FF_REDIS_SSE_BROADCAST on an Unleash server through its admin API.
#
#   flags/unleash-flags.sh create        create the flag and its gradual-rollout
#                                        strategy (0 %, environment off) from
#                                        flags/unleash-import.json; idempotent
#   flags/unleash-flags.sh rollout PCT   put PCT % of sessions on Redis
#   flags/unleash-flags.sh on | off      switch the flag on / off (off is the
#                                        roll-back: every session local again)
#   flags/unleash-flags.sh status        print the flag's state as JSON
#
# Environment:
#   UNLEASH_ADMIN_URL    Unleash base URL, e.g. http://unleash:4242 (no /api)
#   UNLEASH_ADMIN_TOKEN  an admin API token or a personal access token
#   UNLEASH_PROJECT      project [default]
#   UNLEASH_ENVIRONMENT  environment [production]
#   FLAG                 flag name [FF_REDIS_SSE_BROADCAST]
# Needs curl and jq.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
catalogue=$here/unleash-import.json
url=${UNLEASH_ADMIN_URL:?set UNLEASH_ADMIN_URL (e.g. http://unleash:4242)}
token=${UNLEASH_ADMIN_TOKEN:?set UNLEASH_ADMIN_TOKEN (an Unleash admin API token)}
project=${UNLEASH_PROJECT:-default}
env=${UNLEASH_ENVIRONMENT:-production}
flag=${FLAG:-FF_REDIS_SSE_BROADCAST}
base=${url%/}/api/admin/projects/$project/features

# api METHOD PATH [BODY]: the response body on 2xx; the body and exit 1 otherwise.
api() {
    local out status
    out=$(mktemp)
    status=$(curl -sS -o "$out" -w '%{http_code}' -X "$1" \
        -H "Authorization: $token" -H 'Content-Type: application/json' \
        ${3:+--data "$3"} "$2")
    if [[ $status != 2* ]]; then
        echo "error: $1 $2 -> HTTP $status: $(cat "$out")" >&2
        rm -f "$out"
        return 1
    fi
    cat "$out"
    rm -f "$out"
}

# Stops with a clear message when the flag has not been created yet (the
# API would only answer 404).
require_flag() {
    if ! api GET "$base/$flag" >/dev/null 2>&1; then
        echo "error: $flag does not exist in project $project; run '$0 create' first" >&2
        exit 1
    fi
}

# The id of the flag's flexibleRollout strategy in the environment, if any.
rollout_strategy() {
    api GET "$base/$flag/environments/$env/strategies" |
        jq -r '[.[] | select(.name == "flexibleRollout")][0].id // empty'
}

create() {
    if api GET "$base/$flag" >/dev/null 2>&1; then
        echo "$flag exists in project $project"
    else
        api POST "$base" "$(jq -c --arg f "$flag" '.features[] | select(.name == $f)
            | {name, description, type, impressionData}' "$catalogue")" >/dev/null
        echo "created $flag in project $project"
    fi
    if [ -n "$(rollout_strategy)" ]; then
        echo "$flag already has a flexibleRollout strategy in $env"
    else
        api POST "$base/$flag/environments/$env/strategies" "$(jq -c --arg f "$flag" \
            '[.featureStrategies[] | select(.featureName == $f and .name == "flexibleRollout")][0]
             | {name, title, parameters, constraints}' "$catalogue")" >/dev/null
        echo "added the gradual rollout (0 % of sessions, stickiness sessionId) in $env; the flag stays off until 'on'"
    fi
}

rollout() {
    local pct=${1:?usage: rollout PCT (0-100)}
    if ! [[ $pct =~ ^[0-9]+$ ]] || [ "$pct" -gt 100 ]; then
        echo "error: rollout wants a whole percentage 0-100, not '$pct'" >&2
        exit 2
    fi
    require_flag
    local id
    id=$(rollout_strategy)
    if [ -z "$id" ]; then
        echo "error: $flag has no flexibleRollout strategy in $env; run 'create' first" >&2
        exit 1
    fi
    local current
    current=$(api GET "$base/$flag/environments/$env/strategies/$id")
    api PUT "$base/$flag/environments/$env/strategies/$id" "$(jq -c --arg p "$pct" \
        '{name, title, constraints, parameters: (.parameters + {rollout: $p})}' <<<"$current")" >/dev/null
    echo "$flag: $pct % of sessions in $env"
}

switch() {
    require_flag
    api POST "$base/$flag/environments/$env/$1" >/dev/null
    echo "$flag: $1 in $env"
    if [ "$1" = off ]; then
        echo "warning: with $flag off, each event reaches only the instance it was published on." >&2
        echo "warning: that is safe only while the balancer keeps every session on one instance (the sticky configs of phases 1 and 2);" >&2
        echo "warning: behind a phase-3 (round-robin) balancer, clients on other instances stop getting events." >&2
    fi
}

status() {
    require_flag
    api GET "$base/$flag" | jq --arg e "$env" '{name, environment: $e,
        enabled: ([.environments[] | select(.name == $e)][0].enabled),
        strategies: [([.environments[] | select(.name == $e)][0].strategies // [])[]
                     | {name, parameters, disabled}]}'
}

case "${1:-}" in
create) create ;;
rollout) rollout "${2:-}" ;;
on | off) switch "$1" ;;
status) status ;;
*)
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
