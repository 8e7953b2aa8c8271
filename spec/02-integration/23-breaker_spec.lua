-- wxd.breaker and wxd.retry over real HTTP, as options of wxd.http, against
-- a fake upstream (a wxd app written below) that fails, hangs, answers
-- WeChat's errcode -1 and recovers. Every upstream call is counted at the
-- upstream, so "fail fast" means "the upstream saw nothing".
local H = require "helpers"
local http = require "wxd.http"
local breaker = require "wxd.breaker"
local wxd = require "wxd"

local UPSTREAM = [[
local wxd = require "wxd"
local app = require("wxd.app").new()
local mode, calls, seq = "ok", 0, 0
local STORM = { "hang", "fail", "busy" }
app:get("/control", function(req)
  mode = req.query.mode or mode
  if req.query.reset then calls = 0 end
  return "ok\n"
end)
app:get("/count", function() return tostring(calls) end)
app:any("/api", function()
  calls = calls + 1
  local m = mode
  if m == "storm" then
    seq = seq + 1
    m = STORM[seq % 3 + 1]
  end
  if m == "fail" then return 503, "down\n" end
  if m == "busy" then return { errcode = -1, errmsg = "system error" } end
  if m == "bad" then return 400, "bad request\n" end
  if m == "hang" then wxd.sleep(3000) end
  return { errcode = 0 }
end)
return app
]]

local n = 0
local function name(what)
  n = n + 1
  return "int_" .. what .. "_" .. n .. "_" .. os.time()
end

describe("breaker and retry over HTTP", function()
  local up, dir, url

  local function mode(m)
    assert.equal(200, up:get("/control?reset=1&mode=" .. m).status)
  end
  local function upstream_calls() return tonumber(up:get("/count").body) end

  setup(function()
    dir = H.tmpdir()
    H.write_file(dir .. "/app.lua", UPSTREAM)
    up = H.start(dir, { workers = 1 })
    url = "http://127.0.0.1:" .. up.port .. "/api"
  end)

  teardown(function()
    if up then
      up:stop()
      up:cleanup()
    end
    os.execute("rm -rf " .. dir)
  end)

  it("opens after N failures, fails fast without calling the upstream, probes after the cooldown, recovers", function()
    local b = breaker.new(name("cycle"), { failures = 3, failure_rate = 0, cooldown = 1 })
    mode("fail")
    for i = 1, 3 do
      local res = http.get(url, { breaker = b })
      assert.equal(503, res.status, "call " .. i)
    end
    assert.equal("open", (b:state()))
    assert.equal(3, upstream_calls())

    local t0 = wxd.monotonic_ms()
    for _ = 1, 100 do
      local res, err = http.get(url, { breaker = b })
      assert.is_nil(res)
      assert.equal("circuit open", err)
    end
    local per_call_us = (wxd.monotonic_ms() - t0) * 10
    print(string.format("\n  fail fast while open: %.1f µs per call", per_call_us))
    assert.equal(3, upstream_calls(), "no upstream call while open")

    -- half-open: the probe hangs (times out) and opens it again
    mode("hang")
    H.wait_until(function() return b:state() == "half_open" end, 5, "half-open")
    local res, err = http.get(url, { breaker = b, timeout = 0.3 })
    assert.is_nil(res)
    assert.equal("timeout", err)
    assert.equal("open", (b:state()))
    assert.equal(1, upstream_calls())

    -- the upstream recovers: the next probe closes it
    mode("ok")
    H.wait_until(function() return b:state() == "half_open" end, 5, "half-open again")
    res = http.get(url, { breaker = b })
    assert.equal(200, res.status)
    assert.equal("closed", (b:state()))
    res = http.get(url, { breaker = b })
    assert.equal(200, res.status)
    assert.equal(2, upstream_calls())
    local st = b:stats()
    assert.same({ opened = 2, half_opened = 2, closed = 1, rejected = 100 },
      { opened = st.opened, half_opened = st.half_opened, closed = st.closed, rejected = st.rejected })
  end)

  it("a storm of timeouts, 5xx and errcode -1 opens it within 5 s; retries add at most 20% calls", function()
    local b = breaker.new(name("storm"), { failures = 5, failure_rate = 0.5, min_calls = 10, window = 5, cooldown = 1 })
    mode("storm")
    local t0 = wxd.monotonic_ms()
    local opened_after, logical, outcomes = nil, 0, {}
    while wxd.monotonic_ms() - t0 < 4000 do
      logical = logical + 1
      local res, err = http.get(url, { breaker = b, timeout = 0.4,
        retry = { attempts = 3, base = 0.02, cap = 0.1 } })
      local k = res and (res.status .. (res.body:find('"errcode":-1', 1, true) and " -1" or "")) or err
      outcomes[k] = (outcomes[k] or 0) + 1
      if not opened_after and b:stats().opened > 0 then opened_after = (wxd.monotonic_ms() - t0) / 1000 end
      if err == "circuit open" then wxd.sleep(20) end
    end
    local st = b:stats()
    local calls = upstream_calls()
    local first = st.calls - st.retries
    local parts = {}
    for k, v in pairs(outcomes) do parts[#parts + 1] = k .. "=" .. v end
    table.sort(parts)
    print(string.format("\n  storm: opened after %.2f s; %d logical calls, %d upstream calls (%d first, %d retries), %s",
      opened_after or -1, logical, calls, first, st.retries, table.concat(parts, " ")))
    assert.truthy(opened_after and opened_after <= 5, "opened within 5 s")
    assert.equal(st.calls, calls, "the upstream saw exactly the calls the breaker let through")
    assert.truthy(st.retries <= 0.2 * first, "retries " .. st.retries .. " for " .. first .. " first attempts")
    assert.truthy(outcomes["circuit open"] > 0)
  end)

  it("retries idempotent calls on 5xx, not 4xx, and not an unmarked POST", function()
    local fast = { attempts = 3, base = 0.01, cap = 0.02 }
    mode("fail")
    local res = http.get(url, { retry = fast })
    assert.equal(503, res.status)
    assert.equal(3, upstream_calls())

    mode("fail")
    res = http.post(url, "x", { retry = fast })
    assert.equal(503, res.status)
    assert.equal(1, upstream_calls(), "a POST is not retried unless marked")

    mode("fail")
    res = http.post(url, "x", { retry = { attempts = 3, base = 0.01, idempotent = true } })
    assert.equal(503, res.status)
    assert.equal(3, upstream_calls(), "a POST marked idempotent is")

    mode("bad")
    res = http.get(url, { retry = fast })
    assert.equal(400, res.status)
    assert.equal(1, upstream_calls(), "4xx is an answer")

    mode("busy")
    res = http.get(url, { retry = fast })
    assert.equal(200, res.status)
    assert.equal(3, upstream_calls(), "errcode -1 is retried")
  end)

  it("honours the overall deadline: attempts get the rest of it as their timeout", function()
    mode("hang")
    local t0 = wxd.monotonic_ms()
    local res, err = http.get(url, { timeout = 5, retry = { attempts = 5, base = 0.05, deadline = 0.8 } })
    local took = (wxd.monotonic_ms() - t0) / 1000
    assert.is_nil(res)
    assert.equal("timeout", err)
    -- one attempt would take 5 s without the deadline (the upstream hangs 3 s)
    assert.truthy(took < 2.5, "took " .. took .. " s")
    assert.truthy(upstream_calls() >= 1)
  end)
end)
