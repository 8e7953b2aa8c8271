--- wxd.internal: signed internal APIs, between trusted services.
--
-- A caller (another wxd, a cloud function, a script) signs each request
-- with HMAC-SHA256 and a named key it shares with the server; the server's
-- middleware checks the key, the signature, a timestamp window and a nonce
-- it has not seen before (remembered in wxd.store: across workers, and with
-- the store in Redis across nodes), then the request's appid
-- (`X-Wechat-Appid`) and OAuth2 scopes against the route's allow-lists.
--
-- The string signed (every line ends with "\n" except the last):
--
--     WXD1-HMAC-SHA256
--     <METHOD>                 upper case, as sent
--     <target>                 the path and query exactly as sent ("/a/b?x=1")
--     <timestamp>              X-Wxd-Timestamp: Unix seconds, decimal digits
--     <nonce>                  X-Wxd-Nonce: 16..64 of [A-Za-z0-9_-]
--     <appid>                  X-Wechat-Appid, or an empty line
--     <hex(sha256(body))>      64 lower-case hex digits (of "" when no body)
--
-- X-Wxd-Signature = hex(HMAC-SHA256(secret, that string)), lower case.
-- X-Wxd-Key names the key. docs/internal-api.md is the full contract.
--
-- Keys (config.lua, so that a reload rotates them):
--
--     internal = { keys = {
--       { id = "2026-12", secret = env("WXD_INTERNAL_KEY_2026_12") },
--       { id = "2027-01", secret = env("WXD_INTERNAL_KEY_2027_01"), scopes = "events:write" },
--     } }
--
-- @module wxd.internal
-- @usage
-- local internal = require "wxd.internal"
-- app:group("/internal", function(g)
--   g:before(internal.require{ appids = { "wx0123456789abcdef" } })
--   g:post("/refund", internal.protect({ scopes = { "refund:write" } }, do_refund))
-- end)

local crypto = require "wxd.crypto"
local json = require "wxd.json"
local log = require "wxd.log"
local metrics = require "wxd.metrics"
local store = require "wxd.store"
local core = require "wxd.core"

local type, error, ipairs, pairs, tostring, tonumber, setmetatable =
  type, error, ipairs, pairs, tostring, tonumber, setmetatable
local find, format, upper, floor, concat = string.find, string.format, string.upper, math.floor, table.concat

local _M = { _VERSION = "0.1.0" }

_M.SCHEME = "WXD1-HMAC-SHA256"
_M.DEFAULT_WINDOW = 300
_M.HEADERS = {
  key = "X-Wxd-Key", timestamp = "X-Wxd-Timestamp", nonce = "X-Wxd-Nonce",
  signature = "X-Wxd-Signature", appid = "X-Wechat-Appid",
}

local MIN_SECRET = 32
local NONCE_PREFIX = "wxd:internal:nonce:"

local function fail(msg, level) error("wxd.internal: " .. msg, level + 1) end

------------------------------------------------------------------------
-- The canonical string
------------------------------------------------------------------------

local function check_nonce(nonce)
  return type(nonce) == "string" and #nonce >= 16 and #nonce <= 64 and not find(nonce, "[^%w_%-]")
end

