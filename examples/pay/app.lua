-- examples/pay: create a JSAPI / Mini Program payment and hand the page
-- what wx.requestPayment needs.
--
--   WXD_PAY_MCHID=... WXD_PAY_APPID=wx... WXD_PAY_APIV3_KEY=... WXD_PAY_MCH_KEY_FILE=apiclient_key.pem \
--   WXD_PAY_MCH_SERIAL=... build/wxd run examples/pay
--
-- POST /orders {"description", "amount_total" (fen), "openid"}
--   → {"out_trade_no", "prepay_id", "pay_params": {appId, timeStamp, nonceStr, package, signType, paySign}}
--
-- Still to come with the payment state machine (wxd.order): recording the
-- order before the prepay call, POST /pay/notify driving its transitions,
-- GET /orders/:out_trade_no (state and history) and the WebSocket of order
-- updates. Until then this app takes no notifications: acknowledging a
-- payment without recording it would lose it.
local wxd = require "wxd"
local pay = require "wxd.pay"
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
    return 502, { error = "wechat pay unavailable", kind = err, code = info and info.code }
  end
  return { out_trade_no = no, prepay_id = r.prepay_id, pay_params = client:jsapi_params(r.prepay_id) }
end)

app:get("/health", function() return { status = "ok" } end)

return app
