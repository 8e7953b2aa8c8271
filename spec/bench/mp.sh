#!/usr/bin/env bash
# Benchmark the round trip of an encrypted WeChat text message (verify
# msg_signature, decrypt, parse, handler, build the reply, encrypt, sign) on
# wxd (spec/bench/mp_app, 2 worker threads) and on the npm `wechat`
# middleware (spec/bench/mp_node.js, 2 cluster workers), in alternating
# rounds; report median req/s and the ratio wxd/node.  Called by
# `make bench-mp` (and `make bench`) from the repo root with WXD=build/wxd.
# See spec/bench/README.md.
#
# Every request is a distinct message (its own MsgId, nonce and ciphertext),
# pre-generated with wxd.testing just before each wrk run (timestamps are
# fresh), because wxd answers a repeated MsgId from its dedup store.
#
# Environment:
#   WXD              path of the wxd binary (default build/wxd); needed for
#                    both peers (it generates and checks the messages)
#   BENCH_PEERS      "wxd,node" (default), "wxd" or "node"
#   BENCH_ROUNDS     measured rounds (default 3)
#   BENCH_SECONDS    duration of one wrk run in seconds (default 5)
#   BENCH_WARMUP     warm-up seconds per peer, 0 to skip (default 2: node's
#                    JIT needs more than a second)
#   BENCH_CONNS      wrk connections (default 64)
#   BENCH_THREADS    wrk threads (default 2)
#   BENCH_STEERING   wxd's WXD_STEERING (default hash: wrk opens its 64
#                    connections in one burst from one or two CPUs, which
#                    "auto" would put on one worker; see README)
#   BENCH_MP_RATE    messages generated per second of a wrk run, at least
#                    (default 60000; 2 times the best req/s seen so far in
#                    this bench when that is more); a run that sends them
#                    all fails
#   BENCH_NODE_DIR   where `make deps-bench-mp` installed the npm packages
#                    (default build/bench/node)
#   BENCH_KEEP_TMP   1 to keep the temp dir (logs, generated requests)
set -euo pipefail

ROUNDS=${BENCH_ROUNDS:-3}
SECONDS_PER_RUN=${BENCH_SECONDS:-5}
WARMUP=${BENCH_WARMUP:-2}
CONNS=${BENCH_CONNS:-64}
# Two wrk threads: one saturates at about 23k messages/s here (its Lua
# script builds and checks every message), and then measures itself.
THREADS=${BENCH_THREADS:-2}
PEERS_SPEC=${BENCH_PEERS:-wxd,node}
START_TIMEOUT=${BENCH_START_TIMEOUT:-15}
RATE=${BENCH_MP_RATE:-60000}
NODE_DIR=${BENCH_NODE_DIR:-build/bench/node}

BENCH_NAME=bench-mp
# shellcheck source=spec/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# The account both servers are configured with (made up; not a secret).
export MP_TOKEN=wxdbenchtoken
export MP_APPID=wx5c1e0d2b3a497f68
export MP_AES_KEY=BGEE9U2IBeo8fLJT0KIxtbMvAKTu3UD6PNnfeNnaljg

# ---------------------------------------------------------------- arguments

