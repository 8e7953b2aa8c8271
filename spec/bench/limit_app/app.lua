-- The app of spec/bench/limit.sh: one endpoint without a limiter and the
-- same endpoint behind wxd.limit's middleware (one key for every request:
-- the client address of wrk, so both workers take the same mutex, the
-- worst case), with and without the RateLimit-* headers. The rate is so
-- high that every request is allowed: the run measures the check, not 429s.
local limit = require "wxd.limit"
local app = require("wxd.app").new()

local function hello() return "hello world\n" end
local huge = { rate = 1e9, burst = 1e9 }

app:get("/plain", hello)
app:get("/limited", limit.route({ name = "bench_headers", rate = huge.rate, burst = huge.burst }, hello))
app:get("/limited_bare", limit.route({ name = "bench_bare", rate = huge.rate, burst = huge.burst,
  headers = false }, hello))

return app
