#!/usr/bin/env bash
# The cost of observability: /hello throughput of ONE wxd binary with
# metrics and trace context on (the default), off (`metrics = false`,
# `trace = false` in config.lua), and on with OTLP export to a fake
# collector at a sampling rate. Same app, same binary, three processes side
# by side; rounds interleaved (the order rotates each round), medians and
# ratios to `off` at the end, with the machine's CPU idle share per run and
# the server's CPU time per request (which other jobs on the machine move
# much less than req/s).
# See spec/bench/README.md ("Observability cost").
#
# Environment:
#   WXD                the binary (default build/wxd)
#   BENCH_ROUNDS       measured rounds (default 5)
#   BENCH_SECONDS      one wrk run (default 5)
#   BENCH_CONNS, BENCH_THREADS   wrk -c and -t (64, 1)
#   BENCH_OTLP_SAMPLE  the otlp peer's sampling rate (default 0.1)
#   BENCH_PERF=1       after the rounds, one more run per peer under
#                      `perf record -g`: the share of the samples spent in
#                      the observability functions (needs perf)
set -euo pipefail

ROUNDS=${BENCH_ROUNDS:-5}
SECONDS_PER_RUN=${BENCH_SECONDS:-5}
CONNS=${BENCH_CONNS:-64}
THREADS=${BENCH_THREADS:-1}
SAMPLE=${BENCH_OTLP_SAMPLE:-0.1}
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

# The fake collector: takes OTLP/HTTP JSON posts and counts the spans.
mkdir -p "$TMP/collector"
cat >"$TMP/collector/app.lua" <<'LUA'
local app = require("wxd.app").new()
local json = require "wxd.json"
local spans = require("wxd.shdict").get_dict("spans")
app:post("/v1/traces", function(req)
  local body = json.decode(req.body)
  local n = 0
  for _, rs in ipairs(body.resourceSpans or {}) do
    for _, ss in ipairs(rs.scopeSpans or {}) do n = n + #(ss.spans or {}) end
  end
  spans:incr("n", n, 0)
  return 200, { ["content-type"] = "application/json" }, "{}"
end)
app:get("/count", function() return tostring(spans:get("n") or 0) .. "\n" end)
return app
LUA
echo 'return { shdict = { spans = "64k" } }' >"$TMP/collector/config.lua"
free_port
COLLECTOR=$FREE_PORT

# The three peers: examples/hello's app.lua with its own config.lua.
NAMES=(off on otlp)
declare -A CONFIG=(
    [off]='return { metrics = false, trace = false }'
    [on]='return {}'
    [otlp]="return { trace = { otlp = { url = \"http://127.0.0.1:$COLLECTOR/v1/traces\", sample = $SAMPLE } } }"
)
for n in "${NAMES[@]}"; do
    mkdir -p "$TMP/$n"
    cp examples/hello/app.lua "$TMP/$n/app.lua"
    echo "${CONFIG[$n]}" >"$TMP/$n/config.lua"
done

declare -A PORT PID ADMIN
start() { # name appdir workers
    local name=$1 app=$2 workers=$3
    free_port
    PORT[$name]=$FREE_PORT
    free_port
    ADMIN[$name]=$FREE_PORT
    WXD_ACCESS_LOG=off "$WXD" run "$app" --listen "127.0.0.1:${PORT[$name]}" --workers "$workers" \
        --admin "127.0.0.1:${ADMIN[$name]}" >"$TMP/$name.log" 2>&1 &
    PID[$name]=$!
    STARTED+=("${PID[$name]}")
}
PORT[collector]=$COLLECTOR
WXD_ACCESS_LOG=off "$WXD" run "$TMP/collector" --listen "127.0.0.1:$COLLECTOR" --workers 1 >"$TMP/collector.log" 2>&1 &
PID[collector]=$!
STARTED+=("${PID[collector]}")
wait_http collector "${PID[collector]}" "http://127.0.0.1:$COLLECTOR/count" "$TMP/collector.log"
for n in "${NAMES[@]}"; do start "$n" "$TMP/$n" 2; done
for n in "${NAMES[@]}"; do wait_http "$n" "${PID[$n]}" "http://127.0.0.1:${PORT[$n]}/hello" "$TMP/$n.log"; done

# Sanity: the switch is what each peer says.
code() { curl -s -o /dev/null -w '%{http_code}' -m 5 "$@"; }
[[ $(code "http://127.0.0.1:${ADMIN[off]}/metrics") == 404 ]] || die "off: /metrics does not answer 404"
[[ $(code "http://127.0.0.1:${ADMIN[on]}/metrics") == 200 ]] || die "on: /metrics does not answer 200"
up=$(curl -s -m 5 -H 'traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01' \
    "http://127.0.0.1:${PORT[otlp]}/hello")
[[ $up == "hello world" ]] || die "otlp: /hello answered '$up'"

echo "== observability cost: /hello, one binary, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "wxd $(git describe --always --dirty 2>/dev/null || echo '?'), 2 workers each, access log off"
echo "cpus: $(nproc)   load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "peers: off (metrics = false, trace = false), on (default), otlp (on + OTLP export, sample $SAMPLE, to a fake collector)"
for n in "${NAMES[@]}"; do wrk -t"$THREADS" -c"$CONNS" -d1s "http://127.0.0.1:${PORT[$n]}/hello" >/dev/null; done # warm-up
echo "wrk -t$THREADS -c$CONNS -d${SECONDS_PER_RUN}s /hello, $ROUNDS rounds, order rotating"

# proc_cpu PID -> the CPU time the process used so far, in clock ticks
# (user + system, all threads). Per request, it is what the work costs,
# whatever share of the machine the process got: the figure to trust when
# other jobs take CPUs and move req/s around.
TICK=$(getconf CLK_TCK)
proc_cpu() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

