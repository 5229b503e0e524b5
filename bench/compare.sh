#!/usr/bin/env bash
# Re-measures an older server and a newer one in the same run, one after
# the other on this machine, with the same trbench, and prints new/old for
# every figure — the "ratio" column of the history table in
# docs/benchmarks.md.
#
#   bench/compare.sh [-n PAIRS] OLD NEW -- trbench args...
#   bench/compare.sh HEAD~3 HEAD -- -s "stream turns=500"
#   bench/compare.sh -n 4 HEAD~1 HEAD -- -s "stream turns=1000 rate=20 watchers=1"
#   TRBENCH_OLD_ENV=GOMAXPROCS=2 TRBENCH_NEW_ENV=GOMAXPROCS=1 \
#       bench/compare.sh -n 3 /tmp/tokenrelay /tmp/tokenrelay -- -s "stream turns=1000"
#
# OLD and NEW are each a revision, built here, or the path of a server
# binary already built. TRBENCH_OLD_ENV and TRBENCH_NEW_ENV are settings
# for one side's server alone (run.sh's TRBENCH_SERVER_ENV): the same
# binary twice with two settings compares the settings.
#
# With -n, PAIRS pairs are run and the order alternates (old then new, new
# then old, …): on this machine the first run of a pair tends to use less
# CPU, so a build always run second looks dearer than it is
# (docs/benchmarks.md, twelfth round). Each pair's ratios are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
pairs=1
if [ "${1:-}" = "-n" ]; then
	pairs=$2
	shift 2
fi
old=$1 new=$2
shift 2
[ "${1:-}" = "--" ] && shift
out=$(mktemp -d /tmp/trbench-compare.XXXXXX)
name() { # name REV_OR_BINARY ENV: how the history names that side
	local n
	if [ -f "$1" ] && [ -x "$1" ]; then
		n=$(basename "$1")
	else
		n=$(git rev-parse --short "$1")
	fi
	echo "$n${2:+ ($2)}"
}
o=$(name "$old" "${TRBENCH_OLD_ENV:-}") n=$(name "$new" "${TRBENCH_NEW_ENV:-}")
build() { # build REV_OR_BINARY SIDE: the server as $out/SIDE/tokenrelay
	mkdir -p "$out/$2"
	if [ -f "$1" ] && [ -x "$1" ]; then
		cp "$1" "$out/$2/tokenrelay"
		return
	fi
	mkdir -p "$out/src-$2"
	git archive "$1" | tar -x -C "$out/src-$2"
	(cd "$out/src-$2" && go build -o "$out/$2/tokenrelay" ./cmd/tokenrelay)
	rm -rf "$out/src-$2"
}
build "$old" old
build "$new" new
measure() { # measure SIDE PAIR [trbench args...]
	local side=$1 i=$2 name=$o env=${TRBENCH_OLD_ENV:-}
	shift 2
	if [ "$side" = new ]; then
		name=$n env=${TRBENCH_NEW_ENV:-}
	fi
	TRBENCH_SERVER_ENV=$env TRBENCH_COMMIT_NAME=$name \
		bench/run.sh -b "$out/$side/tokenrelay" -- --json "$out/$side-$i.json" "$@" >"$out/$side-$i.txt"
}
for i in $(seq 1 "$pairs"); do
	if [ $((i % 2)) -eq 1 ]; then
		measure old "$i" "$@"
		measure new "$i" --history "$@"
		first=$o
	else
		measure new "$i" --history "$@"
		measure old "$i" "$@"
		first=$n
	fi
	if [ "$pairs" -gt 1 ]; then
		echo "== pair $i of $pairs ($first first)"
	fi
	cat "$out/new-$i.txt"
	go run ./cmd/trbench compare "$out/old-$i.json" "$out/new-$i.json"
done
echo "results kept in $out" >&2
