-- wxd.order in real servers: concurrent duplicate events over real sockets
-- (two workers; and two wxd processes on one Redis), and nothing
-- acknowledged lost to kill -9 (the journal in embedded mode; Redis with
-- AOF appendfsync always, killed too).
local wxd = require "wxd"
local http = require "wxd.http"
local task = require "wxd.task"
local cjson = require "cjson"
local H = require "helpers"

local APP = [[
local app = require("wxd.app").new()
local order = require "wxd.order"
local wxd = require "wxd"
local json = require "cjson"
local function reply(o, st)
  return json.encode{ ok = o ~= nil, status = st, state = o and o.state, version = o and o.version,
                      worker = wxd.worker_id() }
end
app:post("/create/:no", function(req)
  return reply(order.create{ out_trade_no = req.params.no, amount = 100, currency = "CNY" })
end)
app:post("/t/:no/:to/:key", function(req)
  return reply(order.transition(req.params.no, req.params.to, { key = req.params.key, event = "E" }))
end)
app:get("/o/:no", function(req) return reply(order.get(req.params.no)) end)
app:order_hooks{ on_enter = { PAID = function(o) require("wxd.log").info("hook TAG PAID " .. o.out_trade_no) end } }
return app
]]

local function make_app(config, tag)
  local dir = H.tmpdir()
  H.write_file(dir .. "/app.lua", (APP:gsub("TAG", tag or "v1")))
  H.write_file(dir .. "/config.lua", "return " .. config)
  return dir
end

local function call(srv, method, path)
  local res, err = http.request{ url = "http://127.0.0.1:" .. srv.port .. path, method = method,
    timeout = { connect = 5, read = 20, total = 30 } }
  if not res then return nil, err end
  if res.status ~= 200 then return nil, "status " .. res.status .. ": " .. res.body end
  return cjson.decode(res.body)
end

local function must(srv, method, path)
  local r, err = call(srv, method, path)
  assert(r, err)
  return r
end

