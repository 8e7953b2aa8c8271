-- wxd.order retention: does the process's memory stop growing under churn?
-- Run from the repository root with `build/wxd script spec/bench/order_retain_rss.lua`
-- (WXD=path picks another binary for the children).
--
-- Two child processes (each its own `wxd script`, so each RSS is its own)
-- churn orders through the embedded store with a journal in a temp dir:
-- each round creates BENCH_RETAIN_N orders, pays half of them and closes
-- the other half (every order carries a ~300-byte description and a
-- transaction's data, like a real one). One keeps everything
-- (retain = false); the other runs a sweep after each round with "now"
-- moved past settled_days (the defaults, 30 and 400 days), so the round's
-- orders are archived and forgotten, as a server's live set stays bounded
-- by its traffic over the retention: the memory of forgotten orders is
-- reused and RSS stays flat. Prints RSS (MB, /proc/self/statm) and live
-- orders after each round; a verdict line at the end.
-- Measured: see docs/order.md, Retention.
--
-- Environment: BENCH_RETAIN_N (orders per round, default 20000),
-- BENCH_RETAIN_ROUNDS (default 15), BENCH_RETAIN_CHILD (internal).
local wxd = require "wxd"

local N = tonumber(os.getenv("BENCH_RETAIN_N") or "20000")
local ROUNDS = tonumber(os.getenv("BENCH_RETAIN_ROUNDS") or "15")
local child = os.getenv("BENCH_RETAIN_CHILD")

local function rss_mb()
  local f = assert(io.open("/proc/self/statm"))
  local _, res = f:read("*a"):match("(%d+)%s+(%d+)")
  f:close()
  return tonumber(res) * 4096 / 1048576
end

if child then
  local order = require "wxd.order"
  local dir = assert(os.getenv("BENCH_RETAIN_DIR"))
  local retain = child == "retain" and { final_days = 30, settled_days = 400, archive = dir .. "/archive.jsonl" } or false
  local s = order.new{ journal = dir .. "/orders.journal", retain = retain }
  local task = require "wxd.task"
  local desc = string.rep("d", 300)
  local no = 0
  -- Several coroutines at once, as a server has them: their changes share
  -- the journal's fsyncs (group commit).
  local function churn(from, to)
    for i = from, to do
      local id = "B" .. i
      assert(s:create{ out_trade_no = id, amount = i, currency = "CNY", appid = "wxapp", mchid = "1900",
        payer_openid = "oOPENIDxxxxxxxxxxxxxxxxxxxxx", description = desc })
      assert(s:transition(id, "PAYING", { key = "prepay", event = "PREPAY" }))
      if i % 2 == 0 then
        assert(s:transition(id, "PAID", { key = "notify-" .. i, event = "TRANSACTION.SUCCESS",
          data = { transaction_id = "4200000000" .. i, trade_state = "SUCCESS" } }))
      else
        assert(s:transition(id, "CLOSED", { key = "auto-close", event = "AUTO_CLOSE" }))
      end
    end
    return true
  end
  local now = wxd.now() * 1000
  for round = 1, ROUNDS do
    local hs, per = {}, math.ceil(N / 50)
    for k = 0, 49 do
      local a = no + k * per + 1
      local b = math.min(no + (k + 1) * per, no + N)
      if a <= b then hs[#hs + 1] = task.spawn(churn, a, b) end
    end
    for _, h in ipairs(hs) do assert(h:wait(600000)) end
    no = no + N
    -- Past the retention, every round: the round's orders are due.
    now = now + 401 * 86400 * 1000
    local forgotten = assert(s:sweep(now))
    collectgarbage()
    print(string.format("ROUND %d orders=%d live=%d forgotten=%d rss=%.1f", round, no, s:stats().orders,
      forgotten, rss_mb()))
  end
  os.exit(0)
end

local dir = io.popen("mktemp -d /tmp/wxd-bench.XXXXXX"):read("*l")
local function run(mode)
  os.execute("mkdir -p " .. dir .. "/" .. mode)
  local cmd = string.format("BENCH_RETAIN_CHILD=%s BENCH_RETAIN_DIR=%s/%s BENCH_RETAIN_N=%d BENCH_RETAIN_ROUNDS=%d "
    .. "%s script %s 2>/dev/null",
    mode, dir, mode, N, ROUNDS, os.getenv("WXD") or "build/wxd", "spec/bench/order_retain_rss.lua")
  local p = assert(io.popen(cmd))
  local rows = {}
  for line in p:lines() do
    if line:find("^ROUND") then
      print(mode .. " " .. line)
      rows[#rows + 1] = tonumber(line:match("rss=([%d.]+)"))
    end
  end
  p:close()
  return rows
end
local keep = run("keep")
local retain = run("retain")
os.execute("rm -rf " .. dir)
if #keep < ROUNDS or #retain < ROUNDS then
  print("FAILED: a child did not finish")
  os.exit(1)
end
local half = math.floor(ROUNDS / 2)
print(string.format("VERDICT keep: %.1f -> %.1f MB (+%.1f in the second half); retain: %.1f -> %.1f MB (+%.1f)",
  keep[half], keep[ROUNDS], keep[ROUNDS] - keep[half], retain[half], retain[ROUNDS], retain[ROUNDS] - retain[half]))
