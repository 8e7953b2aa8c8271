-- examples/miniprogram: log a Mini Program user in and read their data.
--
--   WXD_MINI_APPID=wx... WXD_MINI_SECRET=... build/wxd run examples/miniprogram
--
-- POST /login   {"code": "<wx.login code>"}            → {"token", "openid"}
-- POST /decrypt {"encryptedData", "iv"} + Bearer token  → the decrypted data
-- POST /phone   {"code": "<getPhoneNumber code>"} + Bearer token → the number
--
-- The session_key WeChat gives at login stays on the server (wxd.store,
-- shared by every worker, or every node with the Redis store): the client
-- only gets a random token that names its session.
local wxd = require "wxd"
local wechat = require "wxd.wechat"
local store = require "wxd.store"
local crypto = require "wxd.crypto"
local json = require "wxd.json"
local log = require "wxd.log"
local app = require("wxd.app").new()

local cfg = wxd.config.miniprogram
local wx = wechat.client({ appid = cfg.appid, secret = cfg.secret, api_base = cfg.api_base })
local SESSION_TTL = cfg.session_ttl or 86400

-- Sessions are stored under a digest of the token: a dump of the store
-- gives no usable token.
local function session_key_of(token) return "mini:session:" .. crypto.sha256_hex(token) end

local function session(req)
  local token = (req.headers.authorization or ""):match("^Bearer ([%w_-]+)$")
  if not token then return nil end
  local rec = store.get(session_key_of(token))
  return rec and json.decode(rec)
end

local function body(req)
  local t = req:json()
  return type(t) == "table" and t or {}
end

app:post("/login", function(req)
  local code = body(req).code
  if type(code) ~= "string" or code == "" then return 400, { error = "code is required" } end
  local s, err, info = wx:code2session(code)
  if not s then
    if err == "invalid code" or (err == "wechat" and (info.errcode == 40029 or info.errcode == 40163)) then
      return 401, { error = "invalid code" }
    end
    log.warn("login: code2session failed", { error = err, errcode = info and info.errcode })
    return 502, { error = "wechat unavailable" }
  end
  local token = crypto.nonce(40)
  local ok = store.set(session_key_of(token), json.encode(s), SESSION_TTL)
  if not ok then return 503, { error = "session store full" } end
  log.info("login", { openid = s.openid })
  return { token = token, openid = s.openid }
end)

app:post("/decrypt", function(req)
  local s = session(req)
  if not s then return 401, { error = "log in first" } end
  local b = body(req)
  if type(b.encryptedData) ~= "string" or type(b.iv) ~= "string" then
    return 400, { error = "encryptedData and iv are required" }
  end
  local data, err = wx:decrypt(s.session_key, b.encryptedData, b.iv)
  if not data then return 400, { error = err } end
  return data
end)

app:post("/phone", function(req)
  if not session(req) then return 401, { error = "log in first" } end
  local code = body(req).code
  if type(code) ~= "string" or code == "" then return 400, { error = "code is required" } end
  local phone, err, info = wx:phone_number(code)
  if not phone then
    if err == "invalid code" or (err == "wechat" and info.errcode == 40029) then
      return 400, { error = "invalid code" }
    end
    return 502, { error = "wechat unavailable" }
  end
  return { phoneNumber = phone.phoneNumber, purePhoneNumber = phone.purePhoneNumber,
    countryCode = phone.countryCode }
end)

app:get("/health", function() return { status = "ok" } end)

return app
