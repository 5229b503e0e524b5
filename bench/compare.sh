#!/usr/bin/env bash
# Re-measures an older server and a newer one in the same run, one after
# the other on this machine, with the same trbench, and prints new/old for
# every figure — the "ratio" column of the history table in
# docs/benchmarks.md.
#
#   bench/compare.sh [-n PAIRS] OLD_REV NEW_REV -- trbench args...
#   bench/compare.sh HEAD~3 HEAD -- -s "stream turns=500"
#   bench/compare.sh -n 4 HEAD~1 HEAD -- -s "stream turns=1000 rate=20 watchers=1"
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
o=$(git rev-parse --short "$old") n=$(git rev-parse --short "$new")
build() { # build REV SIDE NAME: the server of REV as $out/SIDE/NAME
	mkdir -p "$out/$2" "$out/src-$2"
	git archive "$1" | tar -x -C "$out/src-$2"
	(cd "$out/src-$2" && go build -o "$out/$2/$3" ./cmd/tokenrelay)
	rm -rf "$out/src-$2"
}
build "$old" old "$o"
build "$new" new "$n"
measure() { # measure SIDE PAIR [trbench args...]
	local side=$1 i=$2 name=$o
	shift 2
	[ "$side" = new ] && name=$n
	bench/run.sh -b "$out/$side/$name" -- --json "$out/$side-$i.json" "$@" >"$out/$side-$i.txt"
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
