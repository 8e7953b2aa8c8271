-- wxd.shdict in-process: `wxd script` has no app config, so the specs
-- declare their dictionaries (a server takes them from config.lua; the
-- cross-thread side is in spec/02-integration/07-shdict_spec.lua).
local wxd = require "wxd"
local H = require "helpers"
local shdict = require "wxd.shdict"
local config = require "wxd.config"

-- What one entry of `klen` + `vlen` bytes costs, measured on an empty dict.
local function charge(d, klen, vlen)
  d:flush_all()
  assert(d:set(string.rep("k", klen), string.rep("v", vlen)))
  local used = d:stats().used
  d:flush_all()
  return used
end

describe("wxd.shdict", function()
  local d
  before_each(function()
    d = shdict.declare("unit", "1m")
    d:flush_all()
  end)

  describe("declare and get_dict", function()
    it("finds a declared dictionary, the same object each time", function()
      assert.equal(d, shdict.get_dict("unit"))
      assert.equal(d, shdict.declare("unit", 1048576), "declaring again with the same size")
      assert.equal('wxd.shdict "unit"', tostring(d))
      assert.truthy(table.concat(shdict.names(), ","):find("unit", 1, true))
    end)

    it("returns nil, \"no such shdict\" for an undeclared name", function()
      local x, err = shdict.get_dict("never_declared")
      assert.is_nil(x)
      assert.equal("no such shdict", err)
      assert.has_error(function() shdict.get_dict(42) end)
    end)

    it("creates a dictionary named in wxd.config.shdict (a spec that loaded an app's config)", function()
      local saved = wxd.config
      wxd.config = assert(config.validate({ shdict = { from_config = "128k" } }))
      local c = shdict.get_dict("from_config")
      wxd.config = saved
      assert.truthy(c)
      assert.equal(131072, c:stats().capacity)
    end)

    it("accepts sizes as bytes or with k/m/g, and refuses bad names and sizes", function()
      assert.equal(65536, shdict.declare("sz_a", 65536):stats().capacity)
      assert.equal(65536, shdict.declare("sz_b", "64k"):stats().capacity)
      assert.equal(2 * 1024 * 1024, shdict.declare("sz_c", "2M"):stats().capacity)
      assert.equal(1024 ^ 3, shdict.declare("sz_d", "1g"):stats().capacity)
      assert.has_error(function() shdict.declare("small", "63k") end,
        'wxd.shdict.declare: shdict "small": size must be 64k..1024g')
      assert.has_error(function() shdict.declare("bad", "10x") end)
      assert.has_error(function() shdict.declare("bad", 65536.5) end)
      assert.has_error(function() shdict.declare("Bad", "1m") end)
      assert.has_error(function() shdict.declare("1bad", "1m") end)
      assert.has_error(function() shdict.declare("bad-name", "1m") end)
      assert.has_error(function() shdict.declare(string.rep("a", 64), "1m") end)
      assert.has_error(function() shdict.declare("unit", "2m") end,
        'wxd.shdict.declare: shdict "unit" is already declared with 1048576 bytes')
    end)
  end)

  describe("values", function()
    it("stores copies of strings, numbers and booleans, with their type", function()
      local bin = "a\0b\255\n" .. string.rep("x", 5000)
      local cases = { "text", "", bin, 0, 42, -7.25, 2 ^ 53, 1e300, -1 / 0, true, false }
      for i, v in ipairs(cases) do
        assert.is_true(d:set("k" .. i, v))
      end
      for i, v in ipairs(cases) do
        local got = d:get("k" .. i)
        assert.equal(type(v), type(got))
        assert.equal(v, got)
      end
      d:set("nan", 0 / 0)
      local nan = d:get("nan")
      assert.is_true(nan ~= nan)
    end)

    it("overwrites with another type or size", function()
      d:set("k", "short")
      d:set("k", 12)
      assert.equal(12, d:get("k"))
      d:set("k", string.rep("z", 3000))
      assert.equal(3000, #d:get("k"))
      d:set("k", false)
      assert.equal(false, d:get("k"))
      assert.equal(1, d:stats().count)
    end)

    it("raises for tables, functions and other types, telling to encode", function()
      for _, v in ipairs({ {}, function() end, coroutine.create(function() end), io.stdout }) do
        local ok, err = pcall(function() d:set("k", v) end)
        assert.is_false(ok)
        assert.truthy(err:find("bad argument #2 to 'set'", 1, true), err)
        assert.truthy(err:find("encode", 1, true), err)
      end
      assert.has_error(function() d:add("k", {}) end)
      assert.has_error(function() d:replace("k", {}) end)
      assert.has_error(function() d:add("k", nil) end)
    end)

    it("treats set(key, nil) as delete", function()
      d:set("k", 1)
      assert.is_true(d:set("k", nil))
      assert.is_nil(d:get("k"))
    end)
  end)

  describe("keys", function()
    it("are strings of 1..65535 bytes; other types raise", function()
      local long = string.rep("k", 65535)
      assert.is_true(d:set(long, 1))
      assert.equal(1, d:get(long))
      assert.has_error(function() d:get(string.rep("k", 65536)) end, "bad argument #1 to 'get' (a key is 1..65535 bytes)")
      assert.has_error(function() d:get("") end)
      assert.has_error(function() d:get(1) end)
      assert.has_error(function() d:set(true, 1) end)
      assert.has_error(function() d:get() end)
      assert.equal(2, d:set("a\0b", 2) and d:get("a\0b"))
      assert.is_nil(d:get("a"))
    end)
  end)

  describe("operations", function()
    it("get returns nil for a missing key", function()
      assert.is_nil(d:get("missing"))
    end)

    it("add sets only when absent", function()
      assert.is_true(d:add("k", "first"))
      local ok, err = d:add("k", "second")
      assert.is_nil(ok)
      assert.equal("exists", err)
      assert.equal("first", d:get("k"))
    end)

    it("add succeeds over an expired entry", function()
      d:set("k", "old", 0.01)
      wxd.sleep(20)
      assert.is_true(d:add("k", "new"))
      assert.equal("new", d:get("k"))
    end)

    it("replace sets only when present", function()
      local ok, err = d:replace("k", 1)
      assert.is_nil(ok)
      assert.equal("not found", err)
      d:set("k", 1)
      assert.is_true(d:replace("k", 2))
      assert.equal(2, d:get("k"))
    end)

    it("incr adds to numbers, with init and init_ttl for a missing key", function()
      local v, err = d:incr("n", 1)
      assert.is_nil(v)
      assert.equal("not found", err)
      assert.equal(11, d:incr("n", 1, 10))
      assert.equal(12, d:incr("n"))
      assert.equal(9.5, d:incr("n", -2.5))
      assert.equal(0, d:ttl("n"))
      -- TTLs long enough that a descheduled spec cannot see the key expire
      -- between two lines; the expiry itself is waited for.
      assert.equal(5, d:incr("t", 5, 0, 0.5))
      assert.is_true(d:ttl("t") > 0)
      assert.equal(6, d:incr("t", 1, 0, 100), "an existing key keeps its TTL")
      local left = d:ttl("t")
      assert.is_true(left == nil or left <= 0.5, "TTL " .. tostring(left))
      local t0 = wxd.monotonic_ms()
      while d:get("t") ~= nil and wxd.monotonic_ms() - t0 < 5000 do wxd.sleep(20) end
      assert.is_nil(d:get("t"))
      assert.is_true(wxd.monotonic_ms() - t0 < 5000, "the 0.5 s TTL ended")
      d:set("s", "12")
      v, err = d:incr("s", 1)
      assert.is_nil(v)
      assert.equal("not a number", err)
      d:set("b", true)
      assert.equal("not a number", select(2, d:incr("b", 1, 0)))
      assert.has_error(function() d:incr("n", "1") end)
      assert.has_error(function() d:incr("n", 1, "0") end)
    end)

    it("delete removes a key and returns true either way", function()
      d:set("k", 1)
      assert.is_true(d:delete("k"))
      assert.is_nil(d:get("k"))
      assert.is_true(d:delete("k"))
    end)

    it("flush_all empties the dictionary", function()
      for i = 1, 50 do d:set("k" .. i, i) end
      d:flush_all()
      local s = d:stats()
      assert.equal(0, s.count)
      assert.equal(0, s.used)
      assert.same({}, d:keys(0))
    end)

    it("stats report name, capacity, used bytes, count, evictions and expired", function()
      d:set("a", "xyz")
      local s = d:stats()
      assert.equal("unit", s.name)
      assert.equal(1048576, s.capacity)
      assert.equal(1, s.count)
      assert.is_true(s.used > 3 and s.used < 200, "one small entry costs " .. s.used)
      assert.is_number(s.evictions)
      assert.is_number(s.expired)
    end)

    it("keys lists live keys, most recently used first, up to max (default 1024, 0: all)", function()
      for i = 1, 5 do d:set("k" .. i, i) end
      d:get("k2")
      assert.same({ "k2", "k5", "k4", "k3", "k1" }, d:keys())
      assert.same({ "k2", "k5" }, d:keys(2))
      d:set("gone", 1, 0.01)
      wxd.sleep(20)
      assert.same({ "k2", "k5", "k4", "k3", "k1" }, d:keys(0))
      for i = 1, 1500 do d:set("m" .. i, i) end
      assert.equal(1024, #d:keys())
      assert.equal(1505, #d:keys(0))
      assert.has_error(function() d:keys(-1) end)
    end)
  end)

  describe("TTL", function()
    it("expires entries (fractions of a second allowed)", function()
      -- Half a second: a descheduled spec cannot miss the entry before the
      -- checks; the expiry is then waited for, not slept for.
      assert.is_true(d:set("k", "v", 0.5))
      assert.equal("v", d:get("k"))
      local ttl = d:ttl("k")
      assert.is_true(ttl > 0 and ttl <= 0.5, tostring(ttl))
      wxd.sleep(500)
      H.wait_until(function() return d:get("k") == nil end, 5, "the expiry")
      local t, err = d:ttl("k")
      assert.is_nil(t)
      assert.equal("not found", err)
      assert.equal(0, d:stats().count, "an expired entry met by a lookup is dropped")
    end)

    it("0 or nil means no TTL, and a later set without TTL clears it", function()
      d:set("a", 1, 0)
      d:set("b", 1)
      assert.equal(0, d:ttl("a"))
      assert.equal(0, d:ttl("b"))
      d:set("c", 1, 0.02)
      d:set("c", 2)
      wxd.sleep(30)
      assert.equal(2, d:get("c"))
      d:set("e", "x", 0.5)
      assert.is_true(d:replace("e", "y", 10))
      wxd.sleep(550)
      assert.equal("y", d:get("e"), "replace sets the new TTL")
    end)

    it("refuses negative or absurd TTLs", function()
      assert.has_error(function() d:set("k", 1, -1) end, "bad argument #3 to 'set' (expected a TTL in seconds, 0..1e9)")
      assert.has_error(function() d:set("k", 1, 1e10) end)
      assert.has_error(function() d:set("k", 1, "10") end)
      assert.has_error(function() d:set("k", 1, 0 / 0) end)
    end)
  end)

  describe("memory cap", function()
    local small
    before_each(function()
      small = shdict.declare("small", "64k")
      small:flush_all()
    end)

    it("evicts the least recently used entries, never exceeding the cap", function()
      local cost = charge(small, 4, 1000) -- keys "k001".."k999"
      local cap = small:stats().capacity
      local fit = math.floor(cap / cost)
      assert.is_true(fit >= 40 and fit < 64, "1000-byte values that fit in 64k: " .. fit)
      local ev0 = small:stats().evictions
      local payload = string.rep("v", 1000)
      for i = 1, 30 do assert.is_true(small:set(string.format("k%03d", i), payload)) end
      assert.equal(payload, small:get("k001")) -- k001 is now the most recently used
      local total = fit + 20
      for i = 31, total do
        assert.is_true(small:set(string.format("k%03d", i), payload))
        assert.is_true(small:stats().used <= cap)
      end
      local s = small:stats()
      assert.equal(fit, s.count)
      assert.is_true(s.used <= cap and s.used > cap - cost, "used " .. s.used .. " of " .. cap)
      assert.equal(total - fit, s.evictions - ev0)
      -- The oldest untouched keys went first; the touched one stayed.
      assert.equal(payload, small:get("k001"))
      for i = 2, total - fit + 1 do assert.is_nil(small:get(string.format("k%03d", i)), "k" .. i) end
      for i = total - fit + 2, total do assert.equal(payload, small:get(string.format("k%03d", i))) end
    end)

    it("reclaims expired entries before evicting live ones", function()
      local cost = charge(small, 4, 1000)
      local cap = small:stats().capacity
      local fit = math.floor(cap / cost)
      local payload = string.rep("v", 1000)
      for i = 1, 10 do small:set(string.format("t%03d", i), payload, 0.02) end
      for i = 11, fit do small:set(string.format("k%03d", i), payload) end
      wxd.sleep(30)
      local s0 = small:stats()
      for i = 1, 10 do small:set(string.format("n%03d", i), payload) end
      local s = small:stats()
      assert.equal(s0.evictions, s.evictions, "no live entry was evicted")
      assert.equal(10, s.expired - s0.expired)
      assert.equal(fit, s.count)
      assert.equal(payload, small:get(string.format("k%03d", 11)), "the oldest live entry is still there")
    end)

    it("refuses a value larger than the whole cap, keeping the old one", function()
      local base = charge(small, 1, 0) -- an entry with a 1-byte key and an empty value
      small:set("k", "old")
      small:set("other", 1)
      local ok, err = small:set("k", string.rep("x", 65536))
      assert.is_nil(ok)
      assert.equal("no memory", err)
      assert.equal("old", small:get("k"))
      assert.equal(1, small:get("other"), "nothing was evicted for it")
      assert.equal("no memory", select(2, small:add("big", string.rep("x", 70000))))
      -- A value that just fits (charges are rounded up to 16 bytes) evicts
      -- everything else.
      assert.is_true(small:set("k", string.rep("x", 65536 - base - 15)))
      assert.is_nil(small:get("other"))
      assert.equal(1, small:stats().count)
      assert.is_true(small:stats().used <= 65536)
    end)

    it("keeps count and bytes right through many overwrites and deletes", function()
      local cap = small:stats().capacity
      math.randomseed(7)
      for i = 1, 5000 do
        local k = "k" .. math.random(1, 200)
        local r = math.random()
        if r < 0.5 then small:set(k, string.rep("x", math.random(0, 2000)), math.random() < 0.2 and 0.001 or 0)
        elseif r < 0.7 then small:incr(k, 1, 0)
        elseif r < 0.8 then small:delete(k)
        else small:get(k) end
        if i % 500 == 0 then assert.is_true(small:stats().used <= cap) end
      end
      small:flush_all()
      assert.equal(0, small:stats().used)
    end)
  end)
end)

describe("config: the shdict section", function()
  local function fails(t, fragment)
    local cfg, err = config.validate(t)
    assert.is_nil(cfg)
    assert.truthy(err:find(fragment, 1, true), "expected\n  " .. fragment .. "\nin\n  " .. tostring(err))
  end

  it("normalises sizes to bytes", function()
    local cfg = assert(config.validate({ shdict = { cache = "10m", sessions = 1048576, tiny = "64K", big = "1g" } }))
    assert.same({ cache = 10485760, sessions = 1048576, tiny = 65536, big = 1073741824 }, cfg.shdict)
  end)

  it("reads sizes from the environment", function()
    local cfg = assert(config.validate({ shdict = { cache = config.env("CACHE_SIZE") } },
      { getenv = function() return "2m" end }))
    assert.equal(2097152, cfg.shdict.cache)
  end)

  it("names the key in each error", function()
    fails({ shdict = "10m" }, 'config.shdict: expected a table, got "10m"')
    fails({ shdict = { cache = "10x" } },
      'config.shdict.cache: expected a size in bytes (an integer, or a string such as "64k" or "10m"), got "10x"')
    fails({ shdict = { cache = 1.5 } }, "config.shdict.cache: expected a size in bytes")
    fails({ shdict = { cache = true } }, "config.shdict.cache: expected a size in bytes")
    fails({ shdict = { cache = 1000 } }, "config.shdict.cache: must be at least 64k (65536 bytes), got 1000")
    fails({ shdict = { cache = "2000g" } }, 'config.shdict.cache: must be at most 1024g, got "2000g"')
    fails({ shdict = { ["Bad-Name"] = "1m" } }, 'config.shdict["Bad-Name"]: a dictionary name is 1..63 of a-z')
    fails({ shdict = { "1m" } }, "config.shdict[1]: a dictionary name is")
    fails({ shdict = { ["9lives"] = "1m" } }, 'config.shdict["9lives"]: a dictionary name')
    local many = {}
    for i = 1, 33 do many["d" .. i] = "64k" end
    fails({ shdict = many }, "config.shdict: at most 32 dictionaries, got 33")
  end)

  it("parse_size reads bytes and k/m/g strings", function()
    assert.equal(4096, config.parse_size(4096))
    assert.equal(4096, config.parse_size("4096"))
    assert.equal(65536, config.parse_size("64k"))
    assert.equal(3 * 1024 ^ 3, config.parse_size("3G"))
    assert.is_nil(config.parse_size("1.5m"))
    assert.is_nil(config.parse_size("m"))
    assert.is_nil(config.parse_size(-1))
    assert.is_nil(config.parse_size({}))
  end)
end)
