#!/usr/bin/env bash
# The watchdog's cost on the hot path (docs/runaway.md): /hello throughput
# of examples/hello with the watchdog on and off (WXD_WATCHDOG=off), in
# alternating rounds of the same run, and optionally a second binary
# (WXD_BASE, e.g. a build from before the watchdog) as a third peer. Reports
# the median req/s of each and the ratios, and the server's CPU time per
# request (user + system, from /proc/PID/stat): on a machine shared with
# other work throughput swings by tens of percent from run to run, CPU time
# per request much less. See spec/bench/README.md.
#
# Environment:
#   WXD              the binary (default build/wxd)
#   WXD_BASE         a binary to compare with (default: none)
#   BENCH_ROUNDS     measured rounds (default 5)
#   BENCH_SECONDS    duration of one wrk run (default 5)
#   BENCH_CONNS      wrk connections (default 64)
set -euo pipefail

ROUNDS=${BENCH_ROUNDS:-5}
SECONDS_PER_RUN=${BENCH_SECONDS:-5}
CONNS=${BENCH_CONNS:-64}
START_TIMEOUT=${BENCH_START_TIMEOUT:-15}
BENCH_NAME=bench-watchdog
# shellcheck source=spec/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

WXD=${WXD:-build/wxd}
case $WXD in /*) ;; *) WXD="$PWD/$WXD" ;; esac
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
command -v wrk >/dev/null || die "wrk is not installed (make deps-bench)"
[[ -x $WXD ]] || die "no wxd binary at $WXD (run make)"

bench_setup

NAMES=(on off)
declare -A BIN=([on]=$WXD [off]=$WXD) ENVS=([on]="" [off]="WXD_WATCHDOG=off") PORT=() PID=()
if [[ -n ${WXD_BASE:-} ]]; then
    [[ -x $WXD_BASE ]] || die "no binary at WXD_BASE=$WXD_BASE"
    NAMES+=(base)
    BIN[base]=$WXD_BASE
    ENVS[base]=""
fi

for n in "${NAMES[@]}"; do
    free_port
    PORT[$n]=$FREE_PORT
    # shellcheck disable=SC2086  # ENVS holds VAR=value words
    env WXD_ACCESS_LOG=off ${ENVS[$n]} \
        "${BIN[$n]}" run "$ROOT/examples/hello" --workers 2 --listen "127.0.0.1:${PORT[$n]}" \
        >"$TMP/$n.log" 2>&1 &
    PID[$n]=$!
    STARTED+=("${PID[$n]}")
    wait_http "wxd ($n)" "${PID[$n]}" "http://127.0.0.1:${PORT[$n]}/hello" "$TMP/$n.log"
done
grep -q "watchdog off" "$TMP/off.log" || die "the 'off' server did not turn its watchdog off"

# Clock ticks of user + system time the process has used.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))

declare -A RPS=() CPU=()
for n in "${NAMES[@]}"; do wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:${PORT[$n]}/hello" >/dev/null; done
for ((r = 1; r <= ROUNDS; r++)); do
    order=("${NAMES[@]}")
    # Alternate the order each round: nobody always runs first.
    if ((r % 2 == 0)); then
        rev=()
        for ((i = ${#order[@]} - 1; i >= 0; i--)); do rev+=("${order[$i]}"); done
        order=("${rev[@]}")
    fi
    for n in "${order[@]}"; do
        t0=$(cpu_ticks "${PID[$n]}")
        out=$(wrk -t1 -c"$CONNS" -d"${SECONDS_PER_RUN}s" "http://127.0.0.1:${PORT[$n]}/hello")
        t1=$(cpu_ticks "${PID[$n]}")
        wrk_parse "$out"
        [[ -z $WRK_NON2XX && ${WRK_SOCKERR:-0} == 0 ]] || die "errors in a run of $n: $WRK_NON2XX $WRK_SOCKERR_LINE"
        us=$(awk -v t=$((t1 - t0)) -v k="$TICK_US" -v n="$WRK_REQUESTS" 'BEGIN { printf "%.2f", t * k / n }')
        printf 'round %d %-4s %10s req/s  %8s  %s CPU us/request\n' "$r" "$n" "$WRK_RPS" "$WRK_LAT" "$us"
        RPS[$n]="${RPS[$n]:-} $WRK_RPS"
        CPU[$n]="${CPU[$n]:-} $us"
    done
done

echo
# shellcheck disable=SC2086
on=$(median ${RPS[on]})
# shellcheck disable=SC2086
off=$(median ${RPS[off]})
printf 'median /hello req/s: watchdog on %s, off %s: on/off = %s\n' "$on" "$off" \
    "$(awk -v a="$on" -v b="$off" 'BEGIN { printf "%.3f", a / b }')"
# shellcheck disable=SC2086
con=$(median ${CPU[on]})
# shellcheck disable=SC2086
coff=$(median ${CPU[off]})
printf 'median CPU us/request: watchdog on %s, off %s: on/off = %s\n' "$con" "$coff" \
    "$(awk -v a="$con" -v b="$coff" 'BEGIN { printf "%.3f", a / b }')"
if [[ -n ${WXD_BASE:-} ]]; then
    # shellcheck disable=SC2086
    base=$(median ${RPS[base]})
    printf 'median /hello req/s: base %s: on/base = %s\n' "$base" \
        "$(awk -v a="$on" -v b="$base" 'BEGIN { printf "%.3f", a / b }')"
    # shellcheck disable=SC2086
    cbase=$(median ${CPU[base]})
    printf 'median CPU us/request: base %s: on/base = %s\n' "$cbase" \
        "$(awk -v a="$con" -v b="$cbase" 'BEGIN { printf "%.3f", a / b }')"
fi
