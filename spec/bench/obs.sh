#!/usr/bin/env bash
# The cost of observability: /hello throughput of wxd without it (a build of
# BENCH_BASE_REF, the code before metrics and tracing), with it as shipped
# (metrics and trace context are always on), and with OTLP export on at
# sample rate 1 (every request and span recorded; the collector is a closed
# port, so spans are dropped and counted: the worst case for the request
# path). Alternating rounds in one run; medians and ratios at the end.
# See spec/bench/README.md ("Observability cost").
#
# Environment:
#   WXD              the binary with observability (default build/wxd)
#   BENCH_BASE_WXD   a binary without it; default: built from BENCH_BASE_REF
#   BENCH_BASE_REF   git ref of the code before it (default: 315fe7f)
#   BENCH_ROUNDS     measured rounds (default 5)
#   BENCH_SECONDS    one wrk run (default 5)
#   BENCH_CONNS, BENCH_THREADS   wrk -c and -t (64, 1)
set -euo pipefail

ROUNDS=${BENCH_ROUNDS:-5}
SECONDS_PER_RUN=${BENCH_SECONDS:-5}
CONNS=${BENCH_CONNS:-64}
THREADS=${BENCH_THREADS:-1}
START_TIMEOUT=${BENCH_START_TIMEOUT:-15}
BENCH_NAME=bench-obs
# shellcheck source=spec/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

WXD=${WXD:-build/wxd}
case $WXD in /*) ;; *) WXD="$PWD/$WXD" ;; esac
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
[[ -x $WXD ]] || die "no wxd binary at $WXD (make first)"
bench_setup

BASE=${BENCH_BASE_WXD:-}
if [[ -z $BASE ]]; then
    ref=${BENCH_BASE_REF:-315fe7f}
    note "building the base ($ref) in $TMP/base"
    mkdir -p "$TMP/base"
    git archive "$ref" | tar -x -C "$TMP/base"
    make -C "$TMP/base" -j2 >"$TMP/base-build.log" 2>&1 || { show_log "$TMP/base-build.log"; die "base build failed"; }
    BASE=$TMP/base/build/wxd
fi

# The OTLP app: examples/hello with trace.otlp set.
free_port
DEAD=$FREE_PORT
mkdir -p "$TMP/otlp-app"
cp examples/hello/app.lua "$TMP/otlp-app/app.lua"
cat >"$TMP/otlp-app/config.lua" <<EOF
return { trace = { otlp = { url = "http://127.0.0.1:$DEAD/v1/traces", sample = 1 } } }
EOF

declare -A PORT PID
start() { # name binary appdir
    local name=$1 bin=$2 app=$3
    free_port
    PORT[$name]=$FREE_PORT
    WXD_ACCESS_LOG=off "$bin" run "$app" --listen "127.0.0.1:${PORT[$name]}" --workers 2 \
        >"$TMP/$name.log" 2>&1 &
    PID[$name]=$!
    STARTED+=("${PID[$name]}")
    wait_http "$name" "${PID[$name]}" "http://127.0.0.1:${PORT[$name]}/hello" "$TMP/$name.log"
}
NAMES=(base obs obs-otlp)
# The base serves the hello app of its own time (today's uses modules it
# does not have); /hello is the same handler in both.
BASE_APP=examples/hello
[[ -z ${BENCH_BASE_WXD:-} ]] && BASE_APP=$TMP/base/examples/hello
start base "$BASE" "$BASE_APP"
start obs "$WXD" examples/hello
start obs-otlp "$WXD" "$TMP/otlp-app"

declare -A RUNS
for n in "${NAMES[@]}"; do
    wrk -t"$THREADS" -c"$CONNS" -d1s "http://127.0.0.1:${PORT[$n]}/hello" >/dev/null # warm-up
    RUNS[$n]=""
done
echo "wrk -t$THREADS -c$CONNS -d${SECONDS_PER_RUN}s /hello, $ROUNDS rounds, order rotating"
failed=0
for ((r = 0; r < ROUNDS; r++)); do
    for ((k = 0; k < ${#NAMES[@]}; k++)); do
        n=${NAMES[$(((k + r) % ${#NAMES[@]}))]}
        out=$(wrk -t"$THREADS" -c"$CONNS" -d"${SECONDS_PER_RUN}s" "http://127.0.0.1:${PORT[$n]}/hello")
        wrk_parse "$out"
        errs=""
        if [[ -n $WRK_NON2XX || ${WRK_SOCKERR:-0} != 0 ]]; then
            failed=1
            errs="  ${WRK_NON2XX:+non-2xx $WRK_NON2XX }$WRK_SOCKERR_LINE"
        fi
        printf 'round %d  %-9s %10s req/s  latency %s%s\n' "$((r + 1))" "$n" "$WRK_RPS" "$WRK_LAT" "$errs"
        RUNS[$n]+=" $WRK_RPS"
    done
done
# shellcheck disable=SC2086
b=$(median ${RUNS[base]})
echo
printf '%-9s %12s %8s\n' peer "median req/s" "vs base"
for n in "${NAMES[@]}"; do
    # shellcheck disable=SC2086
    m=$(median ${RUNS[$n]})
    printf '%-9s %12s %8s\n' "$n" "$m" "$(awk -v a="$m" -v b="$b" 'BEGIN { printf "%.3f", a / b }')"
done
((failed == 0)) || die "some wrk runs had errors or non-2xx responses"
