-- wxd.store: the same specs against both backends (a shared dictionary,
-- and the redis-server of spec/run.sh), which proves their semantics equal.
local wxd = require "wxd"
local store = require "wxd.store"
local H = require "helpers"

local backends = {
  { name = "memory", cfg = { backend = "memory" } },
  { name = "redis", cfg = function()
    return { backend = "redis", redis = H.redis_url(), prefix = "spec:" .. wxd.now() .. ":" }
  end },
}

for _, b in ipairs(backends) do
  describe("wxd.store (" .. b.name .. ")", function()
    local s
    setup(function()
      s = store.new(type(b.cfg) == "function" and b.cfg() or b.cfg)
      assert.equal(b.name, s.backend)
    end)

    it("gets, sets with a TTL, and deletes", function()
      assert.is_true(s:set("s:a", "one"))
      assert.equal("one", s:get("s:a"))
      -- Half a second, so a descheduled spec still finds the value; the
      -- expiry is then waited for.
      assert.is_true(s:set("s:b", 42, 0.5))
      assert.equal(42, s:get("s:b"))
      wxd.sleep(500)
      H.wait_until(function() return s:get("s:b") == nil end, 5, "the expiry")
      assert.is_true(s:delete("s:a"))
      assert.is_nil(s:get("s:a"))
      assert.is_true(s:delete("s:never"))
      s:set("s:c", "x")
      assert.is_true(s:set("s:c", nil)) -- nil deletes
      assert.is_nil(s:get("s:c"))
    end)

    it("gives values back with their type", function()
      local values = { "", "text", "42", "s", "n1", "t", 0, -7, 0.1, 1 / 3, 2 ^ 53, -1.5e300, true, false,
                       "\0bin\255" }
      for i, v in ipairs(values) do
        assert.is_true(s:set("s:typed:" .. i, v))
        local got = s:get("s:typed:" .. i)
        assert.equal(type(v), type(got))
        assert.equal(v, got)
      end
    end)

    it("adds only when absent (deduplication)", function()
      assert.is_true(s:add("s:msg:1", true, 30))
      local ok, err = s:add("s:msg:1", true, 30)
      assert.is_nil(ok)
      assert.equal("exists", err)
      assert.is_true(s:get("s:msg:1"))
      assert.is_true(s:add("s:msg:2", "v", 0.05))
      wxd.sleep(80)
      assert.is_true(s:add("s:msg:2", "w"))
      assert.equal("w", s:get("s:msg:2"))
    end)

    it("counts, with a TTL given when the counter is made", function()
      assert.equal(1, s:incr("s:n"))
      assert.equal(6, s:incr("s:n", 5))
      assert.equal(5.5, s:incr("s:n", -0.5))
      s:set("s:str", "x")
      local v, err = s:incr("s:str")
      assert.is_nil(v)
      assert.equal("not a number", err)
      s:set("s:bool", true)
      assert.equal("not a number", select(2, s:incr("s:bool")))
      s:set("s:numstr", "5") -- a string, even if it looks like a number
      assert.equal("not a number", select(2, s:incr("s:numstr")))
      assert.equal(2, s:incr("s:short", 2, 0.5))
      assert.equal(3, s:incr("s:short")) -- keeps its TTL
      wxd.sleep(500)
      H.wait_until(function() return s:get("s:short") == nil end, 5, "the expiry")
    end)

    it("counts exactly under concurrency", function()
      local done = 0
      for _ = 1, 200 do
        wxd.timer.after(0, function()
          s:incr("s:race")
          done = done + 1
        end)
      end
      H.wait_until(function() return done == 200 end, 10, "200 increments")
      assert.equal(200, s:get("s:race"))
    end)

    it("compares and sets atomically", function()
      s:set("s:token", "t1")
      assert.is_true(s:cas("s:token", "t1", "t2"))
      local ok, err = s:cas("s:token", "t1", "t3")
      assert.is_nil(ok)
      assert.equal("mismatch", err)
      assert.equal("t2", s:get("s:token"))
      -- nil as old: only when absent; nil as new: delete.
      assert.is_true(s:cas("s:fresh", nil, "v"))
      assert.equal("mismatch", select(2, s:cas("s:fresh", nil, "w")))
      assert.is_true(s:cas("s:fresh", "v", nil))
      assert.is_nil(s:get("s:fresh"))
      -- Types count: 1 is not "1", true is not "t".
      s:set("s:typed", 1)
      assert.equal("mismatch", select(2, s:cas("s:typed", "1", 2)))
      assert.is_true(s:cas("s:typed", 1, 2))
      assert.equal(2, s:get("s:typed"))
      s:set("s:flag", true)
      assert.equal("mismatch", select(2, s:cas("s:flag", "t", false)))
      assert.is_true(s:cas("s:flag", true, false))
      assert.is_false(s:get("s:flag"))
      -- With a TTL on the new value.
      assert.is_true(s:cas("s:flag", false, "gone soon", 0.05))
      wxd.sleep(80)
      assert.is_nil(s:get("s:flag"))
    end)

    it("tells the TTL left", function()
      s:set("s:ttl", "v", 10)
      local left = s:ttl("s:ttl")
      assert.is_true(left > 9 and left <= 10, tostring(left))
      s:set("s:nottl", "v")
      assert.equal(0, s:ttl("s:nottl"))
      local v, err = s:ttl("s:absent")
      assert.is_nil(v)
      assert.equal("not found", err)
    end)

    it("locks across coroutines, with a timeout", function()
      local lk = assert(s:lock("s:job", { timeout = 0.2, expire = 5 }))
      assert.equal("s:job", lk:held())
      local got, err
      wxd.timer.after(0, function() got, err = s:lock("s:job", { timeout = 0.05 }) end)
      H.wait_until(function() return err end, 5, "the waiter's timeout")
      assert.is_nil(got)
      assert.equal("timeout", err)
      assert.is_true(lk:unlock())
      assert.is_nil(lk:held())
      assert.equal("not locked", select(2, lk:unlock()))
      local again = assert(s:lock("s:job"))
      again:unlock()
    end)

    it("hands a lock to a waiter when it is released", function()
      local lk = assert(s:lock("s:handoff"))
      local got
      wxd.timer.after(0, function() got = s:lock("s:handoff", { timeout = 2 }) end)
      wxd.sleep(30)
      assert.is_nil(got)
      lk:unlock()
      H.wait_until(function() return got end, 2, "the waiter to get the lock")
      got:unlock()
    end)

    it("lets a lock expire, and then unlock says so", function()
      local lk = assert(s:lock("s:short", { expire = 0.05 }))
      wxd.sleep(80)
      local other = assert(s:lock("s:short", { timeout = 0 }))
      local ok, err = lk:unlock()
      assert.is_nil(ok)
      assert.equal("expired", err)
      assert.is_true(other:unlock()) -- the other holder's lock was left alone
    end)

    it("raises on misuse", function()
      assert.has_error(function() s:get(nil) end)
      assert.has_error(function() s:set("", 1) end)
      assert.has_error(function() s:set("s:t", {}) end)
      assert.has_error(function() s:add("s:t", nil) end)
      assert.has_error(function() s:set("s:t", 1, "10") end)
      assert.has_error(function() s:set("s:t", 1, -1) end)
      assert.has_error(function() s:incr("s:n", "1") end)
      assert.has_error(function() s:cas("s:t", {}, 1) end)
      assert.has_error(function() s:lock("s:t", { timeout = -1 }) end)
      assert.has_error(function() s:lock("s:t", { expire = 0 }) end)
      assert.has_error(function() s:lock("s:t", 5) end)
    end)
  end)
