#!/usr/bin/env bash
# Runs every spec inside wxd (unit and integration) and ends with one line
# "N passed, N failed, N skipped". Integration specs start their own wxd
# processes on free ports. WXD selects the binary (build/wxd; build/asan/wxd
# for make asan). The exit code is non-zero when anything failed, including
# what happens after busted's summary: the runner crashing on its way out,
# or a wxd server started by a spec that crashed or was left running.
set -u
cd "$(dirname "$0")/.."
WXD=${WXD:-build/wxd}
export WXD
export WXD_LUA_DIR="$PWD/lua"

if [ ! -x "$WXD" ]; then
  echo "spec/run.sh: $WXD is not built (run make)" >&2
  echo "0 passed, 1 failed, 0 skipped"
  exit 1
fi

out=$(mktemp)
# helpers.lua records here every wxd server a spec starts ("start PID") and
# how each one ended ("exit PID CODE").
WXD_SPEC_SERVERS=$(mktemp /tmp/wxd-servers.XXXXXX)
export WXD_SPEC_SERVERS
redis_dir=""
redis_pid=""
cleanup() {
  rm -f "$out" "$WXD_SPEC_SERVERS"
  if [ -n "$redis_pid" ]; then kill "$redis_pid" 2>/dev/null; wait "$redis_pid" 2>/dev/null; fi
  if [ -n "$redis_dir" ]; then rm -rf "$redis_dir"; fi
}
trap cleanup EXIT

# A redis-server of our own, on a free port and a socket in a temp dir, for
# the wxd.redis and store specs (WXD_TEST_REDIS_URL, WXD_TEST_REDIS_SOCK).
# An URL already set in the environment is used as is.
if [ -z "${WXD_TEST_REDIS_URL:-}" ]; then
  if ! command -v redis-server >/dev/null; then
    echo "spec/run.sh: redis-server is not installed (make deps)" >&2
  else
    redis_dir=$(mktemp -d /tmp/wxd-redis.XXXXXX)
    for _ in 1 2 3 4 5; do
      port=$(( 20000 + RANDOM % 30000 ))
      redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$redis_dir" \
        --unixsocket "$redis_dir/redis.sock" --unixsocketperm 700 --daemonize no \
        --logfile "$redis_dir/redis.log" &
      redis_pid=$!
      for _ in $(seq 50); do
        if [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ]; then break; fi
        kill -0 "$redis_pid" 2>/dev/null || break
        sleep 0.1
      done
      if [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ]; then
        export WXD_TEST_REDIS_URL="redis://127.0.0.1:$port/0"
        export WXD_TEST_REDIS_SOCK="$redis_dir/redis.sock"
        break
      fi
      kill "$redis_pid" 2>/dev/null; wait "$redis_pid" 2>/dev/null
      redis_pid=""
    done
    [ -n "$redis_pid" ] || echo "spec/run.sh: could not start redis-server (see $redis_dir/redis.log)" >&2
  fi
fi
if [ $# -eq 0 ]; then set -- spec/01-unit spec/02-integration; fi
"$WXD" script spec/runner.lua -o spec/support/output.lua "$@" 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
summary='^([0-9]+) passed, ([0-9]+) failed, ([0-9]+) skipped$'
last=$(tail -n 1 "$out")
if [[ ! "$last" =~ $summary ]]; then
  echo "spec runner crashed before its summary (exit $rc)"
  echo "0 passed, 1 failed, 0 skipped"
  exit 1
fi
passed=${BASH_REMATCH[1]} failed=${BASH_REMATCH[2]} skipped=${BASH_REMATCH[3]}
extra=0
# The runner exits non-zero when specs failed; any other non-zero exit
# (a crash or a sanitizer report while it shut down) is a failure of its own.
if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
  echo "spec runner exited with $rc after its summary"
  extra=$((extra + 1))
fi
# Spec servers still running get a moment to end, then are killed: a spec
# must stop what it starts. A server that died of a signal other than the
# KILL and TERM specs send crashed (SEGV, ABRT, BUS, FPE, ILL...); under
# make asan a sanitizer catches those and exits 86 (ASAN_OPTIONS exitcode),
# which counts as a crash too.
left=$(awk '$1 == "start" { s[$2] = 1 } $1 == "exit" { delete s[$2] } END { for (p in s) print p }' "$WXD_SPEC_SERVERS")
for pid in $left; do
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "a wxd server started by a spec was left running (pid $pid): killed"
    kill -KILL "$pid" 2>/dev/null
    extra=$((extra + 1))
  fi
done
sleep 0.2 # the exit records of the servers just ended
while read -r what pid code; do
  if [ "$what" = exit ] && [ "$code" -gt 128 ] && [ "$code" -ne 137 ] && [ "$code" -ne 143 ]; then
    echo "a wxd server started by a spec crashed (pid $pid, exit $code: signal $((code - 128)))"
    extra=$((extra + 1))
  elif [ "$what" = exit ] && [ "$code" -eq 86 ] && [ -n "${WXD_SANITIZED:-}" ]; then
    echo "a wxd server started by a spec crashed (pid $pid, exit $code: a sanitizer report)"
    extra=$((extra + 1))
  fi
done < "$WXD_SPEC_SERVERS"
if [ "$extra" -gt 0 ]; then
  echo "$passed passed, $((failed + extra)) failed, $skipped skipped"
  exit 1
fi
[ "$rc" -eq 0 ] || exit "$rc"
[ "$failed" -eq 0 ]
