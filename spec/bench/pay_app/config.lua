-- The wxd peer of spec/bench/pay_http.sh: orders in memory with their
-- journal (fsync'd before each 204) in the benchmark's temp dir.
return {
  order = { journal = os.getenv("BENCH_PAY_JOURNAL_OFF") ~= "1" and assert(os.getenv("BENCH_PAY_JOURNAL")) or false,
            close_after = 0 },
  log = { access = false },
}
