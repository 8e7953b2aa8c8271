--- wxd.limit: rate limiters shared by every worker (and, on Redis, by every node).
--
-- Two kinds, keyed by any string (a client address, an appid, an openid,
-- an API name):
--
-- * token bucket: `{ rate = 50, burst = 10 }` — `rate` per second on
--   average, at most `burst` at once;
-- * sliding window: `{ limit = 100, window = 60 }` — at most `limit` per
--   `window` seconds (the previous fixed window weighted by its overlap).
--
-- A limiter is named: every worker that asks for the name gets the same
-- limiter, kept in the core (core/limit.c) behind a mutex; it survives hot
-- reloads. Idle keys (a full bucket, an empty window) are reclaimed and at
-- most `max_keys` (100000) are kept: the least recently used go first.
--
-- With `redis = url|client|true` (true: the `redis` of config.lua) a token
-- bucket lives in Redis instead, one atomic script per check (GCRA), so
-- that several wxd nodes share it. If Redis fails, `take` returns
-- `nil, err`; the middleware then lets the request through (`on_error =
-- "allow"`, logged) or refuses it with 503 (`on_error = "deny"`).
--
-- @module wxd.limit
-- @usage
-- local limit = require "wxd.limit"
-- local per_ip = limit.new("per_ip", { rate = 50, burst = 10 })
-- local ok, remaining, reset, retry_after = per_ip:take(req.remote_addr)
-- app:before(limit.middleware{ limiter = per_ip })          -- every route
-- app:get("/x", limit.route({ name = "x", rate = 5, burst = 5 }, handler)) -- one route

local core = require "wxd.core.limit"

local type, error, tostring, tonumber, setmetatable, ceil, floor, format =
  type, error, tostring, tonumber, setmetatable, math.ceil, math.floor, string.format

local _M = {}

local function fail(msg, level) error("wxd.limit: " .. msg, level + 1) end

local function positive(v, name, level)
  if type(v) ~= "number" or not (v > 0 and v <= 1e9) then fail(name .. " must be a number in (0, 1e9]", level + 1) end
  return v
end

-- GCRA in one script: the key holds the "theoretical arrival time" in ms
-- of Redis's own clock (TIME), so the nodes' clocks do not matter. Numbers
-- go back as strings: Redis would truncate Lua numbers to integers.
local GCRA = [[
-- Redis before 5 replicates scripts verbatim and refuses a write after TIME.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local T, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tau = T * burst
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local nxt = tat + cost * T
if nxt - now <= tau + 1e-6 then
  redis.call('SET', KEYS[1], string.format('%.3f', nxt), 'PX', math.ceil(nxt - now) + 1)
  return { 1, tostring(math.floor((tau - (nxt - now)) / T + 1e-9)), tostring(nxt - now), '0' }
end
return { 0, tostring(math.floor((tau - (tat - now)) / T + 1e-9)), tostring(tat - now), tostring(nxt - now - tau) }
]]
_M.GCRA_SCRIPT = GCRA

local Local = {}
Local.__index = Local

--- Takes `cost` (1) for `key`.
-- @treturn ?boolean allowed
-- @treturn number remaining: what could still be taken now
-- @treturn number reset: seconds until the key is back to its full allowance
-- @treturn number retry_after: seconds until this cost would be allowed (0 when allowed)
-- or nil, err ("no memory"; on Redis its errors)
function Local:take(key, cost)
  return self._c:take(key, cost)
end

--- Forgets a key.
function Local:reset(key) return self._c:reset(key) end

--- `{ name, kind, keys, bytes, max_keys, allowed, rejected, reclaimed, evictions, rate, burst | limit, window }`
function Local:stats() return self._c:stats() end

--- Reclaims every idle key now (they are also reclaimed a few per take); returns how many.
function Local:sweep() return self._c:sweep() end

local Cluster = {}
Cluster.__index = Cluster

function Cluster:take(key, cost)
  cost = cost or 1
  local res, err = self._redis:eval(GCRA, { self._prefix .. key }, { self._t_ms, self.burst, cost })
  if type(res) ~= "table" then return nil, err or "bad reply" end
  return res[1] == 1, tonumber(res[2]), tonumber(res[3]) / 1000, tonumber(res[4]) / 1000
end

function Cluster:reset(key)
  local ok, err = self._redis:del(self._prefix .. key)
  if ok == nil then return nil, err end
  return true
end

function Cluster:stats()
  return { name = self.name, kind = "bucket", rate = self.rate, burst = self.burst, cluster = true }
end

function Cluster.sweep() return 0 end -- Redis expires idle keys itself (PX)