-- 100 connections at once, the same event (same key) on each, spread over
-- the servers given: all connected and sent before any is read.
local function race(servers, no)
  local conns = {}
  for i = 1, 100 do
    local srv = servers[(i - 1) % #servers + 1]
    conns[i] = { srv = srv, c = srv:connect(30) }
  end
  local req = H.post_raw("/t/" .. no .. "/PAID/notify-1"):gsub("\r\n\r\n", "\r\nConnection: close\r\n\r\n", 1)
  for i = 1, 100 do assert(conns[i].c:send(req)) end
  local count, workers = {}, {}
  for i = 1, 100 do
    local raw = H.read_all(conns[i].c, 30)
    conns[i].c:close()
    local resp = H.parse_responses(raw)[1]
    assert.equal(200, resp.status, raw)
    local r = cjson.decode(resp.body)
    count[r.status] = (count[r.status] or 0) + 1
    workers[conns[i].srv.port .. ":" .. r.worker] = true
  end
  return count, workers
end

-- Streams orders (create, PAYING, PAID) from 8 coroutines until the
-- servers go away; `acked[no]` is the version each last acknowledged.
local function stream(servers, prefix, acked)
  local hs = {}
  for t = 1, 8 do
    hs[t] = task.spawn(function()
      local i = 0
      while true do
        i = i + 1
        local no = prefix .. t .. "x" .. i
        local srv = servers[(t + i) % #servers + 1]
        local steps = { { "POST", "/create/" .. no }, { "POST", "/t/" .. no .. "/PAYING/p" },
          { "POST", "/t/" .. no .. "/PAID/n" } }
        for _, st in ipairs(steps) do
          local r = call(srv, st[1], st[2])
          if not r then return "stopped" end
          assert(r.ok and r.status == "ok", cjson.encode(r))
          acked[no] = r.version
        end
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

local function check_acked(srv, acked)
  local n = 0
  for no, version in pairs(acked) do
    local r = must(srv, "GET", "/o/" .. no)
    assert(r.ok, no .. " lost: " .. cjson.encode(r))
    assert(r.version >= version, no .. " at version " .. r.version .. ", acknowledged " .. version)
    n = n + 1
  end
  return n
end

describe("wxd.order embedded", function()
  it("gives one transition to 100 concurrent duplicate events over two workers", function()
    local dir = make_app('{ order = { journal = "orders.journal", close_after = 0 } }')
    local srv = H.start(dir, { workers = 2 })
    finally(function() srv:stop() srv:cleanup() os.execute("rm -rf " .. dir) end)
    assert.equal("ok", must(srv, "POST", "/create/RACE1").status)
    assert.equal("ok", must(srv, "POST", "/t/RACE1/PAYING/p").status)
    local count, workers = race({ srv }, "RACE1")
    assert.same({ ok = 1, duplicate = 99 }, count)
    assert.is_true(workers[srv.port .. ":0"] and workers[srv.port .. ":1"], "both workers served: " .. cjson.encode(workers))
    local o = must(srv, "GET", "/o/RACE1")
    assert.equal("PAID", o.state)
    assert.equal(2, o.version)
    H.wait_until(function() return #srv:log_lines("hook v1 PAID RACE1") == 1 end, 5, "the PAID hook")
  end)

  it("loses nothing acknowledged to kill -9, and survives a torn journal tail", function()
    local dir = make_app('{ order = { journal = "orders.journal", close_after = 0 } }')
    local srv = H.start(dir, { workers = 2 })
    finally(function() srv:cleanup() os.execute("rm -rf " .. dir) end)
    local acked = {}
    local hs = stream({ srv }, "K", acked)
    H.wait_until(function() return count_keys(acked) >= 100 end, 60, "100 acknowledged orders")
    srv:kill()
    for _, h in ipairs(hs) do assert.equal("stopped", (h:wait(60000))) end
    -- A torn record at the end, as a crash inside a write leaves it.
    local j = dir .. "/orders.journal"
    -- (after its last record: the zero-filled space the journal keeps ahead goes)
    local data = H.journal_records(assert(H.read_file(j)))
    H.write_file(j, data .. data:sub(1, 20))
    local again = H.start(dir, { workers = 2 })
    finally(function() again:stop() again:cleanup() end)
    local n = check_acked(again, acked)
    assert.is_true(n >= 100)
    assert.equal(1, #again:log_lines("ignored a torn or corrupt tail of 20 bytes"))
    -- And it goes on: a new order after the torn tail survives a restart.
    assert.equal("ok", must(again, "POST", "/create/AFTER1").status)
    again:stop()
    local third = H.start(dir, { workers = 1 })
    finally(function() third:stop() third:cleanup() end)
    assert.equal("CREATED", must(third, "GET", "/o/AFTER1").state)
    check_acked(third, acked)
    assert.equal(0, #third:log_lines("torn"))
  end)
end)

describe("wxd.order embedded, in the background", function()
  it("runs the hooks of the serving generation after a hot reload", function()
    local dir = make_app('{ order = { journal = "orders.journal", close_after = 0 } }', "v1")
    local srv = H.start(dir, { workers = 2, pid = true })
    finally(function() srv:stop() srv:cleanup() os.execute("rm -rf " .. dir) end)
    must(srv, "POST", "/create/HOT1")
    must(srv, "POST", "/t/HOT1/PAYING/p")
    assert.equal("ok", must(srv, "POST", "/t/HOT1/PAID/n").status)
    H.wait_until(function() return #srv:log_lines("hook v1 PAID HOT1") == 1 end, 5, "the v1 hook")
    H.write_file(dir .. "/app.lua", (APP:gsub("TAG", "v2")))
    local out, code = H.sh(H.WXD .. " reload --pid " .. srv.dir .. "/wxd.pid")
    assert.equal(0, code, out)
    for i = 1, 4 do -- over both workers' connections
      must(srv, "POST", "/create/HOT2" .. i)
      must(srv, "POST", "/t/HOT2" .. i .. "/PAYING/p")
      assert.equal("ok", must(srv, "POST", "/t/HOT2" .. i .. "/PAID/n").status)
      H.wait_until(function() return #srv:log_lines("hook v2 PAID HOT2" .. i) == 1 end, 5, "the v2 hook")
      assert.equal(0, #srv:log_lines("hook v1 PAID HOT2" .. i))
    end
    -- The orders made before the reload are still there.
    assert.equal("PAID", must(srv, "GET", "/o/HOT1").state)
  end)

  it("closes unpaid orders after close_after, from a timer", function()
    local dir = make_app('{ order = { journal = "orders.journal", close_after = 0.5, close_interval = 0.1 } }')
    local srv = H.start(dir, { workers = 2 })
    finally(function() srv:stop() srv:cleanup() os.execute("rm -rf " .. dir) end)
    must(srv, "POST", "/create/AC1")
    must(srv, "POST", "/create/AC2")
    must(srv, "POST", "/t/AC2/PAYING/p")
    must(srv, "POST", "/create/AC3")
    must(srv, "POST", "/t/AC3/PAYING/p")
    must(srv, "POST", "/t/AC3/PAID/n")
    H.wait_until(function()
      return must(srv, "GET", "/o/AC1").state == "CLOSED" and must(srv, "GET", "/o/AC2").state == "CLOSED"
    end, 10, "the unpaid orders to close")
    assert.equal("PAID", must(srv, "GET", "/o/AC3").state)
  end)
end)

describe("wxd.order on Redis", function()
  local redis
  setup(function()
    redis = H.redis_server({ args = "--appendonly yes --appendfsync always" })
  end)
  teardown(function() redis:cleanup() end)

  local function config()
    return string.format('{ redis = "%s", store = { backend = "redis" }, order = { close_after = 0, prefix = "o%d:" } }',
      redis.url, math.floor(wxd.now() * 1000))
  end

  it("gives one transition to 100 concurrent duplicate events over two wxd processes, and publishes it", function()
    local dir = make_app(config())
    local a = H.start(dir, { workers = 2 })
    local b = H.start(dir, { workers = 2 })
    finally(function()
      a:stop() b:stop() a:cleanup() b:cleanup()
      os.execute("rm -rf " .. dir)
    end)
    local got = {}
    local r = require("wxd.redis").new(redis.url)
    local sub = r:subscribe("wxd:topic:order/RRACE", function(msg) got[#got + 1] = msg end)
    H.wait_until(function() return r:status().subscriber and r:status().subscriber.subscriptions == 1 end, 5,
      "the subscription")
    assert.equal("ok", must(a, "POST", "/create/RRACE").status)
    assert.equal("ok", must(b, "POST", "/t/RRACE/PAYING/p").status)
    local count = race({ a, b }, "RRACE")
    assert.same({ ok = 1, duplicate = 99 }, count)
    local o = must(a, "GET", "/o/RRACE")
    assert.equal("PAID", o.state)
    assert.equal(2, o.version)
    H.wait_until(function() return #got == 2 end, 5, "two published changes")
    local ev = cjson.decode(got[2])
    assert.equal("RRACE", ev.out_trade_no)
    assert.equal("PAYING", ev.from)
    assert.equal("PAID", ev.state)
    assert.equal(2, ev.version)
    assert.equal("E", ev.event)
    assert.is_true(ev.at > 1.7e12)
    sub:unsubscribe()
    -- The hook ran once, in whichever process made the transition.
    H.wait_until(function() return #a:log_lines("hook v1 PAID RRACE") + #b:log_lines("hook v1 PAID RRACE") == 1 end, 5,
      "the PAID hook")
  end)

  it("loses nothing acknowledged when wxd and redis-server are killed with -9 (AOF always)", function()
    local dir = make_app(config())
    local a = H.start(dir, { workers = 2 })
    local b = H.start(dir, { workers = 1 })
    finally(function() a:cleanup() b:cleanup() os.execute("rm -rf " .. dir) end)
    local acked = {}
    local hs = stream({ a, b }, "RK", acked)
    H.wait_until(function() return count_keys(acked) >= 100 end, 60, "100 acknowledged orders")
    a:signal("KILL")
    b:signal("KILL")
    redis:stop()
    for _, h in ipairs(hs) do assert.equal("stopped", (h:wait(60000))) end
    redis:start()
    local c = H.start(dir, { workers = 1 })
    finally(function() c:stop() c:cleanup() end)
    assert.is_true(check_acked(c, acked) >= 100)
  end)

  it("closes unpaid orders after close_after, from a job scanning a sorted set", function()
    local dir = make_app(string.format(
      '{ redis = "%s", store = { backend = "redis" }, order = { close_after = 0.5, close_interval = 0.1, prefix = "c%d:" } }',
      redis.url, math.floor(wxd.now() * 1000)))
    local a = H.start(dir, { workers = 2 })
    local b = H.start(dir, { workers = 1 })
    finally(function() a:stop() b:stop() a:cleanup() b:cleanup() os.execute("rm -rf " .. dir) end)
    must(a, "POST", "/create/RC1")
    must(b, "POST", "/create/RC2")
    must(b, "POST", "/t/RC2/PAYING/p")
    must(a, "POST", "/create/RC3")
    must(a, "POST", "/t/RC3/PAYING/p")
    must(a, "POST", "/t/RC3/PAID/n")
    H.wait_until(function()
      return must(a, "GET", "/o/RC1").state == "CLOSED" and must(b, "GET", "/o/RC2").state == "CLOSED"
    end, 10, "the unpaid orders to close")
    assert.equal("PAID", must(b, "GET", "/o/RC3").state)
    -- Both processes scan; the key makes it one transition.
    assert.equal(2, must(a, "GET", "/o/RC2").version)
  end)
end)
