#!/usr/bin/env bash
# Benchmark wxd against OpenResty (Debian nginx + lua-nginx-module) on the
# same two endpoints, in alternating rounds, and report median req/s, the
# wxd/openresty ratio and idle memory.  Called by `make bench` from the repo
# root with WXD=build/wxd.  See spec/bench/README.md.
#
# Environment:
#   WXD              path of the wxd binary (default build/wxd)
#   BENCH_PEERS      which servers to run: "openresty,wxd" (default),
#                    "openresty" or "wxd"
#   BENCH_ROUNDS     measured rounds per path (default 3)
#   BENCH_SECONDS    duration of one wrk run in seconds (default 5)
#   BENCH_WARMUP     warm-up seconds per peer and path, 0 to skip (default 1)
#   BENCH_CONNS      wrk connections (default 64)
#   BENCH_THREADS    wrk threads (default 1)
#   BENCH_KEEP_TMP   1 to keep the temp dir (configs, logs) after the run
set -euo pipefail

ROUNDS=${BENCH_ROUNDS:-3}
SECONDS_PER_RUN=${BENCH_SECONDS:-5}
WARMUP=${BENCH_WARMUP:-1}
CONNS=${BENCH_CONNS:-64}
THREADS=${BENCH_THREADS:-1}
PEERS_SPEC=${BENCH_PEERS:-openresty,wxd}
START_TIMEOUT=${BENCH_START_TIMEOUT:-15}
PATHS=(/hello /json)

NGX_MODULES=/usr/lib/nginx/modules
EXPECT_HELLO=$'hello world\n'
EXPECT_JSON='{"message":"hello world"}'

BENCH_NAME=bench
# shellcheck source=spec/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ---------------------------------------------------------------- arguments