end

describe("wxd.store", function()
  it("uses the memory backend by default, through the module's functions", function()
    assert.is_true(store.set("m:a", "one"))
    assert.equal("one", store.get("m:a"))
    assert.equal(1, store.incr("m:n"))
    local lk = assert(store.lock("m:lock"))
    assert.is_true(lk:unlock())
  end)

  it("refuses an unknown backend and a redis backend without a URL", function()
    assert.has_error(function() store.new({ backend = "mongo" }) end,
      'wxd.store: unknown backend "mongo" (expected "memory" or "redis")')
    local saved = wxd.config
    wxd.config = {}
    local ok, err = pcall(store.new, { backend = "redis" })
    wxd.config = saved
    assert.is_false(ok)
    assert.matches('needs redis = "redis://..."', err, 1, true)
    assert.has_error(function() store.new({ backend = "redis", redis = "http://x" }) end)
    assert.has_error(function() store.new({ backend = "redis", redis = H.redis_url(), prefix = 1 }) end)
    assert.has_error(function() store.new("memory") end)
  end)

  it("with Redis down, fails with the error of wxd.redis", function()
    local s = store.new({ backend = "redis", redis = "redis://127.0.0.1:" .. H.free_port() })
    local v, err = s:get("k")
    assert.is_nil(v)
    assert.equal("connect", err)
    assert.equal("connect", select(2, s:set("k", 1)))
    assert.equal("connect", select(2, s:lock("k")))
  end)
end)
