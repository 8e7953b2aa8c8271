#!/usr/bin/env bash
# Runs every spec inside wxd (unit and integration) and ends with one line
# "N passed, N failed". Integration specs start their own wxd processes on
# free ports. WXD selects the binary (build/wxd; build/asan/wxd for make asan).
set -u
cd "$(dirname "$0")/.."
WXD=${WXD:-build/wxd}
export WXD
export WXD_LUA_DIR="$PWD/lua"

if [ ! -x "$WXD" ]; then
  echo "spec/run.sh: $WXD is not built (run make)" >&2
  echo "0 passed, 1 failed"
  exit 1
fi

out=$(mktemp)
redis_dir=""
redis_pid=""
cleanup() {
  rm -f "$out"
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
# The runner prints the summary; if it crashed before that, say so.
if ! tail -n 1 "$out" | grep -qE '^[0-9]+ passed, [0-9]+ failed$'; then
  echo "spec runner crashed (exit $rc)"
  echo "0 passed, 1 failed"
  exit 1
fi
exit "$rc"
