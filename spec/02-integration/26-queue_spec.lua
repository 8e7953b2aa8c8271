-- wxd.queue in real servers: writes queued by a wxd app (2 workers) reach a
-- fake upstream (a wxd app that counts deliveries by Idempotency-Key)
-- once it recovers, none lost and none applied twice, across a kill -9 of
-- wxd: the journal in embedded mode; Redis Streams with AOF appendfsync
-- always (redis-server killed with -9 as well) in Redis mode.
local wxd = require "wxd"
local http = require "wxd.http"
local task = require "wxd.task"
local cjson = require "cjson"
local H = require "helpers"

-- The fake upstream: POST /write applies a key once (later deliveries of
-- it are answered 200 "duplicate", as an idempotent API would) and counts
-- every delivery; /mode sets `fail` (1: every call fails with 503) and
-- `every` (every n-th call fails: 5 is 20%).
local UPSTREAM = [[
local app = require("wxd.app").new()
local applied, calls, mode = {}, {}, { fail = 0, every = 0, n = 0 }
app:post("/mode", function(req)
  local d = req:json()
  mode.fail, mode.every = d.fail or 0, d.every or 0
  return { ok = true }
end)
app:post("/write", function(req)
  local key = req:header("Idempotency-Key") or "?"
  mode.n = mode.n + 1
  calls[key] = (calls[key] or 0) + 1
  if mode.fail == 1 or (mode.every > 0 and mode.n % mode.every == 0) then return 503, { error = "down" } end
  if applied[key] then
    applied[key] = applied[key] + 1
    return { ok = true, duplicate = true }
  end
  applied[key] = 1
  return { ok = true, body = req.body }
end)
app:get("/counts", function()
  local n = 0
  for _ in pairs(applied) do n = n + 1 end
  return { applied = applied, calls = calls, keys = n, total = mode.n }
end)
return app
]]

