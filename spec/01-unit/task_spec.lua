-- wxd.task inside wxd script: the spec itself runs in a wxd coroutine on a
-- loop, so it can spawn tasks and wait for them directly.
local wxd = require "wxd"
local H = require "helpers"
local task = require "wxd.task"

-- A task that stays running until open() is called (no timers involved).
local function gate()
  local g = {}
  g.task = task.spawn(function() return wxd.sleep(1e9) end)
  function g.open() g.task:cancel() end
  return g
end

local function count(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n
end

-- Runs `code` in its own `wxd script` process; returns output and exit code.
local function run_script(code)
  local dir = H.tmpdir()
  H.write_file(dir .. "/s.lua", code)
  local out, rc = H.sh("timeout 60 " .. H.WXD .. " script " .. dir .. "/s.lua")
  os.execute("rm -rf " .. dir)
  assert.falsy(out:find("Sanitizer", 1, true), out)
  assert.falsy(out:find("runtime error:", 1, true), out)
  return out, rc
end

describe("wxd.task", function()
  it("is wxd.task too", function()
    assert.equal(task, wxd.task)
  end)

  it("returns every result of the function, nils included", function()
    local h = task.spawn(function(a, b)
      wxd.sleep(1)
      return a, nil, b, nil
    end, "x", 7)
    assert.equal("running", h:status())
    assert.is_false(h:done())
    local n = select("#", h:wait())
    assert.equal(4, n)
    local a, b, c, d = h:wait()
    assert.same({ "x", nil, 7, nil }, { a, b, c, d })
    assert.equal("done", h:status())
    assert.is_true(h:done())
    -- A function that returns nothing: wait returns nothing, status tells.
    local e = task.spawn(function() end)
    assert.equal(0, select("#", e:wait()))
    assert.equal("done", e:status())
  end)

  it("starts the task inside spawn: one that never waits is done on return", function()
    local order = {}
    local h = task.spawn(function()
      order[#order + 1] = "task"
      return 42
    end)
    order[#order + 1] = "spawner"
    assert.same({ "task", "spawner" }, order)
    assert.is_true(h:done())
    assert.equal(42, h:wait())
  end)

  it("runs a task until its first wait inside spawn, then goes on with the spawner", function()
    local order = {}
    local h = task.spawn(function()
      order[#order + 1] = "before wait"
      wxd.sleep(1)
      order[#order + 1] = "after wait"
    end)
    order[#order + 1] = "spawner"
    h:wait()
    assert.same({ "before wait", "spawner", "after wait" }, order)
  end)

  it("returns at once, without yielding, from wait on an ended task", function()
    local h = task.spawn(function() return 1, 2 end)
    local other_ran = false
    task.spawn(function()
      wxd.sleep(0)
      other_ran = true
    end)
    for _ = 1, 3 do
      local a, b = h:wait()
      assert.equal(1, a)
      assert.equal(2, b)
    end
    assert.is_false(other_ran, "wait yielded to the loop")
  end)

  it("resumes waiters inside the call that ends the task, in the order they waited", function()
    local g = gate()
    local log = {}
    local function add(s) log[#log + 1] = s end
    local mid = task.spawn(function()
      local _, err = g.task:wait()
      add("mid: " .. err)
      return "m"
    end)
    for i = 1, 3 do
      task.spawn(function()
        local v = mid:wait()
        add("waiter " .. i .. ": " .. v)
      end)
    end
    g.open() -- ends g.task, which ends mid, which wakes the three
    add("opened")
    assert.same({ "mid: cancelled", "waiter 1: m", "waiter 2: m", "waiter 3: m", "opened" }, log)
  end)

  it("times out one waiter while the task goes on; a later wait gets the result", function()
    local g = gate()
    local finished = false
    local h = task.spawn(function()
      g.task:wait()
      finished = true
      return "late"
    end)
    local patient_got
    local patient = task.spawn(function() patient_got = h:wait() end)
    local v, err = h:wait(20)
    assert.is_nil(v)
    assert.equal("timeout", err)
    assert.equal("running", h:status())
    assert.is_false(finished)
    assert.is_false(patient:done(), "the other waiter still waits")
    g.open()
    assert.is_true(finished)
    assert.equal("late", patient_got)
    assert.equal("late", h:wait())
    assert.equal("late", h:wait(10))
  end)

  it("polls with a timeout of 0", function()
    local g = gate()
    local h = task.spawn(function() g.task:wait() return "r" end)
    assert.same({ nil, "timeout" }, { h:wait(0) })
    g.open()
    assert.equal("r", h:wait(0))
  end)

  it("reports a raising task as nil, err, to every waiter and to later waits", function()
    local h = task.spawn(function()
      wxd.sleep(1)
      error("boom")
    end)
    local other
    task.spawn(function() other = { h:wait() } end)
    local v, err = h:wait()
    assert.is_nil(v)
    assert.truthy(err:find("task_spec.lua:%d+: boom$"), err)
    assert.same({ nil, err }, other)
    assert.equal("failed", h:status())
    assert.is_true(h:done())
    assert.same({ nil, err }, { h:wait() })
    assert.is_false(h:cancel())
  end)

  it("gives non-string errors as strings", function()
    local t = task.spawn(function() error({ code = 1 }) end)
    assert.same({ nil, "(error object is a table value)" }, { t:wait() })
    local n = task.spawn(function() error(12, 0) end)
    assert.same({ nil, "12" }, { n:wait() })
  end)

  it("logs a raising task's error once, with its traceback", function()
    local out, rc = run_script([[
      local task = require "wxd.task"
      local function inner() error("kaput") end
      local h = task.spawn(function() require("wxd").sleep(1) inner() end)
      h:wait(); h:wait(); task.spawn(function() return h:wait() end)
      io.stdout:write(h:status(), "\n")
    ]])
    assert.equal(0, rc, out)
    assert.truthy(out:find("failed\n", 1, true), out)
    local _, lines = out:gsub('"msg":"task error"', "")
    assert.equal(1, lines, out)
    assert.truthy(out:find("kaput", 1, true) and out:find("in function 'inner'", 1, true), out)
  end)

  it("survives a task that overflows its Lua stack, or returns more than a stack holds", function()
    local function recurse(n) return recurse(n + 1) + 1 end
    local h = task.spawn(function()
      wxd.sleep(1)
      return recurse(1)
    end)
    local v, err = h:wait()
    assert.is_nil(v)
    -- LuaJIT cannot always call an error handler at the overflow point.
    assert.truthy(err:find("stack overflow", 1, true) or err == "error in error handling", err)
    assert.equal("failed", h:status())
    assert.same({ nil, err }, { h:wait() })
    local many = {}
    for i = 1, 7990 do many[i] = i end
    assert.equal(7990, select("#", task.spawn(unpack, many):wait()))
    for i = 7991, 7999 do many[i] = i end
    local t = task.spawn(unpack, many)
    assert.equal("failed", t:status())
    assert.same({ nil, "too many results" }, { t:wait() })
  end)

  it("ends a task that yields to nobody (a bare coroutine.yield) as failed", function()
    local h = task.spawn(function() coroutine.yield() end)
    local v, err = h:wait()
    assert.is_nil(v)
    assert.truthy(err:find("nothing would resume it", 1, true), err)
    assert.equal("failed", h:status())
    assert.same({ nil, err }, { h:wait() })
  end)

  it("cancels a sleeping task: its timer is closed, it never resumes, its waiters get cancelled", function()
    local resumed = false
    local h = task.spawn(function()
      wxd.sleep(30)
      resumed = true
    end)
    local waiter_got
    task.spawn(function() waiter_got = { h:wait() } end)
    assert.is_true(h:cancel())
    assert.same({ nil, "cancelled" }, waiter_got)
    assert.same({ nil, "cancelled" }, { h:wait() })
    assert.equal("cancelled", h:status())
    assert.is_true(h:done())
    assert.is_false(h:cancel(), "a second cancel does nothing")
    wxd.sleep(60)
    assert.is_false(resumed)
  end)

  it("closes a cancelled task's sleep timer: a script does not wait for it", function()
    local out, rc = run_script([[
      local wxd = require "wxd"
      local h = wxd.task.spawn(function() wxd.sleep(1e8) end)
      local w = wxd.task.spawn(function() return h:wait(1e8) end)
      assert(h:cancel())
      io.stdout:write(tostring(select(2, w:wait())), "\n")
    ]])
    assert.equal(0, rc, out)
    assert.equal("cancelled\n", out)
  end)

  it("cancels a task that waits for another: that one goes on and keeps its other waiters", function()
    local g = gate()
    local inner = task.spawn(function()
      g.task:wait()
      return "inner"
    end)
    local outer_resumed = false
    local outer = task.spawn(function()
      inner:wait(1e6)
      outer_resumed = true
    end)
    local other
    task.spawn(function() other = inner:wait() end)
    assert.is_true(outer:cancel())
    g.open()
    assert.equal("inner", other)
    assert.equal("inner", inner:wait())
    assert.is_false(outer_resumed)
  end)

  it("cancels a task waiting for a wxd.lock; the lock goes to the next waiter", function()
    local lock = require "wxd.lock"
    wxd.shdict.declare("task_spec_locks", 65536)
    local holder = lock.new("task_spec_locks", { timeout = 1, expire = 30 })
    assert(holder:lock("k"))
    local h = task.spawn(function() return lock.new("task_spec_locks", { timeout = 30 }):lock("k") end)
    assert.same({ nil, "timeout" }, { h:wait(20) })
    local nxt = task.spawn(function()
      local lk = lock.new("task_spec_locks", { timeout = 30 })
      local ok, err = lk:lock("k")
      if ok then lk:unlock() end
      return ok, err
    end)
    assert.is_true(h:cancel())
    holder:unlock()
    assert.same({ true }, { nxt:wait(10000) })
  end)

  it("lets a task cancel itself: its waiters get cancelled at once, it stops at its next wait", function()
    local log = {}
    local function add(s) log[#log + 1] = s end
    local h
    h = task.spawn(function()
      wxd.sleep(1)
      local cancelled = h:cancel()
      add("cancel: " .. tostring(cancelled))
      add("still running")
      wxd.sleep(1)
      add("never")
    end)
    task.spawn(function()
      local _, err = h:wait()
      add("waiter: " .. err)
    end)
    local _, err = h:wait()
    assert.equal("cancelled", err)
    wxd.sleep(20)
    assert.same({ "waiter: cancelled", "cancel: true", "still running" }, log)
    assert.equal("cancelled", h:status())
  end)

  it("drops a waiter cancelled while it is queued to be resumed", function()
    local g = gate()
    local second_resumed = false
    local second
    task.spawn(function()
      g.task:wait()
      second:cancel() -- ended by the same task, not resumed yet
    end)
    second = task.spawn(function()
      g.task:wait()
      second_resumed = true
    end)
    g.open()
    assert.equal("cancelled", second:status())
    assert.is_false(second_resumed)
  end)

  it("resumes 100 waiters of one task, all with the same results", function()
    local g = gate()
    local h = task.spawn(function()
      g.task:wait()
      return "r", 2, nil
    end)
    local got = {}
    for i = 1, 100 do
      task.spawn(function() got[i] = { n = select("#", h:wait()), h:wait() } end)
    end
    -- Half of them with a timeout that does not fire.
    for i = 101, 150 do
      task.spawn(function() got[i] = { n = select("#", h:wait(1e6)), h:wait() } end)
    end
    assert.equal(0, #got)
    g.open()
    assert.equal(150, #got)
    for i = 1, 150 do assert.same({ n = 3, "r", 2, nil }, got[i]) end
  end)

  it("lets a task wait for a task, down a chain of 100,000 without deep C stacks", function()
    -- Each end resumes the next waiter from C; nested without a bound,
    -- this chain overflows the C stack (at about 30,000 under ASan).
    local g = gate()
    local prev = task.spawn(function()
      g.task:wait()
      return 0
    end)
    for _ = 1, 100000 do
      local p = prev
      prev = task.spawn(function() return p:wait() + 1 end)
    end
    g.open()
    assert.equal(100000, prev:wait())
    prev = nil -- luacheck: ignore 311 (drops the chain before the collection)
    collectgarbage()
  end)

  it("runs 10,000 concurrent tasks, each sleeping a little, all awaited", function()
    local hs = {}
    local running = 0
    for i = 1, 10000 do
      hs[i] = task.spawn(function(n)
        running = running + 1
        wxd.sleep(n % 7)
        running = running - 1
        return n * 2
      end, i)
    end
    assert.equal(10000, running, "all of them waited at the same time")
    local sum = 0
    for i = 1, 10000 do sum = sum + hs[i]:wait() end
    assert.equal(10000 * 10001, sum)
    assert.equal(0, running)
  end)

  it("keeps running a task whose handle was dropped, and frees the handle after its end", function()
    local g = gate()
    local finished = false
    local weak = setmetatable({}, { __mode = "k" })
    do
      local h = task.spawn(function()
        g.task:wait()
        finished = true
      end)
      weak[h] = true
    end
    collectgarbage()
    collectgarbage()
    assert.equal(1, count(weak))
    g.open()
    assert.is_true(finished)
    collectgarbage()
    collectgarbage()
    assert.equal(0, count(weak), "the ended task's handle was collected")
  end)

  it("raises on bad arguments and misuse", function()
    local h = task.spawn(function() return 1 end)
    assert.has_error(function() task.spawn() end)
    assert.has_error(function() task.spawn("not a function") end)
    assert.has_error(function() h:wait(-1) end)
    assert.has_error(function() h:wait("soon") end)
    assert.has_error(function() h:wait(0 / 0) end)
    assert.has_error(function() h.wait({}) end)
    assert.has_error(function() h.cancel(io.stdout) end)
    assert.has_error(function() h.status(nil) end)
    assert.has_error(function() h.done(1) end)
  end)

  it("raises when a task waits for itself", function()
    local h
    h = task.spawn(function()
      wxd.sleep(1)
      return h:wait()
    end)
    local v, err = h:wait()
    assert.is_nil(v)
    assert.truthy(err:find("a task cannot wait for itself", 1, true), err)
  end)

  it("raises outside a wxd coroutine, like wxd.sleep", function()
    local g = gate()
    local ok, err = coroutine.resume(coroutine.create(function() return g.task:wait() end))
    assert.is_false(ok)
    assert.truthy(err:find("task:wait: cannot wait here", 1, true), err)
    ok, err = coroutine.resume(coroutine.create(function() return task.spawn(print) end))
    assert.is_false(ok)
    assert.truthy(err:find("wxd.task.spawn: only in", 1, true), err)
    -- Not yieldable (a C function's callback): raises, and waits for nothing.
    ok, err = pcall(string.gsub, "x", "x", function() g.task:wait() end)
    assert.is_false(ok)
    assert.truthy(err:find("cannot wait here", 1, true), err)
    g.open()
  end)

  it("refuses spawns nested deeper than 200 instead of overflowing the C stack", function()
    local function nest(n)
      if n == 0 then return 0 end
      local v, err = task.spawn(nest, n - 1):wait()
      if not v then return nil, err end
      return v + 1
    end
    assert.equal(150, task.spawn(nest, 150):wait())
    local v, err = task.spawn(nest, 100000):wait()
    assert.is_nil(v)
    assert.truthy(err:find("more than 200 tasks starting inside one another", 1, true), err)
  end)

  it("refuses to spawn while app.lua loads (no coroutine of the generation runs yet)", function()
    local dir = H.tmpdir()
    H.write_file(dir .. "/app.lua", 'require("wxd").task.spawn(function() end)\nreturn require("wxd.app").new()\n')
    local out, rc = H.sh(H.WXD .. " check " .. dir)
    os.execute("rm -rf " .. dir)
    assert.equal(1, rc, out)
    assert.truthy(out:find("wxd.task.spawn: only in", 1, true), out)
  end)

  it("keeps a script running while a task sleeps after the main chunk ended", function()
    local out, rc = run_script([[
      local wxd = require "wxd"
      wxd.task.spawn(function() wxd.sleep(20) io.stdout:write("task ended\n") end)
      io.stdout:write("main chunk ended\n")
    ]])
    assert.equal(0, rc, out)
    assert.equal("main chunk ended\ntask ended\n", out)
  end)

  it("frees tasks and waiters left waiting when a script ends or fails", function()
    -- Two tasks waiting for each other, nothing else alive: the loop ends
    -- and the VM is freed with both (the sanitizer build checks the memory).
    local out, rc = run_script([[
      local wxd = require "wxd"
      local a, b
      a = wxd.task.spawn(function() wxd.sleep(1) return b:wait() end)
      b = wxd.task.spawn(function() wxd.sleep(1) return a:wait() end)
      wxd.task.spawn(function() return a:wait() end)
      io.stdout:write("end\n")
    ]])
    assert.equal(0, rc, out)
    assert.equal("end\n", out)
    out, rc = run_script([[
      local wxd = require "wxd"
      local slow = wxd.task.spawn(function() wxd.sleep(1e8) end)
      wxd.task.spawn(function() return slow:wait(1e8) end)
      wxd.task.spawn(function() return slow:wait() end)
      wxd.sleep(1)
      error("the script fails")
    ]])
    assert.equal(1, rc, out)
    assert.truthy(out:find("the script fails", 1, true), out)
  end)
end)
