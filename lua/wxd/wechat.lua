--- wxd.wechat: WeChat's server APIs with the credentials done right.
--
-- `wechat.client(cfg)` gives a client for one appid. It holds no token
-- itself: the access_token, the jsapi and wx_card tickets live in
-- `wxd.store` (the process's shared dictionary by default, Redis when the
-- store is configured so), so every worker — and with Redis every node —
-- uses the same one.
--
-- * Single flight: a missing or expiring credential is fetched by one
--   caller under a store lock; the others wait on the lock (their
--   coroutines yield) and then read what it stored. So 200 requests that
--   all need a token cause one fetch.
-- * Proactive refresh: a background job (a timer on worker 0) renews a
--   credential `refresh_before` seconds (300) before it expires, while
--   requests go on using the valid one. If WeChat fails then, the valid
--   credential stays in use and the job retries with backoff (1 s, 2 s, ...
--   up to 60 s). Only a caller that finds no usable credential at all
--   waits for a fetch.
-- * The platform's rules: `token_mode = "stable"` (default) uses
--   /cgi-bin/stable_token, which hands out the same token while it is
--   valid and renews it in its last 5 minutes; `force_refresh` is used only
--   to replace a token WeChat refused and still hands out, at most once per
--   30 s and 20 times a day (counted in the store). `token_mode = "token"`
--   uses /cgi-bin/token, where every call invalidates the previous token
--   after 5 minutes: which is why only one caller may fetch.
-- * Invalidation: an answer with errcode 40001, 40014 or 42001 marks that
--   exact token bad by compare-and-set (a token another worker already put
--   in its place is kept), and the call is retried once with a fresh one.
--   Rate-limit and busy answers (45009, 45011, -1) are returned as they are.
--
-- * Quotas: calls pass a limiter per appid and one per API path
--   (wxd.limit, shared by the workers) before they go out, so that a burst
--   is held back here instead of WeChat answering 45009/45011. A call over
--   the quota waits up to `quota.wait` seconds for its turn, or fails fast
--   with "quota" (info.retry_after, info.scope "appid" or "api").
--
-- Calls return the decoded JSON object, or `nil, err, info`, where err is
-- a stable kind: "wechat" (errcode ≠ 0; info.errcode, info.errmsg), "quota"
-- (held back by the client's own quota, nothing sent), "status"
-- (HTTP status other than 200; info.status), "json" (a body that is not a
-- JSON object), "token" (no credential could be had; info.detail), or the
-- kinds of wxd.http ("timeout", "connect", "tls", "dns", "protocol",
-- "too_large"; info.detail). Wrong argument types raise.
--
-- Secrets, tokens, tickets and session keys are never logged, and no error
-- string holds one.
--
-- @module wxd.wechat
-- @usage
-- local wechat = require "wxd.wechat"
-- local wx = wechat.client(wxd.config.mp) -- appid, secret, api_base
-- local data, err, info = wx:get("/cgi-bin/user/info", { openid = openid, lang = "zh_CN" })
-- if err == "wechat" then log.warn("user/info refused", { errcode = info.errcode }) end

local http = require "wxd.http"
local store = require "wxd.store"
local timer = require "wxd.timer"
local crypto = require "wxd.crypto"
local log = require "wxd.log"
local json = require "wxd.json"
local core = require "wxd.core"
local metrics = require "wxd.metrics"

local type, error, pairs, ipairs, tostring, tonumber, setmetatable, pcall =
  type, error, pairs, ipairs, tostring, tonumber, setmetatable, pcall
local floor, min = math.floor, math.min
local format, match, find, gsub, sub = string.format, string.match, string.find, string.gsub, string.sub
local now, monotonic_ms = core.now, core.monotonic_ms

local _M = { _VERSION = "0.1.0" }

_M.DEFAULT_API_BASE = "https://api.weixin.qq.com"

-- API calls by API path, outcome ("ok", "wechat" for an errcode, or the
-- failure kind) and errcode ("0" when ok, "" when there was no answer).
local calls_metric, refresh_metric
local function count_call(path, outcome, errcode)
  if not calls_metric then
    calls_metric = metrics.builtin("counter", "wxd_wechat_api_calls_total",
      "WeChat API calls, by API path, outcome and errcode", { "api", "outcome", "errcode" }, { max_series = 1000 })
  end
  metrics.count(calls_metric, { path, outcome, errcode })
end

local function count_refresh(name, background, result)
  if not refresh_metric then
    refresh_metric = metrics.builtin("counter", "wxd_wechat_token_refreshes_total",
      "access_token and ticket fetches, by credential, trigger (background or blocking) and result (ok, failed)",
      { "credential", "trigger", "result" }, { max_series = 100 })
  end
  metrics.count(refresh_metric, { name, background and "background" or "blocking", result })
end


--- errcodes that mean "this access_token is no good".
_M.TOKEN_ERRCODES = { [40001] = true, [40014] = true, [42001] = true }

local TICKET_TYPES = { jsapi = true, wx_card = true }
local FORCE_GAP = 30          -- seconds between two forced stable_token refreshes (WeChat's rule)
local FORCE_PER_DAY = 20      -- forced refreshes a day (WeChat's quota)
local MAX_BACKOFF = 60        -- seconds between background retries, at most
local BAD_TTL = 600           -- how long a refused token is remembered

local function fail(msg, level) error("wxd.wechat: " .. msg, level + 1) end

------------------------------------------------------------------------
-- Credentials in the store: "<expires_at>:<value>", with the store's own
-- TTL at the expiry, so that an expired one disappears by itself.
------------------------------------------------------------------------

local Cred = {}
Cred.__index = Cred

local function new_cred(client, name, fetch)
  local key = "wxd:wechat:" .. client.appid .. ":" .. name
  return setmetatable({ client = client, name = name, key = key, lock_key = key .. ":refresh",
                        fail_key = key .. ":failed", fetch = fetch, next_check = 0, backoff = 0 }, Cred)
end

-- value, expires_at, the record as stored (for compare-and-set)
function Cred:read()
  local rec = store.get(self.key)
  if type(rec) ~= "string" then return nil end
  local e, v = match(rec, "^(%d+):(.+)$")
  if not e then return nil end
  return v, tonumber(e), rec
end

-- Usable: more than expiry_margin seconds left, so that a call made now
-- does not reach WeChat after the expiry.
function Cred:usable(expires_at)
  return expires_at ~= nil and expires_at - now() > self.client.expiry_margin
end

--- The value, or nil, err, info. Waits for a fetch only when there is no
-- usable value.
function Cred:get()
  local v, e, rec = self:read()
  if v and self:usable(e) then return v, rec end
  return self:refresh(false)
end

-- Fetches under the refresh lock. background: do not wait for the lock,
-- and skip when the value is no longer due (someone renewed it).
function Cred:refresh(background)
  local c = self.client
  local asked = now()
  local lk, lerr = store.lock(self.lock_key, { timeout = background and 0 or c.lock_timeout,
    expire = c.lock_expire })
  if not lk then
    if background then return nil, "busy" end
    return nil, "token", { detail = "waiting for another caller's refresh: " .. tostring(lerr) }
  end
  local v, e, rec = self:read()
  if v then
    local left = e - now()
    if (background and left > c.refresh_before) or (not background and self:usable(e)) then
      lk:unlock()
      return v, rec -- fetched by someone else meanwhile
    end
  end
  -- The fetch this caller waited for failed: share its outcome instead of
  -- queueing one more fetch per waiter.
  local f = not background and json.decode(store.get(self.fail_key) or "")
  if type(f) == "table" and type(f.at) == "number" and f.at >= asked then
    lk:unlock()
    return nil, f.kind, f.info
  end
  local ok, nv, expires_in, info = pcall(self.fetch, self, v)
  if not ok then
    lk:unlock()
    error(nv, 0)
  end
  count_refresh(self.name, background, nv and "ok" or "failed")
  if not nv then
    local i = type(info) == "table" and info or {}
    store.set(self.fail_key, json.encode({ at = now(), kind = expires_in,
      info = { errcode = i.errcode, errmsg = i.errmsg, status = i.status, detail = i.detail } }), 10)
    lk:unlock()
    return nil, expires_in, info
  end
  local stats = c.counters
  if background then stats.background_refreshes = stats.background_refreshes + 1
  else stats.blocking_refreshes = stats.blocking_refreshes + 1 end
  local nrec = format("%d:%s", floor(now()) + expires_in, nv)
  local sok, serr = store.set(self.key, nrec, expires_in)
  lk:unlock()
  if not sok then return nil, "token", { detail = "store: " .. tostring(serr) } end
  log.info("wechat: credential refreshed", { appid = c.appid, credential = self.name, expires_in = expires_in,
    background = background or false, renewed = v ~= nil and v ~= nv })
  return nv, nrec, (v ~= nil and v == nv)
end

--- Marks exactly this record bad: a record another caller already put in
-- its place is left alone.
function Cred:invalidate(rec)
  -- Marked bad before it leaves the store: a caller that fetches as soon
  -- as the record is gone must already see that stable_token's answer is
  -- the refused token.
  local v = match(rec, "^%d+:(.+)$")
  if v then store.set(self.key .. ":bad", v, BAD_TTL) end
  local ok = store.cas(self.key, rec, nil)
  if ok then
    self.client.counters.invalidations = self.client.counters.invalidations + 1
  end
  return ok
end

-- Background: renew when due; back off after a failure.
function Cred:tick(t)
  if t < self.next_check then return end
  local c = self.client
  local v, e = self:read()
  if not v or e - now() > c.refresh_before then
    -- Nothing to renew (never fetched, or already dropped: the next caller
    -- fetches), or not due yet.
    self.backoff = 0
    self.next_check = t + c.check_ms
    return
  end
  local nv, err, info = self:refresh(true)
  if nv and not info then
    self.backoff = 0
    self.next_check = t + c.check_ms
    -- A credential that lives less than refresh_before is due at once
    -- again: look at most every half of its remaining life, so that a short
    -- expires_in cannot turn the job into a refresh loop (with /cgi-bin/token
    -- each refresh would also cut the previous token's life).
    local _, e2 = self:read()
    local left = e2 and e2 - now()
    if left and left <= c.refresh_before then
      self.next_check = t + math.max(c.check_ms, left * 500)
    end
    return
  end
  if err == "busy" then -- another caller is fetching right now
    self.next_check = t + c.check_ms
    return
  end
  self.backoff = self.backoff == 0 and 1 or min(self.backoff * 2, MAX_BACKOFF)
  self.next_check = t + self.backoff * 1000
  c.counters.background_failures = c.counters.background_failures + 1
  if nv then
    -- stable_token gave the same token back: it renews only in its last
    -- minutes, which refresh_before reaches first. Ask again later.
    log.info("wechat: credential not renewed yet; the current one stays in use",
      { appid = c.appid, credential = self.name, retry_in_s = self.backoff })
  else
    log.warn("wechat: background refresh failed; the current credential stays in use",
      { appid = c.appid, credential = self.name, error = err, errcode = info and info.errcode,
        detail = info and info.detail, retry_in_s = self.backoff })
  end
end

------------------------------------------------------------------------
-- The client
------------------------------------------------------------------------

local Client = {}
Client.__index = Client
Client.__tostring = function(c) return "wxd.wechat client " .. c.appid end

local function opt_number(cfg, name, default, lo, hi)
  local v = cfg[name]
  if v == nil then return default end
  if type(v) ~= "number" or v ~= v or v < lo or v > hi then
    fail(format("cfg.%s must be a number in [%s, %s], got %s", name, lo, hi, tostring(v)), 4)
  end
  return v
end

local function check_base(base)
  if type(base) ~= "string" or not find(base, "^https?://[^/?#]+") then
    fail("cfg.api_base must be an http(s) URL such as https://api.weixin.qq.com, got " .. tostring(base), 4)
  end
  return (gsub(base, "/+$", ""))
end

local clients = {} -- this Lua state's clients, by appid and settings
local first_client = {} -- appid -> the first client made for it in this Lua state

local function query_string(q)
  if not q then return "" end
  local keys = {}
  for k in pairs(q) do keys[#keys + 1] = k end
  table.sort(keys)
  local parts = {}
  for i, k in ipairs(keys) do parts[i] = crypto.url_encode(k) .. "=" .. crypto.url_encode(tostring(q[k])) end
  return table.concat(parts, "&")
end

-- One HTTP exchange with WeChat, no token logic. token: added as the
-- access_token query parameter when given.
local function request(self, method, path, opts, token)
  local q = opts.query
  local qs = query_string(q)
  if token then qs = "access_token=" .. crypto.url_encode(token) .. (qs ~= "" and "&" .. qs or "") end
  local body, headers = opts.body, nil
  if opts.json ~= nil then
    local ok, encoded = pcall(json.encode, opts.json)
    if not ok then fail("json body cannot be encoded: " .. tostring(encoded), 3) end
    body = encoded -- UTF-8 as is, "/" unescaped: what WeChat's JSON APIs take
    headers = { ["Content-Type"] = "application/json; charset=utf-8" }
  end
  local res, kind, detail = http.request({
    method = method, url = self.api_base .. path .. (qs ~= "" and "?" .. qs or ""),
    body = body, headers = headers, timeout = opts.timeout or self.timeout,
  })
  if not res then return nil, kind, { detail = detail } end
  if res.status ~= 200 then return nil, "status", { status = res.status } end
  if opts.raw then return res end
  local data = json.decode(res.body)
  if type(data) ~= "table" then return nil, "json", { status = res.status, detail = "the answer is not a JSON object" } end
  local code = data.errcode
  if code ~= nil and code ~= 0 then
    return nil, "wechat", { errcode = tonumber(code) or code, errmsg = tostring(data.errmsg or "") }
  end
  return data
end

function Client:request(method, path, opts, token)
  local res, kind, info = request(self, method, path, opts, token)
  if res then
    count_call(path, "ok", "0")
  else
    count_call(path, kind, kind == "wechat" and tostring(info.errcode) or "")
  end
  return res, kind, info
end

local function check_call(method, path, opts, level)
  if type(method) ~= "string" then fail("method must be a string", level + 1) end
  if type(path) ~= "string" or sub(path, 1, 1) ~= "/" then fail("path must be a string starting with /", level + 1) end
  if opts ~= nil and type(opts) ~= "table" then fail("options must be a table", level + 1) end
  opts = opts or {}
  if opts.query ~= nil and type(opts.query) ~= "table" then fail("query must be a table", level + 1) end
  if opts.body ~= nil and type(opts.body) ~= "string" then fail("body must be a string", level + 1) end
  return opts
end

--- Calls an API that takes an access_token, which is added for you.
-- @tparam string method "GET", "POST", ...
-- @tparam string path e.g. "/cgi-bin/user/info"
-- @tparam[opt] table opts `query` (table), `json` (a table sent as JSON) or
--   `body` (a string), `timeout` (as wxd.http), `raw` (return the HTTP
--   response instead of decoding JSON: media downloads)
-- @treturn[1] table the decoded answer
-- @treturn[2] nil
-- @treturn[2] string kind (see the module's description)
-- @treturn[2] table info
function Client:call(method, path, opts)
  opts = check_call(method, path, opts, 2)
  local ok, qerr, qinfo = self:take_quota(path)
  if not ok then return nil, qerr, qinfo end
  for attempt = 1, 2 do
    local token, rec_or_err, info = self.token:get()
    if not token then return nil, rec_or_err, info end
    local data, err, einfo = self:request(method, path, opts, token)
    if err == "wechat" and _M.TOKEN_ERRCODES[einfo.errcode] and attempt == 1 then
      log.warn("wechat: access_token refused; fetching a new one", { appid = self.appid, errcode = einfo.errcode })
      self.token:invalidate(rec_or_err)
    else
      return data, err, einfo
    end
  end
end

--- Takes one call of the quotas (appid, then API path), waiting up to
-- quota.wait seconds in all for a turn.
-- @treturn true|nil
-- @treturn ?string "quota"
-- @treturn ?table `{ scope = "appid"|"api", retry_after = seconds }`
function Client:take_quota(path)
  local q = self.quota
  if not q then return true end
  return require("wxd.limit").take_all({ { q.appid_limiter, self.appid, "appid" },
    { q.api_limiter, path, "api" } }, q.wait, self.counters)
end

--- GET with query parameters (and the access_token).
function Client:get(path, query, opts)
  opts = opts or {}
  if query ~= nil and type(query) ~= "table" then fail("query must be a table", 2) end
  return self:call("GET", path, { query = query, timeout = opts.timeout, raw = opts.raw })
end

--- POST a table as JSON (and the access_token).
function Client:post(path, body, opts)
  opts = opts or {}
  if type(body) ~= "table" then fail("the body must be a table (sent as JSON)", 2) end
  return self:call("POST", path, { json = body, query = opts.query, timeout = opts.timeout, raw = opts.raw })
end

--- The access_token, fetched when needed (for APIs wxd.wechat does not wrap).
-- @treturn[1] string
-- @treturn[2] nil
-- @treturn[2] string kind
-- @treturn[2] table info
function Client:access_token()
  local v, err, info = self.token:get()
  if not v then return nil, err, info end
  return v
end

--- Drops `token` (the value access_token() gave) after WeChat refused it;
-- a newer token is kept. Returns true when it was the current one.
function Client:invalidate_token(token)
  if type(token) ~= "string" then fail("invalidate_token: expected the token string", 2) end
  local v, _, rec = self.token:read()
  if v ~= token then return false end
  return self.token:invalidate(rec) == true
end

--- A ticket: "jsapi" (JS-SDK) or "wx_card" (card JS-SDK).
function Client:ticket(kind)
  kind = kind or "jsapi"
  local cred = self.tickets[kind]
  if not cred then fail('ticket kind must be "jsapi" or "wx_card", got ' .. tostring(kind), 2) end
  local v, err, info = cred:get()
  if not v then return nil, err, info end
  return v
end

--- The JS-SDK configuration for a page: `{ appId, timestamp, nonceStr,
-- signature }`, to pass to wx.config on that page.
-- @tparam string url the page's full URL (a #fragment is dropped)
-- @treturn[1] table
-- @treturn[2] nil
-- @treturn[2] string "invalid url", or a kind as for call()
function Client:jssdk_config(url)
  if type(url) ~= "string" or #url > 2048 or not find(url, "^https?://[^/?#]+") or find(url, "[%c ]") then
    return nil, "invalid url"
  end
  local ticket, err, info = self:ticket("jsapi")
  if not ticket then return nil, err, info end
  local ts = floor(now())
  local nonce = crypto.nonce(16)
  return { appId = self.appid, timestamp = ts, nonceStr = nonce,
    signature = _M.jssdk_signature(ticket, nonce, ts, url) }
end

--- A route handler that serves jssdk_config for `?url=<the page's URL>`:
-- 200 with the JSON, 400 for a missing or bad url, 502 when WeChat cannot
-- give a ticket.
-- @usage app:get("/jssdk/config", wx:jssdk_handler())
function Client:jssdk_handler()
  return function(req)
    local conf, err = self:jssdk_config(req.query.url)
    if conf then return conf end
    if err == "invalid url" then return 400, { error = "url must be the page's http(s) URL" } end
    return 502, { error = "wechat unavailable", kind = err }
  end
end

--- Sends a customer-service message (客服消息): a table as WeChat's
-- /cgi-bin/message/custom/send takes it (`touser`, `msgtype`, ...).
function Client:send_custom(message)
  if type(message) ~= "table" then fail("send_custom: expected a message table", 2) end
  return self:call("POST", "/cgi-bin/message/custom/send", { json = message })
end

--- Mini Program login: exchanges the code of wx.login for the user's
-- openid, session_key (and unionid when there is one). Keep session_key on
-- the server: never send it to the client, never log it.
-- @treturn[1] table `{ openid, session_key, unionid }`
-- @treturn[2] nil
-- @treturn[2] string "invalid code", or a kind as for call()
function Client:code2session(code)
  if type(code) ~= "string" or code == "" or #code > 512 or find(code, "[%c ]") then
    return nil, "invalid code"
  end
  local data, err, info = self:request("GET", "/sns/jscode2session", { query = {
    appid = self.appid, secret = self.secret, js_code = code, grant_type = "authorization_code" } })
  if not data then return nil, err, info end
  if type(data.openid) ~= "string" or type(data.session_key) ~= "string" then
    return nil, "json", { detail = "no openid or session_key in the answer" }
  end
  return { openid = data.openid, session_key = data.session_key, unionid = data.unionid }
end

--- Mini Program: the user's phone number from the code of a
-- getPhoneNumber button (/wxa/business/getuserphonenumber).
-- @treturn[1] table phone_info: `phoneNumber`, `purePhoneNumber`, `countryCode`, `watermark`
-- @treturn[2] nil
-- @treturn[2] string "invalid code", or a kind as for call()
function Client:phone_number(code)
  if type(code) ~= "string" or code == "" or #code > 512 then return nil, "invalid code" end
  local data, err, info = self:call("POST", "/wxa/business/getuserphonenumber", { json = { code = code } })
  if not data then return nil, err, info end
  if type(data.phone_info) ~= "table" then return nil, "json", { detail = "no phone_info in the answer" } end
  local wm = data.phone_info.watermark
  if type(wm) == "table" and wm.appid ~= nil and wm.appid ~= self.appid then
    return nil, "watermark", { detail = "phone_info is for another appid" }
  end
  return data.phone_info
end

--- Mini Program: decrypts encryptedData (wx.getUserInfo, wx.getWeRunData,
-- share info, ...) with the user's session_key; the watermark must name
-- this appid. See wxd.miniprogram.decrypt.
function Client:decrypt(session_key, encrypted_data, iv, opts)
  opts = opts or {}
  return require("wxd.miniprogram").decrypt(session_key, encrypted_data, iv, {
    appid = self.appid, max_age = opts.max_age, now = opts.now })
end

--- Counters of this worker: blocking_refreshes (a caller waited for a
-- fetch), background_refreshes, background_failures, invalidations.
function Client:stats()
  local s = {}
  for k, v in pairs(self.counters) do s[k] = v end
  return s
end

-- Stable mode: a forced refresh is allowed when the last one is FORCE_GAP
-- seconds old and today's count (Beijing time) is under the quota.
function Client:may_force()
  local gap_key = "wxd:wechat:" .. self.appid .. ":force_gap"
  if not store.add(gap_key, true, FORCE_GAP) then
    return false, "a forced refresh was made less than " .. FORCE_GAP .. " s ago"
  end
  local day = os.date("!%Y%m%d", floor(now()) + 8 * 3600)
  local n = store.incr("wxd:wechat:" .. self.appid .. ":force_day:" .. day, 1, 2 * 86400)
  if n and n > FORCE_PER_DAY then return false, "the daily quota of forced refreshes is used up" end
  return true
end

local function token_answer(data, err, info)
  if not data then return nil, err, info end
  local tok, ttl = data.access_token, tonumber(data.expires_in)
  if type(tok) ~= "string" or tok == "" or find(tok, "[%c ]") or not ttl or ttl <= 0 then
    return nil, "json", { detail = "no access_token or expires_in in the answer" }
  end
  return tok, floor(ttl)
end

local function fetch_token(cred)
  local c = cred.client
  if c.token_mode == "token" then
    return token_answer(c:request("GET", "/cgi-bin/token", { query = {
      grant_type = "client_credential", appid = c.appid, secret = c.secret } }))
  end
  local body = { grant_type = "client_credential", appid = c.appid, secret = c.secret, force_refresh = false }
  local tok, ttl, info = token_answer(c:request("POST", "/cgi-bin/stable_token", { json = body }))
  if tok and tok == store.get(cred.key .. ":bad") then
    -- WeChat still hands out the token it refused: only a forced refresh
    -- replaces it, and those are rationed.
    local allowed, why = c:may_force()
    if not allowed then return nil, "token", { detail = "the access_token was refused and " .. why } end
    log.warn("wechat: forcing a stable_token refresh", { appid = c.appid })
    body.force_refresh = true
    tok, ttl, info = token_answer(c:request("POST", "/cgi-bin/stable_token", { json = body }))
  end
  return tok, ttl, info
end

local function fetch_ticket(cred)
  local data, err, info = cred.client:call("GET", "/cgi-bin/ticket/getticket", { query = { type = cred.kind } })
  if not data then return nil, err, info end
  local ticket, ttl = data.ticket, tonumber(data.expires_in)
  if type(ticket) ~= "string" or ticket == "" or not ttl or ttl <= 0 then
    return nil, "json", { detail = "no ticket or expires_in in the answer" }
  end
  return ticket, floor(ttl)
end

local DEFAULT_QUOTA = { appid = { rate = 1000, burst = 2000 }, api = { rate = 200, burst = 400 }, wait = 1 }

-- The client's limiters from cfg.quota (nil: the defaults; false: none),
-- and a string of the settings for the client's identity.
local function check_quota(q, appid)
  if q == false then return nil, "noquota" end
  if q == nil then q = DEFAULT_QUOTA end
  if type(q) ~= "table" then fail("cfg.quota must be a table or false", 4) end
  local limit = require "wxd.limit"
  local out = { wait = q.wait or DEFAULT_QUOTA.wait }
  if type(out.wait) ~= "number" or out.wait < 0 then fail("cfg.quota.wait must be seconds >= 0", 4) end
  local id = { out.wait }
  for _, scope in ipairs({ "appid", "api" }) do
    local s = q[scope] or DEFAULT_QUOTA[scope]
    if type(s) ~= "table" or type(s.rate) ~= "number" or type(s.burst) ~= "number" then
      fail("cfg.quota." .. scope .. " must be { rate = n, burst = n }", 4)
    end
    -- Named by the settings too: two clients of one appid with other quotas do not share them.
    local name = format("wx:%s:%s:%g:%g", scope, appid, s.rate, s.burst)
    out[scope .. "_limiter"] = limit.new(name, { rate = s.rate, burst = s.burst, redis = q.redis })
    id[#id + 1] = name
  end
  return out, table.concat(id, ",")
end

--- A client for one appid. Clients are cached per Lua state: the same
-- settings give the same client.
-- @tparam table cfg
--   `appid`, `secret` (required; e.g. from env("WXD_MP_SECRET")),
--   `api_base` (default: WXD_WECHAT_API_BASE, else https://api.weixin.qq.com),
--   `token_mode` ("stable" or "token"),
--   `refresh_before` (seconds before expiry of the proactive refresh, 300),
--   `expiry_margin` (seconds before expiry a credential stops being used, 30),
--   `background` (false: no proactive refresh job; default: on in a server),
--   `check_ms` (how often the job looks, 1000), `timeout` (as wxd.http, 10 s),
--   `lock_timeout` (seconds a caller waits for another's fetch, 15),
--   `quota` (false: none; default `{ appid = { rate = 1000, burst = 2000 },
--   api = { rate = 200, burst = 400 }, wait = 1 }`: calls per second per
--   appid and per API path, and how long a call may wait for its turn;
--   `redis` as for wxd.limit shares them between nodes)
-- @treturn table the client
function _M.client(cfg)
  if type(cfg) ~= "table" then fail("client: cfg must be a table (appid, secret, ...)", 2) end
  local appid, secret = cfg.appid, cfg.secret
  if type(appid) ~= "string" or not find(appid, "^[%w_-]+$") then fail("cfg.appid must be an appid string", 2) end
  if type(secret) ~= "string" or secret == "" then
    fail("cfg.secret must be the AppSecret (e.g. env(\"WXD_MP_SECRET\")) for " .. appid, 2)
  end
  local mode = cfg.token_mode or "stable"
  if mode ~= "stable" and mode ~= "token" then fail('cfg.token_mode must be "stable" or "token"', 2) end
  local base = check_base(cfg.api_base or os.getenv("WXD_WECHAT_API_BASE") or _M.DEFAULT_API_BASE)
  local refresh_before = opt_number(cfg, "refresh_before", 300, 0, 86400)
  local expiry_margin = opt_number(cfg, "expiry_margin", 30, 0, 3600)
  local check_ms = opt_number(cfg, "check_ms", 1000, 10, 3600000)
  local lock_timeout = opt_number(cfg, "lock_timeout", 15, 0, 600)
  local background = cfg.background
  if background == nil then background = require("wxd.core.shdict").in_server() end
  if cfg.timeout ~= nil and type(cfg.timeout) ~= "number" and type(cfg.timeout) ~= "table" then
    fail("cfg.timeout must be seconds or a table as for wxd.http", 2)
  end
  local quota, quota_id = check_quota(cfg.quota, appid)
  -- The secret is part of the identity (a rotated secret is a new client)
  -- but only as a digest.
  local id = table.concat({ appid, crypto.sha256_hex(secret), mode, base, refresh_before, expiry_margin,
                            check_ms, lock_timeout, tostring(background), quota_id }, "|")
  local c = clients[id]
  if c then return c end
  c = setmetatable({ appid = appid, secret = secret, token_mode = mode, api_base = base,
    refresh_before = refresh_before, expiry_margin = expiry_margin, check_ms = check_ms,
    -- The lock outlives the longest fetch: a ticket fetch may
    -- wait for the token's lock, then make two calls and a retry.
    lock_timeout = lock_timeout,
    lock_expire = lock_timeout + 4 * (type(cfg.timeout) == "table" and (cfg.timeout.total or 30)
                                      or cfg.timeout or 10) + 30,
    timeout = cfg.timeout or 10, quota = quota,
    counters = { blocking_refreshes = 0, background_refreshes = 0, background_failures = 0,
              invalidations = 0, quota_waits = 0, quota_refusals = 0 } }, Client)
  c.token = new_cred(c, "access_token", fetch_token)
  c.tickets = {}
  for kind in pairs(TICKET_TYPES) do
    local t = new_cred(c, "ticket:" .. kind, fetch_ticket)
    t.kind = kind
    c.tickets[kind] = t
  end
  if background then
    c.job = timer.every(check_ms, function()
      local t = monotonic_ms()
      c.token:tick(t)
      for _, tk in pairs(c.tickets) do tk:tick(t) end
    end, { worker = 0 })
  end
  clients[id] = c
  if not first_client[appid] then first_client[appid] = c end
  return c
end

--- The client made first in this Lua state (this generation) for `appid`;
-- without an appid, the only client there is. nil when there is none (or,
-- without an appid, more than one appid).
-- @tparam[opt] string appid
-- @treturn ?table
function _M.client_for(appid)
  if appid ~= nil then return first_client[appid] end
  local only
  for _, c in pairs(first_client) do
    if only then return nil end
    only = c
  end
  return only
end

--- The JS-SDK signature: sha1 of
-- `jsapi_ticket=..&noncestr=..&timestamp=..&url=..` (url without its
-- #fragment).
-- @treturn string 40 lower-case hex characters
function _M.jssdk_signature(ticket, noncestr, timestamp, url)
  if type(ticket) ~= "string" or type(noncestr) ~= "string" or type(url) ~= "string" then
    fail("jssdk_signature: ticket, noncestr and url must be strings", 2)
  end
  if type(timestamp) ~= "number" and type(timestamp) ~= "string" then
    fail("jssdk_signature: timestamp must be a number or a string", 2)
  end
  if type(timestamp) == "number" then timestamp = format("%d", timestamp) end
  url = gsub(url, "#.*$", "")
  return crypto.sha1_hex("jsapi_ticket=" .. ticket .. "&noncestr=" .. noncestr .. "&timestamp=" .. timestamp
    .. "&url=" .. url)
end

return _M
