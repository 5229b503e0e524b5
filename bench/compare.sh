#!/usr/bin/env bash
# Re-measures an older server and a newer one in the same run, one after
# the other on this machine, with the same trbench, and prints new/old for
# every figure — the "ratio" column of the history table in
# docs/benchmarks.md.
#
#   bench/compare.sh OLD_REV NEW_REV -- trbench args...
#   bench/compare.sh HEAD~3 HEAD -- -s "stream turns=500"
set -euo pipefail
cd "$(dirname "$0")/.."
old=$1 new=$2
shift 2
[ "${1:-}" = "--" ] && shift
out=$(mktemp -d /tmp/trbench-compare.XXXXXX)
bench/run.sh -r "$old" -- --json "$out/old.json" "$@" >"$out/old.txt"
bench/run.sh -r "$new" -- --json "$out/new.json" --history "$@" >"$out/new.txt"
cat "$out/new.txt"
go run ./cmd/trbench compare "$out/old.json" "$out/new.json"
echo "results kept in $out" >&2
