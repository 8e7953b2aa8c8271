-- wxd.shdict's wait_change and wxd.store.wait_change: a coroutine waits
-- for a key's value to change, woken natively by the shdict (any write,
-- removal, eviction, expiry), by polling with Redis. Concurrent coroutines
-- are timer callbacks (each its own wxd coroutine). Across worker threads,
-- a reload and a shutdown: spec/02-integration/07-shdict_spec.lua.
local wxd = require "wxd"
local shdict = require "wxd.shdict"
local store = require "wxd.store"
local task = require "wxd.task"
local lock = require "wxd.lock"
local H = require "helpers"

local LONG = 30 -- seconds: a waiter that returns before this was woken

-- Starts fn in a timer coroutine; returns a table that gets .done and the
-- results (.r = { ... }) once fn returned.
local function waiter(fn)
  local w = {}
  wxd.timer.after(0, function()
    w.r = { fn() }
    w.done = true
  end)
  return w
end

describe("wxd.shdict wait_change", function()
  local d
  before_each(function()
    d = shdict.declare("waits", "1m")
    d:flush_all()
  end)

  it("returns at once when the value already differs, nil when absent", function()
    d:set("s", "now")
    d:set("n", 7)
    d:set("b", false)
    assert.equal("now", d:wait_change("s", "before", LONG))
    assert.equal(7, d:wait_change("n", 8, LONG))
    assert.equal(7, d:wait_change("n", "7", LONG), "a string is not the number")
    assert.equal(false, d:wait_change("b", true, LONG))
    local v, err = d:wait_change("absent", "x", LONG)
    assert.is_nil(v)
    assert.is_nil(err)
    assert.equal("now", d:wait_change("s", nil, LONG), "old nil: it exists")
    -- Nothing to wait for, so no coroutine is needed.
    assert.equal("now", coroutine.wrap(function() return d:wait_change("s", "x", LONG) end)())
  end)

  it("looks once with timeout 0: nil, \"timeout\" while the value is old", function()
    d:set("k", "p")
    assert.same({ nil, "timeout" }, { d:wait_change("k", "p", 0) })
    assert.same({ nil, "timeout" }, { d:wait_change("absent", nil, 0) })
  end)

  it("times out with nil, \"timeout\" when nothing changes", function()
    d:set("k", "p", LONG)
    local t0 = wxd.monotonic_ms()
    local v, err = d:wait_change("k", "p", 0.05)
    assert.is_nil(v)
    assert.equal("timeout", err)
    assert.is_true(wxd.monotonic_ms() - t0 >= 49, "never early")
    assert.equal("p", d:get("k"))
  end)

  it("wakes a waiter on every kind of write and removal", function()
    local cases = {
      { "set", "p", function() d:set("k", "r") end, "r" },
      { "replace", "p", function() d:replace("k", "r2") end, "r2" },
      { "set with a TTL", "p", function() d:set("k", "r3", 60) end, "r3" },
      { "incr", 1, function() d:incr("k", 2) end, 3 },
      { "cas", "p", function() d:cas("k", "p", "c") end, "c" },
      { "delete", "p", function() d:delete("k") end, nil },
      { "set nil", "p", function() d:set("k", nil) end, nil },
      { "cas to nil", "p", function() d:cas("k", "p", nil) end, nil },
      { "flush_all", "p", function() d:flush_all() end, nil },
      { "add (old nil)", nil, function() d:add("k", "new") end, "new" },
    }
    for _, c in ipairs(cases) do
      local name, old, write, want = c[1], c[2], c[3], c[4]
      d:flush_all()
      if old ~= nil then d:set("k", old) end
      local w = waiter(function() return d:wait_change("k", old, LONG) end)
      wxd.sleep(10) -- let it queue (if it did not, it returns the same)
      write()
      H.wait_until(function() return w.done end, LONG / 2, name .. ": the waiter")
      assert.equal(want, w.r[1], name)
      assert.is_nil(w.r[2], name)
    end
  end)

  it("goes on waiting through a write of the same value", function()
    d:set("k", "p")
    local w = waiter(function() return d:wait_change("k", "p", LONG) end)
    wxd.sleep(10)
    d:set("k", "p")
    wxd.sleep(20)
    assert.is_nil(w.done, "woken by a write that changed nothing")
    d:set("k", "q")
    H.wait_until(function() return w.done end, 10, "the waiter")
    assert.equal("q", w.r[1])
  end)

  it("wakes at the expiry of the key it waits on (no writer wakes it)", function()
    d:set("k", "p", 0.1)
    local t0 = wxd.monotonic_ms()
    local v, err = d:wait_change("k", "p", LONG)
    local waited = wxd.monotonic_ms() - t0
    assert.is_nil(v)
    assert.is_nil(err)
    assert.is_true(waited >= 99 and waited < LONG * 1000 / 2, "woken after " .. waited .. " ms")
    assert.is_nil(d:get("k"))
  end)

  it("wakes a waiter whose key is evicted to make room", function()
    local small = shdict.declare("waits_small", "64k")
    small:flush_all()
    small:set("k", "p")
    local w = waiter(function() return small:wait_change("k", "p", LONG) end)
    wxd.sleep(10)
    for i = 1, 200 do small:set("fill" .. i, string.rep("x", 1000)) end
    H.wait_until(function() return w.done end, 10, "the waiter")
    assert.is_nil(w.r[1])
    assert.is_nil(w.r[2])
    assert.is_true(small:stats().evictions > 0)
  end)

  it("wakes every waiter of the key at once, and only those", function()
    d:set("k", "p")
    d:set("other", "p")
    local ws, others = {}, {}
    for i = 1, 50 do ws[i] = waiter(function() return d:wait_change("k", "p", LONG) end) end
    for i = 1, 5 do others[i] = waiter(function() return d:wait_change("other", "p", 0.3) end) end
    wxd.sleep(10)
    d:set("k", "done")
    H.wait_until(function()
      for _, w in ipairs(ws) do if not w.done then return false end end
      return true
    end, 10, "all 50 waiters")
    for _, w in ipairs(ws) do assert.equal("done", w.r[1]) end
    H.wait_until(function()
      for _, w in ipairs(others) do if not w.done then return false end end
      return true
    end, 10, "the other key's waiters")
    for _, w in ipairs(others) do assert.same({ nil, "timeout" }, w.r) end
  end)

  it("hands a lock on and wakes a change waiter of the same key at one unlock", function()
    local holder = lock.new("waits", { expire = LONG })
    assert(holder:lock("k"))
    local token = d:get("k")
    local got_lock
    wxd.timer.after(0, function()
      local lk = lock.new("waits", { timeout = LONG })
      got_lock = lk:lock("k") and d:get("k")
      lk:unlock()
    end)
    local w = waiter(function() return d:wait_change("k", token, LONG) end)
    wxd.sleep(10)
    assert.is_true(holder:unlock())
    H.wait_until(function() return w.done and got_lock end, 10, "both waiters")
    -- The change waiter saw the removal or the next holder's token.
    assert.is_true(w.r[1] == nil or (w.r[1] ~= token and type(w.r[1]) == "string"))
    assert.is_true(type(got_lock) == "string" and got_lock ~= token)
  end)

  it("leaves the queue when the waiting task is cancelled; a later write wakes the others", function()
    d:set("k", "p")
    local h = task.spawn(function() return d:wait_change("k", "p", LONG) end)
    local w = waiter(function() return d:wait_change("k", "p", LONG) end)
    wxd.sleep(10)
    assert.is_true(h:cancel())
    assert.same({ nil, "cancelled" }, { h:wait(1000) })
    d:set("k", "q")
    H.wait_until(function() return w.done end, 10, "the remaining waiter")
    assert.equal("q", w.r[1])
    -- Many cancelled at once, then the key removed: nothing left queued.
    local hs = {}
    for i = 1, 20 do hs[i] = task.spawn(function() return d:wait_change("k", "q", LONG) end) end
    for i = 1, 20, 2 do hs[i]:cancel() end
    d:delete("k")
    for i = 2, 20, 2 do assert.same({}, { select(2, hs[i]:wait(10000)) }) end
  end)

  it("raises when it would have to wait outside a wxd coroutine, and on bad arguments", function()
    d:set("k", "p")
    local ok, err = coroutine.wrap(function() return pcall(d.wait_change, d, "k", "p", 1) end)()
    assert.is_false(ok)
    assert.truthy(tostring(err):find("cannot wait here", 1, true), err)
    assert.has_error(function() d:wait_change("k", "p") end)
    assert.has_error(function() d:wait_change("k", "p", -1) end)
    assert.has_error(function() d:wait_change("k", {}, 1) end)
    assert.has_error(function() d:wait_change(42, "p", 1) end)
  end)
end)

