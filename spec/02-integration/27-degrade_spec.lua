-- wxd.degrade in real servers: a fake upstream (a wxd app) failing 20% of
-- its calls trips the degrade of a wxd app (2 workers); reads are then
-- served from the last good snapshots and writes queued; when the upstream
-- recovers, the app switches back, alerts both switches, and every queued
-- write is delivered once (counted at the upstream by Idempotency-Key).
local http = require "wxd.http"
local cjson = require "cjson"
local H = require "helpers"

-- /mode: `fail` 1 fails every call (503), `every` n fails every n-th one.
local UPSTREAM = [[
local app = require("wxd.app").new()
local applied, mode = {}, { fail = 0, every = 0, n = 0, reads = 0, writes = 0 }
local function failing()
  mode.n = mode.n + 1
  return mode.fail == 1 or (mode.every > 0 and mode.n % mode.every == 0)
end
app:post("/mode", function(req)
  local d = req:json()
  mode.fail, mode.every, mode.n = d.fail or 0, d.every or 0, 0
  return { ok = true }
end)
app:get("/profile/:id", function(req)
  mode.reads = mode.reads + 1
  if failing() then return 503, { error = "down" } end
  return { id = req.params.id, name = "user " .. req.params.id, gen = mode.gen }
end)
app:post("/write", function(req)
  mode.writes = mode.writes + 1
  if failing() then return 503, { error = "down" } end
  local key = req:header("Idempotency-Key") or "?"
  applied[key] = (applied[key] or 0) + 1
  return { ok = true }
end)
app:get("/counts", function()
  local n = 0
  for _ in pairs(applied) do n = n + 1 end
  return { applied = applied, keys = n, reads = mode.reads, writes = mode.writes }
end)
return app
]]

local APP = [[
local app = require("wxd.app").new()
local degrade = require "wxd.degrade"
local http = require "wxd.http"
local json = require "cjson"
local log = require "wxd.log"
-- A stand-in for wxd.alert: logs what would be sent.
package.loaded["wxd.alert"] = { send = function(a)
  log.info("ALERT " .. a.key .. " | " .. a.title .. " | " .. a.fields.state)
  return true
end }
local up = os.getenv("UPSTREAM")
local d = degrade.new{ name = "up", window = 5, threshold = 0.15, min_calls = 20, cooldown = 1, probes = 2,
  backoff = { base = 0.05, max = 0.3 },
  send = function(payload, info)
    local res, err = http.post(up .. "/write", payload, { headers = { ["Idempotency-Key"] = info.key }, timeout = 5 })
    if not res then return nil, err end
    return res.status == 200, "status " .. res.status
  end }
app:get("/profile/:id", function(req)
  local v, how = d:read("profile:" .. req.params.id, function()
    local res, err = http.get(up .. "/profile/" .. req.params.id, { timeout = 5 })
    if not res then return nil, err end
    if res.status ~= 200 then return nil, "status " .. res.status end
    return json.decode(res.body)
  end)
  if v == nil then return 503, { error = how } end
  return { value = v, source = how }
end)
app:post("/write/:key", function(req)
  local how, id = d:write("w-" .. req.params.key, { key = req.params.key })
  if not how then return 500, { error = id } end
  return { how = how }
end)
app:get("/state", function()
  local s = d:stats()
  return { mode = s.mode, opened = s.opened, closed = s.closed, pending = s.queue.pending,
           inflight = s.queue.inflight, delivered = s.queue.delivered, dead = s.queue.dead }
end)
return app
]]

local function make_dir(src, config)
  local dir = H.tmpdir()
  H.write_file(dir .. "/app.lua", src)
  H.write_file(dir .. "/config.lua", "return " .. (config or "{}"))
  return dir
end

local function call(port, method, path, body)
  local res, err = http.request{ url = "http://127.0.0.1:" .. port .. path, method = method, body = body,
    headers = body and { ["Content-Type"] = "application/json" } or nil,
    timeout = { connect = 5, read = 20, total = 30 } }
  assert(res, err)
  return res.status, cjson.decode(res.body)
end

local function must(port, method, path, body)
  local status, r = call(port, method, path, body)
  assert(status == 200, path .. ": " .. status .. " " .. cjson.encode(r))
  return r
