--- wxd.pay: the WeChat Pay v3 API, with every signature checked.
--
-- `pay.client(cfg)` gives a client for one merchant (mchid). It signs each
-- request (`Authorization: WECHATPAY2-SHA256-RSA2048 ...`, SHA256withRSA,
-- PKCS#1 v1.5) and verifies the signature of each answer before its body is
-- trusted, with the key named by `Wechatpay-Serial`:
--
-- * platform certificates: downloaded from /v3/certificates, decrypted with
--   the APIv3 key (AES-256-GCM), kept in `wxd.store` (so every worker, and
--   with Redis every node, uses the same set) and refreshed by a background
--   job on worker 0 (every `cert_refresh_s`, default 1 h) and whenever a
--   serial nobody knows arrives (at most once per `miss_refresh_s`);
-- * the WeChat Pay public key (`public_key`, `public_key_id` =
--   `PUB_KEY_ID_...`): requests then carry `Wechatpay-Serial: PUB_KEY_ID_...`
--   so that answers are signed with it. During a migration give both.
--
-- Notifications (`client:notification(headers, body)`, and
-- `app:pay_notify(path, cfg, handlers)`) are verified the same way, with a
-- clock window and a nonce memory, then decrypted.
--
-- Calls return a table, or `nil, kind, info` with kind one of: "wechatpay"
-- (WeChat Pay answered an error: info.code such as "ORDERPAID",
-- "ORDER_CLOSED", "SYSTEM_ERROR", "FREQUENCY_LIMITED"; info.status,
-- info.message, info.retryable), "signature" (the answer's signature did not
-- verify: info.detail), "status" (an unsigned error status: WeChat Pay
-- could not verify the request, or a gateway failed; info.status), "json"
-- (a body that is not the JSON expected), or the kinds of wxd.http
-- ("timeout", "connect", "dns", "tls", "protocol", "too_large").
-- Wrong argument types and bad settings raise.
-- @module wxd.pay
-- @usage
-- local pay = require "wxd.pay"
-- local c = pay.client({ mchid = "1900000001", appid = "wx...", serial = env("WXD_PAY_MCH_SERIAL"),
--   private_key = read(env("WXD_PAY_MCH_KEY_FILE")), apiv3_key = env("WXD_PAY_APIV3_KEY") })
-- local r, err, info = c:jsapi({ description = "tea", out_trade_no = no, amount = { total = 100 },
--   payer = { openid = openid }, notify_url = "https://shop.example/pay/notify" })
-- if r then return c:jsapi_params(r.prepay_id) end

local http = require "wxd.http"
local store = require "wxd.store"
local timer = require "wxd.timer"
local crypto = require "wxd.crypto"
local log = require "wxd.log"
local json = require "wxd.json"
local core = require "wxd.core"
local pay_orders = require "wxd.pay.orders"

local type, error, pairs, ipairs, tostring, tonumber, setmetatable, pcall =
  type, error, pairs, ipairs, tostring, tonumber, setmetatable, pcall
local floor, abs = math.floor, math.abs
local format, find, gsub, sub, byte = string.format, string.find, string.gsub, string.sub, string.byte
local concat, sort = table.concat, table.sort
local now = core.now

local _M = { _VERSION = "0.1.0" }

_M.DEFAULT_API_BASE = "https://api.mch.weixin.qq.com"
_M.DEFAULT_BACKUP_BASE = "https://api2.mch.weixin.qq.com"
_M.SCHEMA = "WECHATPAY2-SHA256-RSA2048"

--- WeChat Pay error codes worth retrying later (with the same request).
_M.RETRYABLE_CODES = { SYSTEM_ERROR = true, FREQUENCY_LIMITED = true, BANK_ERROR = true, RATELIMIT_EXCEEDED = true }

local function fail(msg, level) error("wxd.pay: " .. msg, level + 1) end

------------------------------------------------------------------------
-- Signatures
------------------------------------------------------------------------

--- The v3 request string to sign: `METHOD\nPATH?QUERY\nTIMESTAMP\nNONCE\nBODY\n`.
function _M.request_message(method, url_path, timestamp, nonce, body)
  return method .. "\n" .. url_path .. "\n" .. tostring(timestamp) .. "\n" .. nonce .. "\n" .. (body or "") .. "\n"
end

--- The string a WeChat Pay answer or notification is signed over:
-- `Wechatpay-Timestamp\nWechatpay-Nonce\nRAW_BODY\n`.
function _M.response_message(timestamp, nonce, body)
  return timestamp .. "\n" .. nonce .. "\n" .. (body or "") .. "\n"
end

--- The Authorization header value for a request.
-- @tparam table p `mchid`, `serial` (the merchant certificate's), `key`
--   (the merchant private key object), `method`, `url_path` (path and
--   query as sent), `body`, and optionally `timestamp` and `nonce`
function _M.authorization(p)
  local ts = p.timestamp or floor(now())
  local nonce = p.nonce or crypto.nonce(32)
  local sig = crypto.base64_encode(p.key:sign(_M.request_message(p.method, p.url_path, ts, nonce, p.body)))
  return format('%s mchid="%s",nonce_str="%s",timestamp="%d",serial_no="%s",signature="%s"',
    _M.SCHEMA, p.mchid, nonce, ts, p.serial, sig)
end

local function header(h, name)
  local v = h[name]
  if v == nil then
    -- Headers as received by the server keep their case in some callers' tables.
    local lname = name:lower()
    for k, val in pairs(h) do
      if type(k) == "string" and k:lower() == lname then v = val break end
    end
  end
  if type(v) == "table" then v = v[1] end
  return v
end

------------------------------------------------------------------------
-- The client
------------------------------------------------------------------------

local Client = {}
Client.__index = Client
Client.__tostring = function(c) return "wxd.pay client " .. c.mchid end

local clients = {} -- this Lua state's clients, by settings

local function as_private_key(v)
  if type(v) == "string" then
    local k, err = crypto.load_private_key(v)
    if not k then fail("cfg.private_key: " .. err, 4) end
    return k
  end
  if getmetatable(v) == "wxd.crypto.key" and v:is_private() then return v end
  fail("cfg.private_key must be the merchant private key (PEM text or a key from wxd.crypto)", 4)
end

local function opt_number(cfg, name, default, lo, hi)
  local v = cfg[name]
  if v == nil then return default end
  if type(v) ~= "number" or v ~= v or v < lo or v > hi then
    fail(format("cfg.%s must be a number in [%s, %s], got %s", name, lo, hi, tostring(v)), 4)
  end
  return v
end

local function check_base(name, base)
  if type(base) ~= "string" or not find(base, "^https?://[^/?#]+") then
    fail("cfg." .. name .. " must be an http(s) URL such as " .. _M.DEFAULT_API_BASE .. ", got " .. tostring(base), 4)
  end
  return (gsub(base, "/+$", ""))
end

-- WeChat Pay limits calls per merchant and per API (FREQUENCY_LIMITED); the
-- client holds back a burst before it reaches them. Defaults only stop
-- runaway loops; set cfg.quota to the merchant's real limits.
local DEFAULT_QUOTA = { mchid = { rate = 1000, burst = 2000 }, api = { rate = 500, burst = 1000 }, wait = 1 }

-- The client's limiters from cfg.quota (nil: the defaults; false: none).
local function check_quota(q, mchid)
  if q == false then return nil end
  if q == nil then q = DEFAULT_QUOTA end
  if type(q) ~= "table" then fail("cfg.quota must be a table or false", 3) end
  local limit = require "wxd.limit"
  local out = { wait = q.wait or DEFAULT_QUOTA.wait }
  if type(out.wait) ~= "number" or out.wait < 0 then fail("cfg.quota.wait must be seconds >= 0", 3) end
  for _, scope in ipairs({ "mchid", "api" }) do
    local sc = q[scope] or DEFAULT_QUOTA[scope]
    if type(sc) ~= "table" or type(sc.rate) ~= "number" or type(sc.burst) ~= "number" then
      fail("cfg.quota." .. scope .. " must be { rate = n, burst = n }", 3)
    end
    -- Named by the settings too: clients of one merchant with other quotas do not share them.
    local name = string.format("pay:%s:%s:%g:%g", scope, mchid, sc.rate, sc.burst)
    out[scope .. "_limiter"] = limit.new(name, { rate = sc.rate, burst = sc.burst, redis = q.redis })
  end
  return out
end

-- The API a path names, without the ids in it: per-API quotas count
-- /v3/pay/transactions/out-trade-no/A and .../B as one API.
local ID_AFTER = { ["out-trade-no"] = true, id = true, refunds = true, ["sub-mchid"] = true }
local function api_of(method, path)
  local parts, prev = {}, nil
  for seg in (path:match("^[^?]*")):gmatch("[^/]+") do
    parts[#parts + 1] = (prev and ID_AFTER[prev] and seg ~= "close") and ":id" or seg
    prev = seg
  end
  return method .. " /" .. concat(parts, "/")
end
_M.api_of = api_of

--- Takes one call of the quotas (merchant, then API), waiting up to
-- quota.wait seconds in all for a turn: true, or nil, "quota",
-- { scope = "mchid"|"api", retry_after = seconds } with nothing sent.
function Client:take_quota(method, path)
  local q = self.quota
  if not q then return true end
  return require("wxd.limit").take_all({ { q.mchid_limiter, self.mchid, "mchid" },
    { q.api_limiter, api_of(method, path), "api" } }, q.wait, self.counters)
end

--- A client for one merchant. Clients are cached per Lua state: the same
-- settings give the same client.
-- @tparam table cfg
--   `mchid`, `serial` (merchant certificate serial), `private_key` (PEM or
--   key object), `apiv3_key` (32 bytes) — required;
--   `appid` (default appid of the order APIs and invoke parameters);
--   `public_key` (PEM) and `public_key_id` (`PUB_KEY_ID_...`): public key mode;
--   `platform_certs` (true: use /v3/certificates; default true without a
--   public key, false with one — set both for a migration);
--   `platform_cert_pems` (an array of PEM certificates to start with);
--   `api_base`, `backup_base` (default the real hosts; `backup_base =
--   false`: no failover); `timeout` (as wxd.http, default 10 s);
--   `cert_refresh_s` (3600), `miss_refresh_s` (60), `timestamp_window` (300);
--   `background` (default on in a server); `http` (extra wxd.http options:
--   `ca_file`, `verify`)
function _M.client(cfg)
  if type(cfg) ~= "table" then fail("client: cfg must be a table", 2) end
  local mchid = cfg.mchid
  if type(mchid) ~= "string" or not find(mchid, "^%d+$") then fail("cfg.mchid must be the merchant id (digits)", 2) end
  if type(cfg.serial) ~= "string" or not find(cfg.serial, "^%x+$") then
    fail("cfg.serial must be the merchant certificate serial (hex)", 2)
  end
  if type(cfg.apiv3_key) ~= "string" or #cfg.apiv3_key ~= 32 then
    fail("cfg.apiv3_key must be the 32-byte APIv3 key", 2)
  end
  if cfg.appid ~= nil and (type(cfg.appid) ~= "string" or not find(cfg.appid, "^[%w_-]+$")) then
    fail("cfg.appid must be an appid string", 2)
  end
  local pk_id = cfg.public_key_id
  if (cfg.public_key == nil) ~= (pk_id == nil) then fail("cfg.public_key and cfg.public_key_id go together", 2) end
  if pk_id ~= nil and (type(pk_id) ~= "string" or not find(pk_id, "^PUB_KEY_ID_[%w_]+$")) then
    fail("cfg.public_key_id must look like PUB_KEY_ID_...", 2)
  end
  local use_certs = cfg.platform_certs
  if use_certs == nil then use_certs = pk_id == nil end
  if not use_certs and pk_id == nil then fail("no way to verify answers: give public_key or platform_certs", 2) end
  local base = check_base("api_base", cfg.api_base or os.getenv("WXD_PAY_API_BASE") or _M.DEFAULT_API_BASE)
  local backup = cfg.backup_base
  if backup == nil then
    backup = (cfg.api_base == nil and os.getenv("WXD_PAY_API_BASE") == nil) and _M.DEFAULT_BACKUP_BASE or false
  end
  if backup then backup = check_base("backup_base", backup) end
  if cfg.timeout ~= nil and type(cfg.timeout) ~= "number" and type(cfg.timeout) ~= "table" then
    fail("cfg.timeout must be seconds or a table as for wxd.http", 2)
  end
  if cfg.http ~= nil and type(cfg.http) ~= "table" then fail("cfg.http must be a table", 2) end
  local refresh_s = opt_number(cfg, "cert_refresh_s", 3600, 1, 12 * 3600 - 1)
  local miss_s = opt_number(cfg, "miss_refresh_s", 60, 0, 86400)
  local window = opt_number(cfg, "timestamp_window", 300, 1, 3600)
  local background = cfg.background
  if background == nil then background = require("wxd.core.shdict").in_server() end
  local orders = pay_orders.resolve(cfg.orders)

  local pems = cfg.platform_cert_pems or {}
  if type(pems) ~= "table" then fail("cfg.platform_cert_pems must be an array of PEM texts", 2) end
  local pem_id = {}
  for i, p in ipairs(pems) do
    if type(p) ~= "string" then fail("cfg.platform_cert_pems[" .. i .. "] must be a PEM text", 2) end
    pem_id[i] = crypto.sha256_hex(p)
  end
  local id = concat({ mchid, cfg.serial, crypto.sha256_hex(cfg.apiv3_key),
    type(cfg.private_key) == "string" and crypto.sha256_hex(cfg.private_key) or tostring(cfg.private_key),
    tostring(pk_id), cfg.public_key and crypto.sha256_hex(cfg.public_key) or "", tostring(use_certs),
    concat(pem_id, ","), tostring(cfg.appid), base, tostring(backup), refresh_s, miss_s, window,
    tostring(background), json.encode(cfg.timeout or 0), json.encode(cfg.http or {}), tostring(cfg.orders),
    tostring(cfg.quota) }, "|")
  local c = clients[id]
  if c then return c end

  c = setmetatable({ mchid = mchid, serial = cfg.serial:upper(), appid = cfg.appid, key = as_private_key(cfg.private_key),
    apiv3_key = cfg.apiv3_key, api_base = base, backup_base = backup, timeout = cfg.timeout or 10,
    http_opts = cfg.http or {}, use_certs = use_certs, public_key_id = pk_id, cert_refresh_s = refresh_s,
    miss_refresh_s = miss_s, window = window, prefix = "wxd:pay:" .. mchid .. ":", orders = orders,
    certs_rec = nil, cert_keys = {}, static_keys = {}, newest_cert = nil,
    counters = { requests = 0, failovers = 0, cert_fetches = 0, cert_fetch_failures = 0, verify_failures = 0,
      quota_waits = 0, quota_refusals = 0 }, quota = check_quota(cfg.quota, mchid) },
    Client)
  if pk_id then
    local k, err = crypto.load_public_key(cfg.public_key)
    if not k then fail("cfg.public_key: " .. err, 2) end
    c.public_key = k
    c.static_keys[pk_id] = k
  end
  for i, p in ipairs(pems) do
    local cert, err = crypto.load_certificate(p)
    if not cert then fail("cfg.platform_cert_pems[" .. i .. "]: " .. err, 2) end
    c.static_keys[cert:serial()] = assert(cert:public_key())
    c.static_cert = c.static_cert or { serial = cert:serial(), key = cert:public_key(), not_after = cert:not_after() }
  end
  if use_certs and background then
    c.job = timer.every(refresh_s * 1000, function()
      local ok, err, info = c:refresh_certificates(true)
      if not ok then
        log.warn("pay: platform certificate refresh failed; the certificates in the store stay in use",
          { mchid = mchid, error = err, detail = info and (info.detail or info.code) })
      end
    end, { worker = 0 })
  end
  clients[id] = c
  return c
end

-- A WeChat Pay error answer (already verified) as nil, "wechatpay", info.
local function error_answer(res, data)
  local code = type(data) == "table" and data.code or nil
  local retryable = res.status == 429 or res.status == 500 or res.status == 502 or res.status == 503
    or (code ~= nil and _M.RETRYABLE_CODES[code] == true)
  return nil, "wechatpay", { status = res.status, code = type(code) == "string" and code or nil,
    message = type(data) == "table" and type(data.message) == "string" and data.message or nil,
    detail = type(data) == "table" and data.detail or nil, retryable = retryable }
end

------------------------------------------------------------------------
-- Platform certificates in the store
------------------------------------------------------------------------

-- The stored set: JSON { fetched_at, certs = [{ serial, pem, not_before, not_after }] }.
-- Each worker keeps the keys parsed from the record it last saw; a new
-- record (another worker's refresh) is parsed on the next look-up.
function Client:load_cert_keys()
  local rec = store.get(self.prefix .. "certs")
  if type(rec) ~= "string" then rec = nil end
  if rec == self.certs_rec then return self.cert_keys end
  local keys, newest = {}, nil
  local t = rec and json.decode(rec)
  if type(t) == "table" and type(t.certs) == "table" then
    for _, e in ipairs(t.certs) do
      local cert = type(e) == "table" and type(e.pem) == "string" and crypto.load_certificate(e.pem)
      if cert then
        keys[cert:serial()] = { key = cert:public_key(), not_after = cert:not_after() }
        local t_now = now()
        if cert:not_before() <= t_now and cert:not_after() > t_now
          and (not newest or cert:not_after() > newest.not_after) then
          newest = { serial = cert:serial(), key = keys[cert:serial()].key, not_after = cert:not_after() }
        end
      end
    end
  end
  self.certs_rec, self.cert_keys, self.newest_cert = rec, keys, newest
  self.cert_fetched_at = type(t) == "table" and tonumber(t.fetched_at) or nil
  return keys
end

-- The key for a serial, without any fetch.
function Client:known_key(serial)
  local k = self.static_keys[serial]
  if k then return k end
  if self.use_certs then
    local e = self:load_cert_keys()[serial]
    if e and e.not_after > now() then return e.key end -- an expired certificate signs nothing
  end
  return nil
end

--- Downloads the platform certificates (GET /v3/certificates), checks them
-- and stores them for every worker.
-- @tparam[opt] boolean background do not wait for another caller's refresh
-- @treturn[1] table the serials now known
-- @treturn[2] nil
-- @treturn[2] string kind
-- @treturn[2] table info
function Client:refresh_certificates(background, unknown_serial)
  local lk, lerr = store.lock(self.prefix .. "certs:refresh", { timeout = background and 0 or 10, expire = 60 })
  if not lk then
    if background then return nil, "busy", { detail = "another refresh is running" } end
    return nil, "signature", { detail = "waiting for the certificate refresh: " .. tostring(lerr) }
  end
  local ok, a, b, cc = pcall(self.fetch_certificates, self, background, unknown_serial)
  lk:unlock()
  if not ok then error(a, 0) end
  return a, b, cc
end

function Client:fetch_certificates(background, unknown_serial)
  if unknown_serial then
    -- Someone else may have fetched it while this caller waited; and a
    -- serial nobody has must not make every request fetch.
    if self:known_key(unknown_serial) then return { unknown_serial } end
    local at = self.cert_fetched_at
    if at and now() - at < self.miss_refresh_s then
      return nil, "signature", { detail = "unknown serial" }
    end
  end
  self.counters.cert_fetches = self.counters.cert_fetches + 1
  local res, kind, info = self:send("GET", "/v3/certificates", nil, nil)
  if not res then
    self.counters.cert_fetch_failures = self.counters.cert_fetch_failures + 1
    return nil, kind, info
  end
  local data = json.decode(res.body)
  if res.status ~= 200 or type(data) ~= "table" or type(data.data) ~= "table" then
    self.counters.cert_fetch_failures = self.counters.cert_fetch_failures + 1
    local ok, vk, vinfo = self:verify_response(res, {}) -- {}: no refresh from inside the refresh
    if not ok then return nil, vk, vinfo end
    return error_answer(res, data)
  end
  -- Each certificate comes encrypted with the APIv3 key: what decrypts is
  -- authentic (GCM), so the answer may be signed by a certificate it
  -- brings (the first download, a rotation).
  local list, fresh = {}, {}
  local t_now = now()
  for _, e in ipairs(data.data) do
    local enc = type(e) == "table" and e.encrypt_certificate
    if type(enc) ~= "table" then return nil, "json", { detail = "a certificate without encrypt_certificate" } end
    local pem = _M.decrypt_resource(self.apiv3_key, enc)
    local cert = pem and crypto.load_certificate(pem)
    if not cert then
      self.counters.cert_fetch_failures = self.counters.cert_fetch_failures + 1
      return nil, "signature", { detail = "a platform certificate does not decrypt with the APIv3 key" }
    end
    if type(e.serial_no) == "string" and e.serial_no:upper() ~= cert:serial() then
      return nil, "signature", { detail = "serial_no does not match the certificate" }
    end
    if cert:not_after() > t_now then
      list[#list + 1] = { serial = cert:serial(), pem = pem, not_before = cert:not_before(), not_after = cert:not_after() }
      fresh[cert:serial()] = cert:public_key()
    end
  end
  local ok, vk, vinfo = self:verify_response(res, fresh)
  if not ok then
    self.counters.cert_fetch_failures = self.counters.cert_fetch_failures + 1
    return nil, vk, vinfo
  end
  sort(list, function(x, y) return x.not_after < y.not_after end)
  local rec = json.encode({ fetched_at = floor(t_now), certs = json.array(list) })
  local sok, serr = store.set(self.prefix .. "certs", rec)
  if not sok then return nil, "signature", { detail = "store: " .. tostring(serr) } end
  local serials = {}
  for i, e in ipairs(list) do serials[i] = e.serial end
  log.info("pay: platform certificates stored", { mchid = self.mchid, serials = concat(serials, ","),
    background = background or false })
  self:load_cert_keys()
  return serials
end

------------------------------------------------------------------------
-- Verification of answers and notifications
------------------------------------------------------------------------

--- Verifies WeChat Pay's signature over a body with the headers that came
-- with it. Refreshes the platform certificates once when the serial is
-- unknown (see miss_refresh_s).
-- @tparam table headers Wechatpay-Timestamp, -Nonce, -Signature, -Serial (any case)
-- @tparam string body the raw bytes as received
-- @tparam[opt] table extra serial → key, also trusted (a certificate download:
--   no refresh then)
-- @treturn[1] true
-- @treturn[1] string the serial
-- @treturn[2] nil
-- @treturn[2] string "signature"
-- @treturn[2] table info.detail: "missing headers", "unknown serial",
--   "bad signature", "stale timestamp", "bad timestamp"
function Client:verify(headers, body, extra)
  local ts, nonce = header(headers, "wechatpay-timestamp"), header(headers, "wechatpay-nonce")
  local sig, serial = header(headers, "wechatpay-signature"), header(headers, "wechatpay-serial")
  local function refuse(detail)
    self.counters.verify_failures = self.counters.verify_failures + 1
    return nil, "signature", { detail = detail, serial = serial }
  end
  if type(ts) ~= "string" or type(nonce) ~= "string" or type(sig) ~= "string" or type(serial) ~= "string" then
    return refuse("missing headers")
  end
  if not find(ts, "^%d+$") or #ts > 12 then return refuse("bad timestamp") end
  if abs(now() - tonumber(ts)) >= self.window then return refuse("stale timestamp") end
  if #nonce == 0 or #nonce > 64 or find(nonce, "[%c ]") then return refuse("bad nonce") end
  local sigt = header(headers, "wechatpay-signature-type")
  if sigt ~= nil and sigt ~= _M.SCHEMA then return refuse("unknown signature type") end
  local key = (extra and extra[serial]) or self:known_key(serial)
  if not key and not extra and self.use_certs and find(serial, "^%x+$") and #serial <= 64 then
    local ok, rkind, rinfo = self:refresh_certificates(false, serial)
    key = self:known_key(serial)
    if not ok and not key and rinfo and rinfo.detail ~= "unknown serial" then
      log.warn("pay: platform certificate download failed", { mchid = self.mchid, kind = rkind,
        detail = rinfo.detail, code = rinfo.code })
    end
  end
  if not key then return refuse("unknown serial") end
  -- A WECHATPAY/SIGNTEST/ probe is no base64 and fails here like any forgery.
  local raw = crypto.base64_decode(sig)
  if not raw or not key:verify(_M.response_message(ts, nonce, body), raw) then return refuse("bad signature") end
  return true, serial
end

function Client:verify_response(res, extra)
  return self:verify(res.headers, res.body or "", extra)
end

--- Decrypts a v3 `resource` (or `encrypt_certificate`): AEAD_AES_256_GCM
-- with the APIv3 key, its nonce and associated_data. The plaintext, or
-- `nil, "decrypt failed"`.
function _M.decrypt_resource(apiv3_key, r)
  if type(r) ~= "table" or type(r.ciphertext) ~= "string" or type(r.nonce) ~= "string" then
    return nil, "decrypt failed"
  end
  if r.algorithm ~= nil and r.algorithm ~= "AEAD_AES_256_GCM" then return nil, "decrypt failed" end
  local aad = r.associated_data
  if aad ~= nil and type(aad) ~= "string" then return nil, "decrypt failed" end
  local ct = crypto.base64_decode(r.ciphertext)
  if not ct or #r.nonce ~= 12 then return nil, "decrypt failed" end
  return crypto.aes_gcm_decrypt(apiv3_key, r.nonce, ct, aad or "")
end

--- Verifies a v3 notification and decrypts its resource.
-- Order: headers and clock window, signature over the raw body, the nonce
-- (remembered in the store for 2 × window + 60 s: a replay is refused),
-- then the decryption. Nothing is decrypted before the signature holds.
-- @tparam table headers the request's headers
-- @tparam string body the raw body
-- @treturn[1] table the notification: id, create_time, event_type,
--   resource_type, summary, and `data`, the decrypted resource (a table)
-- @treturn[2] nil
-- @treturn[2] string "signature", "replay", "json" or "decrypt failed"
-- @treturn[2] table info.detail
function Client:notification(headers, body)
  if type(headers) ~= "table" or type(body) ~= "string" then fail("notification: expected headers and the raw body", 2) end
  local ok, kind, info = self:verify(headers, body)
  if not ok then return nil, kind, info end
  local nonce = header(headers, "wechatpay-nonce")
  local added, why = store.add(self.prefix .. "nonce:" .. crypto.sha256_hex(nonce), true, 2 * self.window + 60)
  if not added then
    if why == "exists" then return nil, "replay", { detail = "nonce seen before" } end
    return nil, "store", { detail = tostring(why) }
  end
  local n = json.decode(body)
  if type(n) ~= "table" or type(n.resource) ~= "table" then
    return nil, "json", { detail = "not a notification" }
  end
  local plain = _M.decrypt_resource(self.apiv3_key, n.resource)
  if not plain then return nil, "decrypt failed", { detail = "resource does not decrypt" } end
  local data = json.decode(plain)
  if type(data) ~= "table" then return nil, "json", { detail = "the resource is not a JSON object" } end
  n.data = data
  return n
end

------------------------------------------------------------------------
-- Requests
------------------------------------------------------------------------

local function query_string(q)
  if not q then return "" end
  local keys = {}
  for k in pairs(q) do keys[#keys + 1] = k end
  sort(keys)
  local parts = {}
  for i, k in ipairs(keys) do parts[i] = crypto.url_encode(k) .. "=" .. crypto.url_encode(tostring(q[k])) end
  return concat(parts, "&")
end

-- A connect-phase failure: nothing reached the server, so the backup host may take the request.
local function before_sending(kind, detail)
  if kind == "connect" or kind == "dns" or kind == "tls" then return true end
  return kind == "timeout" and type(detail) == "string" and find(detail, "^connect timeout") ~= nil
end

-- One signed exchange (with failover), no verification. The raw response or nil, kind, info.
function Client:send(method, url_path, body, serial)
  local headers = {
    ["Accept"] = "application/json",
    ["Authorization"] = _M.authorization({ mchid = self.mchid, serial = self.serial, key = self.key,
      method = method, url_path = url_path, body = body }),
  }
  if body then headers["Content-Type"] = "application/json" end
  -- Answers are signed with the public key only when we name it.
  headers["Wechatpay-Serial"] = serial or self.public_key_id
  self.counters.requests = self.counters.requests + 1
  local bases = { self.api_base, self.backup_base or nil }
  local kind, detail
  for i, base in ipairs(bases) do
    local opts = { method = method, url = base .. url_path, headers = headers, body = body,
      timeout = self.timeout }
    for k, v in pairs(self.http_opts) do opts[k] = v end
    local res
    res, kind, detail = http.request(opts)
    if res then return res end
    if not before_sending(kind, detail) or i == #bases then break end
    self.counters.failovers = self.counters.failovers + 1
    log.warn("pay: primary host unreachable; trying the backup", { mchid = self.mchid, kind = kind, detail = detail })
  end
  return nil, kind, { detail = detail }
end


--- One API call: signs, sends (failing over to the backup host when the
-- primary cannot be reached), verifies the answer's signature, decodes it.
-- @tparam string method
-- @tparam string path e.g. "/v3/pay/transactions/jsapi"
-- @tparam[opt] table opts `query` (table), `json` (a table sent as JSON),
--   `serial` (Wechatpay-Serial to send: the certificate or key that
--   encrypted a field; see encrypt)
-- @treturn[1] table the decoded answer ({} for 204)
-- @treturn[2] nil
-- @treturn[2] string kind (see the module)
-- @treturn[2] table info
function Client:request(method, path, opts)
  if type(method) ~= "string" then fail("method must be a string", 2) end
  if type(path) ~= "string" or sub(path, 1, 1) ~= "/" then fail("path must start with /", 2) end
  if opts ~= nil and type(opts) ~= "table" then fail("options must be a table", 2) end
  opts = opts or {}
  local qs = query_string(opts.query)
  local url_path = path .. (qs ~= "" and "?" .. qs or "")
  local body
  if opts.json ~= nil then
    local ok, enc = pcall(json.encode, opts.json)
    if not ok then fail("json body cannot be encoded: " .. tostring(enc), 2) end
    body = enc
  end
  local qok, qkind, qinfo = self:take_quota(method:upper(), path)
  if not qok then return nil, qkind, qinfo end
  local res, kind, info = self:send(method:upper(), url_path, body, opts.serial)
  if not res then return nil, kind, info end
  if (res.status < 200 or res.status > 299) and header(res.headers, "wechatpay-signature") == nil then
    -- WeChat Pay signs its answers once it has verified the request; a
    -- 401 for our own signature, or a gateway's 5xx, comes unsigned. Its
    -- code is for the logs only: nothing unsigned is reported as WeChat
    -- Pay's word.
    local data = json.decode(res.body or "")
    local code = type(data) == "table" and type(data.code) == "string" and data.code:sub(1, 64) or nil
    return nil, "status", { status = res.status, retryable = res.status == 429 or res.status >= 500,
      detail = "unsigned " .. res.status .. " answer" .. (code and " (" .. code .. ")" or "") }
  end
  local ok, vkind, vinfo = self:verify_response(res)
  if not ok then
    vinfo.status = res.status
    return nil, vkind, vinfo
  end
  if res.status == 204 then return {} end
  local data = json.decode(res.body or "")
  if res.status < 200 or res.status > 299 then return error_answer(res, data) end
  if type(data) ~= "table" then return nil, "json", { status = res.status, detail = "the answer is not a JSON object" } end
  return data
end

------------------------------------------------------------------------
-- Sensitive fields
------------------------------------------------------------------------

--- Encrypts a sensitive field (a name, a phone number) with RSA-OAEP
-- (SHA-1, MGF1-SHA1) for WeChat Pay: with the public key when one is set,
-- else with the newest valid platform certificate.
-- @treturn[1] string base64 ciphertext
-- @treturn[1] string the serial to send as `Wechatpay-Serial` (request opts.serial)
-- @treturn[2] nil
-- @treturn[2] string "message too long", or a kind of refresh_certificates
function Client:encrypt(plaintext)
  if type(plaintext) ~= "string" then fail("encrypt: expected a string", 2) end
  local key, serial
  if self.public_key then
    key, serial = self.public_key, self.public_key_id
  else
    self:load_cert_keys()
    local c = self.newest_cert or self.static_cert
    if not c then
      local ok, err, info = self:refresh_certificates(false)
      if not ok then return nil, err, info end
      c = self.newest_cert
      if not c then return nil, "signature", { detail = "no valid platform certificate" } end
    end
    key, serial = c.key, c.serial
  end
  local ct, err = key:encrypt(plaintext)
  if not ct then return nil, err end
  return crypto.base64_encode(ct), serial
end

------------------------------------------------------------------------
-- Order APIs
------------------------------------------------------------------------

local function with_ids(self, order, need_appid)
  if type(order) ~= "table" then fail("expected the order as a table", 3) end
  local body = {}
  for k, v in pairs(order) do body[k] = v end
  body.mchid = body.mchid or self.mchid
  if need_appid then
    body.appid = body.appid or self.appid
    if type(body.appid) ~= "string" then fail("an appid is needed (cfg.appid or order.appid)", 3) end
  end
  if type(body.out_trade_no) ~= "string" then fail("order.out_trade_no must be a string", 3) end
  if type(body.amount) ~= "table" or type(body.amount.total) ~= "number" or body.amount.total % 1 ~= 0 then
    fail("order.amount.total must be an integer (fen)", 3)
  end
  return body
end

-- A prepay: the order recorded (CREATED) before WeChat Pay is asked, PAYING
-- once it answered. A failed prepay leaves the order CREATED: the same
-- out_trade_no may be tried again (the same fields make create a duplicate).
local function prepay(self, kind, body)
  local orders = self.orders
  if orders then
    local o, kind_err, info = pay_orders.before_prepay(orders, body)
    if not o then return nil, kind_err, info end
  end
  local r, err, info = self:request("POST", "/v3/pay/transactions/" .. kind, { json = body })
  if not r then return nil, err, info end
  if orders then
    local ok, kind_err, oinfo = pay_orders.after_prepay(orders, body.out_trade_no, kind:upper(), r)
    if not ok then return nil, kind_err, oinfo end
  end
  return r
end

--- JSAPI / Mini Program prepay: `{ prepay_id }`. order: description,
-- out_trade_no, notify_url, amount = { total [, currency] }, payer = { openid }, ...
-- The order is recorded in wxd.order (CREATED, then PAYING); see docs/pay.md.
function Client:jsapi(order)
  local body = with_ids(self, order, true)
  if type(body.payer) ~= "table" or type(body.payer.openid) ~= "string" then fail("order.payer.openid is needed", 2) end
  return prepay(self, "jsapi", body)
end

--- Native prepay: `{ code_url }`.
function Client:native(order)
  return prepay(self, "native", with_ids(self, order, true))
end

--- App prepay: `{ prepay_id }`.
function Client:app(order)
  return prepay(self, "app", with_ids(self, order, true))
end

--- H5 prepay: `{ h5_url }` (order.scene_info is required by WeChat Pay).
function Client:h5(order)
  return prepay(self, "h5", with_ids(self, order, true))
end

local function path_part(v, what)
  if type(v) ~= "string" or not find(v, "^[%w_%-|*@.]+$") then fail(what .. " must be a string of [A-Za-z0-9_-|*@.]", 3) end
  return v
end

--- Queries an order by out_trade_no.
function Client:query(out_trade_no)
  return self:request("GET", "/v3/pay/transactions/out-trade-no/" .. path_part(out_trade_no, "out_trade_no"),
    { query = { mchid = self.mchid } })
end

--- Queries an order by WeChat Pay's transaction_id.
function Client:query_transaction(transaction_id)
  return self:request("GET", "/v3/pay/transactions/id/" .. path_part(transaction_id, "transaction_id"),
    { query = { mchid = self.mchid } })
end

--- Closes an unpaid order: true, or nil, kind, info (ORDERPAID: it was paid).
function Client:close(out_trade_no)
  local r, err, info = self:request("POST", "/v3/pay/transactions/out-trade-no/"
    .. path_part(out_trade_no, "out_trade_no") .. "/close", { json = { mchid = self.mchid } })
  if not r then return nil, err, info end
  return true
end

--- Refund: r = { out_trade_no | transaction_id, out_refund_no, reason?,
-- notify_url?, amount = { refund, total, currency = "CNY" } }.
function Client:refund(r)
  if type(r) ~= "table" then fail("refund: expected a table", 2) end
  path_part(r.out_refund_no, "out_refund_no")
  if type(r.amount) ~= "table" or type(r.amount.refund) ~= "number" or type(r.amount.total) ~= "number" then
    fail("refund: amount.refund and amount.total must be integers (fen)", 2)
  end
  local body = {}
  for k, v in pairs(r) do body[k] = v end
  if body.amount.currency == nil then
    body.amount = { refund = r.amount.refund, total = r.amount.total, currency = "CNY" }
  end
  -- The order (when named by out_trade_no) is REFUNDING before WeChat Pay
  -- is asked, so that its notification finds it so.
  local orders = self.orders and type(r.out_trade_no) == "string" and self.orders or nil
  local version
  if orders then
    local v, kind, info = pay_orders.before_refund(orders, body)
    if not v then return nil, kind, info end
    version = v
  end
  local res, err, info = self:request("POST", "/v3/refund/domestic/refunds", { json = body })
  if not res and orders and err == "wechatpay" and not info.retryable then
    pay_orders.refund_refused(orders, body, version, info)
  end
  return res, err, info
end

--- Refund query by out_refund_no.
function Client:refund_query(out_refund_no)
  return self:request("GET", "/v3/refund/domestic/refunds/" .. path_part(out_refund_no, "out_refund_no"))
end

--- The parameters of wx.requestPayment (Mini Program) and
-- WeixinJSBridge getBrandWCPayRequest (JSAPI): appId, timeStamp, nonceStr,
-- package ("prepay_id=..."), signType ("RSA") and paySign =
-- base64(SHA256withRSA(appId\ntimeStamp\nnonceStr\npackage\n)).
function Client:jsapi_params(prepay_id, appid)
  appid = appid or self.appid
  if type(prepay_id) ~= "string" or prepay_id == "" then fail("jsapi_params: prepay_id must be a string", 2) end
  if type(appid) ~= "string" then fail("jsapi_params: an appid is needed", 2) end
  local ts = format("%d", floor(now()))
  local nonce = crypto.nonce(32)
  local package = "prepay_id=" .. prepay_id
  local sign = crypto.base64_encode(self.key:sign(appid .. "\n" .. ts .. "\n" .. nonce .. "\n" .. package .. "\n"))
  return { appId = appid, timeStamp = ts, nonceStr = nonce, package = package, signType = "RSA", paySign = sign }
end

--- The parameters of an App payment (the SDK's PayReq): appid, partnerid,
-- prepayid, package "Sign=WXPay", noncestr, timestamp, sign over
-- appid\ntimestamp\nnoncestr\nprepayid\n.
function Client:app_params(prepay_id, appid)
  appid = appid or self.appid
  if type(prepay_id) ~= "string" or prepay_id == "" then fail("app_params: prepay_id must be a string", 2) end
  if type(appid) ~= "string" then fail("app_params: an appid is needed", 2) end
  local ts = format("%d", floor(now()))
  local nonce = crypto.nonce(32)
  local sign = crypto.base64_encode(self.key:sign(appid .. "\n" .. ts .. "\n" .. nonce .. "\n" .. prepay_id .. "\n"))
  return { appid = appid, partnerid = self.mchid, prepayid = prepay_id, package = "Sign=WXPay", noncestr = nonce,
    timestamp = ts, sign = sign }
end

--- Counters of this worker: requests, failovers, cert_fetches,
-- cert_fetch_failures, verify_failures.
function Client:stats()
  local s = {}
  for k, v in pairs(self.counters) do s[k] = v end
  return s
end

------------------------------------------------------------------------
-- Notifications: app:pay_notify
------------------------------------------------------------------------

local function fail_answer(res, status, message)
  res.headers["content-type"] = "application/json"
  return status, json.encode({ code = "FAIL", message = message })
end

local Notify = {}
Notify.__index = Notify
setmetatable(Notify, { __index = require("wxd.pay.notify") })

function Notify:receive(req, res)
  local body = req.body or ""
  if #body > self.max_body_bytes then return fail_answer(res, 413, "body too large") end
  if byte(body, 1) == 60 and self.v2 then -- '<': a v2 notification (refunds made by hand)
    return self.v2:receive(req, res)
  end
  local n, kind, info = self.client:notification(req.headers, body)
  if not n then
    log.warn("pay: notification refused", { path = self.path, kind = kind, detail = info and info.detail,
      serial = info and info.serial, remote = req.remote_addr })
    if kind == "store" then return fail_answer(res, 503, "try again") end
    return fail_answer(res, kind == "signature" and 401 or 400, kind == "signature" and "bad signature" or kind)
  end
  local ok, status, message = self:process(self.client.orders,
    n, { req = req, client = self.client, path = self.path, version = 3 })
  if ok then return 204 end
  return fail_answer(res, status, message)
end

--- Mounts a v3 notification URL (what `app:pay_notify` calls): POST
-- verified, decrypted, handled; 204 only after the handler returned true.
-- @tparam table app a wxd.app
-- @tparam string path e.g. "/pay/notify"
-- @tparam table cfg `client` (a wxd.pay client) or the settings of one;
--   `deadline_ms` (4500), `max_body_bytes` (64 KiB), `v2` (settings of
--   wxd.pay.v2's notification handling, `{ key = APIv2 key, mchid, appid }`,
--   for v2 XML refund notifications on the same URL)
-- @tparam table|function handlers by event_type ("TRANSACTION.SUCCESS",
--   "REFUND.SUCCESS", ...), `default`; each `fn(data, notification, ctx)`
--   returns true once the event is durably handled
function _M.mount(app, path, cfg, handlers)
  if type(path) ~= "string" then fail("pay_notify: path must be a string", 2) end
  if type(cfg) ~= "table" then fail("pay_notify: cfg must be a table", 2) end
  if type(handlers) == "function" then handlers = { default = handlers } end
  if type(handlers) ~= "table" then fail("pay_notify: handlers must be a table or a function", 2) end
  for k, v in pairs(handlers) do
    if type(v) ~= "function" then fail("pay_notify: handlers[" .. tostring(k) .. "] must be a function", 2) end
  end
  local client = cfg.client
  if client == nil then client = _M.client(cfg) end
  if getmetatable(client) ~= Client then fail("pay_notify: cfg.client must be a wxd.pay client", 2) end
  local deadline_ms = cfg.deadline_ms or 4500
  if type(deadline_ms) ~= "number" or deadline_ms <= 0 or deadline_ms > 60000 then
    fail("pay_notify: cfg.deadline_ms must be in (0, 60000]", 2)
  end
  local self = setmetatable({ path = path, client = client, prefix = client.prefix, handlers = handlers,
    deadline_ms = deadline_ms,
    max_body_bytes = cfg.max_body_bytes or 65536, done_ttl = 25 * 3600,
    run_expire = cfg.handler_timeout or 120 }, Notify)
  if cfg.v2 ~= nil then
    self.v2 = require("wxd.pay.v2").notify_endpoint(path, cfg.v2, handlers, self, client.orders)
  end
  app:post(path, function(req, res) return self:receive(req, res) end)
  return app
end


return _M
