#!/usr/bin/env bash
# Benchmark WeChat Pay v3 notifications end to end over HTTP: each one
# verified (headers, ±300 s, SHA256withRSA over the raw body, the nonce),
# decrypted (AES-256-GCM) and answered 204, on wxd (spec/bench/pay_app,
# app:pay_notify, 2 worker threads: also checked against its stored order
# and moved to PAID durably, journal fsync'd, before the 204) and on Node
# (spec/bench/pay_node.js, node's crypto, cluster of 2 workers: verify and
# decrypt only), in alternating rounds; reports the median notifications/s
# and the ratio wxd/node. Called by `make bench-pay-http` (and `make bench`)
# from the repo root. See spec/bench/README.md.
#
# The ceiling: the same wrk load against a wxd route that answers 204 and
# checks nothing (peer wxd-null: the HTTP layer's and wrk's own cost) and
# the machine's RSA-2048 verify rate on one core (openssl speed) bound what
# any server that verifies one signature per notification could do here:
# 1 / (1/null_rps + 1/(CPUS * verify_per_s)), printed next to node's rate.
#
# Every request is a distinct notification (its own id, order, nonce and
# RSA signature, made with the fake WeChat Pay's platform key by
# spec/bench/pay_tool.lua before each run, outside the measurement); for
# wxd the orders they name are created (PAYING) before the run too.
#
# Environment: WXD (build/wxd), BENCH_PEERS ("wxd,node,wxd-null"), BENCH_ROUNDS (3),
# BENCH_SECONDS (5), BENCH_WARMUP (2), (BENCH_PEERS may add "wxd-noorders":
# the same wxd app with the client's orders off, to show the order step's share), BENCH_CONNS (64), BENCH_THREADS (2),
# BENCH_STEERING (hash), BENCH_PAY_RATE (notifications generated per second
# of a run, at least; default 30000, or 2 x the best rate seen so far),
# BENCH_NULL_POOL (notifications in wxd-null's pool, sent over and over:
# 4000), BENCH_KEEP_TMP.
set -euo pipefail

ROUNDS=${BENCH_ROUNDS:-3}
SECONDS_PER_RUN=${BENCH_SECONDS:-5}
WARMUP=${BENCH_WARMUP:-2}
CONNS=${BENCH_CONNS:-64}
THREADS=${BENCH_THREADS:-2}
PEERS_SPEC=${BENCH_PEERS:-wxd,node,wxd-null}
NULL_POOL=${BENCH_NULL_POOL:-4000}
START_TIMEOUT=${BENCH_START_TIMEOUT:-15}
RATE=${BENCH_PAY_RATE:-30000}

BENCH_NAME=bench-pay-http
# shellcheck source=spec/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

