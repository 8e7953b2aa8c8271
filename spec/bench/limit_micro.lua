-- The rate-limiter check alone, without HTTP: ns per call of the core's
-- take (one key; a million distinct keys) and of the middleware on a fake
-- request. Run by spec/bench/limit.sh, or
--   build/wxd script spec/bench/limit_micro.lua [N]
local limit = require "wxd.limit"
local wxd = require "wxd"

local N = tonumber(arg and arg[1]) or 2e6

local function bench(name, n, fn)
  fn(1000) -- warm up (and let the JIT compile the loop)
  local t0 = wxd.monotonic_ms()
  fn(n)
  local ns = (wxd.monotonic_ms() - t0) * 1e6 / n
  print(string.format("%-44s %8.0f ns per call", name, ns))
end

local one = assert(limit.new("micro_one_" .. os.time(), { rate = 1e9, burst = 1e9 }))
bench("take, one key", N, function(n)
  for _ = 1, n do one:take("127.0.0.1") end
end)

-- 1 per second: every key stays live (not idle) for the whole run.
local many = assert(limit.new("micro_many_" .. os.time(), { rate = 1, burst = 10, max_keys = 2e6 }))
local keys = {}
for i = 1, 1e6 do keys[i] = "10." .. (i % 256) .. "." .. (math.floor(i / 256) % 256) .. "." .. i end
bench("take, 1e6 distinct keys (table grows)", 1e6, function(n)
  for i = 1, n do many:take(keys[(i - 1) % 1e6 + 1]) end
end)
print(string.format("  %d keys, %.1f MB in the limiter", many:stats().keys, many:stats().bytes / 1048576))
print(string.format("  %d reclaimed by sweep", many:sweep()))
-- The key strings would make every later GC cycle walk a million-entry table.
keys = nil -- luacheck: ignore 311
collectgarbage()

local win = assert(limit.new("micro_window_" .. os.time(), { limit = 1e9, window = 60 }))
bench("take, sliding window, one key", N, function(n)
  for _ = 1, n do win:take("127.0.0.1") end
end)

local mw = limit.middleware({ limiter = one })
local req = { remote_addr = "127.0.0.1" }
bench("middleware with headers (fake request)", N, function(n)
  for _ = 1, n do mw(req, { headers = {} }) end
end)
local bare = limit.middleware({ limiter = one, headers = false })
bench("middleware without headers", N, function(n)
  for _ = 1, n do bare(req, nil) end
end)
