--- wxd.session: cookie sessions with data in wxd.store (docs/api-versions.md).
--
-- The cookie holds only a random id and its HMAC (`<id>.<mac>`): a
-- tampered or forged cookie is refused before the store is asked. The data
-- lives in wxd.store (memory, or Redis so that any node serves any
-- session), under `prefix .. id`, as JSON. A session ends at `ttl` seconds
-- after login (absolute) or `idle` seconds after its last request,
-- whichever comes first. `login` always gives a new id (no fixation) and
-- removes the old one. Unsafe methods (POST, PUT, PATCH, DELETE) of a
-- request that carries the session cookie need the session's CSRF token in
-- `X-CSRF-Token` (or the form field `_csrf`).
--
-- @module wxd.session
-- @usage
-- local sessions = session.new{ secret = os.getenv("SESSION_SECRET") }
-- v2:before(sessions:middleware())
-- v2:post("/login", function(req, res)
--   -- ... check the password ...
--   sessions:login(req, res, { user = "u1" })
--   return { data = { csrf_token = req.session.csrf } }
-- end)
local crypto = require "wxd.crypto"
local json = require "wxd.json"
local store_mod = require "wxd.store"

local type, pairs, error, setmetatable, pcall, tostring = type, pairs, error, setmetatable, pcall, tostring

local _M = {}

local UNSAFE = { POST = true, PUT = true, PATCH = true, DELETE = true }

-- The store of config.lua, called as an object like a store.new() one.
local DEFAULT_STORE = {
  get = function(_, k) return store_mod.get(k) end,
  set = function(_, k, v, ttl) return store_mod.set(k, v, ttl) end,
  delete = function(_, k) return store_mod.delete(k) end,
}

local Sessions = {}
Sessions.__index = Sessions

--- A session manager. Options: `secret` (required, at least 32 bytes: the
-- HMAC key of cookie values), `name` (cookie, default "sid"), `ttl`
-- (absolute lifetime, default 86400 s), `idle` (default 1800 s), `store`
-- (a wxd.store object, default the store of config.lua), `prefix` (default
-- "session:"), `cookie` (more set_cookie options: same_site, domain, path),
-- `csrf` (default true), `on_csrf(req, res)` (the refusal; default 403
-- `{ error = "csrf" }`), `clock` (for tests).
function _M.new(opts)
  if type(opts) ~= "table" or type(opts.secret) ~= "string" or #opts.secret < 32 then
    error("wxd.session.new: secret must be a string of at least 32 bytes", 2)
  end
  return setmetatable({
    secret = opts.secret, name = opts.name or "sid", ttl = opts.ttl or 86400, idle = opts.idle or 1800,
    store = opts.store or DEFAULT_STORE, prefix = opts.prefix or "session:", cookie = opts.cookie or {},
    csrf = opts.csrf ~= false, on_csrf = opts.on_csrf, clock = opts.clock or os.time,
  }, Sessions)
end

function Sessions:sign(id)
  return id .. "." .. crypto.base64url_encode(crypto.hmac_sha256(self.secret, id))
end

-- The id of a cookie value, or nil when its MAC is wrong.
function Sessions:unsign(value)
  if type(value) ~= "string" or #value > 200 then return nil end
  local id, mac = value:match("^([%w]+)%.([%w%-_]+)$")
  if not id then return nil end
  local want = crypto.base64url_encode(crypto.hmac_sha256(self.secret, id))
  if not crypto.equals(want, mac) then return nil end
  return id
end

function Sessions:cookie_opts(extra)
  local o = {}
  for k, v in pairs(self.cookie) do o[k] = v end
  for k, v in pairs(extra or {}) do o[k] = v end
  o.http_only = true
  return o
end

