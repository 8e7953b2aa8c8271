-- wxd.limit in-process: the arithmetic of both kinds at chosen instants
-- (the core's take accepts a time for specs), reclaiming of idle keys and
-- the bound on memory with a million distinct keys. The cross-worker and
-- cross-node sides are in spec/02-integration/22-limit_spec.lua.
local limit = require "wxd.limit"

local n = 0
local function fresh(opts)
  n = n + 1
  return assert(limit.new("unit_" .. n .. "_" .. tostring(os.time()), opts))
end

describe("wxd.limit", function()
  describe("token bucket", function()
    it("allows burst at once, then rate per second, with the headers' numbers", function()
      local lim = fresh({ rate = 50, burst = 10 })
      local c = lim._c
      for i = 1, 10 do
        local ok, remaining = c:take("k", 1, 100)
        assert.is_true(ok, "request " .. i)
        assert.equal(10 - i, remaining)
      end
      local ok, remaining, reset, retry = c:take("k", 1, 100)
      assert.is_false(ok)
      assert.equal(0, remaining)
      assert.near(0.2, reset, 1e-6)        -- 10 tokens at 50/s
      assert.near(0.02, retry, 1e-6)       -- one token
      -- 20 ms later exactly one more token
      assert.is_true((c:take("k", 1, 100.02)))
      assert.is_false((c:take("k", 1, 100.02)))
      -- over one second: 50 more
      local got = 0
      for i = 1, 1000 do
        if c:take("k", 1, 100.02 + i * 0.001) then got = got + 1 end
      end
      assert.equal(50, got)
    end)

    it("keeps keys apart and counts cost", function()
      local c = fresh({ rate = 1, burst = 5 })._c
      assert.is_true((c:take("a", 5, 10)))
      assert.is_false((c:take("a", 1, 10)))
      assert.is_true((c:take("b", 3, 10)))
      local ok, remaining = c:take("b", 3, 10)
      assert.is_false(ok)
      assert.equal(2, remaining)
      local _, _, _, retry = c:take("b", 3, 10)
      assert.near(1, retry, 1e-6)
    end)

    it("the same name is the same limiter; new parameters replace the old ones", function()
      local name = "unit_same_" .. os.time()
      local a = assert(limit.new(name, { rate = 1, burst = 1 }))
      local b = assert(limit.new(name, { rate = 1, burst = 1 }))
      assert.equal(a._c, b._c)
      assert.is_true((a._c:take("k", 1, 5)))
      assert.is_false((b._c:take("k", 1, 5)))
      limit.new(name, { rate = 1, burst = 2 })
      assert.is_true((b._c:take("k", 1, 5)))
      assert.has_error(function() limit.new(name, { limit = 1, window = 1 }) end)
    end)
  end)

  describe("sliding window", function()
    it("weights the previous window by its overlap", function()
      local c = fresh({ limit = 10, window = 1 })._c
      for _ = 1, 10 do assert.is_true((c:take("k", 1, 50.5))) end
      local ok, _, _, retry = c:take("k", 1, 50.5)
      assert.is_false(ok)
      -- the next window starts at 51; at 51 + x the estimate is 10 * (1 - x)
      assert.near(0.5 + 0.1, retry, 1e-6)
      assert.is_false((c:take("k", 1, 51.05)))  -- 9.5 + 1 > 10
      assert.is_true((c:take("k", 1, 51.1)))    -- 9 + 1
      assert.is_false((c:take("k", 1, 51.1)))
      -- two windows later it is forgotten
      local ok2, remaining = c:take("k", 1, 53)
      assert.is_true(ok2)
      assert.equal(9, remaining)
    end)
  end)

  describe("memory", function()
    it("reclaims idle keys as it goes: a million distinct keys stay within a bounded table", function()
      -- 1000/s, burst 1: a key is idle again 1 ms after its request.
      local lim = fresh({ rate = 1000, burst = 1 })
      local c = lim._c
      local t0, peak = 1000, 0
      for i = 1, 1e6 do
        assert.is_true((c:take("client-" .. i, 1, t0 + i * 1e-4))) -- 10 new keys per ms
        if i % 1e5 == 0 then peak = math.max(peak, c:stats().keys) end
      end
      local st = lim:stats()
      assert.truthy(peak <= 20, "live keys " .. peak)
      assert.truthy(st.reclaimed >= 1e6 - 20)
      assert.equal(0, st.evictions)
      print(string.format("\n  1e6 keys, idle after 1 ms: %d kept, %d bytes, %d reclaimed", st.keys, st.bytes, st.reclaimed))
    end)

    it("evicts the least recently used keys beyond max_keys: a million live keys cost at most max_keys entries", function()
      local lim = fresh({ rate = 1, burst = 10, max_keys = 100000 })
      local c = lim._c
      for i = 1, 1e6 do
        c:take("client-" .. i, 1, 2000)
      end
      local st = lim:stats()
      assert.equal(100000, st.keys)
      assert.equal(900000, st.evictions)
      -- ~100 bytes per key of 13 bytes, the bucket array included
      assert.truthy(st.bytes < 100000 * 128, "bytes " .. st.bytes)
      print(string.format("\n  1e6 live keys, max_keys 1e5: %d kept, %d bytes (%.0f per key), %d evicted",
        st.keys, st.bytes, st.bytes / st.keys, st.evictions))
      -- most recent survive, oldest went: the last key still has 9 tokens taken... and the first is fresh
      local ok, remaining = c:take("client-1000000", 1, 2000)
      assert.is_true(ok)
      assert.equal(8, remaining)
      ok, remaining = c:take("client-1", 1, 2000)
      assert.is_true(ok)
      assert.equal(9, remaining)
      -- once idle, sweep drops them all
      assert.equal(100000, c:sweep(3000))
      assert.equal(0, lim:stats().keys)
    end)
  end)

  describe("middleware", function()
    local function req(addr) return { remote_addr = addr } end
    local function res() return { headers = {} } end

    it("answers 429 with Retry-After and RateLimit-* headers", function()
      local mw = limit.middleware({ name = "unit_mw_" .. os.time(), rate = 1, burst = 2 })
      local r1 = res()
      assert.is_nil(mw(req("1.2.3.4"), r1))
      assert.equal("2", r1.headers["ratelimit-limit"])
      assert.equal("1", r1.headers["ratelimit-remaining"])
      assert.is_nil(mw(req("1.2.3.4"), res()))
      local r3 = res()
      local status, body = mw(req("1.2.3.4"), r3)
      assert.equal(429, status)
      assert.truthy(body)
      assert.equal("1", r3.headers["retry-after"])
      assert.equal("0", r3.headers["ratelimit-remaining"])
      assert.equal("2", r3.headers["ratelimit-reset"])
      assert.is_nil(mw(req("5.6.7.8"), res()), "another address has its own bucket")
    end)

    it("does not limit a nil key, and raises on misuse", function()
      local mw = limit.middleware({ name = "unit_mw2_" .. os.time(), rate = 1, burst = 1, key = function() return nil end })
      for _ = 1, 5 do assert.is_nil(mw(req("x"), res())) end
      assert.has_error(function() limit.middleware({}) end)
      assert.has_error(function() limit.new("x", { rate = -1 }) end)
      assert.has_error(function() limit.new("x", {}) end)
    end)
  end)
end)