WXD=${WXD:-build/wxd}
case $WXD in /*) ;; *) WXD="$PWD/$WXD" ;; esac
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

RUN_OPENRESTY=0 RUN_WXD=0
for p in ${PEERS_SPEC//,/ }; do
    case $p in
        openresty|nginx) RUN_OPENRESTY=1 ;;
        wxd) RUN_WXD=1 ;;
        *) die "unknown peer '$p' in BENCH_PEERS (use openresty, wxd or both, comma separated)" ;;
    esac
done
PEERS=()
((RUN_OPENRESTY)) && PEERS+=(openresty)
((RUN_WXD)) && PEERS+=(wxd)
((${#PEERS[@]})) || die "BENCH_PEERS selects no peer"

for n in ROUNDS SECONDS_PER_RUN WARMUP CONNS THREADS START_TIMEOUT; do
    [[ ${!n} =~ ^[0-9]+$ ]] || die "$n must be a non-negative integer, got '${!n}'"
done
((ROUNDS >= 1)) || die "BENCH_ROUNDS must be at least 1"
((SECONDS_PER_RUN >= 1)) || die "BENCH_SECONDS must be at least 1"

for tool in wrk curl ss; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done
if ((RUN_OPENRESTY)); then
    command -v nginx >/dev/null || die "nginx is not installed (apt-get install nginx libnginx-mod-http-lua)"
    for m in ndk_http_module.so ngx_http_lua_module.so; do
        [[ -f $NGX_MODULES/$m ]] || die "missing $NGX_MODULES/$m (apt-get install libnginx-mod-http-lua)"
    done
fi
if ((RUN_WXD)); then
    [[ -x $WXD ]] || die "wxd binary not found at $WXD (run make first, or BENCH_PEERS=openresty)"
    [[ -d examples/hello ]] || die "examples/hello not found under $ROOT"
fi

# ------------------------------------------------------- process management

bench_setup

# Write an nginx config serving the two endpoints under prefix dir $1 on $2.
write_nginx_conf() {
    local dir=$1 port=$2 user_line=""
    mkdir -p "$dir/logs"
    # The user directive only matters (and is only accepted quietly) when the
    # master runs as root; keep workers as root so they can use the temp dir.
    ((EUID == 0)) && user_line="user root;"
    cat >"$dir/nginx.conf" <<EOF
load_module $NGX_MODULES/ndk_http_module.so;
load_module $NGX_MODULES/ngx_http_lua_module.so;

$user_line
worker_processes 2;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;

events {
    worker_connections 1024;
}

http {
    access_log off;
    keepalive_requests 100000;
    keepalive_timeout 65s;

    client_body_temp_path $dir/client_body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;

    server {
        listen 127.0.0.1:$port;

        location = /hello {
            content_by_lua_block {
                ngx.header.content_type = "text/plain"
                ngx.print("hello world\n")
            }
        }

        location = /json {
            content_by_lua_block {
                ngx.header.content_type = "application/json"
                ngx.print(require("cjson").encode({message = "hello world"}))
            }
        }
    }
}
EOF
}

# start_nginx DIR PORT -> sets NGX_PID
start_nginx() {
    local dir=$1 port=$2 out
    write_nginx_conf "$dir" "$port"
    if ! out=$(nginx -e "$dir/logs/error.log" -p "$dir" -c "$dir/nginx.conf" -t 2>&1); then
        echo "$out" >&2
        die "generated nginx config is invalid ($dir/nginx.conf)"
    fi
    nginx -e "$dir/logs/error.log" -p "$dir" -c "$dir/nginx.conf" \
        -g 'daemon off; master_process on;' >"$dir/logs/stdout.log" 2>&1 &
    NGX_PID=$!
    STARTED+=("$NGX_PID")
    wait_http "openresty (nginx)" "$NGX_PID" "http://127.0.0.1:$port/hello" "$dir/logs/error.log"
}

# start_wxd LOG PORT -> sets WXD_PID
start_wxd() {
    local log=$1 port=$2
    WXD_ACCESS_LOG=off "$WXD" run examples/hello --listen "127.0.0.1:$port" --workers 2 \
        >"$log" 2>&1 &
    WXD_PID=$!
    STARTED+=("$WXD_PID")
    wait_http "wxd" "$WXD_PID" "http://127.0.0.1:$port/hello" "$log"
}

# ------------------------------------------------------------ sanity checks

FAILURES=()

check_body() {
    local peer=$1 url=$2 want=$3 code got
    code=$(curl -s -m 5 -o "$TMP/body" -w '%{http_code}' "$url" || true)
    got=$(cat "$TMP/body" 2>/dev/null; printf x)
    got=${got%x}
    if [[ $code != 200 || $got != "$want" ]]; then
        echo "bench: sanity check failed for $peer $url" >&2
        echo "  status:   ${code:-none} (want 200)" >&2
        printf '  body:     %q\n' "$got" >&2
        printf '  expected: %q\n' "$want" >&2
        return 1
    fi
}

# --------------------------------------------------------------- benchmark

declare -A PORT URL_BASE RESULTS

echo "== wxd benchmark: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(uname -n)"
echo "cpus: $(nproc)   load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "wrk: -t$THREADS -c$CONNS -d${SECONDS_PER_RUN}s, $ROUNDS round(s) per path, warm-up ${WARMUP}s"
echo "peers:"
if ((RUN_OPENRESTY)); then
    lua_ver=$(dpkg-query -W -f='${Version}' libnginx-mod-http-lua 2>/dev/null || echo unknown)
    echo "  openresty: $(nginx -v 2>&1 | sed 's/^nginx version: //'), libnginx-mod-http-lua $lua_ver"
fi
if ((RUN_WXD)); then
    wxd_ver=unknown
    if out=$(timeout 3 "$WXD" --version 2>/dev/null </dev/null) && [[ -n $out ]]; then
        wxd_ver=${out%%$'\n'*}
    fi
    git_ver=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo "no commit")
    echo "  wxd:       $wxd_ver (repo $git_ver, binary $WXD)"
fi
echo

if ((RUN_OPENRESTY)); then
    free_port
    PORT[openresty]=$FREE_PORT
    start_nginx "$TMP/nginx" "${PORT[openresty]}"
    NGX_MAIN_PID=$NGX_PID
fi
if ((RUN_WXD)); then
    free_port
    PORT[wxd]=$FREE_PORT
    start_wxd "$TMP/wxd.log" "${PORT[wxd]}"
    WXD_MAIN_PID=$WXD_PID
fi

sane=1
for peer in "${PEERS[@]}"; do
    URL_BASE[$peer]="http://127.0.0.1:${PORT[$peer]}"
    check_body "$peer" "${URL_BASE[$peer]}/hello" "$EXPECT_HELLO" || sane=0
    check_body "$peer" "${URL_BASE[$peer]}/json" "$EXPECT_JSON" || sane=0
done
if ((!sane)); then
    ((RUN_OPENRESTY)) && show_log "$TMP/nginx/logs/error.log"
    ((RUN_WXD)) && show_log "$TMP/wxd.log"
    die "aborting: a server does not answer as expected (nginx's /json needs lua-cjson)"
fi
echo "sanity: /hello and /json answer correctly on ${PEERS[*]}"
echo

# run_wrk LABEL PEER PATH SECONDS -> sets RPS, prints one line, records
# errors in FAILURES (so it must not run in a subshell).
run_wrk() {
    local label=$1 peer=$2 path=$3 secs=$4 out rc=0 rps
    out=$(wrk -t"$THREADS" -c"$CONNS" -d"${secs}s" "${URL_BASE[$peer]}$path" 2>&1) || rc=$?
    wrk_parse "$out"
    rps=$WRK_RPS
    if ((rc != 0)) || [[ -z $rps ]]; then
        FAILURES+=("$label $peer $path: wrk failed (exit $rc)")
        echo "$out" >&2
        rps=0
    fi
    if [[ -n $WRK_NON2XX && $WRK_NON2XX != 0 ]]; then
        FAILURES+=("$label $peer $path: $WRK_NON2XX non-2xx/3xx responses")
    fi
    if [[ -n $WRK_SOCKERR && $WRK_SOCKERR != 0 ]]; then
        FAILURES+=("$label $peer $path: $WRK_SOCKERR_LINE")
    fi
    printf '  %-8s %-6s %-9s %12s req/s   latency avg %-8s non-2xx %-4s socket errors %s\n' \
        "$label" "$path" "$peer" "$rps" "${WRK_LAT:-?}" "${WRK_NON2XX:-0}" "${WRK_SOCKERR:-0}"
    RPS=$rps
}

echo "rounds (order alternates every round):"
turn=0
for path in "${PATHS[@]}"; do
    if ((WARMUP > 0)); then
        for peer in "${PEERS[@]}"; do
            run_wrk warm-up "$peer" "$path" "$WARMUP"
        done
    fi
    for ((r = 1; r <= ROUNDS; r++)); do
        turn=$((turn + 1))
        if ((turn % 2)); then order=("${PEERS[@]}"); else
            order=()
            for ((i = ${#PEERS[@]} - 1; i >= 0; i--)); do order+=("${PEERS[i]}"); done
        fi
        for peer in "${order[@]}"; do
            run_wrk "round $r" "$peer" "$path" "$SECONDS_PER_RUN"
            RESULTS[$peer$path]+="$RPS "
        done
    done
done
echo

# --------------------------------------------------------------- the table

cell() { [[ -n ${RESULTS[$1$2]:-} ]] && echo "${RESULTS[$1$2]% }" | tr ' ' '/' || echo "-"; }

echo "results (median of $ROUNDS round(s), requests/sec):"
printf '  %-7s %14s %14s %9s\n' path openresty wxd wxd/openr
for path in "${PATHS[@]}"; do
    o=- w=- ratio=-
    # shellcheck disable=SC2086
    ((RUN_OPENRESTY)) && o=$(median ${RESULTS[openresty$path]})
    # shellcheck disable=SC2086
    ((RUN_WXD)) && w=$(median ${RESULTS[wxd$path]})
    if ((RUN_OPENRESTY && RUN_WXD)); then
        ratio=$(awk -v w="$w" -v o="$o" 'BEGIN { if (o > 0) printf "%.2f", w / o; else print "n/a" }')
    fi
    printf '  %-7s %14s %14s %9s\n' "$path" "$o" "$w" "$ratio"
done
echo "per round (req/s, in round order):"
for path in "${PATHS[@]}"; do
    for peer in "${PEERS[@]}"; do
        printf '  %-7s %-10s %s\n' "$path" "$peer" "$(cell "$peer" "$path")"
    done
done
echo

# ------------------------------------------------------------ idle memory

# Memory is read twice: from the benchmark servers one second after the load
# stopped, and from fresh instances that served a single request.  The fresh
# ones are started one at a time after the others are gone, so that PSS is
# not lowered by pages shared with a sibling instance.
sleep 1
echo "memory (RSS summed over the process tree; PSS counts shared pages once):"
if ((RUN_WXD)); then
    read -r rss pss n <<<"$(tree_mem "$WXD_MAIN_PID")"
    echo "  wxd after benchmark:        RSS $(mb "$rss") MB, PSS $(mb "$pss") MB ($n process(es))"
    WXD_AFTER_RSS=$rss
fi
if ((RUN_OPENRESTY)); then
    read -r rss pss n <<<"$(tree_mem "$NGX_MAIN_PID")"
    echo "  openresty after benchmark:  RSS $(mb "$rss") MB, PSS $(mb "$pss") MB (master + $((n - 1)) workers)"
    NGX_AFTER_RSS=$rss
    stop_server "$NGX_MAIN_PID"
fi
((RUN_WXD)) && stop_server "$WXD_MAIN_PID"
if ((RUN_WXD)); then
    free_port
    start_wxd "$TMP/wxd-idle.log" "$FREE_PORT"
    curl -s -o /dev/null -m 5 "http://127.0.0.1:$FREE_PORT/hello" || true
    sleep 1
    read -r rss pss n <<<"$(tree_mem "$WXD_PID")"
    WXD_IDLE_RSS=$rss
    echo "  wxd fresh, idle:            RSS $(mb "$rss") MB, PSS $(mb "$pss") MB ($n process(es))"
    stop_server "$WXD_PID"
fi
if ((RUN_OPENRESTY)); then
    free_port
    start_nginx "$TMP/nginx-idle" "$FREE_PORT"
    curl -s -o /dev/null -m 5 "http://127.0.0.1:$FREE_PORT/hello" || true
    sleep 1
    read -r rss pss n <<<"$(tree_mem "$NGX_PID")"
    NGX_IDLE_RSS=$rss
    echo "  openresty fresh, idle:      RSS $(mb "$rss") MB, PSS $(mb "$pss") MB (master + $((n - 1)) workers)"
    stop_server "$NGX_PID"
fi
if ((RUN_WXD)); then
    echo "idle RSS (2 workers): $(mb "$WXD_IDLE_RSS") MB"
fi
if ((RUN_OPENRESTY)); then
    echo "nginx idle RSS (master + 2 workers): $(mb "$NGX_IDLE_RSS") MB"
fi
if ((RUN_WXD && RUN_OPENRESTY)); then
    echo "RSS ratio wxd/openresty: idle $(awk -v a="$WXD_IDLE_RSS" -v b="$NGX_IDLE_RSS" 'BEGIN { printf "%.2f", a / b }')," \
        "after benchmark $(awk -v a="$WXD_AFTER_RSS" -v b="$NGX_AFTER_RSS" 'BEGIN { printf "%.2f", a / b }')"
fi
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------- verdict

if ((${#FAILURES[@]})); then
    echo
    echo "FAILED: errors during the benchmark:" >&2
    printf '  %s\n' "${FAILURES[@]}" >&2
    exit 1
fi
echo "ok: no non-2xx responses and no socket errors"
