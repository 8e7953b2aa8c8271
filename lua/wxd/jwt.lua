--- wxd.jwt: JSON Web Tokens (RFC 7519) signed with HS256, RS256 or ES256,
-- OAuth2 bearer authentication (RFC 6750) and JWKS key sets (docs/jwt.md).
--
-- A key carries its algorithm: the token's `alg` header only has to agree
-- with it, never chooses it. So `alg: none` is refused, and an RSA public
-- key can never be used as an HMAC secret (the HS/RS confusion): an HS256
-- token is checked against HS256 keys only.
--
-- @module wxd.jwt
-- @usage
-- local jwt = require "wxd.jwt"
-- local key = jwt.key{ alg = "RS256", file = "/etc/wxd/issuer-public.pem", kid = "2024-01" }
-- local claims, err = jwt.verify(token, { keys = { key }, issuer = "https://auth.example.com", audience = "shop" })
local crypto = require "wxd.crypto"
local json = require "wxd.json"
local http = require "wxd.http"
local log = require "wxd.log"
local task = require "wxd.task"

local type, pairs, ipairs, tostring, error, setmetatable, getmetatable, pcall =
  type, pairs, ipairs, tostring, error, setmetatable, getmetatable, pcall
local find, sub, char, byte, concat = string.find, string.sub, string.char, string.byte, table.concat
local b64u_enc, b64u_dec = crypto.base64url_encode, crypto.base64url_decode

local _M = {}

local ALGS = { HS256 = true, RS256 = true, ES256 = true }
local DEFAULT_LEEWAY = 60 -- seconds of clock skew accepted on exp, nbf and iat
local MAX_TOKEN = 16 * 1024

------------------------------------------------------------------------
-- Keys
------------------------------------------------------------------------

local KEY_MT = { __tostring = function(k) return "wxd.jwt.key (" .. k.alg .. (k.kid and (" " .. k.kid) or "") .. ")" end }

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then
    error("wxd.jwt.key: cannot read " .. tostring(path) .. ": " .. tostring(err), 3)
  end
  local s = f:read("*a")
  f:close()
  return s
end

--- A key for one algorithm.
-- `{ alg = "HS256", secret = bytes }` (at least 32 bytes);
-- `{ alg = "RS256" | "ES256", pem = text | file = path }`, a public key
-- (verify only) or a private key (sign and verify); optional `kid`.
-- Wrong arguments raise: keys come from configuration.
-- @tparam table opts
-- @treturn table key
function _M.key(opts)
  if type(opts) ~= "table" or not ALGS[opts.alg] then
    error("wxd.jwt.key: alg must be HS256, RS256 or ES256", 2)
  end
  local k = setmetatable({ alg = opts.alg, kid = opts.kid }, KEY_MT)
  if opts.alg == "HS256" then
    if type(opts.secret) ~= "string" or #opts.secret < 32 then
      error("wxd.jwt.key: HS256 needs a secret of at least 32 bytes", 2)
    end
    k.secret = opts.secret
    k.can_sign = true
    return k
  end
  local pem = opts.pem or (opts.file and read_file(opts.file))
  if type(pem) ~= "string" then
    error("wxd.jwt.key: " .. opts.alg .. " needs pem or file", 2)
  end
  local priv, pub
  if opts.alg == "RS256" then
    priv = find(pem, "PRIVATE KEY", 1, true) and crypto.load_private_key(pem)
    pub = not priv and crypto.load_public_key(pem)
  else
    priv = find(pem, "PRIVATE KEY", 1, true) and crypto.ec_load_private_key(pem)
    pub = not priv and crypto.ec_load_public_key(pem)
  end
  if not (priv or pub) then
    error("wxd.jwt.key: not a " .. (opts.alg == "RS256" and "RSA" or "P-256 EC") .. " key", 2)
  end
  k.pkey = priv or pub
  k.can_sign = priv and true or false
  return k
end

