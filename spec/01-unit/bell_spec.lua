-- The loop bell (core/bell.c): the journal's writer hands the coroutines
-- waiting for a commit to their loop's bell, which wakes the loop once per
-- batch and keeps it alive only while someone waits. Seen through
-- wxd.order's journal (any journaled store waits the same way), in this
-- process and in `wxd script` processes that end while waits are pending.
local core = require "wxd.core"
local order = require "wxd.order"
local task = require "wxd.task"
local H = require "helpers"

local function new_order(st, no)
  return st:create({ out_trade_no = no, amount = 1, currency = "CNY", appid = "wxa", mchid = "m1" })
end

-- Runs `code` as a `wxd script` file with args; returns its output and exit code.
local function script(dir, name, code, ...)
  local path = dir .. "/" .. name
  H.write_file(path, code)
  local args = { H.WXD, "script", path }
  for _, a in ipairs({ ... }) do args[#args + 1] = a end
  return H.sh(table.concat(args, " "))
end

-- The orders a journal holds, read by a fresh process.
local COUNT = [[
local st = require("wxd.order").new({ journal = arg[1], close_after = 0 })
local n = 0
for i = 1, tonumber(arg[2]) do if st:get("S" .. i) then n = n + 1 end end
print("orders " .. n)
]]

describe("the loop bell", function()
  local dir
  before_each(function() dir = H.tmpdir() end)
  after_each(function() H.sh("rm -rf " .. dir) end)

  it("resumes the waiters of a commit in fewer wake-ups than waits", function()
    local st = order.new({ journal = dir .. "/o.journal", close_after = 0 })
    local before = assert(core.bell_stats(), "a script VM has a bell")
    local hs = {}
    for t = 1, 64 do
      hs[t] = task.spawn(function()
        for i = 1, 10 do assert(new_order(st, "T" .. t .. "-" .. i)) end
        return true
      end)
    end
    for _, h in ipairs(hs) do assert.is_true(h:wait()) end
    local after = core.bell_stats()
    local posted, runs = after.posted - before.posted, after.runs - before.runs
    -- 640 durable waits (some find their commit done and post nothing).
    assert.truthy(posted > 64 and posted <= 640, "posted " .. posted)
    assert.truthy(runs >= 1 and runs < posted, ("runs %d for %d posted"):format(runs, posted))
    assert.equal(640, st:stats().orders)
  end)

  it("keeps a script running while its tasks wait for commits, and lets it end after", function()
    -- The main chunk returns at once; the tasks' waits alone keep the loop.
    local out, code = script(dir, "spawn.lua", [[
local st = require("wxd.order").new({ journal = arg[1], close_after = 0 })
for t = 1, 32 do
  require("wxd.task").spawn(function()
    for i = 1, 20 do
      local no = "S" .. ((t - 1) * 20 + i)
      assert(st:create({ out_trade_no = no, amount = 1, currency = "CNY", appid = "wxa", mchid = "m1" }))
    end
  end)
end
]], dir .. "/s.journal")
    assert.equal(0, code, out)
    out, code = script(dir, "count.lua", COUNT, dir .. "/s.journal", 640)
    assert.equal(0, code, out)
    assert.truthy(out:find("orders 640", 1, true), out)
  end)

  it("drops the waits of a script that fails while they are pending, and exits", function()
    -- The failure cancels every wait: some are still with the writer, some
    -- handed to the bell already. Each run exits 1 with the error (under
    -- ASan: with nothing leaked or used after it was freed).
    for run = 1, 10 do
      local journal = dir .. "/f" .. run .. ".journal"
      local out, code = script(dir, "fail.lua", [[
local st = require("wxd.order").new({ journal = arg[1], close_after = 0 })
local task = require("wxd.task")
for t = 1, 32 do
  task.spawn(function()
    for i = 1, 50 do
      st:create({ out_trade_no = "S" .. ((t - 1) * 50 + i), amount = 1, currency = "CNY", appid = "wxa", mchid = "m1" })
    end
  end)
end
require("wxd").sleep(0.001 * tonumber(arg[2]))
error("stop here")
]], journal, run)
      assert.equal(1, code, "run " .. run .. ": " .. out)
      assert.truthy(out:find("stop here", 1, true), out)
      -- What was acknowledged before the end is in the journal, whole.
      out, code = script(dir, "count.lua", COUNT, journal, 1600)
      assert.equal(0, code, out)
      assert.truthy(out:match("orders (%d+)"), out)
    end
  end)

  it("is not there outside a VM that has one: journaled calls then block and still work", function()
    -- `wxd check` loads an app in a VM without a bell; an app whose
    -- app.lua makes a durable change at load time still loads.
    local app = dir .. "/app"
    H.sh("mkdir -p " .. app)
    H.write_file(app .. "/config.lua", "return { order = { journal = 'o.journal', close_after = 0 } }\n")
    H.write_file(app .. "/app.lua", [[
local st = require("wxd.order")
assert(require("wxd.core").bell_stats() == nil, "no bell here")
assert(st.create({ out_trade_no = "LOAD1", amount = 1, currency = "CNY", appid = "wxa", mchid = "m1" }))
return require("wxd.app").new()
]])
    local out, code = H.sh(H.WXD .. " check " .. app)
    assert.equal(0, code, out)
    assert.truthy(out:find("ok:", 1, true), out)
  end)
end)
