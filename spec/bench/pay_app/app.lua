-- The wxd peer of spec/bench/pay_http.sh: WeChat Pay v3 notifications on
-- app:pay_notify, each verified (window, RSA signature, nonce), decrypted
-- (AES-256-GCM), checked against its stored order and moved to PAID
-- (durably) before the 204. The platform certificate is given (no
-- download); the API host is never called.
local pay = require "wxd.pay"
local order = require "wxd.order"
local task = require "wxd.task"
local app = require("wxd.app").new()

local DIR = assert(os.getenv("BENCH_PAY_DIR"), "BENCH_PAY_DIR")
local function read(name)
  local f = assert(io.open(DIR .. "/" .. name, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

local client = pay.client({ mchid = "1900000001", appid = "wxbenchappid0001",
  serial = "3775B6A45ACD588826D15E583A95F5DD00000001", private_key = read("mch.key"),
  apiv3_key = os.getenv("BENCH_PAY_APIV3") or "0123456789abcdef0123456789abcdef",
  platform_cert_pems = { read("plat.crt") }, api_base = "http://127.0.0.1:1", backup_base = false,
  background = false, orders = os.getenv("BENCH_PAY_ORDERS") ~= "off" })

app:pay_notify("/pay/notify", { client = client }, {
  ["TRANSACTION.SUCCESS"] = function(_, _, ctx) return not ctx.order or ctx.order.state == "PAID" end,
})

-- The ceiling's null route (peer wxd-null of pay_http.sh): the same
-- requests, read by the same HTTP layer, answered 204 with nothing checked.
app:post("/bench/null", function() return 204 end)

-- Outside the measurement: the orders the next run's notifications are
-- about, created and moved to PAYING as a prepay would (64 at a time, so
-- that the journal commits them in groups).
app:post("/bench/orders", function(req)
  local run, first, count = req.query.run, tonumber(req.query.first), tonumber(req.query.count)
  local next_seq, last = first, first + count - 1
  local function worker()
    while next_seq <= last do
      local no = "B" .. run .. "x" .. next_seq
      next_seq = next_seq + 1
      assert(order.create({ out_trade_no = no, amount = 100, currency = "CNY", appid = "wxbenchappid0001",
        mchid = "1900000001", payer_openid = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o" }))
      assert(order.transition(no, "PAYING", { key = "prepay", event = "PREPAY" }))
    end
    return true
  end
  local hs = {}
  for i = 1, 64 do hs[i] = task.spawn(worker) end
  for _, h in ipairs(hs) do assert(h:wait()) end
  return { ok = true, count = count }
end)

-- The state machine's counters (transitions, duplicates, ...).
app:get("/bench/stats", function() return order.stats() end)
app:get("/bench/order/:no", function(req) return order.get(req.params.no) or { state = "none" } end)
app:get("/health", function() return { status = "ok" } end)

return app
