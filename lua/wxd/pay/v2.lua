--- wxd.pay.v2: the legacy WeChat Pay API (XML, MD5 / HMAC-SHA256 signatures).
--
-- * `v2.sign(params, key [, sign_type])`: every non-empty parameter but
--   `sign`, sorted by name, `k=v&...&key=<APIv2 key>`, MD5 or HMAC-SHA256
--   (keyed with the APIv2 key), upper-case hex.
-- * `v2.verify(params, key)`: the `sign` field checked in constant time,
--   with the declared `sign_type`, else MD5 or HMAC-SHA256 (merchants on
--   HMAC receive MD5-signed notifications).
-- * `v2.client(cfg)`: signed XML requests; the answer's signature checked;
--   refunds over mutual TLS with the merchant's PKCS#12 bundle.
-- * `v2.decrypt_req_info(req_info, key)`: refund notifications
--   (AES-256-ECB, key = lower-case hex MD5 of the APIv2 key).
-- * `app:pay_notify_v2(path, cfg, handlers)`: payment and refund
--   notifications, answered in XML.
--
-- XML is parsed by wxd.xml, which refuses every DOCTYPE (no XXE).
-- Calls return a table or `nil, kind, info`: "wechatpay" (return_code or
-- result_code FAIL: info.code is err_code or "FAIL", info.message),
-- "signature" (the answer's sign does not verify), "xml", "status", or the
-- kinds of wxd.http.
-- @module wxd.pay.v2

local http = require "wxd.http"
local crypto = require "wxd.crypto"
local xml = require "wxd.xml"
local log = require "wxd.log"

local type, error, pairs, ipairs, tostring, tonumber, setmetatable =
  type, error, pairs, ipairs, tostring, tonumber, setmetatable
local find, gsub, format = string.find, string.gsub, string.format
local concat, sort = table.concat, table.sort

local _M = { _VERSION = "0.1.0" }

_M.DEFAULT_API_BASE = "https://api.mch.weixin.qq.com"
_M.DEFAULT_BACKUP_BASE = "https://api2.mch.weixin.qq.com"
_M.SUCCESS_REPLY = "<xml><return_code><![CDATA[SUCCESS]]></return_code><return_msg><![CDATA[OK]]></return_msg></xml>"

local function fail(msg, level) error("wxd.pay.v2: " .. msg, level + 1) end

local function check_key(key, level)
  if type(key) ~= "string" or key == "" then fail("the APIv2 key must be a non-empty string", level + 1) end
end

--- The string that is signed: `k=v&...&key=KEY`.
function _M.sign_string(params, key)
  local names = {}
  for k, v in pairs(params) do
    if k ~= "sign" and type(k) == "string" and (type(v) == "string" or type(v) == "number") and v ~= "" then
      names[#names + 1] = k
    end
  end
  sort(names)
  local parts = {}
  for i, k in ipairs(names) do parts[i] = k .. "=" .. tostring(params[k]) end
  parts[#parts + 1] = "key=" .. key
  return concat(parts, "&")
end

--- The signature of params: 32 (MD5) or 64 (HMAC-SHA256) upper-case hex characters.
-- @tparam table params
-- @tparam string key the APIv2 key
-- @tparam[opt="MD5"] string sign_type "MD5" or "HMAC-SHA256"
function _M.sign(params, key, sign_type)
  if type(params) ~= "table" then fail("sign: params must be a table", 2) end
  check_key(key, 2)
  local s = _M.sign_string(params, key)
  sign_type = sign_type or "MD5"
  if sign_type == "MD5" then return crypto.md5_hex(s):upper() end
  if sign_type == "HMAC-SHA256" then return crypto.hmac_sha256_hex(key, s):upper() end
  fail('sign: sign_type must be "MD5" or "HMAC-SHA256", got ' .. tostring(sign_type), 2)
end

--- Checks params.sign: true, or nil, "bad signature".
function _M.verify(params, key)
  if type(params) ~= "table" then fail("verify: params must be a table", 2) end
  check_key(key, 2)
  local sign = params.sign
  if type(sign) ~= "string" or sign == "" then return nil, "bad signature" end
  local first = params.sign_type == "HMAC-SHA256" and "HMAC-SHA256" or "MD5"
  local second = first == "MD5" and "HMAC-SHA256" or "MD5"
  if crypto.equals(_M.sign(params, key, first), sign:upper()) then return true end
  if crypto.equals(_M.sign(params, key, second), sign:upper()) then return true end
  return nil, "bad signature"
end

--- Decodes a v2 XML document (DOCTYPE refused): the fields, or nil, err.
function _M.decode(body)
  if type(body) ~= "string" then return nil, "invalid xml" end
  local t, root = xml.decode(body, { max_bytes = 65536, max_depth = 4 })
  if not t then return nil, root end
  for k, v in pairs(t) do
    if type(v) ~= "string" then t[k] = nil end -- v2 fields are flat
  end
  return t
end

--- Encodes flat params as `<xml>...</xml>`.
function _M.encode(params)
  local t = {}
  for k, v in pairs(params) do t[k] = tostring(v) end
  return xml.encode(t)
end

--- Decrypts a refund notification's req_info: the fields of its `<root>`,
-- or nil, "decrypt failed".
function _M.decrypt_req_info(req_info, key)
  check_key(key, 2)
  if type(req_info) ~= "string" then return nil, "decrypt failed" end
  local ct = crypto.base64_decode((gsub(req_info, "%s", "")))
  if not ct then return nil, "decrypt failed" end
  local plain = crypto.aes_ecb_decrypt(crypto.md5_hex(key), ct)
  if not plain then return nil, "decrypt failed" end
  local t = _M.decode(plain)
  if not t then return nil, "decrypt failed" end
  return t
end

------------------------------------------------------------------------
-- The client
------------------------------------------------------------------------

local Client = {}
Client.__index = Client

--- A v2 client.
-- @tparam table cfg `mchid`, `key` (APIv2 key), `appid`; `sign_type`
--   ("MD5" default, or "HMAC-SHA256"); `pkcs12` (the bytes of
--   apiclient_cert.p12, for refunds) and `pkcs12_passphrase` (default the
--   mchid); `api_base`, `backup_base`; `timeout`; `http` (extra wxd.http
--   options such as ca_file)
function _M.client(cfg)
  if type(cfg) ~= "table" then fail("client: cfg must be a table", 2) end
  if type(cfg.mchid) ~= "string" or not find(cfg.mchid, "^%d+$") then fail("cfg.mchid must be digits", 2) end
  check_key(cfg.key, 2)
  local st = cfg.sign_type or "MD5"
  if st ~= "MD5" and st ~= "HMAC-SHA256" then fail('cfg.sign_type must be "MD5" or "HMAC-SHA256"', 2) end
  if cfg.pkcs12 ~= nil and type(cfg.pkcs12) ~= "string" then fail("cfg.pkcs12 must be the bundle's bytes", 2) end
  local base = cfg.api_base or os.getenv("WXD_PAY_API_BASE") or _M.DEFAULT_API_BASE
  local backup = cfg.backup_base
  if backup == nil then backup = (base == _M.DEFAULT_API_BASE) and _M.DEFAULT_BACKUP_BASE or false end
  return setmetatable({ mchid = cfg.mchid, key = cfg.key, appid = cfg.appid, sign_type = st, pkcs12 = cfg.pkcs12,
    passphrase = cfg.pkcs12_passphrase or cfg.mchid, api_base = (gsub(base, "/+$", "")),
    backup_base = backup and (gsub(backup, "/+$", "")) or false, timeout = cfg.timeout or 10,
    http_opts = cfg.http or {} }, Client)
end

local function before_sending(kind, detail)
  if kind == "connect" or kind == "dns" or kind == "tls" then return true end
  return kind == "timeout" and type(detail) == "string" and find(detail, "^connect timeout") ~= nil
end

--- One signed XML call.
-- @tparam string path e.g. "/pay/orderquery"
-- @tparam table params the fields (mch_id, appid, nonce_str, sign_type and sign are added)
-- @tparam[opt] table opts `cert = true`: mutual TLS with cfg.pkcs12
-- @treturn[1] table the answer's fields (signature checked)
-- @treturn[2] nil
-- @treturn[2] string kind
-- @treturn[2] table info
function Client:request(path, params, opts)
  if type(path) ~= "string" or path:sub(1, 1) ~= "/" then fail("path must start with /", 2) end
  if type(params) ~= "table" then fail("params must be a table", 2) end
  opts = opts or {}
  local p = {}
  for k, v in pairs(params) do p[k] = v end
  p.mch_id = p.mch_id or self.mchid
  p.appid = p.appid or self.appid
  p.nonce_str = p.nonce_str or crypto.nonce(32)
  if self.sign_type ~= "MD5" then p.sign_type = self.sign_type end
  p.sign = _M.sign(p, self.key, self.sign_type)
  local body = _M.encode(p)
  local client_cert
  if opts.cert then
    if not self.pkcs12 then fail("this call needs the merchant certificate: cfg.pkcs12", 2) end
    client_cert = { pkcs12 = self.pkcs12, passphrase = self.passphrase }
  end
  local res, kind, detail
  local bases = { self.api_base, self.backup_base or nil }
  for i, base in ipairs(bases) do
    local o = { method = "POST", url = base .. path, body = body, timeout = self.timeout,
      headers = { ["Content-Type"] = "text/xml; charset=utf-8" }, client_cert = client_cert }
    for k, v in pairs(self.http_opts) do o[k] = v end
    res, kind, detail = http.request(o)
    if res or not before_sending(kind, detail) or i == #bases then break end
    log.warn("pay.v2: primary host unreachable; trying the backup", { mchid = self.mchid, kind = kind })
  end
  if not res then return nil, kind, { detail = detail } end
  if res.status ~= 200 then return nil, "status", { status = res.status } end
  local t, err = _M.decode(res.body)
  if not t then return nil, "xml", { detail = err } end
  if t.return_code ~= "SUCCESS" then
    return nil, "wechatpay", { code = "FAIL", message = t.return_msg }
  end
  if t.sign ~= nil or t.result_code ~= nil then
    local ok = _M.verify(t, self.key)
    if not ok then return nil, "signature", { detail = "bad signature" } end
  end
  if t.result_code ~= nil and t.result_code ~= "SUCCESS" then
    return nil, "wechatpay", { code = t.err_code or "FAIL", message = t.err_code_des,
      retryable = t.err_code == "SYSTEMERROR" or t.err_code == "FREQUENCY_LIMITED" }
  end
  return t
end

--- Refund (/secapi/pay/refund, mutual TLS): params out_trade_no or
-- transaction_id, out_refund_no, total_fee, refund_fee, ...
function Client:refund(params)
  return self:request("/secapi/pay/refund", params, { cert = true })
end

--- Refund query (/pay/refundquery).
function Client:refund_query(params)
  return self:request("/pay/refundquery", params)
end

--- Order query (/pay/orderquery).
function Client:order_query(params)
  return self:request("/pay/orderquery", params)
end

------------------------------------------------------------------------
-- Notifications
------------------------------------------------------------------------

local REFUND_EVENTS = { SUCCESS = "REFUND.SUCCESS", CHANGE = "REFUND.ABNORMAL", REFUNDCLOSE = "REFUND.CLOSED" }
-- v2 refund_status → v3's (what wxd.pay.orders maps to a state).
local REFUND_STATUS = { SUCCESS = "SUCCESS", CHANGE = "ABNORMAL", REFUNDCLOSE = "CLOSED" }

local Endpoint = {}
Endpoint.__index = Endpoint

local DISPATCHER = { __index = require("wxd.pay.notify") }

local function answer(res, ok, msg)
  res.headers["content-type"] = "application/xml; charset=utf-8"
  if ok then return 200, _M.SUCCESS_REPLY end
  return 200, format("<xml><return_code><![CDATA[FAIL]]></return_code><return_msg><![CDATA[%s]]></return_msg></xml>",
    (gsub(msg or "FAIL", "]]>", "")))
end

-- A v2 amount in fen: an integer string becomes a number; anything else is
-- kept as it is, which no stored amount equals (an amount mismatch).
local function fen(v)
  if type(v) == "string" and #v <= 15 and find(v, "^%d+$") then return tonumber(v) end
  return v
end

-- The notification as a v3-like table: id, event_type, data (the v2
-- fields, for the handler), version = 2, and order_data: the same facts
-- in the shape of a v3 resource (mchid, appid, amount = { total, currency },
-- trade_state / refund_status, ...), which wxd.pay.orders checks against
-- the stored order. The id is the order's idempotency key too.
function Endpoint:open(body)
  local t, err = _M.decode(body)
  if not t then return nil, "xml", err end
  if t.return_code ~= "SUCCESS" then return nil, "not success", t.return_msg end
  if t.mch_id ~= nil and t.mch_id ~= self.mchid then return nil, "mchid mismatch" end
  if self.appid and t.appid ~= nil and t.appid ~= self.appid then return nil, "appid mismatch" end
  if t.req_info ~= nil then
    -- Refunds: no sign; req_info is encrypted with the key instead.
    local info = _M.decrypt_req_info(t.req_info, self.key)
    if not info then return nil, "decrypt failed" end
    local ev = REFUND_EVENTS[info.refund_status] or "REFUND.UNKNOWN"
    return { id = "v2refund:" .. tostring(info.refund_id or info.out_refund_no) .. ":" .. tostring(info.refund_status),
      event_type = ev, data = info, outer = t, version = 2,
      order_data = { mchid = t.mch_id, out_trade_no = info.out_trade_no, transaction_id = info.transaction_id,
        out_refund_no = info.out_refund_no, refund_id = info.refund_id,
        refund_status = REFUND_STATUS[info.refund_status],
        amount = { total = fen(info.total_fee), refund = fen(info.refund_fee) } } }
  end
  if not _M.verify(t, self.key) then return nil, "bad signature" end
  local ev = t.result_code == "SUCCESS" and "TRANSACTION.SUCCESS" or "TRANSACTION.FAIL"
  return { id = "v2pay:" .. tostring(t.transaction_id or t.out_trade_no), event_type = ev, data = t, version = 2,
    -- A v2 payment result says SUCCESS or FAIL, no trade_state: FAIL moves
    -- nothing (the customer may pay the same order again).
    order_data = { mchid = t.mch_id, appid = t.appid, out_trade_no = t.out_trade_no,
      transaction_id = t.transaction_id, trade_state = t.result_code == "SUCCESS" and "SUCCESS" or nil,
      amount = { total = fen(t.total_fee), currency = t.fee_type } } }
end

function Endpoint:receive(req, res)
  local n, why = self:open(req.body or "")
  if not n then
    log.warn("pay.v2: notification refused", { path = self.path, reason = why, remote = req.remote_addr })
    return answer(res, false, why)
  end
  local ok, _, message = self.dispatcher:process(self.orders, n, { req = req, path = self.path, version = 2 })
  if ok then return answer(res, true) end
  return answer(res, false, message)
end

--- The v2 notification handling of a path (used by wxd.pay's mount for v2
-- refund notifications on a v3 URL). cfg: `key`, `mchid`, `appid`;
-- `orders`: a store of wxd.pay.orders.resolve, or nil (none).
function _M.notify_endpoint(path, cfg, handlers, dispatcher, orders)
  if type(cfg) ~= "table" then fail("cfg must be a table (key, mchid, appid)", 3) end
  check_key(cfg.key, 3)
  if type(cfg.mchid) ~= "string" then fail("cfg.mchid must be a string", 3) end
  return setmetatable({ path = path, key = cfg.key, mchid = cfg.mchid, appid = cfg.appid, handlers = handlers,
    dispatcher = dispatcher, orders = orders }, Endpoint)
end

--- Mounts a v2 notification URL (what `app:pay_notify_v2` calls).
-- @tparam table cfg `key` (APIv2), `mchid`, `appid`, `deadline_ms` (4500),
--   `orders` (as wxd.pay's client: `true` wxd.order's default store, a
--   store from wxd.order.new, `false` none)
-- @tparam table|function handlers by event_type ("TRANSACTION.SUCCESS",
--   "TRANSACTION.FAIL", "REFUND.SUCCESS", "REFUND.ABNORMAL",
--   "REFUND.CLOSED"), `default`; `fn(data, notification, ctx)` returns true
--   once handled
function _M.mount(app, path, cfg, handlers)
  if type(path) ~= "string" then fail("pay_notify_v2: path must be a string", 2) end
  if type(handlers) == "function" then handlers = { default = handlers } end
  if type(handlers) ~= "table" then fail("pay_notify_v2: handlers must be a table or a function", 2) end
  local d = setmetatable({ path = path, prefix = "wxd:pay:" .. tostring(cfg.mchid) .. ":", handlers = handlers,
    deadline_ms = cfg.deadline_ms or 4500, done_ttl = 25 * 3600, run_expire = cfg.handler_timeout or 120 }, DISPATCHER)
  local ep = _M.notify_endpoint(path, cfg, handlers, d, require("wxd.pay.orders").resolve(cfg.orders))
  app:post(path, function(req, res) return ep:receive(req, res) end)
  return app
end

return _M
