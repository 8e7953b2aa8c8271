# Functions of .ci/run, sourced (and checked by spec/01-unit/ci_spec.lua).
# Each step adds to the totals; a step fails on a non-zero exit, on a
# missing summary line, or on failed specs in it.
ci_passed=0
ci_failed=0
ci_skipped=0

# ci_fail WHAT: a step that is not a spec suite failed.
ci_fail() {
  echo "ci: FAILED: $1"
  ci_failed=$((ci_failed + 1))
}

# ci_suite NAME CMD...: runs a command that ends with the line
# "N passed, N failed, N skipped" and adds its counts.
ci_suite() {
  local name=$1; shift
  local log rc line
  log=$(mktemp)
  echo "== $name"
  set -o pipefail
  "$@" 2>&1 | tee "$log"
  rc=$?
  line=$(tail -n 1 "$log")
  rm -f "$log"
  if [[ "$line" =~ ^([0-9]+)\ passed,\ ([0-9]+)\ failed,\ ([0-9]+)\ skipped$ ]]; then
    ci_passed=$((ci_passed + BASH_REMATCH[1]))
    ci_failed=$((ci_failed + BASH_REMATCH[2]))
    ci_skipped=$((ci_skipped + BASH_REMATCH[3]))
    if [ "$rc" -ne 0 ] && [ "${BASH_REMATCH[2]}" -eq 0 ]; then
      ci_fail "$name exited with $rc after a summary with no failure"
    fi
  else
    ci_fail "$name ended (exit $rc) without a summary line"
  fi
}

# ci_summary: the last line, and the exit code: non-zero when anything
# failed. Skipped specs do not fail CI, but they are shown.
ci_summary() {
  echo "$ci_passed passed, $ci_failed failed, $ci_skipped skipped"
  [ "$ci_failed" -eq 0 ]
}