local function check_appid(appid)
  return appid == nil or (type(appid) == "string" and #appid <= 64 and not find(appid, "[^%w_%-]"))
end

--- The string a signature covers (see the module's description).
-- @tparam string method
-- @tparam string target path and query as sent, e.g. "/internal/x?a=1"
-- @tparam number|string timestamp Unix seconds
-- @tparam string nonce
-- @tparam ?string appid the X-Wechat-Appid header, or nil
-- @tparam ?string body
-- @treturn string
function _M.canonical(method, target, timestamp, nonce, appid, body)
  if type(method) ~= "string" or type(target) ~= "string" or type(nonce) ~= "string" then
    fail("canonical: method, target and nonce must be strings", 2)
  end
  if type(timestamp) == "number" then timestamp = format("%d", timestamp) end
  if type(timestamp) ~= "string" then fail("canonical: timestamp must be a number or a string", 2) end
  if appid ~= nil and type(appid) ~= "string" then fail("canonical: appid must be a string", 2) end
  if body ~= nil and type(body) ~= "string" then fail("canonical: body must be a string", 2) end
  return concat({ _M.SCHEME, upper(method), target, timestamp, nonce, appid or "",
                  crypto.sha256_hex(body or "") }, "\n")
end

------------------------------------------------------------------------
-- Keys
------------------------------------------------------------------------

local function word_set(v, what, level)
  if v == nil then return nil end
  if type(v) == "string" then
    local t = {}
    for w in v:gmatch("%S+") do t[#t + 1] = w end
    v = t
  end
  if type(v) ~= "table" then fail(what .. " must be a list of strings or a space-separated string", level + 1) end
  local set = {}
  for _, w in ipairs(v) do
    if type(w) ~= "string" or w == "" then fail(what .. " must hold non-empty strings", level + 1) end
    set[w] = true
  end
  return set
end

local function make_key(k, level)
  if type(k) ~= "table" then fail("a key must be a table { id =, secret = }", level + 1) end
  local id, secret = k.id, k.secret
  if type(id) ~= "string" or not find(id, "^[%w_.:-]+$") or #id > 64 then
    fail("a key id must be 1..64 of [A-Za-z0-9_.:-], got " .. tostring(id), level + 1)
  end
  if type(secret) ~= "string" or #secret < MIN_SECRET then
    -- The value itself is never shown.
    fail("the secret of key " .. id .. " must be a string of at least " .. MIN_SECRET .. " bytes", level + 1)
  end
  return {
    id = id, secret = secret,
    scopes = word_set(k.scopes, "scopes of key " .. id, level + 1),
    appids = word_set(k.appids, "appids of key " .. id, level + 1),
  }
end

local KeySet = {}
KeySet.__index = KeySet
KeySet.__tostring = function(s) return "wxd.internal keyset (" .. concat(s.ids, ", ") .. ")" end

--- A key set: the keys a server accepts and a client signs with.
-- @tparam table list `{ { id =, secret =, scopes =?, appids =? }, ... }`
--   (more than one during a rotation); a table that already is a key set is
--   returned as is
-- @tparam[opt] string sign_with the id clients sign with (default: the last key listed)
-- @treturn table
function _M.keyset(list, sign_with)
  if getmetatable(list) == KeySet then return list end
  if type(list) ~= "table" or list[1] == nil then fail("keys must be a non-empty list of { id =, secret = }", 2) end
  local s = setmetatable({ by_id = {}, ids = {} }, KeySet)
  for _, k in ipairs(list) do
    local key = make_key(k, 2)
    if s.by_id[key.id] then fail("key id " .. key.id .. " is listed twice", 2) end
    s.by_id[key.id] = key
    s.ids[#s.ids + 1] = key.id
  end
  sign_with = sign_with or s.ids[#s.ids]
  if not s.by_id[sign_with] then fail("sign_with names no key: " .. tostring(sign_with), 2) end
  s.sign_with = sign_with
  return s
end

function KeySet:get(id) return self.by_id[id] end

-- The config's section, or nil.
local function config_section()
  local wxd = require "wxd"
  local c = type(wxd.config) == "table" and wxd.config.internal or nil
  if c ~= nil and type(c) ~= "table" then fail("config.internal must be a table", 3) end
  return c
end

-- The key set of config.lua, made once per Lua state (a generation: a
-- reload brings the new keys).
local config_keys
function _M.config_keys()
  if config_keys then return config_keys end
  local c = config_section()
  if not c or c.keys == nil then
    fail('no keys: set internal = { keys = { { id = "...", secret = env("...") } } } in config.lua', 2)
  end
  config_keys = _M.keyset(c.keys, c.sign_with)
  return config_keys
end

local function resolve_keys(keys, level)
  if keys == nil then return _M.config_keys() end
  if type(keys) ~= "table" then fail("keys must be a list of keys or a key set", level + 1) end
  return _M.keyset(keys)
end

------------------------------------------------------------------------
-- Client side
------------------------------------------------------------------------

local function signing_key(key, level)
  if key == nil then
    local s = _M.config_keys()
    return s:get(s.sign_with)
  end
  if type(key) == "string" then
    local k = _M.config_keys():get(key)
    if not k then fail("no key " .. key .. " in config.internal.keys", level + 1) end
    return k
  end
  return make_key(key, level + 1)
end

--- Signs a request: the headers to send with it.
-- @tparam table opts `method` (default "GET"), `target` (path and query as
--   they will be sent, required), `body`, `appid` (sent as X-Wechat-Appid),
--   `key` (`{ id =, secret = }`, or an id of config.internal.keys; default
--   the config's `sign_with`), `timestamp` and `nonce` (tests; default now
--   and 24 random characters)
-- @treturn table header name -> value
-- @usage local h = internal.sign{ method = "POST", target = "/internal/refund", body = b }
function _M.sign(opts)
  if type(opts) ~= "table" then fail("sign: expected a table", 2) end
  local target = opts.target
  if type(target) ~= "string" or target:sub(1, 1) ~= "/" then fail("sign: target must start with /", 2) end
  local method = upper(opts.method or "GET")
  if not check_appid(opts.appid) then fail("sign: appid must be 1..64 of [A-Za-z0-9_-]", 2) end
  local key = signing_key(opts.key, 2)
  local ts = opts.timestamp or floor(core.now())
  local nonce = opts.nonce or crypto.nonce(24)
  local s = _M.canonical(method, target, ts, nonce, opts.appid, opts.body)
  local h = _M.HEADERS
  local out = {
    [h.key] = key.id, [h.timestamp] = type(ts) == "number" and format("%d", ts) or ts, [h.nonce] = nonce,
    [h.signature] = crypto.hmac_sha256_hex(key.secret, s),
  }
  if opts.appid then out[h.appid] = opts.appid end
  return out
end

--- Sends a signed request with wxd.http (one wxd calling another's
-- internal API).
-- @tparam table opts `url` (required; its path and query are signed),
--   `method`, `body` or `json` (a table, sent as JSON), `appid`, `key`, and
--   any other option of wxd.http.request (`headers`, `timeout`, `retry`...).
--   A retried request is signed once: the server would refuse its replay,
--   so give `retry` only for answers that never reached the handler.
-- @return as wxd.http.request
function _M.request(opts)
  if type(opts) ~= "table" or type(opts.url) ~= "string" then fail("request: expected { url = ... }", 2) end
  local http = require "wxd.http"
  local _, _, _, target = http.parse_url(opts.url)
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  o.key, o.appid, o.json = nil, nil, nil
  o.method = upper(opts.method or (opts.json ~= nil and "POST" or "GET"))
  local headers = {}
  for k, v in pairs(opts.headers or {}) do headers[k] = v end
  if opts.json ~= nil then
    o.body = json.encode(opts.json)
    headers["Content-Type"] = "application/json"
  end
  if opts.query ~= nil then fail("request: put the query in the url (it is signed as sent)", 2) end
  local signed = _M.sign({ method = o.method, target = target, body = o.body, appid = opts.appid, key = opts.key })
  for k, v in pairs(signed) do headers[k] = v end
  o.headers = headers
  return http.request(o)
end

------------------------------------------------------------------------
-- Server side
------------------------------------------------------------------------

local refused_metric
local function count_refused(reason)
  if not refused_metric then
    refused_metric = metrics.builtin("counter", "wxd_internal_refused_total",
      "Internal API requests refused, by reason", { "reason" }, { max_series = 50 })
  end
  metrics.count(refused_metric, { reason })
end

local function default_fail(_, _, status, err, description)
  return status, { error = err, error_description = description }
end

-- Checks the signature headers of req against keys; on success returns the
-- key. Otherwise nil, status, error, description.
local function authenticate(req, keys, window, now)
  local hd = req.headers
  local id, ts, nonce, sig = hd["x-wxd-key"], hd["x-wxd-timestamp"], hd["x-wxd-nonce"], hd["x-wxd-signature"]
  if not id or not ts or not nonce or not sig then
    return nil, 401, "missing signature", "X-Wxd-Key, X-Wxd-Timestamp, X-Wxd-Nonce and X-Wxd-Signature are required"
  end
  local key = keys:get(id)
  if not key then return nil, 401, "unknown key", "no active key has this id" end
  if not find(ts, "^%d+$") or #ts > 12 then return nil, 401, "bad timestamp", "Unix seconds expected" end
  local skew = tonumber(ts) - now
  if skew > window or skew < -window then
    return nil, 401, "stale timestamp", format("more than %d s from the server's clock", window)
  end
  if not check_nonce(nonce) then return nil, 401, "bad nonce", "16..64 of [A-Za-z0-9_-] expected" end
  local appid = hd["x-wechat-appid"]
  if not check_appid(appid) then return nil, 403, "appid not allowed", "malformed X-Wechat-Appid" end
  local qs = req.query_string
  local target = req.path .. ((qs and qs ~= "") and "?" .. qs or "")
  local expected = crypto.hmac_sha256_hex(key.secret, _M.canonical(req.method, target, ts, nonce, appid, req.body))
  if #sig ~= 64 or not crypto.equals(expected, sig:lower()) then
    return nil, 401, "bad signature", "the signature does not match the request"
  end
  -- Remembered at least as long as the timestamp stays inside the window.
  local ttl = tonumber(ts) + window - now + 1
  local ok, err = store.add(NONCE_PREFIX .. id .. ":" .. nonce, true, ttl > 1 and ttl or 1)
  if not ok then
    if err == "exists" then return nil, 401, "replayed nonce", "this nonce was used already" end
    log.error("internal: the nonce store failed; request refused", { error = tostring(err), key = id })
    return nil, 503, "nonce store unavailable", "try again later"
  end
  return key
end

local function intersects(have, allowed)
  for s in pairs(allowed) do if have[s] then return true end end
  return false
end

-- The appid and scope allow-lists. nil when allowed, else status, error, description.
local function authorize(req, ctx, appids, scopes)
  local key = ctx and ctx.key
  local appid = req.headers["x-wechat-appid"]
  if appids or (key and key.appids) then
    if not appid then return 403, "appid not allowed", "X-Wechat-Appid is required" end
    if (appids and not appids[appid]) or (key and key.appids and not key.appids[appid]) then
      return 403, "appid not allowed", "this appid may not call this API"
    end
  end
  if scopes then
    local sources = 0
    if req.ctx.scopes then -- an OAuth2 access token (wxd.jwt.bearer)
      sources = sources + 1
      if not intersects(req.ctx.scopes, scopes) then return 403, "insufficient scope", "the token lacks the scope" end
    end
    if key and key.scopes then
      sources = sources + 1
      if not intersects(key.scopes, scopes) then return 403, "insufficient scope", "the key lacks the scope" end
    end
    if sources == 0 then return 403, "insufficient scope", "no scopes were granted to this request" end
  end
  return nil
end

--- A `before` middleware (or, through protect, a route's guard).
-- @tparam[opt] table opts
--   `keys` (a list of keys or a key set; default config.internal.keys),
--   `window` (seconds of clock difference accepted either way; default
--   config.internal.window or 300), `signed` (default true; false checks
--   only the allow-lists, e.g. after wxd.jwt.bearer), `appids` (allow-list
--   of X-Wechat-Appid values), `scopes` (allow-list: one of them is
--   needed), `on_fail(req, res, status, error, description)` (shapes the
--   refusal; default `{ error =, error_description = }`)
-- @treturn function middleware(req, res)
function _M.require(opts)
  if opts ~= nil and type(opts) ~= "table" then fail("require: opts must be a table", 2) end
  opts = opts or {}
  local signed = opts.signed ~= false
  local keys = signed and resolve_keys(opts.keys, 2) or nil
  local section = config_section() or {}
  local window = opts.window or section.window or _M.DEFAULT_WINDOW
  if type(window) ~= "number" or window < 1 or window > 86400 then fail("window must be 1..86400 seconds", 2) end
  local appids = word_set(opts.appids, "appids", 2)
  local scopes = word_set(opts.scopes, "scopes", 2)
  local on_fail = opts.on_fail or default_fail
  if type(on_fail) ~= "function" then fail("on_fail must be a function", 2) end
  return function(req, res)
    local ctx = req.ctx.internal
    if signed and not ctx then
      local key, status, err, desc = authenticate(req, keys, window, floor(core.now()))
      if not key then
        count_refused(err)
        return on_fail(req, res, status, err, desc)
      end
      ctx = { key = key, key_id = key.id, appid = req.headers["x-wechat-appid"] }
      req.ctx.internal = ctx
    end
    local status, err, desc = authorize(req, ctx, appids, scopes)
    if status then
      count_refused(err)
      return on_fail(req, res, status, err, desc)
    end
    return nil
  end
end

--- Wraps a route handler in the checks of require(opts): per-route
-- allow-lists. Behind a group's require, the signature is not checked a
-- second time (its nonce is spent): only the allow-lists of this route are.
-- @usage g:post("/refund", internal.protect({ scopes = { "refund:write" } }, refund))
function _M.protect(opts, fn)
  if type(fn) ~= "function" then fail("protect: expected opts and a handler", 2) end
  local mw = _M.require(opts)
  return function(req, res)
    local status, body = mw(req, res)
    if status ~= nil then return status, body end
    return fn(req, res)
  end
end

return _M
