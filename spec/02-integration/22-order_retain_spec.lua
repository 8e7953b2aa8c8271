-- wxd.order retention in a real server: worker 0's sweep timer forgets due
-- orders (a tiny retention in config.lua), archives them next to the
-- journal, counts them in /metrics, and logs an archive failure while
-- forgetting nothing.
local http = require "wxd.http"
local cjson = require "cjson"
local H = require "helpers"

local APP = [[
local app = require("wxd.app").new()
local order = require "wxd.order"
local json = require "cjson"
local function reply(o, st) return json.encode{ ok = o ~= nil, status = st, state = o and o.state } end
app:post("/create/:no", function(req)
  return reply(order.create{ out_trade_no = req.params.no, amount = 100, currency = "CNY" })
end)
app:post("/t/:no/:to/:key", function(req)
  return reply(order.transition(req.params.no, req.params.to, { key = req.params.key }))
end)
app:get("/o/:no", function(req) return reply(order.get(req.params.no)) end)
return app
]]

local function make_app(config)
  local dir = H.tmpdir()
  H.write_file(dir .. "/app.lua", APP)
  H.write_file(dir .. "/config.lua", "return " .. config)
  return dir
end

local function must(srv, method, path)
  local res, err = http.request{ url = "http://127.0.0.1:" .. srv.port .. path, method = method,
    timeout = { connect = 5, read = 20, total = 30 } }
  assert(res, err)
  assert.equal(200, res.status, res.body)
  return cjson.decode(res.body)
end

local function metric(admin, line)
  local res = assert(http.request{ url = "http://127.0.0.1:" .. admin .. "/metrics", timeout = { total = 10 } })
  return tonumber(res.body:match(line:gsub("%p", "%%%0") .. " (%d+)"))
end

-- Three orders: one CLOSED, one PAID, one PAYING.
local function three(srv, p)
  for _, no in ipairs({ p .. "C", p .. "P", p .. "K" }) do must(srv, "POST", "/create/" .. no) end
  must(srv, "POST", "/t/" .. p .. "C/CLOSED/c")
  must(srv, "POST", "/t/" .. p .. "P/PAYING/p")
  must(srv, "POST", "/t/" .. p .. "P/PAID/n")
  must(srv, "POST", "/t/" .. p .. "K/PAYING/p")
end

describe("wxd.order retention in a server", function()
  it("sweeps from a timer: archives, forgets, counts; the unpaid order stays", function()
    -- 1e-6 days: about 86 ms.
    local dir = make_app('{ order = { journal = "data/orders.journal", close_after = 0, '
      .. 'retain = { final_days = 1e-6, settled_days = 1e-6, sweep_interval = 0.1 } } }')
    os.execute("mkdir -p " .. dir .. "/data")
    local admin = H.free_port()
    local srv = H.start(dir, { workers = 2, args = "--admin 127.0.0.1:" .. admin })
    finally(function() srv:stop() srv:cleanup() os.execute("rm -rf " .. dir) end)
    three(srv, "S")
    H.wait_until(function()
      return must(srv, "GET", "/o/SC").status == "not found" and must(srv, "GET", "/o/SP").status == "not found"
    end, 20, "the closed and the paid order to be forgotten")
    assert.equal("PAYING", must(srv, "GET", "/o/SK").state)
    -- Next to the journal, one line each.
    local lines = {}
    for line in (H.read_file(dir .. "/data/orders.archive.jsonl") or ""):gmatch("[^\n]+") do
      local o = cjson.decode(line)
      lines[o.out_trade_no] = o.state
    end
    assert.same({ SC = "CLOSED", SP = "PAID" }, lines)
    H.wait_until(function() return (metric(admin, 'wxd_order_events_total{kind="forgotten"}') or 0) >= 2 end,
      20, "the forgotten counter in /metrics")
    assert.is_true(#srv:log_lines("order sweep") >= 1)
  end)

  it("logs an archive it cannot write and forgets nothing", function()
    local dir = make_app('{ order = { journal = "orders.journal", close_after = 0, '
      .. 'retain = { final_days = 1e-6, sweep_interval = 0.1, archive = "missing/archive.jsonl" } } }')
    local srv = H.start(dir, { workers = 1 })
    finally(function() srv:stop() srv:cleanup() os.execute("rm -rf " .. dir) end)
    three(srv, "F")
    H.wait_until(function() return #srv:log_lines("nothing more forgotten until the next sweep") >= 2 end, 20,
      "two sweeps to fail")
    assert.equal("CLOSED", must(srv, "GET", "/o/FC").state)
    local line = srv:log_lines("nothing more forgotten until the next sweep")[1]
    assert.matches("archive " .. dir .. "/missing/archive.jsonl: No such file or directory", line, 1, true)
  end)
end)