local backends = {
  { name = "memory", cfg = function() return { backend = "memory", shdict = "waits_store" } end },
  { name = "redis", cfg = function()
    return { backend = "redis", redis = H.redis_url(), prefix = "spec:wait:" .. wxd.now() .. ":" }
  end },
}

for _, b in ipairs(backends) do
  describe("wxd.store wait_change (" .. b.name .. ")", function()
    local s
    setup(function()
      shdict.declare("waits_store", "1m")
      s = store.new(b.cfg())
    end)

    it("returns at once a value that differs, and nil for an absent key", function()
      s:set("w:a", "r")
      assert.equal("r", s:wait_change("w:a", "p", LONG))
      s:set("w:n", 5)
      assert.equal(5, s:wait_change("w:n", "5", LONG))
      assert.same({}, { s:wait_change("w:absent", "p", LONG) })
      assert.same({ nil, "timeout" }, { s:wait_change("w:a", "r", 0) })
    end)

    it("returns the value another coroutine sets, before its timeout", function()
      s:set("w:k", "p", 60)
      local w = waiter(function() return s:wait_change("w:k", "p", LONG) end)
      wxd.sleep(20)
      assert.is_true(s:set("w:k", "rreply", 60))
      H.wait_until(function() return w.done end, 10, "the waiter")
      assert.same({ "rreply" }, w.r)
    end)

    it("returns nil when the key is deleted or expires, and waits for an absent key to appear", function()
      s:set("w:d", "p")
      local w = waiter(function() return s:wait_change("w:d", "p", LONG) end)
      wxd.sleep(20)
      s:delete("w:d")
      H.wait_until(function() return w.done end, 10, "the waiter")
      assert.same({}, w.r)
      s:set("w:e", "p", 0.1)
      assert.same({}, { s:wait_change("w:e", "p", LONG) })
      local w2 = waiter(function() return s:wait_change("w:new", nil, LONG) end)
      wxd.sleep(20)
      s:add("w:new", true)
      H.wait_until(function() return w2.done end, 10, "the waiter")
      assert.same({ true }, w2.r)
    end)

    it("times out with nil, \"timeout\"", function()
      s:set("w:t", "p", 60)
      local t0 = wxd.monotonic_ms()
      assert.same({ nil, "timeout" }, { s:wait_change("w:t", "p", 0.05) })
      assert.is_true(wxd.monotonic_ms() - t0 >= 49)
    end)

    it("raises on a bad key, old value or timeout", function()
      assert.has_error(function() s:wait_change("", "p", 1) end)
      assert.has_error(function() s:wait_change("w:x", {}, 1) end)
      assert.has_error(function() s:wait_change("w:x", "p", nil) end)
      assert.has_error(function() s:wait_change("w:x", "p", -1) end)
    end)
  end)
end

describe("wxd.store.wait_change", function()
  it("is one of the module's functions (the store of config.lua)", function()
    assert.is_function(store.wait_change)
    store.set("spec:wait:module", "r")
    assert.equal("r", store.wait_change("spec:wait:module", "p", 1))
  end)
end)
