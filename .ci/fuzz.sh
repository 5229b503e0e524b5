#!/usr/bin/env bash
# Runs each fuzz target for a short while (FUZZTIME, default 20s): the
# client frame decoder, the id check and the SSE Last-Event-ID parser.
# Seed corpora live in each package's testdata/fuzz/<FuzzName>/; a failing
# input is written there too, so it becomes a regression test (commit it).
# .ci/run calls this after the unit tests.
set -euo pipefail
cd "$(dirname "$0")/.."

fuzztime="${FUZZTIME:-20s}"
targets=(
  "FuzzDecodeClient ./internal/protocol"
  "FuzzValidID ./internal/chat"
  "FuzzParseLastEventID ./internal/gateway"
  "FuzzDecodeDelta ./internal/bus"
)
for t in "${targets[@]}"; do
  read -r name pkg <<<"$t"
  echo "-- $name ($pkg, $fuzztime)"
  go test -run='^$' -fuzz="^${name}\$" -fuzztime="$fuzztime" "$pkg"
done