--- A limiter; the same name gives the same limiter in every worker.
-- @tparam string name 1..63 bytes
-- @tparam table opts `rate` and `burst` (token bucket) or `limit` and
--   `window` (sliding window, seconds); `max_keys` (100000); `redis` (url,
--   client or true) and `prefix` ("wxd:limit:") for cluster mode
-- @treturn table the limiter
function _M.new(name, opts)
  if type(name) ~= "string" then fail("name must be a string", 2) end
  if type(opts) ~= "table" then fail("options must be a table", 2) end
  local kind, a, b
  if opts.rate ~= nil or opts.burst ~= nil then
    kind, a = "bucket", positive(opts.rate, "rate", 2)
    b = positive(opts.burst or 1, "burst", 2)
  elseif opts.limit ~= nil or opts.window ~= nil then
    kind, a, b = "window", positive(opts.limit, "limit", 2), positive(opts.window, "window", 2)
  else
    fail("give rate and burst (token bucket) or limit and window (sliding window)", 2)
  end
  if opts.redis then
    if kind ~= "bucket" then fail("the Redis mode is a token bucket (rate, burst)", 2) end
    local r = opts.redis
    if type(r) ~= "table" or not r.eval then r = require("wxd.redis").new(r ~= true and r or nil) end
    local prefix = opts.prefix or "wxd:limit:"
    if type(prefix) ~= "string" then fail("prefix must be a string", 2) end
    return setmetatable({ name = name, kind = kind, rate = a, burst = b, limit = b, _redis = r,
      _prefix = prefix .. name .. ":", _t_ms = format("%.6f", 1000 / a) }, Cluster)
  end
  local max_keys = opts.max_keys
  if max_keys ~= nil and (type(max_keys) ~= "number" or max_keys < 1) then fail("max_keys must be a number >= 1", 2) end
  local c, err = core.new(name, kind, a, b, max_keys)
  if not c then return nil, err end
  return setmetatable({ name = name, kind = kind, limit = kind == "bucket" and b or a, _c = c }, Local)
end

local function client_addr(req) return req.remote_addr end

--- A `before` middleware: takes one unit (or `cost(req)`) per request for
-- `key(req)` (the client address by default; a nil key is not limited).
-- Allowed requests get `RateLimit-Limit`, `RateLimit-Remaining` and
-- `RateLimit-Reset` headers (`headers = false`: none); refused ones a 429
-- with those and `Retry-After` (whole seconds, at least 1).
-- @tparam table opts `limiter` (from new) or the options of new with a
--   `name`; `key`, `cost`, `headers`, `on_error` ("allow" or "deny"),
--   `status` (429), `body`
-- @treturn function middleware(req, res)
function _M.middleware(opts)
  if type(opts) ~= "table" then fail("middleware options must be a table", 2) end
  local lim = opts.limiter
  if lim == nil then
    if type(opts.name) ~= "string" then fail("middleware needs a limiter or a name", 2) end
    local err
    lim, err = _M.new(opts.name, opts)
    if not lim then fail(err, 2) end
  elseif type(lim) ~= "table" or type(lim.take) ~= "function" then
    fail("limiter must come from wxd.limit.new", 2)
  end
  local key_of = opts.key or client_addr
  if type(key_of) ~= "function" then fail("key must be a function(req)", 2) end
  local cost_of = opts.cost
  if cost_of ~= nil and type(cost_of) ~= "function" and type(cost_of) ~= "number" then
    fail("cost must be a number or a function(req)", 2)
  end
  local with_headers = opts.headers ~= false
  local deny_on_error = opts.on_error == "deny"
  local status = opts.status or 429
  local body = opts.body or "too many requests\n"
  local limit_value = tostring(lim.limit)
  return function(req, res)
    local key = key_of(req)
    if key == nil then return nil end
    local cost = cost_of
    if type(cost) == "function" then cost = cost(req) end
    local ok, remaining, reset, retry_after = lim:take(tostring(key), cost)
    if ok == nil then
      require("wxd.log").warn("wxd.limit: limiter unavailable", { limiter = lim.name, err = tostring(remaining) })
      if deny_on_error then return 503, "rate limiter unavailable\n" end
      return nil
    end
    if ok and not with_headers then return nil end
    local h = res.headers
    h["ratelimit-limit"] = limit_value
    h["ratelimit-remaining"] = tostring(floor(remaining))
    h["ratelimit-reset"] = tostring(ceil(reset))
    if ok then return nil end
    local after = ceil(retry_after)
    h["retry-after"] = tostring(after >= 1 and after < 1e9 and after or (after < 1 and 1 or 1e9))
    return status, body
  end
end

--- A handler behind a limiter: `app:get(path, limit.route(opts, handler))`.
-- @tparam table|function opts as for middleware, or a middleware
-- @tparam function handler
function _M.route(opts, handler)
  if type(handler) ~= "function" then fail("route needs a handler function", 2) end
  local mw = type(opts) == "function" and opts or _M.middleware(opts)
  return function(req, res)
    local a, b = mw(req, res)
    if a ~= nil then return a, b end
    return handler(req, res)
  end
end

--- Names of the limiters of this process.
function _M.names() return core.names() end

--- Takes one unit from each limiter in turn, waiting up to `wait` seconds
-- in all for a turn: the outbound quotas of wxd.wechat and wxd.pay. A
-- limiter that cannot answer (Redis down) does not stop the call.
-- @tparam table steps `{ { limiter, key, scope }, ... }`
-- @tparam number wait seconds
-- @tparam[opt] table counters its `quota_waits` and `quota_refusals` are counted
-- @treturn true|nil
-- @treturn ?string "quota"
-- @treturn ?table `{ scope = ..., retry_after = seconds }`
function _M.take_all(steps, wait, counters)
  local wxd_core = require "wxd.core"
  local deadline = wxd_core.monotonic_ms() + wait * 1000
  for _, step in ipairs(steps) do
    local lim, key, scope = step[1], step[2], step[3]
    while true do
      local ok, _, _, after = lim:take(key)
      if ok ~= false then break end
      if wxd_core.monotonic_ms() + after * 1000 > deadline then
        if counters then counters.quota_refusals = counters.quota_refusals + 1 end
        return nil, "quota", { scope = scope, retry_after = after }
      end
      if counters then counters.quota_waits = counters.quota_waits + 1 end
      wxd_core.sleep(ceil(after * 1000))
    end
  end
  return true
end

return _M
