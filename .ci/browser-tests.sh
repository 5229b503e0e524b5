#!/usr/bin/env bash
# Browser tests of the chat page and JS client (web/test/*.test.mjs):
# playwright-core drives Debian's Chromium against the real tokenrelay binary.
# Called by .ci/run; runnable on its own from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x "${CHROMIUM_PATH:-/usr/bin/chromium}" ]; then
  echo "browser-tests: installing chromium with apt"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium >/dev/null
fi
"${CHROMIUM_PATH:-/usr/bin/chromium}" --version

npm ci --no-audit --no-fund

bin_dir="$(mktemp -d)"
trap 'rm -rf "$bin_dir"' EXIT
if [ -z "${TOKENRELAY_BIN:-}" ]; then
  go build -o "$bin_dir/tokenrelay" ./cmd/tokenrelay
  export TOKENRELAY_BIN="$bin_dir/tokenrelay"
fi

# One file at a time: each starts its own server and browser, and the
# machine has two cores. Only *.test.mjs: Node 20 given the directory would
# also run the helpers and the screenshot script.
node --test --test-concurrency=1 web/test/*.test.mjs
