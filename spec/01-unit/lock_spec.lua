-- wxd.lock in-process: coroutines of one script contend through timer
-- callbacks (each runs in its own wxd coroutine and may wait). Across
-- worker threads: spec/02-integration/07-shdict_spec.lua.
local wxd = require "wxd"
local shdict = require "wxd.shdict"
local lock = require "wxd.lock"

local function now() return wxd.monotonic_ms() end

-- Runs fn(i) in n timer coroutines and waits until all returned.
local function run_all(n, fn, timeout_ms)
  local done = 0
  for i = 1, n do
    wxd.timer.after(0, function()
      local ok, err = pcall(fn, i)
      done = done + 1
      if not ok then error(err) end
    end)
  end
  local deadline = now() + (timeout_ms or 5000)
  while done < n and now() < deadline do wxd.sleep(5) end
  assert.equal(n, done, "every coroutine finished")
end

describe("wxd.lock", function()
  local d
  before_each(function()
    d = shdict.declare("locks", "1m")
    d:flush_all()
  end)

  it("excludes every other holder from the critical section", function()
    local counter, inside, overlap = 0, 0, false
    run_all(5, function()
      local lk = lock.new("locks", { timeout = 5, expire = 5 })
      for _ = 1, 4 do
        assert(lk:lock("counter"))
        inside = inside + 1
        if inside > 1 then overlap = true end
        local v = counter
        wxd.sleep(3) -- everyone else runs meanwhile
        counter = v + 1
        inside = inside - 1
        assert.is_true(lk:unlock())
      end
    end)
    assert.is_false(overlap)
    assert.equal(20, counter)
    assert.is_nil(d:get("counter"), "nothing left behind")
  end)

  it("wakes a waiter when the holder unlocks, not at a poll interval", function()
    -- A loaded machine may delay any single wake-up, so this looks at the
    -- median of several: a waiter that polled (or waited for its 2 s
    -- timeout) would be late on most rounds, not on one.
    local lags = {}
    for round = 1, 5 do
      local acquired_at
      local holder = lock.new("locks", { expire = 10 })
      assert(holder:lock("k"))
      wxd.timer.after(0, function()
        local lk = lock.new("locks", { timeout = 2 })
        assert(lk:lock("k"))
        acquired_at = now()
        lk:unlock()
      end)
      wxd.sleep(30)
      local unlocked_at = now()
      assert.is_true(holder:unlock())
      while not acquired_at and now() - unlocked_at < 3000 do wxd.sleep(1) end
      assert.truthy(acquired_at, "round " .. round .. ": the waiter got the lock")
      lags[round] = acquired_at - unlocked_at
      assert.is_true(lags[round] >= 0)
    end
    table.sort(lags)
    assert.is_true(lags[3] < 50, string.format("median wake-up %.2f ms after the unlock (%s)",
      lags[3], table.concat(lags, ", ")))
  end)

  it("wakes a waiter when the key is deleted or flushed", function()
    for _, remove in ipairs({ function() d:delete("k") end, function() d:flush_all() end }) do
      local holder = lock.new("locks", { expire = 10 })
      assert(holder:lock("k"))
      local got
      wxd.timer.after(0, function()
        local lk = lock.new("locks", { timeout = 2 })
        got = lk:lock("k") and now()
        lk:unlock()
      end)
      wxd.sleep(30)
      local t0 = now()
      remove()
      while not got and now() - t0 < 3000 do wxd.sleep(1) end
      assert.truthy(got)
      -- Long before the waiter's 2 s timeout or the holder's 10 s expiry.
      assert.is_true(got - t0 < 1000, string.format("woken %.2f ms after the removal", got - t0))
      assert.equal("expired", select(2, holder:unlock()), "its lock was removed")
    end
  end)

  it("times out with nil, \"timeout\"", function()
    local holder = lock.new("locks")
    assert(holder:lock("k"))
    local lk = lock.new("locks", { timeout = 0.05 })
    local t0 = now()
    local ok, err = lk:lock("k")
    local waited = now() - t0
    assert.is_nil(ok)
    assert.equal("timeout", err)
    -- Never early; late only by what a loaded machine adds (the holder's
    -- lock lasts 30 s, so this is the waiter's own timeout).
    assert.is_true(waited >= 49 and waited < 2000, "waited " .. waited .. " ms")
    assert.is_nil(lk:held())
    -- timeout = 0: one try, no wait.
    t0 = now()
    assert.equal("timeout", select(2, lock.new("locks", { timeout = 0 }):lock("k")))
    assert.is_true(now() - t0 < 1000, "no wait (the default timeout is 5 s)")
    holder:unlock()
  end)

  it("expires a lock whose holder never unlocks; the waiter gets it then", function()
    local dead = lock.new("locks", { expire = 0.05 })
    assert(dead:lock("k"))
    local t0 = now()
    local lk = lock.new("locks", { timeout = 2, expire = 5 })
    assert.is_true(lk:lock("k"))
    local waited = now() - t0
    assert.is_true(waited >= 45 and waited < 120, "acquired after " .. waited .. " ms")
    -- The late holder cannot release what is no longer its lock.
    local ok, err = dead:unlock()
    assert.is_nil(ok)
    assert.equal("expired", err)
    assert.equal(lk.token, d:get("k"), "the new holder keeps it")
    assert.is_true(lk:unlock())
    assert.is_nil(d:get("k"))
  end)

  it("lets only the owner unlock", function()
    local a = lock.new("locks")
    local b = lock.new("locks")
    assert.are_not.equal(a.token, b.token)
    assert.equal(32, #a.token)
    assert(a:lock("k"))
    local ok, err = b:unlock()
    assert.is_nil(ok)
    assert.equal("not locked", err)
    -- Even with the key in hand, another token does not delete it.
    b.key = "k"
    assert.equal("expired", select(2, b:unlock()))
    assert.equal(a.token, d:get("k"))
    assert.is_true(a:unlock())
    assert.equal("not locked", select(2, a:unlock()))
  end)

  it("holds one key per object", function()
    local lk = lock.new("locks")
    assert(lk:lock("a"))
    assert.equal("a", lk:held())
    local ok, err = lk:lock("b")
    assert.is_nil(ok)
    assert.equal("already locked", err)
    assert.is_true(lk:unlock())
    assert(lk:lock("b"))
    assert.is_true(lk:unlock())
  end)

  it("stores the lock with its expiry in the dictionary", function()
    local lk = lock.new("locks", { expire = 7 })
    assert(lk:lock("k"))
    local ttl = d:ttl("k")
    assert.is_true(ttl > 6.9 and ttl <= 7)
    lk:unlock()
  end)

  it("raises when waiting is impossible: outside a wxd coroutine", function()
    local holder = lock.new("locks")
    assert(holder:lock("k"))
    local lk = lock.new("locks", { timeout = 1 })
    local ok, err = coroutine.wrap(function() return pcall(lk.lock, lk, "k") end)()
    assert.is_false(ok)
    assert.truthy(err:find("cannot wait here", 1, true), err)
    -- A free lock needs no waiting, so it works there.
    local ok2 = coroutine.wrap(function() return lk:lock("free") end)()
    assert.is_true(ok2)
    lk:unlock()
    holder:unlock()
  end)

  it("raises for a missing dictionary and bad options or keys", function()
    assert.has_error(function() lock.new("no_such_dict") end,
      'wxd.lock.new: no such shdict "no_such_dict" (declare it in config.lua: shdict = { no_such_dict = "1m" })')
    assert.has_error(function() lock.new(1) end)
    assert.has_error(function() lock.new("locks", "x") end)
    assert.has_error(function() lock.new("locks", { timeout = -1 }) end)
    assert.has_error(function() lock.new("locks", { expire = 0 }) end)
    assert.has_error(function() lock.new("locks", { expire = "5" }) end)
    assert.has_error(function() lock.new("locks"):lock(42) end)
    assert.has_error(function() lock.new("locks"):lock("") end)
  end)

  it("is reachable as wxd.lock and wxd.shdict", function()
    assert.equal(lock, wxd.lock)
    assert.equal(shdict, wxd.shdict)
  end)
end)
