#!/usr/bin/env bash
# Cost of a rate-limiter check per request: wrk against spec/bench/limit_app
# (2 workers) on /plain, /limited (wxd.limit middleware with RateLimit-*
# headers) and /limited_bare (the check only), in alternating rounds, then
# the difference of the medians as ns per request. Also runs
# spec/bench/limit_micro.lua (the check alone, no HTTP). See
# spec/bench/README.md ("Rate limiter").
#
# Environment: WXD (build/wxd), BENCH_ROUNDS (5), BENCH_SECONDS (5),
# BENCH_CONNS (64), BENCH_THREADS (1), BENCH_KEEP_TMP.
set -euo pipefail

ROUNDS=${BENCH_ROUNDS:-5}
SECONDS_PER_RUN=${BENCH_SECONDS:-5}
CONNS=${BENCH_CONNS:-64}
THREADS=${BENCH_THREADS:-1}
START_TIMEOUT=15
PATHS=(/plain /limited /limited_bare)

BENCH_NAME=bench-limit
# shellcheck source=spec/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

WXD=${WXD:-build/wxd}
case $WXD in /*) ;; *) WXD="$PWD/$WXD" ;; esac
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
[[ -x $WXD ]] || die "wxd binary not found at $WXD (run make first)"
command -v wrk >/dev/null || die "wrk is not installed"

bench_setup
free_port
PORT=$FREE_PORT
WXD_ACCESS_LOG=off "$WXD" run spec/bench/limit_app --listen "127.0.0.1:$PORT" --workers 2 >"$TMP/wxd.log" 2>&1 &
PID=$!
STARTED+=("$PID")
wait_http wxd "$PID" "http://127.0.0.1:$PORT/plain" "$TMP/wxd.log"
for p in "${PATHS[@]}"; do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT$p")
    [[ $code == 200 ]] || die "$p answered $code"
done
curl -s -D - -o /dev/null "http://127.0.0.1:$PORT/limited" | grep -qi '^ratelimit-remaining:' ||
    die "/limited sends no RateLimit-Remaining"

# CPU time of the server (all its threads), in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$PID/stat"; }
HZ=$(getconf CLK_TCK)

declare -A RUNS CPU
for p in "${PATHS[@]}"; do wrk -t"$THREADS" -c"$CONNS" -d1s "http://127.0.0.1:$PORT$p" >/dev/null; done
for ((r = 1; r <= ROUNDS; r++)); do
    order=("${PATHS[@]}")
    ((r % 2)) || order=(/limited_bare /limited /plain)
    for p in "${order[@]}"; do
        t0=$(cpu_ticks)
        out=$(wrk -t"$THREADS" -c"$CONNS" -d"${SECONDS_PER_RUN}s" "http://127.0.0.1:$PORT$p" 2>&1)
        t1=$(cpu_ticks)
        wrk_parse "$out"
        [[ -n $WRK_RPS ]] || die "no wrk result for $p: $out"
        [[ -z $WRK_NON2XX && ${WRK_SOCKERR:-0} == 0 ]] || die "$p: non-2xx ($WRK_NON2XX) or socket errors ($WRK_SOCKERR_LINE)"
        cpu=$(awk -v d=$((t1 - t0)) -v hz="$HZ" -v n="$WRK_REQUESTS" 'BEGIN { printf "%.0f", d / hz * 1e9 / n }')
        printf 'round %d %-14s %10s req/s  latency %-8s server CPU %6s ns/request\n' "$r" "$p" "$WRK_RPS" "$WRK_LAT" "$cpu"
        RUNS[$p]+="$WRK_RPS "
        CPU[$p]+="$cpu "
    done
done

# shellcheck disable=SC2086  # (word splitting of the recorded runs is meant)
plain=$(median ${RUNS[/plain]})
# shellcheck disable=SC2086
limited=$(median ${RUNS[/limited]})
# shellcheck disable=SC2086
bare=$(median ${RUNS[/limited_bare]})
echo
echo "median req/s: /plain $plain, /limited $limited, /limited_bare $bare"
# Wall time per request is 1/rps; the server's 2 workers share 2 CPUs with
# wrk (and, here, other users of the machine), so rps moves by tens of
# percent between runs and this difference is mostly noise. The server's
# own CPU time per request (/proc/PID/stat, below) is the steadier measure.
awk -v a="$plain" -v b="$limited" -v c="$bare" 'BEGIN {
    d1 = (1 / b - 1 / a) * 1e9; d2 = (1 / c - 1 / a) * 1e9
    printf "limiter cost per request (wall, 1/rps difference): %.0f ns with headers, %.0f ns check only\n", d1, d2
    printf "  (x2 for CPU time if both workers were busy all along: %.0f ns, %.0f ns)\n", 2 * d1, 2 * d2
}'
# shellcheck disable=SC2086
cpu_plain=$(median ${CPU[/plain]})
# shellcheck disable=SC2086
cpu_limited=$(median ${CPU[/limited]})
# shellcheck disable=SC2086
cpu_bare=$(median ${CPU[/limited_bare]})
echo "median server CPU per request: /plain $cpu_plain ns, /limited $cpu_limited ns, /limited_bare $cpu_bare ns"
awk -v a="$cpu_plain" -v b="$cpu_limited" -v c="$cpu_bare" 'BEGIN {
    printf "limiter cost per request (server CPU time difference): %.0f ns with headers, %.0f ns check only\n", b - a, c - a
}'
echo
"$WXD" script spec/bench/limit_micro.lua