-- Writes a session record with the store ttl of whichever end comes first.
function Sessions:write(s)
  local now = self.clock()
  local left = math.min(s.created + self.ttl, s.seen + self.idle) - now
  if left <= 0 then return nil, "expired" end
  return self.store:set(self.prefix .. s.id, json.encode({
    data = s.data, created = s.created, seen = s.seen, csrf = s.csrf,
  }), left)
end

--- Load the request's session: `req.session` is `{ id, data, csrf }` or
-- nil; `req.ctx.session_end` says why a cookie gave none ("tampered",
-- "expired", "idle", "unknown"). Returns the session or nil, reason.
function Sessions:load(req, res)
  local value = req.cookies[self.name]
  if value == nil then return nil end
  local id = self:unsign(value)
  local why
  local s
  if not id then
    why = "tampered"
  else
    local raw, err = self.store:get(self.prefix .. id)
    if err then error("wxd.session: store: " .. tostring(err), 0) end
    local ok, rec = pcall(json.decode, raw or "")
    if not raw or not ok or type(rec) ~= "table" then
      why = "unknown"
    else
      local now = self.clock()
      if now >= rec.created + self.ttl then
        why = "expired"
      elseif now > rec.seen + self.idle then
        why = "idle"
      else
        s = { id = id, data = rec.data, csrf = rec.csrf, created = rec.created, seen = rec.seen }
        if type(s.data) ~= "table" then s.data = {} end
        if now > s.seen then
          s.seen = now
          self:write(s)
        end
      end
    end
    if why and why ~= "unknown" then self.store:delete(self.prefix .. id) end
  end
  if not s then
    req.ctx.session_end = why
    res:clear_cookie(self.name, { path = self.cookie.path, domain = self.cookie.domain })
    return nil, why
  end
  s.saved = json.encode(s.data)
  req.session = s
  return s
end

--- Save `req.session.data` if it changed (the middleware's `after` part
-- does this; call it yourself before streaming a response).
function Sessions:save(req)
  local s = req.session
  if not s then return true end
  local now = json.encode(s.data)
  if now == s.saved then return true end
  s.saved = now
  return self:write(s)
end

--- Start a session with a new id (any old one of the request is removed):
-- call it after the login succeeded. Sets the cookie on `res`.
function Sessions:login(req, res, data)
  local old = req.session
  if old then self.store:delete(self.prefix .. old.id) end
  local now = self.clock()
  local s = { id = crypto.nonce(32), data = data or {}, csrf = crypto.nonce(32), created = now, seen = now }
  local ok, err = self:write(s)
  if not ok then return nil, err end
  s.saved = json.encode(s.data)
  req.session = s
  res:set_cookie(self.name, self:sign(s.id), self:cookie_opts({ max_age = self.ttl }))
  return s
end

--- End the request's session: removed from the store, cookie cleared.
function Sessions:logout(req, res)
  local s = req.session
  if s then self.store:delete(self.prefix .. s.id) end
  req.session = nil
  res:clear_cookie(self.name, { path = self.cookie.path, domain = self.cookie.domain })
  return true
end

local function csrf_refused(_, _)
  return 403, { error = "csrf" }
end

--- `before` and `after` middlewares in one: `g:before(m)` loads the
-- session and checks CSRF; pass `m.after` to `g:after` to save changed
-- data (`sessions:middleware()` returns both; `sessions:mount(g)` adds
-- both to a group or app).
function Sessions:middleware()
  local before = function(req, res)
    local s = self:load(req, res)
    if s and self.csrf and UNSAFE[req.method] then
      local token = req.headers["x-csrf-token"]
      if type(token) ~= "string" then
        local form = req:form()
        token = form and form._csrf
      end
      if type(token) ~= "string" or not crypto.equals(token, s.csrf) then
        return (self.on_csrf or csrf_refused)(req, res)
      end
    end
    return nil
  end
  local after = function(req)
    self:save(req)
  end
  return before, after
end

function Sessions:mount(g)
  local before, after = self:middleware()
  g:before(before)
  g:after(after)
  return g
end

return _M