-- The app under test: POST /push/:key queues a write; the consumer sends
-- it upstream with the key as Idempotency-Key.
local APP = [[
local app = require("wxd.app").new()
local queue = require "wxd.queue"
local http = require "wxd.http"
local upstream = os.getenv("UPSTREAM")
queue.consume("out", function(payload, info)
  local res, err = http.post(upstream .. "/write", payload.body,
    { headers = { ["Idempotency-Key"] = info.key }, timeout = 5 })
  if not res then return nil, err end
  if res.status ~= 200 then return nil, "status " .. res.status end
  return true
end, { max_attempts = 1000, visibility = VIS, backoff = { base = 0.02, max = 0.3 } })
app:post("/push/:key", function(req)
  local id, status = queue.push("out", { body = "w-" .. req.params.key }, { key = req.params.key })
  if not id then return 500, { error = status } end
  return { id = id, status = status }
end)
app:get("/stats", function() return queue.stats("out") end)
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
  if not res then return nil, err end
  if res.status ~= 200 then return nil, "status " .. res.status .. ": " .. res.body end
  return cjson.decode(res.body)
end

local function must(port, method, path, body)
  local r, err = call(port, method, path, body)
  assert(r, err)
  return r
end

-- Pushes keys P1, P2, ... from 6 coroutines until the server goes away or
-- `limit` were acknowledged; acked[key] = true for each acknowledged push.
local function stream(srv, prefix, acked, limit)
  local hs, next_i = {}, 0
  for t = 1, 6 do
    hs[t] = task.spawn(function()
      while true do
        next_i = next_i + 1
        if limit and next_i > limit then return "done" end
        local key = prefix .. next_i
        local r = call(srv.port, "POST", "/push/" .. key)
        if not r then return "stopped" end
        assert(r.status == "ok", cjson.encode(r))
        acked[key] = true
      end
    end)
  end
  return hs
end

local function count_keys(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n
end

-- Every acknowledged push applied upstream exactly once, nothing else applied.
local function check_delivered(up, acked, attempted)
  local c = must(up.port, "GET", "/counts")
  for key in pairs(acked) do
    assert(c.applied[key], key .. " acknowledged but never delivered")
  end
  for key in pairs(c.applied) do
    assert(attempted[key], key .. " delivered but never pushed")
  end
  return c
end

local function run_crash_case(config, extra_kill, restart)
  local servers, dirs = {}, {}
  finally(function()
    for _, s in ipairs(servers) do s:stop() s:cleanup() end
    os.execute("rm -rf " .. table.concat(dirs, " "))
  end)
  local up_dir = make_dir(UPSTREAM)
  local up = H.start(up_dir, { workers = 1 })
  local dir = make_dir((APP:gsub("VIS", "1")), config)
  dirs[1], dirs[2], servers[1] = up_dir, dir, up
  local env = "UPSTREAM=http://127.0.0.1:" .. up.port
  local srv = H.start(dir, { workers = 2, env = env })
  servers[2] = srv
  -- The upstream fails every other call: some writes get through, others
  -- wait in the queue with attempts and backoff, some are in flight.
  must(up.port, "POST", "/mode", '{"every":2}')
  local acked = {}
  local hs = stream(srv, "K", acked)
  H.wait_until(function()
    return count_keys(acked) >= 150 and must(up.port, "GET", "/counts").total >= 20
  end, 60, "150 acknowledged pushes and 20 upstream calls")
  srv:signal("KILL")
  if extra_kill then extra_kill() end
  for _, h in ipairs(hs) do assert.equal("stopped", (h:wait(60000))) end
  local attempted = {}
  for i = 1, count_keys(acked) + 20 do attempted["K" .. i] = true end
  local before = must(up.port, "GET", "/counts")
  print(string.format("\n  at the kill: %d keys applied, %d upstream calls", before.keys, before.total))
  assert.is_true(before.keys < count_keys(acked), "some writes were still queued at the kill")
  assert.is_true(before.keys > 0, "some writes were delivered before the kill")
  if restart then restart() end
  -- The upstream recovers; a new wxd delivers what the killed one left.
  must(up.port, "POST", "/mode", '{"every":0}')
  local again = H.start(dir, { workers = 2, env = env })
  servers[3] = again
  H.wait_until(function()
    local s = call(again.port, "GET", "/stats")
    return s and s.pending == 0 and s.inflight == 0
  end, 60, "the queue to drain")
  local c = check_delivered(up, acked, attempted)
  local dup = 0
  for _, n in pairs(c.applied) do dup = dup + (n - 1) end
  -- Redeliveries after the crash are answered "duplicate" by the upstream
  -- (at least once); each key is applied once.
  print(string.format("\n  %d acknowledged, %d applied once, %d redelivered duplicates, %d upstream calls",
    count_keys(acked), c.keys, dup, c.total))
  assert.equal(0, must(again.port, "GET", "/stats").dead)
  return c, acked
end

describe("wxd.queue embedded (journal)", function()
  it("delivers queued writes once the upstream recovers: none lost, none doubled", function()
    local up_dir = make_dir(UPSTREAM)
    local up = H.start(up_dir, { workers = 1 })
    local dir = make_dir((APP:gsub("VIS", "5")), '{ queue = { path = "queue.journal" } }')
    local srv = H.start(dir, { workers = 2, env = "UPSTREAM=http://127.0.0.1:" .. up.port })
    finally(function()
      srv:stop() srv:cleanup() up:stop() up:cleanup()
      os.execute("rm -rf " .. dir .. " " .. up_dir)
    end)
    must(up.port, "POST", "/mode", '{"fail":1}')
    local acked = {}
    for _, h in ipairs(stream(srv, "D", acked, 100)) do assert.equal("done", (h:wait(60000))) end
    assert.equal(100, count_keys(acked))
    -- The same keys again: not queued twice.
    for i = 1, 10 do assert.equal("duplicate", must(srv.port, "POST", "/push/D" .. i).status) end
    H.wait_until(function() return must(up.port, "GET", "/counts").total >= 100 end, 30, "failing deliveries")
    must(up.port, "POST", "/mode", '{"fail":0}')
    H.wait_until(function() return must(up.port, "GET", "/counts").keys == 100 end, 60, "100 deliveries")
    H.wait_until(function() return must(srv.port, "GET", "/stats").delivered == 100 end, 10, "100 acks")
    local c = check_delivered(up, acked, acked)
    for key, n in pairs(c.applied) do assert.equal(1, n, key .. " applied " .. n .. " times") end
    local s = must(srv.port, "GET", "/stats")
    assert.equal(0, s.pending)
    assert.equal(0, s.dead)
  end)

  it("loses no acknowledged write to kill -9 of wxd, and delivers each once", function()
    run_crash_case('{ queue = { path = "queue.journal" } }')
  end)
end)

describe("wxd.queue across a hot reload", function()
  local TAGGED = [[
local app = require("wxd.app").new()
local queue = require "wxd.queue"
queue.consume("tagged", function(payload)
  require("wxd.log").info("deliver TAG " .. payload)
  return true
end)
app:post("/push/:p", function(req) return { id = (queue.push("tagged", req.params.p)) } end)
return app
]]

  it("delivers with the newest generation's handler", function()
    local dir = make_dir((TAGGED:gsub("TAG", "v1")), '{ queue = { path = "queue.journal" } }')
    local srv = H.start(dir, { workers = 2, pid = true })
    finally(function() srv:stop() srv:cleanup() os.execute("rm -rf " .. dir) end)
    for i = 1, 4 do must(srv.port, "POST", "/push/a" .. i) end
    for i = 1, 4 do
      H.wait_until(function() return #srv:log_lines("deliver v1 a" .. i) == 1 end, 10, "a" .. i .. " by v1")
    end
    H.write_file(dir .. "/app.lua", (TAGGED:gsub("TAG", "v2")))
    local out, code = H.sh(H.WXD .. " reload --pid " .. srv.dir .. "/wxd.pid")
    assert.equal(0, code, out)
    for i = 1, 8 do must(srv.port, "POST", "/push/b" .. i) end
    for i = 1, 8 do
      H.wait_until(function() return #srv:log_lines("deliver v2 b" .. i) == 1 end, 10, "b" .. i .. " by v2")
      assert.equal(0, #srv:log_lines("deliver v1 b" .. i))
    end
  end)
end)

describe("wxd.queue on Redis (Streams, AOF always)", function()
  local redis
  setup(function() redis = H.redis_server({ args = "--appendonly yes --appendfsync always" }) end)
  teardown(function() redis:cleanup() end)

  it("loses no acknowledged write to kill -9 of wxd and redis-server, and delivers each once", function()
    local config = string.format('{ redis = "%s", queue = { backend = "redis", prefix = "q%d:" } }', redis.url,
      math.floor(wxd.now() * 1000))
    run_crash_case(config, function() redis:stop() end, function() redis:start() end)
  end)
end)
