#!/usr/bin/env bash
# The benchmark suite of docs/benchmarks.md: each scenario against a fresh
# server (so RSS figures start from a clean baseline). Results go to
# OUT (default /tmp/trbench-suite): one .txt and one .json per scenario,
# and history.md with rows for the history table.
#
#   bench/suite.sh [OUT] [-r REV | -b BINARY]   (REV defaults to HEAD: the
#                            committed server, not the work tree others edit)
#
# OUT defaults to TRBENCH_SUITE_OUT, or /tmp/trbench-suite. A scenario whose
# run fails is named with the end of its log, the others still run, and the
# suite exits non-zero.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${TRBENCH_SUITE_OUT:-/tmp/trbench-suite}
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
	out=$1
	shift
fi
mkdir -p "$out" || exit 1
: >"$out/history.md"
failed=()
run() { # name "server flags" trbench args...
	local name=$1 flags=$2 status
	shift 2
	echo "=== $name" >&2
	bench/run.sh "$@" -f "$flags" -- --json "$out/$name.json" --history "${ARGS[@]}" >"$out/$name.txt" 2>"$out/$name.log"
	status=$?
	grep '^| ' "$out/$name.txt" | sed "s/| $/| /" >>"$out/history.md"
	grep -v '^| ' "$out/$name.txt"
	if [ "$status" -ne 0 ]; then
		echo "bench/suite.sh: $name failed (exit $status); the end of $out/$name.log:" >&2
		tail -5 "$out/$name.log" >&2
		failed+=("$name")
	fi
}
REV=("$@")
[ ${#REV[@]} -eq 0 ] && REV=(-r HEAD)
ARGS=(-s "idle conns=10000 hold=150s");                                                   run idle "" "${REV[@]}"
# The floor first, in the same trbench run: the stream's deltas written by
# a process that does nothing else (docs/benchmarks.md, twenty-second round).
ARGS=(-s "floor turns=1000 rate=20 watchers=1" -s "stream turns=1000 rate=20 watchers=1"); run stream-1k "" "${REV[@]}"
# The same 20k tokens/s in a quarter of the turns (400 tokens each): with
# the stream above it splits the server's CPU into a cost per turn and a
# cost per delta (docs/benchmarks.md, twenty-first round).
ARGS=(-s "stream turns=1000 rate=20 tokens=400 watchers=1 label=400tok");                  run stream-400tok "" "${REV[@]}"
ARGS=(-s "cancel turns=1000 rate=20 watchers=1");                                          run cancel-1k "" "${REV[@]}"
ARGS=(-s "resume turns=1000 rate=20 watchers=1 probe-rate=20 long=1000,10000,100000");     run resume-1k "" "${REV[@]}"
ARGS=(-s "reconnect turns=500 rate=20 watchers=2 storm-pct=10 storm-every=2s");            run reconnect "" "${REV[@]}"
# Many slow turns (20 tok/s each, as in the stream above), then few fast
# ones (1000 tok/s, 10,000-token answers), where a connection that falls
# behind gets merged deltas (PROTOCOL.md, delivery rule 3).
ramp1="ramp watchers=1 warmup=6s duration=12s ramp=1200,1600,2000,2400,2800,3200,3600,4000,4400"
ramp10="ramp watchers=10 warmup=6s duration=12s ramp=200,300,400,500,600,700,800,900"
fast1="ramp watchers=1 rate=1000 tokens=10000 warmup=6s duration=12s ramp=100,200,280,360,440,520,600"
fast10="ramp watchers=10 rate=1000 tokens=10000 warmup=6s duration=12s ramp=50,80,100,120,140,160,180"
ARGS=(-s "$ramp1 label=batch_off");                                                        run ramp-1w "" "${REV[@]}"
ARGS=(-s "$ramp10 label=batch_off");                                                       run ramp-10w "" "${REV[@]}"
ARGS=(-s "$fast1 label=fast_batch_off");                                                   run ramp-1w-fast "" "${REV[@]}"
ARGS=(-s "$fast10 label=fast_batch_off");                                                  run ramp-10w-fast "" "${REV[@]}"
ARGS=(-s "$ramp1 label=batch_50ms");                                                       run ramp-1w-batch "--batch-window 50ms" "${REV[@]}"
ARGS=(-s "$ramp10 label=batch_50ms");                                                      run ramp-10w-batch "--batch-window 50ms" "${REV[@]}"
ARGS=(-s "cancel turns=400 rate=20 watchers=1 label=8k");                                  run cancel-8k "" "${REV[@]}"
ARGS=(-s "resume turns=400 rate=20 watchers=1 probe-rate=20 long= label=8k");              run resume-8k "" "${REV[@]}"
echo "history rows: $out/history.md" >&2
if [ ${#failed[@]} -gt 0 ]; then
	echo "bench/suite.sh: failed: ${failed[*]}" >&2
	exit 1
fi
