#!/usr/bin/env bash
# Installs playwright-core, the browser driver of the browser tests
# (tests/browser.rs), once, outside the repository, and prints the
# directory it lives in.
#
# The npm package `playwright-core` (the driver only: it downloads no
# browser) is installed into
# ${XDG_CACHE_HOME:-$HOME/.cache}/sse-scale/playwright-<version>; a later run
# finds it there and returns at once. The tests drive Debian's Chromium
# (/usr/bin/chromium, package `chromium`), so nothing is fetched at run time.
# Override the version with PLAYWRIGHT_VERSION.
set -euo pipefail

version=${PLAYWRIGHT_VERSION:-1.65.1}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/sse-scale
dir=$cache/playwright-$version

if [ -f "$dir/.installed" ] && [ -f "$dir/node_modules/playwright-core/package.json" ]; then
    echo "$dir"
    exit 0
fi

if ! command -v npm >/dev/null; then
    echo "error: npm is needed to install playwright-core (Debian: apt-get install nodejs npm)" >&2
    exit 1
fi

mkdir -p "$cache"
# Install into a temporary directory and move it in place, so an interrupted
# install is never mistaken for a finished one.
tmp=$(mktemp -d "$cache/.playwright-$version.XXXXXX")
chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
echo '{ "name": "sse-scale-playwright", "private": true, "version": "0.0.0" }' >"$tmp/package.json"
echo "installing playwright-core@$version into $dir (first run only)" >&2
# PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD: playwright-core has no install hook
# today; the variable keeps it that way should a version add one.
(cd "$tmp" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 \
    npm install --no-audit --no-fund --loglevel=error "playwright-core@$version" >&2)
touch "$tmp/.installed"
rm -rf "$dir"
mv "$tmp" "$dir"
trap - EXIT
echo "$dir"