WXD=${WXD:-build/wxd}
case $WXD in /*) ;; *) WXD="$PWD/$WXD" ;; esac
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
case $NODE_DIR in /*) ;; *) NODE_DIR="$ROOT/$NODE_DIR" ;; esac
TOOL=spec/bench/mp_tool.lua

RUN_WXD=0 RUN_NODE=0
for p in ${PEERS_SPEC//,/ }; do
    case $p in
        wxd) RUN_WXD=1 ;;
        node) RUN_NODE=1 ;;
        *) die "unknown peer '$p' in BENCH_PEERS (use wxd, node or both, comma separated)" ;;
    esac
done
PEERS=()
((RUN_WXD)) && PEERS+=(wxd)
((RUN_NODE)) && PEERS+=(node)
((${#PEERS[@]})) || die "BENCH_PEERS selects no peer"

for n in ROUNDS SECONDS_PER_RUN WARMUP CONNS THREADS START_TIMEOUT RATE; do
    [[ ${!n} =~ ^[0-9]+$ ]] || die "$n must be a non-negative integer, got '${!n}'"
done
((ROUNDS >= 1)) || die "BENCH_ROUNDS must be at least 1"
((SECONDS_PER_RUN >= 1)) || die "BENCH_SECONDS must be at least 1"
((THREADS >= 1)) || die "BENCH_THREADS must be at least 1"
((RATE >= 100)) || die "BENCH_MP_RATE must be at least 100"

for tool in wrk curl ss; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done
[[ -x $WXD ]] || die "wxd binary not found at $WXD (run make first): it also generates the messages"
if ((RUN_NODE)); then
    command -v node >/dev/null || die "node is not installed (Node.js 20 or later)"
    [[ -f $NODE_DIR/node_modules/wechat/package.json ]] ||
        die "the npm package wechat is not installed in $NODE_DIR (run make deps-bench-mp)"
fi

# ------------------------------------------------------- process management

bench_setup

# start_wxd LOG PORT -> sets WXD_PID
start_wxd() {
    local log=$1 port=$2
    WXD_ACCESS_LOG=off WXD_STEERING=${BENCH_STEERING:-hash} "$WXD" run spec/bench/mp_app --listen "127.0.0.1:$port" --workers 2 \
        >"$log" 2>&1 &
    WXD_PID=$!
    STARTED+=("$WXD_PID")
    wait_http "wxd" "$WXD_PID" "http://127.0.0.1:$port/health" "$log"
}

# start_node LOG PORT -> sets NODE_PID (the cluster primary)
start_node() {
    local log=$1 port=$2
    MP_PORT=$port MP_NODE_WORKERS=2 NODE_PATH="$NODE_DIR/node_modules" NODE_ENV=production \
        node spec/bench/mp_node.js >"$log" 2>&1 &
    NODE_PID=$!
    STARTED+=("$NODE_PID")
    wait_http "node" "$NODE_PID" "http://127.0.0.1:$port/health" "$log"
}

# ------------------------------------------------------- the messages

# MsgIds are RUN_ID followed by a 9-digit sequence number: unique in this
# run, and a 64-bit integer like WeChat's.
RUN_ID=$(date +%s)
NEXT_SEQ=0

# gen FILE COUNT [bad] -> FILE has COUNT fresh messages; sets FIRST_SEQ.
# Large counts are generated by one process per CPU, each its own range.
gen() {
    local file=$1 count=$2 bad=${3:-} jobs part i first n pids=() failed=0
    FIRST_SEQ=$NEXT_SEQ
    jobs=$(nproc)
    ((jobs <= 8)) || jobs=8
    ((count >= 10000 && jobs > 1)) || jobs=1
    part=$(((count + jobs - 1) / jobs))
    for ((i = 0; i < jobs; i++)); do
        first=$((NEXT_SEQ + i * part))
        n=$((count - i * part < part ? count - i * part : part))
        ((n > 0)) || { jobs=$i; break; }
        "$WXD" script "$TOOL" gen "$file.$i" "$n" "$RUN_ID" "$first" ${bad:+"$bad"} &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || failed=1; done
    ((!failed)) || die "could not generate messages with $TOOL"
    for ((i = 0; i < jobs; i++)); do cat "$file.$i"; rm -f "$file.$i"; done >"$file"
    NEXT_SEQ=$((NEXT_SEQ + count))
}

# post PEER FILE OUT -> the status of POSTing the first message of FILE;
# the body goes to OUT.
post() {
    local peer=$1 file=$2 out=$3 target body
    IFS=$'\t' read -r target body <"$file"
    curl -s -m 5 -o "$out" -w '%{http_code}' -H 'Content-Type: text/xml' \
        --data-binary "$body" "${URL_BASE[$peer]}$target" || true
}

# ------------------------------------------------------------ sanity checks

declare -A URL_BASE RESULTS LOG

# check_peer PEER: a message gets a signed, encrypted "echo: <Content>"; a
# message with a forged msg_signature is refused.
check_peer() {
    local peer=$1 code
    gen "$TMP/check.txt" 1
    code=$(post "$peer" "$TMP/check.txt" "$TMP/check.body")
    if [[ $code != 200 ]]; then
        echo "bench-mp: $peer answered a valid message with status ${code:-none} (want 200)" >&2
        head -c 400 "$TMP/check.body" >&2 2>/dev/null || true
        return 1
    fi
    if ! "$WXD" script "$TOOL" check "$TMP/check.body" "$(printf 'message %09d' "$FIRST_SEQ")" >"$TMP/check.out"; then
        echo "bench-mp: $peer: wrong reply to a valid message" >&2
        return 1
    fi
    echo "  $peer: $(cat "$TMP/check.out")"
    gen "$TMP/forged.txt" 1 bad
    code=$(post "$peer" "$TMP/forged.txt" "$TMP/forged.body")
    if [[ $code != 4?? ]] || grep -q 'Encrypt' "$TMP/forged.body"; then
        echo "bench-mp: $peer accepted a message with a forged msg_signature (status ${code:-none})" >&2
        return 1
    fi
    echo "  $peer: a forged msg_signature is refused with $code"
}

# --------------------------------------------------------------- benchmark

echo "== wxd mp benchmark (encrypted text message round trip): $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(uname -n)"
echo "cpus: $(nproc)   load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "wrk: -t$THREADS -c$CONNS -d${SECONDS_PER_RUN}s, $ROUNDS round(s), warm-up ${WARMUP}s;" \
    "each run gets max($RATE, 2 x best req/s so far) distinct messages per second (wrk threads take every other one)"
echo "peers:"
if ((RUN_WXD)); then
    wxd_ver=unknown
    if out=$(timeout 3 "$WXD" --version 2>/dev/null </dev/null) && [[ -n $out ]]; then
        wxd_ver=${out%%$'\n'*}
    fi
    git_ver=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo "no commit")
    echo "  wxd:  $wxd_ver (repo $git_ver), spec/bench/mp_app, 2 worker threads"
fi
if ((RUN_NODE)); then
    wechat_ver=$(node -p "require('$NODE_DIR/node_modules/wechat/package.json').version" 2>/dev/null || echo unknown)
    echo "  node: node $(node --version), npm wechat $wechat_ver, spec/bench/mp_node.js, cluster of 2 workers"
fi
echo

for peer in "${PEERS[@]}"; do
    free_port
    URL_BASE[$peer]="http://127.0.0.1:$FREE_PORT"
    LOG[$peer]="$TMP/$peer.log"
    case $peer in
        wxd) start_wxd "${LOG[$peer]}" "$FREE_PORT"; PID_wxd=$WXD_PID ;;
        node) start_node "${LOG[$peer]}" "$FREE_PORT"; PID_node=$NODE_PID ;;
    esac
done

echo "sanity:"
sane=1
for peer in "${PEERS[@]}"; do
    check_peer "$peer" || sane=0
done
if ((!sane)); then
    for peer in "${PEERS[@]}"; do show_log "${LOG[$peer]}"; done
    die "aborting: a server does not answer as expected"
fi
echo

FAILURES=()
BEST_RPS=0
WXD_LOG_LINES=0
((RUN_WXD)) && WXD_LOG_LINES=$(wc -l <"${LOG[wxd]}")

# cpu_ticks -> "idle total": the machine's CPU time so far (/proc/stat, all
# CPUs), idle counting iowait too.
cpu_ticks() {
    awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print $5 + $6, t; exit }' /proc/stat
}

# idle_share BEFORE AFTER -> the idle share of the machine's CPUs between two
# cpu_ticks readings, in percent with one decimal.
idle_share() {
    awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " ");
        t = y[2] - x[2]; if (t <= 0) print "n/a"; else printf "%.1f", 100 * (y[1] - x[1]) / t }'
}

# run_wrk LABEL PEER SECONDS -> sets RPS and IDLE, prints one line, records
# errors in FAILURES (so it must not run in a subshell).
run_wrk() {
    local label=$1 peer=$2 secs=$3 out rc=0 rps pool rate nbad t0 t1
    rate=$(awk -v r="$RATE" -v b="$BEST_RPS" 'BEGIN { b = int(b * 2); print (b > r ? b : r) }')
    pool=$((rate * secs))
    gen "$TMP/pool.txt" "$pool"
    rm -f "$TMP/pool.txt.ready"
    t0=$(cpu_ticks)
    out=$(MP_REQUESTS="$TMP/pool.txt" MP_THREADS=$THREADS \
        wrk -t"$THREADS" -c"$CONNS" -d"${secs}s" -s spec/bench/mp_wrk.lua "${URL_BASE[$peer]}/wx" 2>&1) || rc=$?
    t1=$(cpu_ticks)
    # The idle share of the run itself: the wrk script reads /proc/stat when
    # every thread has loaded its messages and again at the end (loading
    # them takes seconds, with one CPU busy); around wrk as a fallback.
    local s0 s1
    s0=$(awk '/^mp_wrk: CPU START cpu / { t = 0; for (i = 5; i <= NF; i++) t += $i; print $8 + $9, t; exit }' <<<"$out")
    s1=$(awk '/^mp_wrk: CPU END cpu / { t = 0; for (i = 5; i <= NF; i++) t += $i; print $8 + $9, t; exit }' <<<"$out")
    if [[ -n $s0 && -n $s1 ]]; then IDLE=$(idle_share "$s0" "$s1"); else IDLE=$(idle_share "$t0" "$t1"); fi
    rm -f "$TMP/pool.txt" "$TMP/pool.txt.ready"
    wrk_parse "$out"
    rps=$WRK_RPS
    if ((rc != 0)) || [[ -z $rps ]]; then
        FAILURES+=("$label $peer: wrk failed (exit $rc)")
        echo "$out" >&2
        rps=0
    fi
    if grep -q 'POOL EXHAUSTED' <<<"$out"; then
        FAILURES+=("$label $peer: sent all $pool generated messages, so MsgIds repeated (raise BENCH_MP_RATE)")
    fi
    nbad=$(awk '/^mp_wrk: BAD REPLIES/ {print $4}' <<<"$out")
    if [[ -z $nbad ]]; then
        FAILURES+=("$label $peer: the wrk script did not report its reply check")
    elif ((nbad > 0)); then
        FAILURES+=("$label $peer: $nbad replies were not an encrypted reply with status 200")
    fi
    if [[ -n $WRK_NON2XX && $WRK_NON2XX != 0 ]]; then
        FAILURES+=("$label $peer: $WRK_NON2XX non-2xx/3xx responses")
    fi
    if [[ -n $WRK_SOCKERR && $WRK_SOCKERR != 0 ]]; then
        FAILURES+=("$label $peer: $WRK_SOCKERR_LINE")
    fi
    printf '  %-8s %-5s %10s req/s  idle %5s%%  latency avg %-8s requests %-7s of %-7s bad replies %-3s socket errors %s\n' \
        "$label" "$peer" "$rps" "$IDLE" "${WRK_LAT:-?}" "${WRK_REQUESTS:-?}" "$pool" "${nbad:-?}" "${WRK_SOCKERR:-0}"
    BEST_RPS=$(awk -v r="$rps" -v b="$BEST_RPS" 'BEGIN { print (r > b ? r : b) }')
    RPS=$rps
}

declare -A IDLES

# run_hello LABEL -> sets RPS: plain GET /health on wxd, the same wrk shape.
run_hello() {
    local label=$1 out rc=0 t0 t1
    t0=$(cpu_ticks)
    out=$(wrk -t"$THREADS" -c"$CONNS" -d"${SECONDS_PER_RUN}s" "${URL_BASE[wxd]}/health" 2>&1) || rc=$?
    t1=$(cpu_ticks)
    wrk_parse "$out"
    RPS=${WRK_RPS:-0}
    if ((rc != 0)) || [[ -z $WRK_RPS ]]; then FAILURES+=("$label hello: wrk failed (exit $rc)"); RPS=0; fi
    if [[ -n $WRK_NON2XX && $WRK_NON2XX != 0 ]]; then FAILURES+=("$label hello: $WRK_NON2XX non-2xx responses"); fi
    printf '  %-8s %-5s %10s req/s  idle %5s%%  (GET /health on the same wxd: its HTTP layer alone)\n' \
        "$label" hello "$RPS" "$(idle_share "$t0" "$t1")"
}

echo "rounds (messages are generated before each run, outside the measurement; the order alternates):"
if ((WARMUP > 0)); then
    for peer in "${PEERS[@]}"; do run_wrk warm-up "$peer" "$WARMUP"; done
fi
for ((r = 1; r <= ROUNDS; r++)); do
    if ((r % 2)); then order=("${PEERS[@]}"); else
        order=()
        for ((i = ${#PEERS[@]} - 1; i >= 0; i--)); do order+=("${PEERS[i]}"); done
    fi
    for peer in "${order[@]}"; do
        run_wrk "round $r" "$peer" "$SECONDS_PER_RUN"
        RESULTS[$peer]+="$RPS "
        IDLES[$peer]+="$IDLE "
    done
    # wxd's own HTTP layer in the same round: GET /health on the same
    # server, so the WeChat layer's cost shows as a fraction of it.
    if ((RUN_WXD)); then
        run_hello "round $r"
        RESULTS[hello]+="$RPS "
    fi
done
echo

# --------------------------------------------------------------- the table

echo "results (median of $ROUNDS round(s), encrypted text messages per second):"
w=- n=- ratio=-
# shellcheck disable=SC2086
((RUN_WXD)) && w=$(median ${RESULTS[wxd]})
# shellcheck disable=SC2086
((RUN_NODE)) && n=$(median ${RESULTS[node]})
if ((RUN_WXD && RUN_NODE)); then
    ratio=$(awk -v w="$w" -v n="$n" 'BEGIN { if (n > 0) printf "%.2f", w / n; else print "n/a" }')
fi
printf '  %14s %14s %9s\n' wxd node wxd/node
printf '  %14s %14s %9s\n' "$w" "$n" "$ratio"
echo "per round (req/s, in round order):"
for peer in "${PEERS[@]}"; do
    printf '  %-5s %s\n' "$peer" "$(echo "${RESULTS[$peer]% }" | tr ' ' '/')"
done
((RUN_WXD)) && printf '  %-5s %s\n' hello "$(echo "${RESULTS[hello]% }" | tr ' ' '/')"
echo "CPU idle share of the machine during the rounds (median; /proc/stat, all CPUs):"
for peer in "${PEERS[@]}"; do
    # shellcheck disable=SC2086
    printf '  %-5s %s%%   (rounds: %s)\n' "$peer" "$(median ${IDLES[$peer]})" "$(echo "${IDLES[$peer]% }" | tr ' ' '/')"
done
if ((RUN_WXD)); then
    # shellcheck disable=SC2086
    h=$(median ${RESULTS[hello]})
    frac=$(awk -v w="$w" -v h="$h" 'BEGIN { if (h > 0) printf "%.2f", w / h; else print "n/a" }')
    echo "wxd messages/s as a fraction of wxd's own GET /health req/s in this run: $frac ($w / $h)"
fi
echo "goals (docs: spec/bench/README.md): wxd/node >= 3.0; idle < 10% during the wxd rounds; messages/s >= 0.35 x /health"
echo

# ------------------------------------------------------------ after the load

sleep 1
echo "after the load:"
if ((RUN_WXD)); then
    read -r rss pss nproc <<<"$(tree_mem "$PID_wxd")"
    echo "  wxd memory:  RSS $(mb "$rss") MB, PSS $(mb "$pss") MB ($nproc process)"
    stats=$(curl -s -m 5 "${URL_BASE[wxd]}/bench/store" || true)
    echo "  wxd dedup store (shdict wxd_store, LRU): $stats"
    warns=$(tail -n +"$((WXD_LOG_LINES + 1))" "${LOG[wxd]}" | grep -c '"level":"\(warn\|error\)"' || true)
    if ((warns > 0)); then
        FAILURES+=("wxd logged $warns warning(s)/error(s) during the runs (see below)")
        tail -n +"$((WXD_LOG_LINES + 1))" "${LOG[wxd]}" | grep '"level":"\(warn\|error\)"' | head -5 >&2
    fi
fi
if ((RUN_NODE)); then
    read -r rss pss nproc <<<"$(tree_mem "$PID_node")"
    echo "  node memory: RSS $(mb "$rss") MB, PSS $(mb "$pss") MB (primary + $((nproc - 1)) workers)"
fi
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------- verdict

if ((${#FAILURES[@]})); then
    echo
    echo "FAILED: errors during the benchmark:" >&2
    printf '  %s\n' "${FAILURES[@]}" >&2
    exit 1
fi
echo "ok: every reply was an encrypted reply (two fully checked before the runs); no socket errors; no MsgId sent twice"
