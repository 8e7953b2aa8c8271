-- WeChat Pay notifications driving wxd.order under load and failure: the
-- merchant app of spec/fixtures/apps/payclient (2 workers) against the
-- fake WeChat Pay (spec/fixtures/apps/fakepay). Transitions are counted
-- from the orders' histories and versions, never from handler calls.
local H = require "helpers"
local cjson = require "cjson"
local crypto = require "wxd.crypto"
local http = require "wxd.http"
local task = require "wxd.task"

local MCHID = "1900000001"
local APIV3 = "0123456789abcdef0123456789abcdef"
local MCH_SERIAL = "3775B6A45ACD588826D15E583A95F5DD00000001"

local function env(t)
  local parts = {}
  for k, v in pairs(t) do parts[#parts + 1] = k .. "='" .. tostring(v) .. "'" end
  table.sort(parts)
  return table.concat(parts, " ")
end

local function make_keys(dir)
  for _, c in ipairs({ { "mch", MCH_SERIAL, MCHID }, { "plat1", "5157F09EFDC096DE15EBE81A47057A7232F1B8E1", "plat" } }) do
    local out, code = H.sh(string.format("cd %s && openssl req -x509 -newkey rsa:2048 -nodes -keyout %s.key "
      .. "-out %s.crt -days 3 -subj '/CN=%s' -set_serial 0x%s", dir, c[1], c[1], c[3], c[2]))
    assert(code == 0, out)
  end
end

-- A request over wxd.http (concurrent ones run in tasks).
local function req(port, method, path, body, read_s)
  local res, err, detail = http.request({ method = method, url = "http://127.0.0.1:" .. port .. path,
    headers = { ["Content-Type"] = "application/json" }, body = body and cjson.encode(body),
    timeout = { connect = 5, read = read_s or 60, total = read_s or 60 } })
  assert(res, tostring(err) .. ": " .. tostring(detail))
  return res.status, cjson.decode(res.body ~= "" and res.body or "null")
end

-- Runs fn(i) for i = 1..n, at most `width` at a time.
local function each_concurrently(n, width, fn)
  local next_i, hs = 1, {}
  for w = 1, width do
    hs[w] = task.spawn(function()
      while next_i <= n do
        local i = next_i
        next_i = next_i + 1
        fn(i)
      end
      return true
    end)
  end
  for _, h in ipairs(hs) do
    local ok, err = h:wait()
    assert(ok, err)
  end
  return true
end

describe("WeChat Pay notifications on the payment state machine", function()
  local dir, fake

  local function ctl(path, body, read_s)
    local st, b = req(fake.port, "POST", path, body, read_s)
    assert.equal(200, st, cjson.encode(b))
    return b
  end

  local function start_client(extra, workers)
    local e = { PAYCLIENT_DIR = dir, FAKEPAY_MCHID = MCHID, FAKEPAY_APIV3_KEY = APIV3, PAY_MCH_SERIAL = MCH_SERIAL,
                PAY_API_BASE = "http://127.0.0.1:" .. fake.port,
                PAYCLIENT_JOURNAL = dir .. "/orders-" .. crypto.nonce(8) .. ".journal" }
    for k, v in pairs(extra or {}) do e[k] = v end
    return H.start(H.app("payclient"), { workers = workers or 2, env = env(e) })
  end

  local function prepay(srv, no, amount)
    local st, b = req(srv.port, "POST", "/prepay/jsapi", { out_trade_no = no, amount = amount or 100 })
    assert.equal(200, st, cjson.encode(b))
  end

  local function order_of(srv, no)
    local st, o = req(srv.port, "GET", "/ctl/order/" .. no)
    assert.equal(200, st, cjson.encode(o))
    return o
  end

  -- Exactly one transition to PAID, keyed by the notification id, and
  -- nothing else: CREATED -> PAYING -> PAID, version 2.
  local function assert_paid_once(o, id)
    assert.same({ "PAID", 2, 2, 0 }, { o.state, o.version, #o.history, #o.late }, o.out_trade_no)
    assert.same({ "PAYING", "PAYING", "PAID", id }, { o.history[1].to, o.history[2].from, o.history[2].to,
      o.history[2].key }, o.out_trade_no)
  end

  setup(function()
    dir = H.tmpdir()
    make_keys(dir)
    fake = H.start(H.app("fakepay"), { workers = 2, env = env({ FAKEPAY_DIR = dir, FAKEPAY_MCHID = MCHID,
      FAKEPAY_APIV3_KEY = APIV3 }) })
  end)
  teardown(function()
    fake:stop()
    fake:cleanup()
    os.execute("rm -rf " .. dir)
  end)

  it("1,000 orders x 20 concurrent duplicate notifications on 2 workers: exactly 1,000 transitions to PAID", function()
    ctl("/_ctl/reset")
    local srv = start_client()
    finally(function() srv:stop() srv:cleanup() end)
    local N, COPIES = 1000, 20
    local url = "http://127.0.0.1:" .. srv.port .. "/pay/notify"
    local tag = crypto.nonce(6)
    local function no_of(i) return "K" .. tag .. "-" .. i end
    each_concurrently(N, 8, function(i) prepay(srv, no_of(i)) end)
    -- 20 deliveries of each notification at once (fresh signatures, one id), 10 notifications at a time: 200
    -- concurrent requests.
    local acked = {}
    each_concurrently(N, 10, function(i)
      local r = ctl("/_ctl/notify", { url = url, out_trade_no = no_of(i), id = "N-" .. no_of(i), copies = COPIES }, 120)
      assert.equal(COPIES, #r.statuses)
      for _, st in ipairs(r.statuses) do
        -- 500: a delivery that waited for another's handler past the deadline; WeChat Pay retries it.
        assert.truthy(st == 204 or st == 500, tostring(st) .. " for " .. no_of(i))
        if st == 204 then acked[i] = true end
      end
    end)
    -- WeChat Pay's retry of any notification that got no 2xx.
    for i = 1, N do
      if not acked[i] then
        local r = ctl("/_ctl/notify", { url = url, out_trade_no = no_of(i), id = "N-" .. no_of(i), retries = 20 })
        assert.equal(204, r.statuses[#r.statuses])
      end
    end
    -- Count from the orders themselves.
    local versions, paid = 0, 0
    each_concurrently(N, 8, function(i)
      local o = order_of(srv, no_of(i))
      assert_paid_once(o, "N-" .. no_of(i))
      versions = versions + o.version
      for _, e in ipairs(o.history) do
        if e.to == "PAID" then paid = paid + 1 end
      end
    end)
    assert.equal(N, paid)
    assert.equal(2 * N, versions)
    local _, stats = req(srv.port, "GET", "/ctl/order_stats")
    assert.equal(2 * N, stats.transitions) -- N to PAYING, N to PAID
    assert.equal(N, stats.orders)
  end)

  describe("with Redis killed in the middle of notifications", function()
    local redis
    setup(function() redis = H.redis_server({ args = "--appendonly yes --appendfsync always" }) end)
    teardown(function() redis:cleanup() end)

    it("answers 5xx after the checks passed, and WeChat Pay's retry succeeds once Redis is back", function()
      ctl("/_ctl/reset")
      -- Nonces and claims in the worker's memory, orders in Redis: the notification gets past
      -- its verification and fails at the order.
      local srv = start_client({ SPEC_REDIS_URL = redis.url, PAYCLIENT_STORE = "memory",
        PAYCLIENT_ORDER_BACKEND = "redis", SPEC_STORE_PREFIX = "k" .. crypto.nonce(6) .. ":" })
      finally(function() srv:stop() srv:cleanup() end)
      local no = "RK-" .. crypto.nonce(8)
      prepay(srv, no, 700)
      redis:stop()
      local url = "http://127.0.0.1:" .. srv.port .. "/pay/notify"
      local h = task.spawn(ctl, "/_ctl/notify", { url = url, out_trade_no = no, id = "N-" .. no, retries = 300,
        retry_ms = 100 }, 120)
      H.wait_until(function() return #srv:log_lines("order store unavailable") >= 2 end, 30, "a refused delivery")
      redis:start()
      local r, err = h:wait()
      assert(r, err)
      assert.truthy(#r.statuses >= 3, cjson.encode(r.statuses))
      for i = 1, #r.statuses - 1 do
        assert.truthy(r.statuses[i] >= 500, cjson.encode(r.statuses))
        assert.same({ code = "FAIL", message = "order store unavailable" }, cjson.decode(r.bodies[i]))
      end
      assert.equal(204, r.statuses[#r.statuses])
      assert_paid_once(order_of(srv, no), "N-" .. no)
      local _, calls = req(srv.port, "GET", "/ctl/calls/N-" .. no)
      assert.equal(1, calls.calls)
    end)

    it("a stream of notifications across a kill -9 of Redis: every order PAID once, nothing lost or doubled", function()
      ctl("/_ctl/reset")
      local prefix = "s" .. crypto.nonce(6) .. ":"
      -- A claim left in Redis by a handler whose release failed expires after 10 s (default 120).
      local srv = start_client({ SPEC_REDIS_URL = redis.url, SPEC_STORE_PREFIX = prefix, PAY_HANDLER_TIMEOUT = 10 })
      finally(function() srv:stop() srv:cleanup() end)
      local N = 300
      local function no_of(i) return "S" .. prefix:sub(2, 7) .. "-" .. i end
      each_concurrently(N, 6, function(i) prepay(srv, no_of(i)) end)
      local url = "http://127.0.0.1:" .. srv.port .. "/pay/notify"
      local finals, failed = {}, 0
      local stream = task.spawn(each_concurrently, N, 6, function(i)
        local r = ctl("/_ctl/notify", { url = url, out_trade_no = no_of(i), id = "N-" .. no_of(i), retries = 300,
          retry_ms = 100 }, 120)
        finals[i] = r.statuses[#r.statuses]
        failed = failed + #r.statuses - 1
      end)
      local function done() return select(2, req(srv.port, "GET", "/ctl/calls")).done end
      H.wait_until(function() return done() >= 30 end, 60, "30 handled notifications")
      redis:stop()
      H.wait_until(function() return #srv:log_lines("notification refused") + #srv:log_lines("order store unavailable")
        + #srv:log_lines("WeChat Pay retries") >= 3 end, 30, "refused deliveries")
      redis:start()
      local ok, err = stream:wait()
      assert(ok, err)
      assert.truthy(failed >= 3, "deliveries refused while Redis was down: " .. failed)
      for i = 1, N do
        assert.equal(204, finals[i], no_of(i))
        assert_paid_once(order_of(srv, no_of(i)), "N-" .. no_of(i))
      end
    end)
  end)
end)