end

describe("wxd.degrade", function()
  it("degrades on 20% failures, serves snapshots, queues writes, and heals", function()
    local up_dir = make_dir(UPSTREAM)
    local up = H.start(up_dir, { workers = 1 })
    local dir = make_dir(APP, '{ queue = { path = "queue.journal" } }')
    local srv = H.start(dir, { workers = 2, env = "UPSTREAM=http://127.0.0.1:" .. up.port })
    finally(function()
      srv:stop() srv:cleanup() up:stop() up:cleanup()
      os.execute("rm -rf " .. dir .. " " .. up_dir)
    end)
    -- Healthy: fresh reads, and snapshots of five profiles.
    for i = 1, 5 do
      local r = must(srv.port, "GET", "/profile/" .. i)
      assert.equal("fresh", r.source)
      assert.equal("user " .. i, r.value.name)
    end
    assert.equal("sent", must(srv.port, "POST", "/write/S1").how)
    assert.equal("normal", must(srv.port, "GET", "/state").mode)
    -- The upstream fails one call in five: 20% > 15%.
    must(up.port, "POST", "/mode", '{"every":5}')
    local calls, sources = 0, {}
    while must(srv.port, "GET", "/state").mode == "normal" do
      local status, r = call(srv.port, "GET", "/profile/" .. (calls % 5 + 1))
      assert.equal(200, status, cjson.encode(r)) -- a failed fresh read falls back to its snapshot
      sources[r.source] = (sources[r.source] or 0) + 1
      calls = calls + 1
      assert(calls <= 60, "no degrade after 60 calls at 20% failures")
    end
    assert.is_true(sources.snapshot >= 3, cjson.encode(sources))
    -- It tripped on the window's rate: at least min_calls calls, more than 15% failed.
    local opened = srv:log_lines('"to":"open"')
    assert.equal(1, #opened)
    local wc = tonumber(opened[1]:match('"window_calls":(%d+)'))
    local wf = tonumber(opened[1]:match('"window_failures":(%d+)'))
    assert.is_true(wc >= 20 and wf / wc > 0.15, opened[1])
    print(string.format("\n  tripped after %d reads: %d of the window's %d calls failed", calls, wf, wc))
    H.wait_until(function() return #srv:log_lines("ALERT degrade:up | degraded: up | degraded") == 1 end, 5,
      "the degrade alert")
    -- Now the upstream is down for good: reads from snapshots, writes queued.
    must(up.port, "POST", "/mode", '{"fail":1}')
    for i = 1, 5 do
      local r = must(srv.port, "GET", "/profile/" .. i)
      assert.equal("snapshot", r.source)
      assert.equal("user " .. i, r.value.name)
    end
    local status = call(srv.port, "GET", "/profile/99")
    assert.equal(503, status)
    local keys = {}
    for i = 1, 40 do
      keys[i] = "W" .. i
      assert.equal("queued", must(srv.port, "POST", "/write/" .. keys[i]).how)
    end
    assert.is_true(must(srv.port, "GET", "/state").pending >= 1)
    -- The upstream recovers: probes succeed, the mode switches back, the queue drains.
    must(up.port, "POST", "/mode", '{"fail":0}')
    H.wait_until(function() return must(srv.port, "GET", "/state").mode == "normal" end, 30, "back to normal")
    H.wait_until(function() return #srv:log_lines("ALERT degrade:up:recovered | recovered: up | normal") == 1 end, 5,
      "the recovery alert")
    H.wait_until(function()
      local s = must(srv.port, "GET", "/state")
      return s.pending == 0 and s.inflight == 0
    end, 30, "the queue to drain")
    local c = must(up.port, "GET", "/counts")
    for _, k in ipairs(keys) do assert.equal(1, c.applied[k], k .. " applied " .. tostring(c.applied[k])) end
    assert.equal(41, c.keys) -- S1 and the 40 queued
    assert.equal(0, must(srv.port, "GET", "/state").dead)
    assert.equal("fresh", must(srv.port, "GET", "/profile/1").source)
    assert.equal(1, #srv:log_lines("degrade: switched to degraded mode"))
    assert.equal(1, #srv:log_lines("degrade: back to normal"))
  end)
end)