declare -A RUNS IDLES COSTS
failed=0
for ((r = 0; r < ROUNDS; r++)); do
    for ((k = 0; k < ${#NAMES[@]}; k++)); do
        n=${NAMES[$(((k + r) % ${#NAMES[@]}))]}
        t0=$(cpu_ticks)
        c0=$(proc_cpu "${PID[$n]}")
        out=$(wrk -t"$THREADS" -c"$CONNS" -d"${SECONDS_PER_RUN}s" "http://127.0.0.1:${PORT[$n]}/hello")
        c1=$(proc_cpu "${PID[$n]}")
        t1=$(cpu_ticks)
        idle=$(idle_share "$t0" "$t1")
        wrk_parse "$out"
        cost=$(awk -v c="$((c1 - c0))" -v t="$TICK" -v n="${WRK_REQUESTS:-0}" \
            'BEGIN { if (n > 0) printf "%.2f", c / t * 1e6 / n; else print 0 }')
        errs=""
        if [[ -n $WRK_NON2XX || ${WRK_SOCKERR:-0} != 0 || -z $WRK_RPS ]]; then
            failed=1
            errs="  ${WRK_NON2XX:+non-2xx $WRK_NON2XX }$WRK_SOCKERR_LINE"
        fi
        printf 'round %d  %-5s %10s req/s  %6s cpu-us/req  idle %5s%%  latency %s%s\n' "$((r + 1))" "$n" \
            "${WRK_RPS:-0}" "$cost" "$idle" "$WRK_LAT" "$errs"
        RUNS[$n]+=" ${WRK_RPS:-0}"
        IDLES[$n]+=" $idle"
        COSTS[$n]+=" $cost"
    done
done

median3() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 }
    END { if (NR % 2) printf "%.3f", v[(NR + 1) / 2]; else printf "%.3f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# Same-round ratios: each round's on/off and otlp/off, then their median
# (less sensitive to another job taking the CPU for a whole round).
round_ratios() { # peer
    local -a a b
    read -r -a a <<<"${RUNS[$1]}"
    read -r -a b <<<"${RUNS[off]}"
    local i out=""
    for ((i = 0; i < ${#a[@]}; i++)); do
        out+=" $(awk -v x="${a[i]}" -v y="${b[i]}" 'BEGIN { if (y > 0) printf "%.3f", x / y; else print 0 }')"
    done
    echo "$out"
}
# shellcheck disable=SC2086
b=$(median ${RUNS[off]})
# shellcheck disable=SC2086
bc=$(median ${COSTS[off]})
echo
printf '%-5s %12s %8s %13s %13s %8s %11s  %s\n' peer "median req/s" "vs off" "round ratios" "cpu-us/req" "off/this" \
    "idle (med)" rounds
for n in "${NAMES[@]}"; do
    # shellcheck disable=SC2086
    m=$(median ${RUNS[$n]})
    rr=$(round_ratios "$n")
    # shellcheck disable=SC2086
    mc=$(median ${COSTS[$n]})
    # shellcheck disable=SC2086
    printf '%-5s %12s %8s %13s %13s %8s %10s%%  %s\n' "$n" "$m" "$(awk -v a="$m" -v b="$b" 'BEGIN { printf "%.3f", a / b }')" \
        "$(median3 $rr)" "$mc" "$(awk -v a="$mc" -v b="$bc" 'BEGIN { if (a > 0) printf "%.3f", b / a; else print "n/a" }')" \
        "$(median ${IDLES[$n]})" "$(echo "${RUNS[$n]# }" | tr ' ' '/')"
done
echo "(cpu-us/req: the server's CPU time per request, user + system, all threads; off/this: the throughput"
echo " ratio it implies when the CPUs are the limit. round ratios: median of each round's req/s over off's.)"
echo "spans at the collector: $(curl -s -m 5 "http://127.0.0.1:$COLLECTOR/count")"
echo "goal (issue 16): on within 5% of off (ratios >= 0.95)"
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"

if [[ ${BENCH_PERF:-0} == 1 ]]; then
    command -v perf >/dev/null || die "BENCH_PERF=1 needs perf"
    # The functions that run per request for metrics and trace context, and
    # the Lua side of span export (LuaJIT's own frames are not named).
    OBS_SYMS='wxd_metrics_|wxd_trace_|next_random|hex64|route_entry|request_series|http_trace_context|incoming_trace|find_header_value'
    echo
    echo "perf (one ${SECONDS_PER_RUN}s run per peer, samples of the wxd process, self time):"
    for n in "${NAMES[@]}"; do
        wrk -t"$THREADS" -c"$CONNS" -d"$((SECONDS_PER_RUN + 2))s" "http://127.0.0.1:${PORT[$n]}/hello" >/dev/null &
        wp=$!
        sleep 1
        perf record -q -F 999 -g -p "${PID[$n]}" -o "$TMP/perf-$n.data" -- sleep "$SECONDS_PER_RUN" >/dev/null 2>&1 || true
        wait "$wp" || true
        perf report -q -i "$TMP/perf-$n.data" --no-children --sort sym -g none 2>/dev/null >"$TMP/perf-$n.txt" || true
        share=$(awk -v re="$OBS_SYMS" '$0 ~ re { gsub("%", "", $1); s += $1 } END { printf "%.2f", s }' "$TMP/perf-$n.txt")
        printf '  %-5s observability functions %5s%% of samples; top:\n' "$n" "$share"
        { grep -E "$OBS_SYMS" "$TMP/perf-$n.txt" || true; } | head -5 | sed 's/^/      /'
    done
fi
((failed == 0)) || die "some wrk runs had errors or non-2xx responses"
