-- examples/pay: WeChat Pay v3 JSAPI / Mini Program payments on the payment
-- state machine (see README.md here, docs/pay.md and docs/order.md).
--
-- POST /orders {"description", "amount_total" (fen), "openid"}
--   → {"out_trade_no", "prepay_id", "pay_params": {appId, timeStamp, nonceStr, package, signType, paySign}}
--   The order is recorded (CREATED) before WeChat Pay is asked and is PAYING once it answered.
-- GET /orders/:out_trade_no → {"out_trade_no", "state", "amount", "history": [{from, to, event, at}, ...]}
-- POST /pay/notify: WeChat Pay's notifications, verified, checked against the order and applied
--   (PAID, refunds) before the 204.
-- GET /orders/:out_trade_no/live and GET /ws/orders/:out_trade_no: the live order page (live.lua).
local wxd = require "wxd"
local pay = require "wxd.pay"
local order = require "wxd.order"
local crypto = require "wxd.crypto"
local log = require "wxd.log"
local app = require("wxd.app").new()

local cfg = wxd.config.pay
local function read(path)
  local f = assert(io.open(path, "rb"), "cannot read " .. tostring(path))
  local s = f:read("*a")
  f:close()
  return s
end

local client = pay.client({
  mchid = cfg.mchid, appid = cfg.appid, serial = cfg.mch_serial, apiv3_key = cfg.apiv3_key,
  private_key = read(cfg.mch_key_file),
  platform_cert_pems = cfg.platform_cert_file and { read(cfg.platform_cert_file) } or nil,
  public_key = cfg.public_key_file and read(cfg.public_key_file) or nil,
  public_key_id = cfg.public_key_id or nil,
  -- A public key given: verify with it; a platform certificate too: a migration.
  platform_certs = (not cfg.public_key_file) or cfg.platform_cert_file and true or false,
  api_base = cfg.api_base,
})

-- out_trade_no: 6..32 of [A-Za-z0-9_-|*], unique per merchant.
local function new_trade_no()
  return os.date("!%Y%m%d%H%M%S") .. crypto.nonce(12)
end

app:post("/orders", function(req)
  local b = req:json()
  if type(b) ~= "table" then return 400, { error = "a JSON object is expected" } end
  local amount = b.amount_total
  if type(amount) ~= "number" or amount % 1 ~= 0 or amount < 1 or amount > 1e9 then
    return 400, { error = "amount_total must be a positive integer (fen)" }
  end
  if type(b.openid) ~= "string" or not b.openid:find("^[%w_-]+$") then return 400, { error = "openid is required" } end
  local description = type(b.description) == "string" and b.description ~= "" and b.description:sub(1, 127) or "order"
  local no = new_trade_no()
  local r, err, info = client:jsapi({ description = description, out_trade_no = no, notify_url = cfg.notify_url,
    amount = { total = amount, currency = "CNY" }, payer = { openid = b.openid } })
  if not r then
    log.warn("pay: prepay failed", { out_trade_no = no, error = err, code = info and info.code,
      detail = info and info.detail })
    -- The order stays CREATED (or was never recorded): nothing to undo.
    return 502, { error = "wechat pay unavailable", kind = err, code = info and info.code }
  end
  return { out_trade_no = no, prepay_id = r.prepay_id, pay_params = client:jsapi_params(r.prepay_id) }
end)

app:get("/orders/:out_trade_no", function(req)
  local no = req.params.out_trade_no
  if not no:find("^[%w_%-|*@.]+$") or #no > 64 then return 400, { error = "bad out_trade_no" } end
  local o, err = order.get(no)
  if not o then
    if err == "not found" then return 404, { error = "no such order" } end
    return 503, { error = "order store unavailable" }
  end
  local history = {}
  for i, e in ipairs(o.history) do history[i] = { from = e.from, to = e.to, event = e.event, at = e.at } end
  return { out_trade_no = o.out_trade_no, state = o.state, amount = o.amount, currency = o.currency,
    history = wxd.json.array(history) }
end)

-- By the time a handler runs, the notification is verified, its order
-- checked (mchid, appid, amount) and moved durably: this is where the
-- business goes (ship, tell the customer). Returning true answers 204.
app:pay_notify("/pay/notify", { client = client }, {
  ["TRANSACTION.SUCCESS"] = function(tx, _, ctx)
    log.info("order paid", { out_trade_no = tx.out_trade_no, transaction_id = tx.transaction_id,
      state = ctx.order and ctx.order.state })
    return true
  end,
  ["REFUND.SUCCESS"] = function(refund)
    log.info("order refunded", { out_trade_no = refund.out_trade_no, out_refund_no = refund.out_refund_no })
    return true
  end,
})

-- Money that arrived for an order that no longer expected it (paid after it
-- was closed): recorded in the order's `late` list; reconcile by hand or refund.
app:order_hooks{ on_late = function(o, ev)
  log.error("late payment event: reconcile", { out_trade_no = o.out_trade_no, state = o.state, to = ev.to,
    key = ev.key })
end }

-- GET /orders/:out_trade_no/live (a page) and GET /ws/orders/:out_trade_no
-- (the order, then each change, over a WebSocket): see live.lua.
require("live").mount(app)

app:get("/health", function() return { status = "ok" } end)

return app
