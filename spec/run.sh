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
trap 'rm -f "$out"' EXIT
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
