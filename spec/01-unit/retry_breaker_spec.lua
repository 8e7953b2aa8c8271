-- wxd.retry and wxd.breaker in-process: the delays the code chose (with
-- an injected random, sleep and clock, so nothing depends on the wall
-- clock), the deadline, what is retried and what not; the breaker's exact
-- transitions at chosen instants (the core takes a time for specs) and its
-- retry budget. Against a real failing upstream: 02-integration/23-breaker_spec.lua.
local H = require "helpers"
local cjson = require "cjson"
local retry = require "wxd.retry"
local breaker = require "wxd.breaker"

local n = 0
local function name(what)
  n = n + 1
  return "unit_" .. what .. "_" .. n .. "_" .. os.time()
end

-- A fake clock in ms that only sleeping moves, and the waits asked for.
local function fake_time()
  local t = { now = 1000, waits = {} }
  t.clock = function() return t.now end
  t.sleep = function(s)
    t.waits[#t.waits + 1] = s
    t.now = t.now + s * 1000
  end
  return t
end

describe("wxd.retry", function()
  it("retries transient failures with exponential backoff and full jitter, within the bounds", function()
    for _ = 1, 20 do
      local t = fake_time()
      local calls = 0
      local res, err = retry.call({ attempts = 6, base = 0.1, cap = 1, sleep = t.sleep, clock = t.clock }, function()
        calls = calls + 1
        return nil, "timeout"
      end)
      assert.is_nil(res)
      assert.equal("timeout", err)
      assert.equal(6, calls)
      assert.equal(5, #t.waits)
      local bounds = { 0.1, 0.2, 0.4, 0.8, 1 } -- min(cap, base * 2^k)
      for i, w in ipairs(t.waits) do
        assert.truthy(w >= 0 and w <= bounds[i] + 1e-12, "wait " .. i .. " = " .. w)
      end
    end
  end)

  it("the upper bound is reached with random() = 1 (so the jitter is full, not partial)", function()
    local t = fake_time()
    local seen = {}
    retry.call({ attempts = 5, base = 0.05, cap = 0.3, random = function() return 1 end, sleep = t.sleep,
      clock = t.clock, on_retry = function(attempt, wait, _, err) seen[#seen + 1] = { attempt, wait, err } end },
      function() return nil, "connect" end)
    assert.same({ 0.05, 0.1, 0.2, 0.3 }, t.waits)
    assert.same({ 2, 0.05, "connect" }, seen[1])
    assert.equal(5, seen[4][1])
  end)

  it("stops before a wait that would end past the deadline and hands the deadline's rest to the call", function()
    local t = fake_time()
    local remaining = {}
    local calls = 0
    retry.call({ attempts = 10, base = 0.1, cap = 10, deadline = 1, random = function() return 1 end,
      sleep = t.sleep, clock = t.clock }, function()
      calls = calls + 1
      return nil, "timeout"
    end)
    -- waits 0.1, 0.2, 0.4 (0.7 s); the next, 0.8, would end at 1.5 > 1
    assert.same({ 0.1, 0.2, 0.4 }, t.waits)
    assert.equal(4, calls)
    local o = retry.options({ deadline = 2, attempts = 2, random = function() return 0.5 end, sleep = t.sleep,
      clock = t.clock, base = 1 })
    retry.run(o, function(_, left)
      remaining[#remaining + 1] = left
      return nil, "timeout"
    end)
    assert.same({ 2, 1.5 }, remaining)
  end)

  it("does not retry answers: success, 4xx, business errcodes, other errors; retries 5xx and errcode -1", function()
    local function count(...)
      local results = { ... }
      local calls = 0
      local t = fake_time()
      retry.call({ attempts = 3, sleep = t.sleep, clock = t.clock }, function()
        calls = calls + 1
        return unpack(results)
      end)
      return calls
    end
    assert.equal(1, count({ status = 200, body = "{}" }))
    assert.equal(1, count({ status = 404, body = "" }))
    assert.equal(1, count({ status = 200, body = '{"errcode":45009,"errmsg":"api freq out of limit"}' }))
    assert.equal(1, count({ errcode = 40001 }))
    assert.equal(1, count(nil, "tls"))
    assert.equal(1, count(nil, "protocol"))
    assert.equal(3, count({ status = 502, body = "" }))
    assert.equal(3, count({ status = 200, body = '{"errcode":-1,"errmsg":"system error"}' }))
    assert.equal(3, count({ errcode = -1 }))
    assert.equal(3, count(nil, "connect"))
  end)

  it("never retries a raised error; misuse raises", function()
    local calls = 0
    assert.has_error(function()
      retry.call({ attempts = 3 }, function() calls = calls + 1 error("boom") end)
    end)
    assert.equal(1, calls)
    assert.has_error(function() retry.call({ attempts = 0 }, print) end)
    assert.has_error(function() retry.call({ base = "x" }, print) end)
    assert.has_error(function() retry.call({}, nil) end)
  end)
end)

describe("wxd.breaker", function()
  it("closed → open after N consecutive failures; open fails fast; half-open after the cooldown; a success closes", function()
    local b = breaker.new(name("consec"), { failures = 3, failure_rate = 0, cooldown = 5 })
    local c = b._c
    local function call(ok, at)
      local allowed, probe = c:allow(false, at)
      if not allowed then return probe end
      return c:report(ok, probe, at)
    end
    assert.equal("closed", call(false, 100))
    assert.equal("closed", call(true, 100))   -- a success resets the run
    assert.equal("closed", call(false, 101))
    assert.equal("closed", call(false, 101))
    assert.equal("open", call(false, 102))
    assert.equal("open", call(true, 104.9))   -- refused: not called
    assert.equal("open", (c:state(104.9)))
    assert.equal("half_open", (c:state(107)))
    -- half-open: one probe at a time
    local ok, probe = c:allow(false, 107)
    assert.is_true(ok)
    assert.equal(1, probe) -- the first half-open spell
    local ok2, why = c:allow(false, 107)
    assert.is_nil(ok2)
    assert.equal("open", why)
    assert.equal("closed", c:report(true, probe, 107.1))
    local st = b:stats()
    assert.same({ 1, 1, 1, 2 }, { st.opened, st.half_opened, st.closed, st.rejected })
  end)

  it("a failed probe opens it again for a whole cooldown; probes = 2 needs two successes", function()
    local c = breaker.new(name("probe"), { failures = 1, failure_rate = 0, cooldown = 1, probes = 2 })._c
    local _, p = c:allow(false, 100)
    assert.equal("open", c:report(false, p, 100))
    local _, p1 = c:allow(false, 101)
    assert.equal(1, p1)
    assert.equal("open", c:report(false, p1, 101.5))
    assert.is_nil((c:allow(false, 102.4)))
    local _, q1 = c:allow(false, 102.5)
    local _, q2 = c:allow(false, 102.5)
    assert.is_nil((c:allow(false, 102.5)), "a third probe at once is refused")
    assert.equal("half_open", c:report(true, q1, 102.6))
    assert.equal("closed", c:report(true, q2, 102.6))
  end)

  it("a probe that reports after its half-open spell ended counts for nothing", function()
    local c = breaker.new(name("stale"), { failures = 1, failure_rate = 0, cooldown = 1, probes = 2 })._c
    local _, p = c:allow(false, 100)
    c:report(false, p, 100)
    local _, slow = c:allow(false, 101)   -- spell 1: a probe that takes long
    local _, fast = c:allow(false, 101)
    assert.equal("open", c:report(false, fast, 101.1))
    local _, n1 = c:allow(false, 102.2)   -- spell 2
    assert.equal(2, n1)
    assert.equal("half_open", c:report(true, slow, 102.3), "the stale success neither closes it")
    local _, n2 = c:allow(false, 102.3)
    assert.truthy(n2, "nor took a probe slot")
    assert.equal("half_open", c:report(true, n1, 102.4))
    assert.equal("closed", c:report(true, n2, 102.4))
  end)

  it("opens on the failure rate of the window once there are min_calls calls", function()
    local c = breaker.new(name("rate"), { failures = 0, failure_rate = 0.5, min_calls = 10, window = 10 })._c
    for i = 1, 9 do
      local _, p = c:allow(false, 200 + i * 0.1)
      assert.equal("closed", c:report(i % 2 == 0, p, 200 + i * 0.1)) -- 5 of 9 failed: too few calls
    end
    local _, p = c:allow(false, 201)
    assert.equal("open", c:report(false, p, 201))
    -- calls older than the window do not count
    local c2 = breaker.new(name("rate2"), { failures = 0, failure_rate = 0.5, min_calls = 4, window = 10 })._c
    for _ = 1, 3 do
      local _, q = c2:allow(false, 300)
      c2:report(false, q, 300)
    end
    local _, q = c2:allow(false, 311)
    assert.equal("closed", c2:report(false, q, 311), "the three old failures left the window")
  end)

  it("call: counts raised errors and transient results, fails fast with nil, \"circuit open\"", function()
    local b = breaker.new(name("call"), { failures = 2, failure_rate = 0, cooldown = 60 })
    local calls = 0
    assert.has_error(function() b:call(function() calls = calls + 1 error("boom") end) end)
    local res, err = b:call(function() calls = calls + 1 return { status = 503 } end)
    assert.equal(503, res.status)
    assert.is_nil(err)
    res, err = b:call(function() calls = calls + 1 return "never" end)
    assert.is_nil(res)
    assert.equal("circuit open", err)
    assert.equal(2, calls)
    assert.equal("open", (b:state()))
    b:reset()
    assert.equal("closed", (b:state()))
    assert.equal("ok", (b:call(function() return "ok" end)))
  end)

  it("logs every state change as one JSON line (warn when it opens, with the counts that tripped it)", function()
    local dir = H.tmpdir()
    H.write_file(dir .. "/trip.lua", [[
local breaker = require "wxd.breaker"
local c = breaker.new("logged", { failures = 2, failure_rate = 0, cooldown = 1 })._c
for _ = 1, 2 do local _, p = c:allow(false, 10) c:report(false, p, 10) end
local _, p = c:allow(false, 11)
c:report(true, p, 11)
]])
    local out, code = H.sh(H.WXD .. " script " .. dir .. "/trip.lua")
    os.execute("rm -rf " .. dir)
    assert.equal(0, code, out)
    local changes = {}
    for line in out:gmatch("[^\n]+") do
      local rec = cjson.decode(line)
      if rec.msg == "circuit breaker state change" then changes[#changes + 1] = rec end
    end
    assert.equal(3, #changes, out)
    assert.same({ "warn", "closed", "open", 2 }, { changes[1].level, changes[1].from, changes[1].to,
      changes[1].consecutive_failures })
    assert.same({ "info", "open", "half_open" }, { changes[2].level, changes[2].from, changes[2].to })
    assert.same({ "info", "half_open", "closed" }, { changes[3].level, changes[3].from, changes[3].to })
    assert.equal("logged", changes[3].breaker)
  end)

  it("the retry budget: retries through a breaker add at most retry_ratio extra calls", function()
    local b = breaker.new(name("budget"), { failures = 0, failure_rate = 0, retry_ratio = 0.2, retry_max = 10 })
    local t = fake_time()
    local calls, logical = 0, 200
    for _ = 1, logical do
      retry.call({ attempts = 3, breaker = b, sleep = t.sleep, clock = t.clock }, function()
        calls = calls + 1
        return nil, "timeout"
      end)
    end
    assert.truthy(calls - logical <= 0.2 * logical, calls .. " calls for " .. logical)
    assert.truthy(calls - logical >= 0.2 * logical - 1, "the budget is used: " .. calls)
    assert.equal(calls - logical, b:stats().retries)
  end)

  it("holds at most 1,024 breakers per process: a new name past that raises; known names still work", function()
    -- In a process of its own: the registry lives as long as the process.
    local dir = H.tmpdir()
    H.write_file(dir .. "/many.lua", [[
local breaker = require "wxd.breaker"
for i = 1, 1024 do assert(breaker.new("upstream-" .. i)) end
local ok, err = pcall(breaker.new, "upstream-1025")
print("new: " .. tostring(ok) .. " " .. tostring(err))
local again = breaker.new("upstream-7", { failures = 2 })
print("known: " .. tostring(again ~= nil) .. " " .. again:state())
]])
    local out, code = H.sh(H.WXD .. " script " .. dir .. "/many.lua")
    H.sh("rm -rf " .. dir)
    assert.equal(0, code, out)
    assert.truthy(out:find("new: false [^\n]*too many breakers %(1024%)"), out)
    assert.truthy(out:find("known: true closed", 1, true), out)
  end)
end)