WXD=${WXD:-build/wxd}
case $WXD in /*) ;; *) WXD="$PWD/$WXD" ;; esac
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
TOOL=spec/bench/pay_tool.lua

RUN_WXD=0 RUN_NODE=0 RUN_NOORD=0 RUN_NULL=0
for p in ${PEERS_SPEC//,/ }; do
    case $p in
        wxd) RUN_WXD=1 ;;
        node) RUN_NODE=1 ;;
        wxd-noorders) RUN_NOORD=1 ;;
        wxd-null) RUN_NULL=1 ;;
        *) die "unknown peer '$p' in BENCH_PEERS (use wxd, node, wxd-noorders, wxd-null, comma separated)" ;;
    esac
done
PEERS=()
((RUN_WXD)) && PEERS+=(wxd)
((RUN_NOORD)) && PEERS+=(wxd-noorders)
((RUN_NODE)) && PEERS+=(node)
((RUN_NULL)) && PEERS+=(wxd-null)
((${#PEERS[@]})) || die "BENCH_PEERS selects no peer"
for n in ROUNDS SECONDS_PER_RUN WARMUP CONNS THREADS RATE NULL_POOL; do
    [[ ${!n} =~ ^[0-9]+$ ]] || die "$n must be a non-negative integer, got '${!n}'"
done
((ROUNDS >= 1 && SECONDS_PER_RUN >= 1 && THREADS >= 1 && RATE >= 100 && NULL_POOL >= THREADS)) || die "bad settings"
for tool in wrk curl ss openssl; do command -v "$tool" >/dev/null || die "$tool is not installed"; done
[[ -x $WXD ]] || die "wxd binary not found at $WXD (run make first): it also generates the notifications"
((RUN_NODE)) && { command -v node >/dev/null || die "node is not installed (Node.js 20 or later)"; }

bench_setup
"$WXD" script "$TOOL" keys "$TMP" || die "could not make the keys"
export BENCH_PAY_DIR=$TMP BENCH_PAY_JOURNAL=$TMP/orders.journal

RUN_ID=$(date +%s)
NEXT_SEQ=0

# gen FILE COUNT -> FILE has COUNT fresh notifications (one process per CPU);
# sets FIRST_SEQ.
gen() {
    local file=$1 count=$2 jobs part i first n pids=() failed=0
    FIRST_SEQ=$NEXT_SEQ
    jobs=$(nproc)
    ((jobs <= 8)) || jobs=8
    ((count >= 2000 && jobs > 1)) || jobs=1
    part=$(((count + jobs - 1) / jobs))
    for ((i = 0; i < jobs; i++)); do
        first=$((NEXT_SEQ + i * part))
        n=$((count - i * part < part ? count - i * part : part))
        ((n > 0)) || { jobs=$i; break; }
        "$WXD" script "$TOOL" gen "$TMP" "$file.$i" "$n" "$RUN_ID" "$first" &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || failed=1; done
    ((!failed)) || die "could not generate notifications with $TOOL"
    for ((i = 0; i < jobs; i++)); do cat "$file.$i"; rm -f "$file.$i"; done >"$file"
    NEXT_SEQ=$((NEXT_SEQ + count))
}

declare -A URL_BASE RESULTS LOG PID BEST

start_peer() {
    local peer=$1 port=$2 log=$3 pid
    case $peer in
        wxd | wxd-noorders)
            BENCH_PAY_ORDERS=$([[ $peer == wxd ]] && echo on || echo off) WXD_ACCESS_LOG=off \
                WXD_STEERING=${BENCH_STEERING:-hash} "$WXD" run spec/bench/pay_app \
                --listen "127.0.0.1:$port" --workers 2 >"$log" 2>&1 &
            ;;
        wxd-null)
            BENCH_PAY_ORDERS=off BENCH_PAY_JOURNAL_OFF=1 WXD_ACCESS_LOG=off \
                WXD_STEERING=${BENCH_STEERING:-hash} "$WXD" run spec/bench/pay_app \
                --listen "127.0.0.1:$port" --workers 2 >"$log" 2>&1 &
            ;;
        node)
            BENCH_PAY_PORT=$port BENCH_PAY_NODE_WORKERS=2 NODE_ENV=production node spec/bench/pay_node.js >"$log" 2>&1 &
            ;;
    esac
    pid=$!
    STARTED+=("$pid")
    PID[$peer]=$pid
    wait_http "$peer" "$pid" "http://127.0.0.1:$port/health" "$log"
}

# prepare PEER FILE COUNT: the notifications, and for wxd their orders (PAYING).
# wxd-null reads none of them: one pool of NULL_POOL, made once, sent over and over.
prepare() {
    local peer=$1 file=$2 count=$3 out
    if [[ $peer == wxd-null && $file == "$TMP/pool.txt" ]]; then
        [[ -s $TMP/null_pool.txt ]] || gen "$TMP/null_pool.txt" "$NULL_POOL"
        cp "$TMP/null_pool.txt" "$file"
        return
    fi
    gen "$file" "$count"
    if [[ $peer == wxd ]]; then
        out=$(curl -s -m 600 -X POST "${URL_BASE[wxd]}/bench/orders?run=$RUN_ID&first=$FIRST_SEQ&count=$count")
        [[ $out == *'"ok":true'* ]] || die "wxd could not create the orders: $out"
    fi
}

path_of() { if [[ $1 == wxd-null ]]; then echo /bench/null; else echo /pay/notify; fi; }

post_first() {
    local peer=$1 file=$2 ts nonce sig serial body
    IFS=$'\t' read -r ts nonce sig serial body <"$file"
    curl -s -m 5 -o "$TMP/post.body" -w '%{http_code}' -H 'Content-Type: application/json' \
        -H "Wechatpay-Timestamp: $ts" -H "Wechatpay-Nonce: $nonce" -H "Wechatpay-Signature: $sig" \
        -H "Wechatpay-Serial: $serial" --data-binary "$body" "${URL_BASE[$peer]}$(path_of "$peer")" || true
}

# check_peer PEER: a notification gets 204 (and wxd's order is PAID); the same
# one again with its nonce is refused; a forged signature is refused.
check_peer() {
    local peer=$1 code
    prepare "$peer" "$TMP/check.txt" 1
    code=$(post_first "$peer" "$TMP/check.txt")
    [[ $code == 204 ]] || { echo "$peer answered a valid notification with ${code:-none}" >&2; cat "$TMP/post.body" >&2; return 1; }
    if [[ $peer == wxd-null ]]; then
        echo "  $peer: /bench/null answers 204 (nothing verified: the ceiling's HTTP layer)"
        return 0
    fi
    if [[ $peer == wxd ]]; then
        curl -s "${URL_BASE[wxd]}/bench/order/B${RUN_ID}x$FIRST_SEQ" | grep -q '"state":"PAID"' ||
            { echo "wxd: the order is not PAID after its notification" >&2; return 1; }
    fi
    # Two replays: wxd remembers nonces across its workers and refuses both;
    # node's Set is per worker process, so only the one that reaches the
    # worker that saw the nonce is refused (round robin: one of the two).
    local c1 c2
    c1=$(post_first "$peer" "$TMP/check.txt")
    c2=$(post_first "$peer" "$TMP/check.txt")
    if [[ $peer == wxd* && ($c1 != 4?? || $c2 != 4??) ]] || [[ $c1 != 4?? && $c2 != 4?? ]]; then
        echo "$peer accepted a replayed notification ($c1, $c2)" >&2
        return 1
    fi
    prepare "$peer" "$TMP/forged.txt" 1
    awk -F'\t' 'BEGIN { OFS = "\t" } { $3 = "WECHATPAY/SIGNTEST/" substr($3, 20); print }' "$TMP/forged.txt" >"$TMP/forged2.txt"
    code=$(post_first "$peer" "$TMP/forged2.txt")
    [[ $code == 4?? ]] || { echo "$peer accepted a SIGNTEST probe ($code)" >&2; return 1; }
    echo "  $peer: a notification 204$([[ $peer == wxd ]] && echo ' (order PAID)'), its replay and a SIGNTEST probe refused"
}

cpu_ticks() { awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print $5 + $6, t; exit }' /proc/stat; }
idle_share() {
    awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " ");
        t = y[2] - x[2]; if (t <= 0) print "n/a"; else printf "%.1f", 100 * (y[1] - x[1]) / t }'
}

FAILURES=()

run_wrk() {
    local label=$1 peer=$2 secs=$3 out rc=0 rps pool rate nbad t0 t1
    rate=$(awk -v r="$RATE" -v b="${BEST[$peer]:-0}" 'BEGIN { b = int(b * 2); print (b > r ? b : r) }')
    pool=$((rate * secs))
    [[ $peer == wxd-null ]] && pool=$NULL_POOL
    prepare "$peer" "$TMP/pool.txt" "$pool"
    rm -f "$TMP/pool.txt.ready"
    t0=$(cpu_ticks)
    out=$(PAY_REQUESTS="$TMP/pool.txt" PAY_THREADS=$THREADS PAY_PATH=$(path_of "$peer") \
        wrk -t"$THREADS" -c"$CONNS" -d"${secs}s" -s spec/bench/pay_wrk.lua "${URL_BASE[$peer]}$(path_of "$peer")" 2>&1) || rc=$?
    t1=$(cpu_ticks)
    # The idle share of the run itself (pay_wrk.lua prints /proc/stat once
    # every thread has loaded and at the end; see wrk_start.lua); around
    # wrk as a fallback.
    local s0 s1
    s0=$(awk '/^pay_wrk: CPU START cpu / { t = 0; for (i = 5; i <= NF; i++) t += $i; print $8 + $9, t; exit }' <<<"$out")
    s1=$(awk '/^pay_wrk: CPU END cpu / { t = 0; for (i = 5; i <= NF; i++) t += $i; print $8 + $9, t; exit }' <<<"$out")
    if [[ -n $s0 && -n $s1 ]]; then IDLE=$(idle_share "$s0" "$s1"); else IDLE=$(idle_share "$t0" "$t1"); fi
    rm -f "$TMP/pool.txt" "$TMP/pool.txt.ready"
    wrk_parse "$out"
    rps=$WRK_RPS
    if ((rc != 0)) || [[ -z $rps ]]; then FAILURES+=("$label $peer: wrk failed (exit $rc)"); echo "$out" >&2; rps=0; fi
    [[ $peer != wxd-null ]] && grep -q 'POOL EXHAUSTED' <<<"$out" && FAILURES+=("$label $peer: sent all $pool notifications (raise BENCH_PAY_RATE)")
    nbad=$(awk '/^pay_wrk: BAD REPLIES/ {print $4}' <<<"$out")
    if [[ -z $nbad ]]; then FAILURES+=("$label $peer: the wrk script did not report its check")
    elif ((nbad > 0)); then FAILURES+=("$label $peer: $nbad answers were not 204"); fi
    if [[ -n $WRK_SOCKERR && $WRK_SOCKERR != 0 ]]; then FAILURES+=("$label $peer: $WRK_SOCKERR_LINE"); fi
    printf '  %-8s %-5s %10s notifications/s  idle %5s%%  latency avg %-8s sent %-7s of %-7s not 204: %s\n' \
        "$label" "$peer" "$rps" "$IDLE" "${WRK_LAT:-?}" "${WRK_REQUESTS:-?}" "$pool" "${nbad:-?}"
    BEST[$peer]=$(awk -v r="$rps" -v b="${BEST[$peer]:-0}" 'BEGIN { print (r > b ? r : b) }')
    RPS=$rps
}

echo "== wxd pay notification benchmark (verify + decrypt [+ order check and PAID]): $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "cpus: $(nproc)   load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "wrk: -t$THREADS -c$CONNS -d${SECONDS_PER_RUN}s, $ROUNDS round(s), warm-up ${WARMUP}s; every notification distinct"
((RUN_WXD)) && echo "  wxd:  $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?'), spec/bench/pay_app, 2 worker threads, orders journaled"
((RUN_NODE)) && echo "  node: $(node --version), spec/bench/pay_node.js, cluster of 2 workers, node's crypto"

for peer in "${PEERS[@]}"; do
    free_port
    URL_BASE[$peer]="http://127.0.0.1:$FREE_PORT"
    LOG[$peer]="$TMP/$peer.log"
    start_peer "$peer" "$FREE_PORT" "${LOG[$peer]}"
done
echo "sanity:"
for peer in "${PEERS[@]}"; do
    check_peer "$peer" || { show_log "${LOG[$peer]}"; die "aborting: $peer does not answer as expected"; }
done

# The sanity checks' refusals are logged as warnings; the runs must log none.
LOG_LINES=0
((RUN_WXD)) && LOG_LINES=$(wc -l <"${LOG[wxd]}")
declare -A IDLES
echo "rounds (notifications and orders made before each run, outside the measurement; the order alternates):"
if ((WARMUP > 0)); then for peer in "${PEERS[@]}"; do run_wrk warm-up "$peer" "$WARMUP"; done; fi
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
done
echo
w=- n=- ratio=-
# shellcheck disable=SC2086
((RUN_WXD)) && w=$(median ${RESULTS[wxd]})
# shellcheck disable=SC2086
((RUN_NODE)) && n=$(median ${RESULTS[node]})
((RUN_WXD && RUN_NODE)) && ratio=$(awk -v w="$w" -v n="$n" 'BEGIN { if (n > 0) printf "%.2f", w / n; else print "n/a" }')
if ((RUN_NOORD)); then
    # shellcheck disable=SC2086
    echo "wxd without the order step (BENCH_PAY_ORDERS=off: verify, nonce, decrypt, handler): $(median ${RESULTS[wxd-noorders]})/s"
fi
echo "results (median of $ROUNDS round(s), notifications per second):"
printf '  %14s %14s %9s\n' wxd node wxd/node
printf '  %14s %14s %9s\n' "$w" "$n" "$ratio"
for peer in "${PEERS[@]}"; do
    # shellcheck disable=SC2086
    printf '  %-5s rounds %s   idle (median) %s%%\n' "$peer" "$(echo "${RESULTS[$peer]% }" | tr ' ' '/')" "$(median ${IDLES[$peer]})"
done
echo "goal (issue 14): wxd/node >= 3.0"
if ((RUN_NULL)); then
    # The ceiling (spec/bench/README.md, "The ceiling"): the HTTP layer and
    # wrk measured (wxd-null), plus one RSA-2048 verification per
    # notification at the rate one core of this machine does it.
    # shellcheck disable=SC2086
    null_rps=$(median ${RESULTS[wxd-null]})
    # shellcheck disable=SC2086
    null_idle=$(median ${IDLES[wxd-null]})
    cpus=$(nproc)
    speed=$(openssl speed -seconds 2 rsa2048 2>/dev/null) || speed=
    verify_s=$(awk '/verify\/s/ { for (i = 1; i <= NF; i++) if ($i == "verify/s") col = i }
        col && /^rsa +2048 +bits/ { print $(col + 3); exit }' <<<"$speed")
    if [[ -z $verify_s ]]; then
        FAILURES+=("ceiling: no verify/s in the output of openssl speed rsa2048")
        verify_s=0
    fi
    echo "ceiling inputs: null_rps $null_rps/s (wxd-null median, idle $null_idle%), CPUS $cpus," \
        "verify_per_s $verify_s (openssl speed -seconds 2 rsa2048, one core)"
    read -r ceil cratio <<<"$(awk -v z="$null_rps" -v c="$cpus" -v v="$verify_s" -v n="$n" 'BEGIN {
        if (z <= 0 || v <= 0) { print "n/a n/a"; exit }
        x = 1 / (1 / z + 1 / (c * v)); printf "%.0f %s\n", x, (n + 0 > 0 ? sprintf("%.2f", x / n) : "n/a") }')"
    echo "ceiling: a server verifying one RSA-2048 signature per notification over this HTTP layer cannot exceed" \
        "1 / (1/null_rps + 1/(CPUS*verify_per_s)) = $ceil/s = $cratio x node"
    if awk -v i="$null_idle" 'BEGIN { exit !(i + 0 > 5) }'; then
        echo "  (the null runs left $null_idle% of the CPUs idle: their CPU per request is overstated, so this" \
            "ceiling is too low to be a bound)"
    fi
fi
if ((RUN_WXD)); then
    echo "wxd's state machine after the runs: $(curl -s -m 5 "${URL_BASE[wxd]}/bench/stats")"
    read -r rss pss nproc <<<"$(tree_mem "${PID[wxd]}")"
    echo "wxd memory: RSS $(mb "$rss") MB ($nproc process)"
    if tail -n +"$((LOG_LINES + 1))" "${LOG[wxd]}" | grep -q '"level":"\(warn\|error\)"'; then
        FAILURES+=("wxd logged warnings or errors during the runs (see below)")
        tail -n +"$((LOG_LINES + 1))" "${LOG[wxd]}" | grep '"level":"\(warn\|error\)"' | head -5 >&2
    fi
fi
if ((RUN_NODE)); then
    read -r rss pss nproc <<<"$(tree_mem "${PID[node]}")"
    echo "node memory: RSS $(mb "$rss") MB, PSS $(mb "$pss") MB (primary + $((nproc - 1)) workers)"
fi
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
if ((${#FAILURES[@]})); then
    echo "FAILED:" >&2
    printf '  %s\n' "${FAILURES[@]}" >&2
    exit 1
fi
echo "ok: every answer 204, no notification sent twice"
