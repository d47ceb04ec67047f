#!/usr/bin/env bash
# Installs the Unleash server the flag tests run against, once, outside the
# repository, and prints the directory it lives in.
#
# The npm package `unleash-server` is installed into
# ${XDG_CACHE_HOME:-$HOME/.cache}/sse-scale/unleash-<version>; a later run
# finds it there and returns at once. 7.5.x is the last line that runs on
# Node 20 (8.x needs Node 22). Override the version with UNLEASH_VERSION.
set -euo pipefail

version=${UNLEASH_VERSION:-7.5.1}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/sse-scale
dir=$cache/unleash-$version
marker=$dir/.installed

if [ -f "$marker" ]; then
    echo "$dir"
    exit 0
fi

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "error: node and npm are needed to install unleash-server (Debian: apt-get install nodejs npm)" >&2
    exit 1
fi

mkdir -p "$cache"
# Install into a temporary directory and move it in place, so an interrupted
# install is never mistaken for a finished one.
tmp=$(mktemp -d "$cache/.unleash-$version.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/package.json" <<JSON
{ "name": "sse-scale-unleash", "private": true, "version": "0.0.0" }
JSON
echo "installing unleash-server@$version into $dir (first run only)" >&2
(cd "$tmp" && npm install --no-audit --no-fund --loglevel=error "unleash-server@$version" >&2)
touch "$tmp/.installed"
rm -rf "$dir"
mv "$tmp" "$dir"
trap - EXIT
echo "$dir"
