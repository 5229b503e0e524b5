#!/usr/bin/env bash
# Runs each fuzz target for a short while (FUZZTIME, default 200000
# executions, 5-30 s each here): the client frame decoder, the id check, the
# SSE Last-Event-ID parser and the delta decoder. The budget is a count, not
# a duration: Go 1.26's fuzz coordinator can fail a duration-bounded run with
# a bare "context deadline exceeded" at its end, having found nothing
# (go.dev/issue/75804, fixed in Go 1.27); a count has no deadline to race.
# Seed corpora live in each package's testdata/fuzz/<FuzzName>/; a failing
# input is written there too, so it becomes a regression test (commit it).
# .ci/run calls this after the unit tests.
set -euo pipefail
cd "$(dirname "$0")/.."

fuzztime="${FUZZTIME:-200000x}"
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
