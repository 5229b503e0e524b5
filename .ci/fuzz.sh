#!/usr/bin/env bash
# Runs each fuzz target for a short while: a count of executions each
# (5-15 s here, under two minutes in all), or FUZZTIME for every one. The
# targets: the client frame decoder, the id check, the SSE Last-Event-ID
# parser, the delta decoder, the journal reader of a crashed run, the
# snapshot head decoder, the compat frame and body decoding, the token and
# header parsing, the simulator directive, the OpenAI stream reader and its
# surrogate pair joiner. The budget is a count, not a duration: Go 1.26's
# fuzz coordinator can fail a duration-bounded run with a bare "context
# deadline exceeded" at its end, having found nothing (go.dev/issue/75804,
# fixed in Go 1.27); a count has no deadline to race.
# Seed corpora live in each package's testdata/fuzz/<FuzzName>/ (or are
# added by the target); a failing input is written there too, so it becomes
# a regression test (commit it).
# .ci/run calls this after the unit tests.
set -euo pipefail
cd "$(dirname "$0")/.."

targets=(
  "FuzzDecodeClient ./internal/protocol 100000x"
  "FuzzValidID ./internal/chat 100000x"
  "FuzzParseLastEventID ./internal/gateway 50000x"
  "FuzzDecodeDelta ./internal/bus 50000x"
  "FuzzDecodeSegment ./internal/bus 10000x"
  "FuzzDecodeHead ./internal/bus 10000x"
  "FuzzCompatInput ./internal/gateway 10000x"
  "FuzzAuthenticate ./internal/auth 10000x"
  "FuzzParseDirective ./internal/provider/sim 50000x"
  "FuzzSSEReader ./internal/provider/openai 50000x"
  "FuzzPairJoiner ./internal/provider/openai 50000x"
)
for t in "${targets[@]}"; do
  read -r name pkg count <<<"$t"
  fuzztime="${FUZZTIME:-$count}"
  echo "-- $name ($pkg, $fuzztime)"
  go test -run='^$' -fuzz="^${name}\$" -fuzztime="$fuzztime" "$pkg"
done