-- DER pieces for a SubjectPublicKeyInfo built from JWK numbers.
local function der_len(n)
  if n < 128 then return char(n) end
  if n < 256 then return char(0x81, n) end
  return char(0x82, math.floor(n / 256), n % 256)
end
local function der(tag, body) return char(tag) .. der_len(#body) .. body end
local function der_uint(bytes)
  local i = 1
  while i < #bytes and byte(bytes, i) == 0 do i = i + 1 end
  bytes = sub(bytes, i)
  if byte(bytes, 1) >= 0x80 then bytes = "\0" .. bytes end
  return der(0x02, bytes)
end
local function pem_of(spki)
  local b64 = crypto.base64_encode(spki)
  local lines = {}
  for i = 1, #b64, 64 do lines[#lines + 1] = sub(b64, i, i + 63) end
  return "-----BEGIN PUBLIC KEY-----\n" .. concat(lines, "\n") .. "\n-----END PUBLIC KEY-----\n"
end
local RSA_ALG_ID = der(0x30, der(0x06, "\42\134\72\134\247\13\1\1\1") .. "\5\0")
local EC_P256_ALG_ID = der(0x30, der(0x06, "\42\134\72\206\61\2\1") .. der(0x06, "\42\134\72\206\61\3\1\7"))

--- A verification key from a JWK (RFC 7517): RSA (`n`, `e`) as RS256 or
-- EC P-256 (`x`, `y`) as ES256. Symmetric (`oct`) keys are refused: a key
-- set is public. nil, "invalid jwk" for anything else.
-- @tparam table jwk
-- @treturn ?table key
function _M.key_from_jwk(jwk)
  if type(jwk) ~= "table" then return nil, "invalid jwk" end
  if jwk.use ~= nil and jwk.use ~= "sig" then return nil, "invalid jwk" end
  local kid = type(jwk.kid) == "string" and jwk.kid or nil
  local k
  if jwk.kty == "RSA" and (jwk.alg == nil or jwk.alg == "RS256") then
    local n, e = type(jwk.n) == "string" and b64u_dec(jwk.n), type(jwk.e) == "string" and b64u_dec(jwk.e)
    if not (n and e and #n >= 256 and #n <= 1024 and #e >= 1 and #e <= 8) then return nil, "invalid jwk" end
    local spki = der(0x30, RSA_ALG_ID .. der(0x03, "\0" .. der(0x30, der_uint(n) .. der_uint(e))))
    local pk = crypto.load_public_key(pem_of(spki))
    if not pk then return nil, "invalid jwk" end
    k = { alg = "RS256", kid = kid, pkey = pk, can_sign = false }
  elseif jwk.kty == "EC" and jwk.crv == "P-256" and (jwk.alg == nil or jwk.alg == "ES256") then
    local x, y = type(jwk.x) == "string" and b64u_dec(jwk.x), type(jwk.y) == "string" and b64u_dec(jwk.y)
    if not (x and y and #x == 32 and #y == 32) then return nil, "invalid jwk" end
    local pk = crypto.ec_load_public_key(pem_of(der(0x30, EC_P256_ALG_ID .. der(0x03, "\0\4" .. x .. y))))
    if not pk then return nil, "invalid jwk" end
    k = { alg = "ES256", kid = kid, pkey = pk, can_sign = false }
  else
    return nil, "invalid jwk"
  end
  return setmetatable(k, KEY_MT)
end

local function signature(key, input)
  if key.alg == "HS256" then
    return crypto.hmac_sha256(key.secret, input)
  end
  return key.pkey:sign(input)
end

local function check_sig(key, input, sig)
  if key.alg == "HS256" then
    return crypto.equals(crypto.hmac_sha256(key.secret, input), sig)
  end
  return key.pkey:verify(input, sig) == true
end

------------------------------------------------------------------------
-- Signing
------------------------------------------------------------------------

--- Issue a token: `claims` (a table) signed with `key` (HS256 or a private
-- RS256/ES256 key). Options: `expires_in` (seconds: sets `exp`; `iat` is
-- always set unless given), `header` (extra header fields), `now`.
-- @treturn string the compact JWS
function _M.sign(claims, key, opts)
  if type(claims) ~= "table" then error("wxd.jwt.sign: claims must be a table", 2) end
  if getmetatable(key) ~= KEY_MT or not key.can_sign then
    error("wxd.jwt.sign: needs an HS256 key or a private RS256/ES256 key", 2)
  end
  opts = opts or {}
  local now = opts.now or os.time()
  local body = {}
  for k, v in pairs(claims) do body[k] = v end
  if body.iat == nil then body.iat = now end
  if opts.expires_in then body.exp = now + opts.expires_in end
  local header = { typ = "JWT" }
  for k, v in pairs(opts.header or {}) do header[k] = v end
  header.alg = key.alg
  if key.kid and header.kid == nil then header.kid = key.kid end
  local input = b64u_enc(json.encode(header)) .. "." .. b64u_enc(json.encode(body))
  return input .. "." .. b64u_enc(signature(key, input))
end

------------------------------------------------------------------------
-- Verification
------------------------------------------------------------------------

local function decode_part(s)
  local raw = b64u_dec(s)
  if not raw then return nil end
  local ok, v = pcall(json.decode, raw)
  if not ok or type(v) ~= "table" or v[1] ~= nil then return nil end
  return v
end

--- Split and decode a token without checking anything: header, claims,
-- signing input, signature; or nil, "malformed".
function _M.decode(token)
  if type(token) ~= "string" or #token > MAX_TOKEN then return nil, "malformed" end
  local d1 = find(token, ".", 1, true)
  local d2 = d1 and find(token, ".", d1 + 1, true)
  if not d2 or find(token, ".", d2 + 1, true) then return nil, "malformed" end
  local header, claims = decode_part(sub(token, 1, d1 - 1)), decode_part(sub(token, d1 + 1, d2 - 1))
  local sig = b64u_dec(sub(token, d2 + 1))
  if not (header and claims and sig) then return nil, "malformed" end
  return header, claims, sub(token, 1, d2 - 1), sig
end

local function has_audience(aud, want)
  if type(aud) == "string" then return aud == want end
  if type(aud) == "table" then
    for _, a in ipairs(aud) do if a == want then return true end end
  end
  return false
end

local function is_time(v) return v == nil or (type(v) == "number" and v == v and v > -1e15 and v < 1e15) end

--- Verify a token. Returns its claims, or nil and one of: "malformed",
-- "unsupported alg", "unknown kid", "bad signature", "expired",
-- "not yet valid", "issued in the future", "wrong issuer",
-- "wrong audience", "missing exp" (with `require_exp`).
-- @tparam string token compact JWS
-- @tparam table opts `keys` (a list of keys, or a key set from jwt.jwks),
--   `issuer` (string or list), `audience`, `leeway` (seconds, default 60),
--   `require_exp` (default true), `algs` (allowed, default every alg of
--   the keys), `now`
function _M.verify(token, opts)
  local header, claims, input, sig = _M.decode(token)
  if not header then return nil, claims end
  local alg = header.alg
  if not ALGS[alg] or (opts.algs and not opts.algs[alg]) then return nil, "unsupported alg" end
  if header.crit ~= nil then return nil, "unsupported alg" end
  local kid = header.kid
  if kid ~= nil and type(kid) ~= "string" then return nil, "malformed" end

  local keys = opts.keys
  local candidates
  if type(keys) == "table" and keys.lookup then
    local k, err = keys:lookup(kid, alg)
    if not k then return nil, err end
    candidates = { k }
  else
    candidates = {}
    for _, k in ipairs(keys or {}) do
      -- the key decides the algorithm; a kid, when both have one, must match
      if k.alg == alg and (kid == nil or k.kid == nil or k.kid == kid) then
        candidates[#candidates + 1] = k
      end
    end
    if not candidates[1] then
      return nil, kid and "unknown kid" or "unsupported alg"
    end
  end
  local ok = false
  for _, k in ipairs(candidates) do
    if k.alg == alg and check_sig(k, input, sig) then ok = true break end
  end
  if not ok then return nil, "bad signature" end

  local now = opts.now or os.time()
  local leeway = opts.leeway or DEFAULT_LEEWAY
  if not (is_time(claims.exp) and is_time(claims.nbf) and is_time(claims.iat)) then return nil, "malformed" end
  if claims.exp == nil then
    if opts.require_exp ~= false then return nil, "missing exp" end
  elseif now >= claims.exp + leeway then
    return nil, "expired"
  end
  if claims.nbf and now + leeway < claims.nbf then return nil, "not yet valid" end
  if claims.iat and now + leeway < claims.iat then return nil, "issued in the future" end
  if opts.issuer then
    local iss_ok = false
    if type(opts.issuer) == "table" then
      for _, i in ipairs(opts.issuer) do if claims.iss == i then iss_ok = true end end
    else
      iss_ok = claims.iss == opts.issuer
    end
    if not iss_ok then return nil, "wrong issuer" end
  end
  if opts.audience and not has_audience(claims.aud, opts.audience) then return nil, "wrong audience" end
  return claims, header
end

------------------------------------------------------------------------
-- JWKS
------------------------------------------------------------------------

local JWKS = {}
JWKS.__index = JWKS

--- A key set fetched from a JWKS URL and cached in the worker. Keys are
-- refreshed after `ttl` seconds (default 300) when next used; a token with
-- a kid not in the set makes one fetch at once (at most one every
-- `min_refresh` seconds, default 30), so a rotated-in key works on its
-- first request. A failed fetch keeps the old keys.
-- @tparam table opts { url =, ttl =, min_refresh =, timeout =, http = (options for wxd.http) }
function _M.jwks(opts)
  if type(opts) ~= "table" or type(opts.url) ~= "string" then
    error("wxd.jwt.jwks: url required", 2)
  end
  return setmetatable({
    url = opts.url, ttl = opts.ttl or 300, min_refresh = opts.min_refresh or 30,
    http = opts.http, keys = {}, fetched_at = nil, tried_at = nil, fetches = 0, clock = opts.clock or os.time,
  }, JWKS)
end

-- One fetch; its result replaces the set, a failure keeps it.
function JWKS:fetch()
  local now = self.clock()
  self.tried_at = now
  self.fetches = self.fetches + 1
  local ropts = { headers = { accept = "application/json" } }
  for k, v in pairs(self.http or {}) do ropts[k] = v end
  local res, err = http.get(self.url, ropts)
  local why = not res and tostring(err) or (res.status ~= 200 and "status " .. res.status) or nil
  local ok, doc
  if not why then
    ok, doc = pcall(json.decode, res.body)
    if not ok or type(doc) ~= "table" or type(doc.keys) ~= "table" then why = "invalid json" end
  end
  if why then
    self.last_error = why
    log.warn("jwks fetch failed", { url = self.url, error = why })
    return nil, "jwks fetch failed"
  end
  local keys = {}
  for _, jwk in ipairs(doc.keys) do
    local k = _M.key_from_jwk(jwk)
    if k then keys[#keys + 1] = k end
  end
  self.keys, self.fetched_at = keys, now
  return true
end

--- Fetch the set now. Concurrent callers in a worker share one fetch:
-- the first starts it as a task, the others wait for that task.
function JWKS:refresh()
  local h = self.inflight
  if h then return h:wait() end
  local ok, spawned = pcall(task.spawn, self.fetch, self)
  if not ok then return self:fetch() end -- not in a wxd coroutine
  self.inflight = spawned
  local r, err = spawned:wait()
  if self.inflight == spawned then self.inflight = nil end
  return r, err
end

local function find_key(keys, kid, alg)
  for _, k in ipairs(keys) do
    if k.alg == alg and (kid == nil or k.kid == kid) then return k end
  end
end

--- The key for a token's kid and alg: from the cache, else after a fetch.
function JWKS:lookup(kid, alg)
  local now = self.clock()
  if (not self.fetched_at or now - self.fetched_at >= self.ttl) and (not self.tried_at or now > self.tried_at) then
    self:refresh()
  end
  local k = find_key(self.keys, kid, alg)
  if k then return k end
  -- a fetch under way (another request's) may bring the kid: wait for it
  if self.inflight or not self.tried_at or now - self.tried_at >= self.min_refresh then
    self:refresh()
    k = find_key(self.keys, kid, alg)
    if k then return k end
  end
  return nil, "unknown kid"
end

------------------------------------------------------------------------
-- OAuth2 bearer middleware (RFC 6750)
------------------------------------------------------------------------

local function quote(s) return '"' .. tostring(s):gsub('[\\"]', "") .. '"' end

local function challenge(realm, err, desc, scope)
  local parts = { "Bearer realm=" .. quote(realm) }
  if err then parts[#parts + 1] = "error=" .. quote(err) end
  if desc then parts[#parts + 1] = "error_description=" .. quote(desc) end
  if scope then parts[#parts + 1] = "scope=" .. quote(scope) end
  return concat(parts, ", ")
end

local function default_fail(_, _, status, err, desc)
  return status, { error = err or "unauthorized", error_description = desc }
end

--- A `before` middleware: requires `Authorization: Bearer <jwt>` verified
-- with `opts` (as for verify). On success `req.ctx.jwt` holds the claims and
-- `req.ctx.scopes` the token's scopes (`scope`, space-separated, or `scp`).
-- Without a token: 401 with `WWW-Authenticate: Bearer realm="..."`; with
-- a bad one: 401 and `error="invalid_token"`. `opts.realm` (default
-- "api"), `opts.on_fail(req, res, status, err, description)` shapes the
-- body (the header is set before it runs).
function _M.bearer(opts)
  if type(opts) ~= "table" or opts.keys == nil then error("wxd.jwt.bearer: keys required", 2) end
  local realm = opts.realm or "api"
  local on_fail = opts.on_fail or default_fail
  return function(req, res)
    local auth = req.headers.authorization
    local token = type(auth) == "string" and auth:match("^[Bb][Ee][Aa][Rr][Ee][Rr] +([%w%-_%.~+/]+=*)%s*$")
    if not token then
      res.headers["WWW-Authenticate"] = challenge(realm)
      return on_fail(req, res, 401, nil, nil)
    end
    local claims, err = _M.verify(token, opts)
    if not claims then
      res.headers["WWW-Authenticate"] = challenge(realm, "invalid_token", err)
      return on_fail(req, res, 401, "invalid_token", err)
    end
    local scopes = {}
    local s = claims.scope
    if type(s) == "string" then
      for w in s:gmatch("%S+") do scopes[w] = true end
    elseif type(claims.scp) == "table" then
      for _, w in ipairs(claims.scp) do scopes[w] = true end
    end
    req.ctx.jwt, req.ctx.scopes, req.ctx.jwt_realm, req.ctx.jwt_fail = claims, scopes, realm, on_fail
    return nil
  end
end

--- Wrap a route handler so that it needs every scope listed (after
-- bearer): otherwise 403 with `error="insufficient_scope"` and the scope
-- needed in `WWW-Authenticate`.
-- @usage v3:post("/orders", jwt.scoped("orders:write", create_order))
function _M.scoped(scopes, fn)
  if type(scopes) == "string" then scopes = { scopes } end
  if type(scopes) ~= "table" or type(fn) ~= "function" then
    error("wxd.jwt.scoped: expected scopes and a handler", 2)
  end
  local need = concat(scopes, " ")
  return function(req, res)
    local have = req.ctx.scopes
    if not have then
      error("wxd.jwt.scoped: no bearer middleware ran for this route", 0)
    end
    for _, s in ipairs(scopes) do
      if not have[s] then
        res.headers["WWW-Authenticate"] = challenge(req.ctx.jwt_realm, "insufficient_scope", nil, need)
        return req.ctx.jwt_fail(req, res, 403, "insufficient_scope", "needs " .. need)
      end
    end
    return fn(req, res)
  end
end

return _M
