#!/usr/bin/env bash
# Runs trbench against a fresh tokenrelay: builds the server (of the work
# tree, or of REV), starts it on 127.0.0.1:TRBENCH_PORT (default 18282; it
# stops if that port is taken, rather than measure another server) with a
# new data dir, runs trbench with the given arguments, stops the server.
#
#   bench/run.sh [-r REV | -b BINARY] [-f "server flags"] [-p PROFILE_PREFIX] -- trbench args...
#
# -b runs an already built server binary (to repeat runs of several builds
# interleaved without rebuilding); the results name it after the file, or
# TRBENCH_COMMIT_NAME when set.
#
# TRBENCH_SERVER_LOG=path keeps the server's log.
# TRBENCH_START_WAIT=s is how long the server may take to answer /healthz
# (default 30); past it the script stops with the server's log.
# TRBENCH_TOOL=path runs that trbench binary instead of building the work
# tree's (to compare two versions of the tool on the same server).
# -p serves the server's pprof on the next port and saves a CPU profile of
# each measured window as PROFILE_PREFIX-<scenario>-<n>.pb.gz.
#
# Examples:
#   bench/run.sh -- -s "idle conns=10000"
#   bench/run.sh -f "--batch-window 20ms" -- -s "ramp watchers=10" --json /tmp/b.json
#   bench/run.sh -r HEAD~1 -- --scenarios stream   # an older server, same tool
set -euo pipefail
cd "$(dirname "$0")/.."
rev="" bin="" extra="" prof=""
while [ $# -gt 0 ]; do
	case "$1" in
	-r) rev="$2"; shift 2 ;;
	-b) bin="$2"; shift 2 ;;
	-f) extra="$2"; shift 2 ;;
	-p) prof="$2"; shift 2 ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	--) shift; break ;;
	*) break ;;
	esac
done
work=$(mktemp -d /tmp/trbench-run.XXXXXX)
trap 'kill "${pid:-}" 2>/dev/null || true; wait "${pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
if [ -n "$bin" ]; then
	cp "$bin" "$work/tokenrelay"
	commit=${TRBENCH_COMMIT_NAME:-$(basename "$bin")}
elif [ -n "$rev" ]; then
	mkdir "$work/src"
	git archive "$rev" | tar -x -C "$work/src"
	(cd "$work/src" && go build -o "$work/tokenrelay" ./cmd/tokenrelay)
	commit=$(git rev-parse --short "$rev")
else
	go build -o "$work/tokenrelay" ./cmd/tokenrelay
	commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo "+dirty")
fi
if [ -n "${TRBENCH_TOOL:-}" ]; then
	cp "$TRBENCH_TOOL" "$work/trbench"
else
	go build -o "$work/trbench" ./cmd/trbench
fi
# The machine may be shared: wait (up to TRBENCH_QUIET_WAIT s, default 300)
# until under 0.3 cores are busy, so others' work does not skew the figures.
busy() { # busy cores over 2 s
	read -r _ a b c d e f g h _ </proc/stat; t1=$((a+b+c+d+e+f+g+h)) i1=$((d+e))
	sleep 2
	read -r _ a b c d e f g h _ </proc/stat; t2=$((a+b+c+d+e+f+g+h)) i2=$((d+e))
	echo $(( ( (t2-t1) - (i2-i1) ) * 100 * $(nproc) / (t2-t1) ))
}
waited=0
while [ "$waited" -lt "${TRBENCH_QUIET_WAIT:-300}" ]; do
	b=$(busy)
	[ "$b" -lt 30 ] && break
	[ "$waited" -eq 0 ] && echo "machine busy ($b% of a core); waiting for it to calm down" >&2
	waited=$((waited + 2))
done
port=${TRBENCH_PORT:-18282}
if curl -s -o /dev/null "http://127.0.0.1:$port/" 2>/dev/null; then
	echo "bench/run.sh: something already listens on 127.0.0.1:$port; stop it or set TRBENCH_PORT" >&2
	exit 1
fi
profargs=()
if [ -n "$prof" ]; then
	extra="$extra --debug-addr 127.0.0.1:$((port + 1))"
	profargs=(--pprof "http://127.0.0.1:$((port + 1))" --pprof-out "$prof")
fi
# Every per-user limit lifted that the build has (older builds lack the
# newer limits' flags).
lifts="--limit-sends 0 --limit-connections 0 --limit-turns 0"
if "$work/tokenrelay" serve -h 2>&1 | grep -q -- -limit-new-conversations; then
	lifts="$lifts --limit-new-conversations 0"
fi
# shellcheck disable=SC2086
${TRBENCH_SERVER_ENV:+env $TRBENCH_SERVER_ENV} "$work/tokenrelay" serve --addr "127.0.0.1:$port" --data-dir "$work/data" --delta-timestamps \
	$lifts --log-level warn $extra >"$work/server.log" 2>&1 &
pid=$!
deadline=$((SECONDS + ${TRBENCH_START_WAIT:-30}))
until curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; do
	if ! kill -0 "$pid" 2>/dev/null; then
		echo "bench/run.sh: the server exited before it was ready:" >&2
		tail -20 "$work/server.log" >&2
		exit 1
	fi
	if [ "$SECONDS" -ge "$deadline" ]; then
		echo "bench/run.sh: the server was not ready (GET /healthz) within ${TRBENCH_START_WAIT:-30} s:" >&2
		tail -20 "$work/server.log" >&2
		exit 1
	fi
	sleep 0.1
done
echo "server $commit pid $pid: tokenrelay serve $extra" >&2
set +e
TRBENCH_COMMIT=$commit "$work/trbench" --url "ws://127.0.0.1:$port/v1/ws" --pid "$pid" "${profargs[@]}" "$@"
status=$?
if grep -qvE 'level=(INFO|DEBUG)|listening on' "$work/server.log"; then
	echo "--- server log (warnings and errors, last 20 lines)" >&2
	grep -vE 'level=(INFO|DEBUG)|listening on' "$work/server.log" | tail -20 >&2
fi
[ -n "${TRBENCH_SERVER_LOG:-}" ] && cp "$work/server.log" "$TRBENCH_SERVER_LOG"
exit $status
