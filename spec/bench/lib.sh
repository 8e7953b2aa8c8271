# shellcheck shell=bash disable=SC2034  # (sets variables for the scripts that source it)
# Shared shell helpers of the benchmarks (spec/bench/run.sh, spec/bench/mp.sh).
# Source it after `set -euo pipefail`; set BENCH_NAME (the prefix of
# messages) and START_TIMEOUT (seconds wait_http waits) first, then call
# bench_setup, which makes $TMP and the traps that stop every pid in STARTED
# on exit and remove $TMP (kept with BENCH_KEEP_TMP=1).

die() { echo "${BENCH_NAME:-bench}: $*" >&2; exit 1; }
note() { echo "${BENCH_NAME:-bench}: $*" >&2; }

# The pid and all of its descendants (nginx master + workers; wxd is one
# process with threads, but count children too in case that ever changes).
tree_pids() {
    local pid=$1 child
    [[ -d /proc/$pid ]] || return 0
    echo "$pid"
    for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do
        tree_pids "$child"
    done
}

stop_tree() {
    local pid=$1 p alive i
    local pids
    pids=$(tree_pids "$pid")
    [[ -n $pids ]] || return 0
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < 30; i++)); do
        alive=0
        for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for p in $pids; do
        if kill -0 "$p" 2>/dev/null; then
            note "pid $p did not exit 3 s after TERM, sending KILL"
            kill -KILL "$p" 2>/dev/null
        fi
    done
    wait "$pid" 2>/dev/null
}

cleanup() {
    local rc=$? pid
    set +e
    trap - EXIT INT TERM
    for pid in "${STARTED[@]}"; do stop_tree "$pid"; done
    if [[ ${BENCH_KEEP_TMP:-0} == 1 ]]; then
        note "kept $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}

bench_setup() {
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/wxd-bench.XXXXXX")
    STARTED=()   # pids of every server this script started
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# Sets FREE_PORT to a port nobody on this machine uses in any TCP state
# (listening or not) and that we have not handed out already.  There is a
# window between the check and the bind; the start-up wait catches a lost
# race.  Not meant to run in $(...): it records the port in TAKEN_PORTS.
TAKEN_PORTS=" "
free_port() {
    local used p i
    used=" $(ss -Htan 2>/dev/null | awk '{n = split($4, a, ":"); print a[n]}' | tr '\n' ' ') "
    for ((i = 0; i < 200; i++)); do
        p=$((20000 + ((RANDOM << 15) | RANDOM) % 40000))
        [[ $used == *" $p "* || $TAKEN_PORTS == *" $p "* ]] && continue
        if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then continue; fi
        TAKEN_PORTS+="$p "
        FREE_PORT=$p
        return 0
    done
    die "could not find a free TCP port"
}

show_log() {
    local f=$1
    [[ -s $f ]] || return 0
    echo "---- last lines of $f ----" >&2
    tail -n 20 "$f" >&2
    echo "----" >&2
}

# Wait until url answers with any HTTP status, failing early if pid died.
wait_http() {
    local name=$1 pid=$2 url=$3 log=$4 deadline
    deadline=$((SECONDS + START_TIMEOUT))
    while ((SECONDS < deadline)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            show_log "$log"
            die "$name exited during start-up"
        fi
        if curl -s -o /dev/null -m 1 "$url"; then return 0; fi
        sleep 0.1
    done
    show_log "$log"
    die "$name did not answer $url within ${START_TIMEOUT}s"
}

# Stop a server started by this script and forget it.
stop_server() {
    local pid=$1 i keep=()
    stop_tree "$pid" || true
    for i in "${STARTED[@]}"; do [[ $i == "$pid" ]] || keep+=("$i"); done
    STARTED=("${keep[@]}")
}

# Resident memory of a process tree: "rss_kb pss_kb nprocs".  RSS summed over
# processes counts shared pages (code, COW pages of nginx workers) more than
# once; PSS divides them among the sharers, so it is the fairer total.
tree_mem() {
    local p rss=0 pss=0 n=0 v
    for p in $(tree_pids "$1"); do
        v=$(awk '/^VmRSS:/{print $2}' "/proc/$p/status" 2>/dev/null || true)
        rss=$((rss + ${v:-0}))
        v=$(awk '/^Pss:/{print $2}' "/proc/$p/smaps_rollup" 2>/dev/null || true)
        pss=$((pss + ${v:-0}))
        n=$((n + 1))
    done
    echo "$rss $pss $n"
}

mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

median() {
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 }
        END { if (NR % 2) printf "%.2f", v[(NR + 1) / 2];
              else printf "%.2f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# wrk_parse OUTPUT: reads wrk's report into WRK_RPS (empty if missing),
# WRK_LAT (mean latency), WRK_NON2XX, WRK_SOCKERR (socket errors summed),
# WRK_SOCKERR_LINE and WRK_REQUESTS (requests completed).
wrk_parse() {
    local out=$1
    WRK_RPS=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    WRK_LAT=$(awk '$1 == "Latency" {print $2; exit}' <<<"$out")
    WRK_NON2XX=$(awk -F': *' '/Non-2xx or 3xx responses/ {print $2}' <<<"$out")
    # "Socket errors: connect 0, read 0, write 0, timeout 0" -> sum
    WRK_SOCKERR=$(awk '/Socket errors:/ {s = 0; for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) s += $i; print s}' <<<"$out")
    WRK_SOCKERR_LINE=$(grep -m1 'Socket errors' <<<"$out" | sed 's/^ *//' || true)
    WRK_REQUESTS=$(awk '/ requests in / {print $1; exit}' <<<"$out")
}

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
