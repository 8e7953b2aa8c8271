-- wxd.task micro-benchmark: what spawning a task and waiting for it costs
-- on one worker, and the same hand-off done the way lua/wxd/mp.lua does it
-- before wxd.task (the handler in a timer.after(0) run, the request waiting
-- on a wxd.lock the handler holds until it ends). Run with
-- `build/wxd script spec/bench/task.lua`.
--
-- Every number is per hand-off, median of BENCH_TASK_ROUNDS rounds of N
-- hand-offs (one at a time: a request waiting for its handler). "waits
-- once" handlers yield to the loop once (wxd.sleep(0)), as a handler that
-- calls anything upstream does; the loop turn itself is measured alone
-- for comparison.
--
-- Environment: BENCH_TASK_N (default 100000), BENCH_TASK_ROUNDS (5).
local wxd = require "wxd"
local task = require "wxd.task"
local timer = require "wxd.timer"
local lock = require "wxd.lock"

local N = tonumber(os.getenv("BENCH_TASK_N") or "100000")
local ROUNDS = tonumber(os.getenv("BENCH_TASK_ROUNDS") or "5")
wxd.shdict.declare("bench_task", "1m")

local function measure(name, fn)
  local t = {}
  for r = 1, ROUNDS do
    collectgarbage()
    local t0 = wxd.monotonic_ms()
    fn()
    t[r] = (wxd.monotonic_ms() - t0) * 1000 / N
  end
  table.sort(t)
  local us = t[math.floor((ROUNDS + 1) / 2)]
  print(string.format("%-58s %7.2f us  %9.0f /s", name, us, 1e6 / us))
  return us
end

local function returns_at_once(i) return i end
local function waits_once(i)
  wxd.sleep(0)
  return i
end

print(string.format("wxd.task, %d hand-offs per round, median of %d rounds", N, ROUNDS))
measure("loop turn alone: wxd.sleep(0)", function()
  for _ = 1, N do wxd.sleep(0) end
end)
measure("spawn + wait, handler returns at once", function()
  for i = 1, N do assert(task.spawn(returns_at_once, i):wait() == i) end
end)
measure("spawn + wait, handler waits once", function()
  for i = 1, N do assert(task.spawn(waits_once, i):wait() == i) end
end)
measure("spawn + wait(4500), handler waits once (5-second rule)", function()
  for i = 1, N do assert(task.spawn(waits_once, i):wait(4500) == i) end
end)
measure("before wxd.task: timer.after(0) + wxd.lock, waits once", function()
  local lk = lock.new("bench_task", { timeout = 4.5, expire = 60 })
  for i = 1, N do
    local key = "run:" .. i
    local runner = lock.new("bench_task", { timeout = 0, expire = 60 })
    assert(runner:lock(key))
    local result
    timer.after(0, function()
      result = waits_once(i)
      runner:unlock()
    end)
    assert(lk:lock(key))
    lk:unlock()
    assert(result == i)
  end
end)
