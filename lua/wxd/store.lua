--- wxd.store: the one store API of wxd, for idempotency keys, replay nonces,
-- deduplication, counters and locks.
--
-- Backends, with the same semantics:
--
-- * "memory" (the default, zero setup) keeps everything in a shared
--   dictionary of the process (`wxd.shdict`): every worker sees the same
--   data, it survives hot reloads, and a restart empties it.
-- * "redis" keeps it in Redis (the top-level `redis` of config.lua, see
--   wxd.redis), so that several wxd nodes share it. Values carry a one-byte
--   type tag, so a number comes back a number and a boolean a boolean;
--   incr, cas and unlock are Lua scripts (atomic on the server).
--
-- Configuration (config.lua):
--
--     store = { backend = "memory", shdict = NAME }
--     store = { backend = "redis", prefix = "shop:" }   -- and redis = "redis://..."
--
-- NAME defaults to "wxd_store", a 16 MiB dictionary the server creates
-- when config.lua does not declare one of that name. `prefix` (redis only,
-- default none) is put before every key.
--
-- Values are strings, numbers or booleans (encode tables with wxd.json).
-- Expected failures return nil, err; wrong argument types raise. With
-- Redis, every call may also fail with the errors of wxd.redis ("timeout",
-- "closed", "connect", "auth", or the server's message).
-- @module wxd.store
-- @usage
-- local store = require "wxd.store"
-- local first = store.add("msg:" .. msg_id, true, 30)   -- nil, "exists" on a retry
-- local lk = assert(store.lock("refund:" .. no, { timeout = 3 }))
-- ... ; lk:unlock()

local type, error, tostring, tonumber, setmetatable =
  type, error, tostring, tonumber, setmetatable
local str_format, str_sub, str_byte, math_ceil, math_min = string.format, string.sub, string.byte, math.ceil, math.min

local _M = {}

local DEFAULT_DICT = "wxd_store"
local DEFAULT_SIZE = "16m"

local function check_key(key)
  if type(key) ~= "string" or key == "" then
    error("wxd.store: key must be a non-empty string, got " .. type(key), 3)
  end
end

------------------------------------------------------------------------
-- memory: a shdict
------------------------------------------------------------------------

local Memory = {}
Memory.__index = Memory

local function memory_backend(cfg)
  local shdict = require "wxd.shdict"
  local name = cfg.shdict or DEFAULT_DICT
  if type(name) ~= "string" then error("wxd.store: shdict must be a string", 3) end
  local d = shdict.get_dict(name)
  if not d and name == DEFAULT_DICT and not require("wxd.core.shdict").in_server() then
    -- wxd script and wxd check have no server to create it.
    d = shdict.declare(DEFAULT_DICT, DEFAULT_SIZE)
  end
  if not d then
    error('wxd.store: no shdict "' .. name .. '" (declare it in config.lua: shdict = { ' .. name .. ' = "16m" })', 3)
  end
  return setmetatable({ dict = d, dict_name = name }, Memory)
end

function Memory:get(key) return self.dict:get(key) end
function Memory:set(key, value, ttl) return self.dict:set(key, value, ttl) end
function Memory:add(key, value, ttl) return self.dict:add(key, value, ttl) end
function Memory:incr(key, by, ttl) return self.dict:incr(key, by or 1, 0, ttl) end
function Memory:delete(key) return self.dict:delete(key) end
function Memory:cas(key, old, new, ttl) return self.dict:cas(key, old, new, ttl) end
function Memory:ttl(key) return self.dict:ttl(key) end
function Memory:wait_change(key, old, timeout) return self.dict:wait_change(key, old, timeout) end

function Memory:lock(key, opts)
  local lk = require("wxd.lock").new(self.dict_name, opts)
  local ok, err = lk:lock(key)
  if not ok then return nil, err end
  return lk
end

------------------------------------------------------------------------
-- redis
------------------------------------------------------------------------

local Redis = {}
Redis.__index = Redis

-- Type tags: s string, n number (%.17g: exact for every double), t/f boolean.
local function encode(v, what)
  local t = type(v)
  if t == "string" then return "s" .. v end
  if t == "number" then return "n" .. str_format("%.17g", v) end
  if t == "boolean" then return v and "t" or "f" end
  error("wxd.store: " .. what .. " must be a string, a number or a boolean, got " .. t, 3)
end

local TAG_S, TAG_N = str_byte("s"), str_byte("n")

-- A value someone else wrote without a tag comes back as the raw string.
local function decode(s)
  local tag = str_byte(s, 1)
  if tag == TAG_S then return str_sub(s, 2) end
  if tag == TAG_N then
    local n = tonumber(str_sub(s, 2))
    if n then return n end
  elseif s == "t" then
    return true
  elseif s == "f" then
    return false
  end
  return s
end

-- TTL in seconds (fractions allowed) -> ms for PX, 0 for none; as the
-- memory backend checks it.
local function ttl_ms(ttl)
  if ttl == nil then return 0 end
  if type(ttl) ~= "number" then
    error("wxd.store: ttl must be a number of seconds, got " .. type(ttl), 3)
  end
  if not (ttl >= 0 and ttl <= 1e9) then
    error("wxd.store: expected a TTL in seconds, 0..1e9, got " .. tostring(ttl), 3)
  end
  if ttl == 0 then return 0 end
  local ms = math_ceil(ttl * 1000)
  return ms < 1 and 1 or ms
end

local INCR = [[
local v = redis.call('GET', KEYS[1])
local by = tonumber(ARGV[1])
if not v then
  local s = 'n' .. string.format('%.17g', by)
  if ARGV[2] ~= '0' then redis.call('SET', KEYS[1], s, 'PX', ARGV[2]) else redis.call('SET', KEYS[1], s) end
  return s
end
if string.sub(v, 1, 1) ~= 'n' then return false end
local n = tonumber(string.sub(v, 2))
if not n then return false end
local s = 'n' .. string.format('%.17g', n + by)
redis.call('SET', KEYS[1], s, 'KEEPTTL')
return s
]]

local CAS = [[
local v = redis.call('GET', KEYS[1])
if ARGV[1] == '0' then
  if v then return 0 end
elseif v ~= ARGV[2] then
  return 0
end
if ARGV[3] == '0' then redis.call('DEL', KEYS[1]) return 1 end
if ARGV[5] ~= '0' then redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[5]) else redis.call('SET', KEYS[1], ARGV[4]) end
return 1
]]

local UNLOCK = [[
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
]]

local function redis_backend(cfg)
  local redis = require "wxd.redis"
  local prefix = cfg.prefix or ""
  if type(prefix) ~= "string" then error("wxd.store: prefix must be a string", 3) end
  local url = cfg.redis
  if url == nil then
    local wxd = require "wxd"
    url = type(wxd.config) == "table" and wxd.config.redis or nil
    if url == nil then error('wxd.store: backend "redis" needs redis = "redis://..." in config.lua', 3) end
  end
  return setmetatable({ r = redis.new(url), prefix = prefix, null = redis.null }, Redis)
end

function Redis:get(key)
  local v, err, detail = self.r:call("GET", self.prefix .. key)
  if v == nil then return nil, err, detail end
  if v == self.null then return nil end
  return decode(v)
end

function Redis:set(key, value, ttl)
  local k = self.prefix .. key
  if value == nil then return self:delete(key) end
  local enc, px = encode(value, "value"), ttl_ms(ttl)
  local ok, err, detail
  if px > 0 then ok, err, detail = self.r:call("SET", k, enc, "PX", px)
  else ok, err, detail = self.r:call("SET", k, enc) end
  if not ok then return nil, err, detail end
  return true
end

function Redis:add(key, value, ttl)
  local enc, px = encode(value, "value"), ttl_ms(ttl)
  local k = self.prefix .. key
  local ok, err, detail
  if px > 0 then ok, err, detail = self.r:call("SET", k, enc, "NX", "PX", px)
  else ok, err, detail = self.r:call("SET", k, enc, "NX") end
  if ok == nil then return nil, err, detail end
  if ok == self.null then return nil, "exists" end
  return true
end

function Redis:incr(key, by, ttl)
  if by == nil then by = 1 end
  if type(by) ~= "number" then error("wxd.store: incr: by must be a number, got " .. type(by), 3) end
  local v, err, detail = self.r:eval(INCR, { self.prefix .. key }, { str_format("%.17g", by), ttl_ms(ttl) })
  if v == nil then return nil, err, detail end
  if v == self.null then return nil, "not a number" end
  return decode(v)
end

function Redis:delete(key)
  local ok, err, detail = self.r:call("DEL", self.prefix .. key)
  if ok == nil then return nil, err, detail end
  return true
end

function Redis:cas(key, old, new, ttl)
  local old_enc = old == nil and "" or encode(old, "old")
  local new_enc = new == nil and "" or encode(new, "new")
  local v, err, detail = self.r:eval(CAS, { self.prefix .. key },
    { old == nil and "0" or "1", old_enc, new == nil and "0" or "1", new_enc, ttl_ms(ttl) })
  if v == nil then return nil, err, detail end
  if v == 1 then return true end
  return nil, "mismatch"
end

function Redis:ttl(key)
  local ms, err, detail = self.r:call("PTTL", self.prefix .. key)
  if ms == nil then return nil, err, detail end
  if ms == -2 then return nil, "not found" end
  if ms < 0 then return 0 end
  return ms / 1000
end

-- Polls GET with a backoff (2 ms doubling to 50 ms), for the reason
-- given at Redis:lock below.
function Redis:wait_change(key, old, timeout)
  local old_enc = old ~= nil and encode(old, "old") or nil
  local k = self.prefix .. key
  local wxd = require "wxd"
  local core = require "wxd.core"
  local deadline = core.monotonic_ms() + timeout * 1000
  local pause = 2
  while true do
    local v, err, detail = self.r:call("GET", k)
    if v == nil then return nil, err, detail end
    if v == self.null then
      if old_enc ~= nil then return nil end
    elseif v ~= old_enc then
      return decode(v)
    end
    local left = deadline - core.monotonic_ms()
    if left <= 0 then return nil, "timeout" end
    wxd.sleep(math_min(pause, left))
    pause = math_min(pause * 2, 50)
  end
end

local RedisLock = {}
RedisLock.__index = RedisLock

local function seconds(opts, name, default, min_exclusive)
  local v = opts[name]
  if v == nil then return default end
  if type(v) ~= "number" or v ~= v or v < 0 or v > 1e9 or (min_exclusive and v == 0) then
    error("wxd.store.lock: " .. name .. " must be a number of seconds" .. (min_exclusive and " > 0" or " >= 0")
      .. ", got " .. tostring(v), 3)
  end
  return v
end

-- SET NX PX with a random token; waiters poll with a backoff (5 ms
-- doubling to 100 ms): Redis has no wake-up for a deleted key short of
-- keyspace notifications, which need server configuration.
function Redis:lock(key, opts)
  if opts ~= nil and type(opts) ~= "table" then
    error("wxd.store.lock: opts must be a table, got " .. type(opts), 3)
  end
  opts = opts or {}
  local timeout = seconds(opts, "timeout", 5, false)
  local expire_ms = math_ceil(seconds(opts, "expire", 30, true) * 1000)
  local wxd = require "wxd"
  local core = require "wxd.core"
  local token = require("wxd.crypto").hex_encode(require("wxd.crypto").random_bytes(16))
  local k = self.prefix .. key
  local deadline = core.monotonic_ms() + timeout * 1000
  local pause = 5
  while true do
    local ok, err, detail = self.r:call("SET", k, token, "NX", "PX", expire_ms)
    if ok == nil then return nil, err, detail end
    if ok ~= self.null then
      return setmetatable({ store = self, k = k, key = key, token = token }, RedisLock)
    end
    local left = deadline - core.monotonic_ms()
    if left <= 0 then return nil, "timeout" end
    wxd.sleep(math_min(pause, left))
    pause = math_min(pause * 2, 100)
  end
end

--- Releases the lock (only if it is still this holder's).
-- @treturn ?boolean true when released
-- @treturn ?string "not locked" (already released), "expired" (it expired
--   and may now be someone else's: it is left alone), or a Redis error
function RedisLock:unlock()
  if not self.k then return nil, "not locked" end
  local k = self.k
  self.k = nil
  local v, err, detail = self.store.r:eval(UNLOCK, { k }, { self.token })
  if v == nil then return nil, err, detail end
  if v == 1 then return true end
  return nil, "expired"
end

--- The key this lock holds, or nil once unlocked.
function RedisLock:held()
  return self.k and self.key or nil
end

------------------------------------------------------------------------
-- The API
------------------------------------------------------------------------

local Store = {}
Store.__index = Store

--- A store with its own settings (the module's functions use the one of
-- config.lua). Raises on a bad setting.
-- @tparam[opt] table cfg `backend` ("memory" or "redis"), `shdict`
--   (memory), `prefix` and `redis` (a URL or a wxd.redis table; default the
--   `redis` of config.lua)
-- @treturn table an object with the module's functions as methods
-- @usage local s = store.new({ backend = "redis", prefix = "test:" })
function _M.new(cfg)
  if cfg ~= nil and type(cfg) ~= "table" then error("wxd.store.new: expected a table, got " .. type(cfg), 2) end
  cfg = cfg or {}
  local backend = cfg.backend or "memory"
  local impl
  if backend == "memory" then impl = memory_backend(cfg)
  elseif backend == "redis" then impl = redis_backend(cfg)
  else error('wxd.store: unknown backend "' .. tostring(backend) .. '" (expected "memory" or "redis")', 2) end
  return setmetatable({ impl = impl, backend = backend }, Store)
end

local function check_value(v)
  local t = type(v)
  if t ~= "string" and t ~= "number" and t ~= "boolean" then
    error("wxd.store: value must be a string, a number or a boolean, got " .. t, 3)
  end
end

--- The value of key, or nil when absent or expired.
function Store:get(key)
  check_key(key)
  return self.impl:get(key)
end

--- Sets key to value (nil deletes), expiring after ttl seconds (none: never).
-- @treturn ?boolean true
-- @treturn ?string "no memory"
function Store:set(key, value, ttl)
  check_key(key)
  if value ~= nil then check_value(value) end
  return self.impl:set(key, value, ttl)
end

--- Sets key only when it is absent: the first of concurrent callers wins.
-- @treturn ?boolean true when this call set it
-- @treturn ?string "exists", "no memory"
function Store:add(key, value, ttl)
  check_key(key)
  check_value(value)
  return self.impl:add(key, value, ttl)
end

--- Adds `by` (default 1) to a number, creating it at 0 (with ttl) if absent.
-- @treturn ?number the new value
-- @treturn ?string "not a number", "no memory"
function Store:incr(key, by, ttl)
  check_key(key)
  return self.impl:incr(key, by, ttl)
end

--- Removes key.
function Store:delete(key)
  check_key(key)
  return self.impl:delete(key)
end

--- Compare-and-set: when key holds `old` (nil: absent), it gets `new`
-- (nil: deleted), atomically across workers (and, with Redis, nodes).
-- @treturn ?boolean true when swapped
-- @treturn ?string "mismatch" (someone else changed it), "no memory"
-- @usage store.cas("token:" .. appid, bad_token, nil) -- drop exactly that token
function Store:cas(key, old, new, ttl)
  check_key(key)
  if old ~= nil then check_value(old) end
  if new ~= nil then check_value(new) end
  return self.impl:cas(key, old, new, ttl)
end

--- The remaining seconds of key's TTL (0: none).
-- @treturn ?number
-- @treturn ?string "not found"
function Store:ttl(key)
  check_key(key)
  return self.impl:ttl(key)
end

--- Waits until key no longer holds `old` (nil: until it exists) and
-- returns its value then. Returns at once when it already differs. The
-- memory backend is woken natively the moment a worker writes, deletes or
-- evicts the key, or it expires; the Redis one polls (2 ms doubling to
-- 50 ms). Needs a wxd coroutine to wait (a handler, a task, a timer).
-- @tparam string key
-- @param old the value to wait away from (string, number, boolean or nil)
-- @tparam number timeout seconds to wait at most (0: look once)
-- @return the new value, nil when the key was removed (or is absent)
-- @treturn ?string "timeout" (still `old`), "no memory", or a Redis error
-- @usage local v, err = store.wait_change("job:" .. id, "pending", 3)
function Store:wait_change(key, old, timeout)
  check_key(key)
  if old ~= nil then check_value(old) end
  if type(timeout) ~= "number" or not (timeout >= 0 and timeout <= 1e9) then
    error("wxd.store.wait_change: timeout must be a number of seconds 0..1e9, got " .. tostring(timeout), 2)
  end
  return self.impl:wait_change(key, old, timeout)
end

--- Takes a lock across workers (and, with Redis, nodes) on `key`.
-- @tparam string key
-- @tparam[opt] table opts `timeout` (seconds to wait, default 5),
--   `expire` (seconds the lock lasts at most, default 30)
-- @treturn ?table the held lock: call :unlock() when done
-- @treturn ?string "timeout", "no memory"
function Store:lock(key, opts)
  check_key(key)
  return self.impl:lock(key, opts)
end

-- The store of config.lua, made on first use in this Lua state.
local default

local function the_store()
  if default then return default end
  local wxd = require "wxd"
  local cfg = type(wxd.config) == "table" and wxd.config.store or nil
  if cfg ~= nil and type(cfg) ~= "table" then
    error("wxd.store: config.store must be a table", 3)
  end
  default = _M.new(cfg)
  return default
end

for _, name in ipairs({ "get", "set", "add", "incr", "delete", "cas", "ttl", "lock", "wait_change" }) do
  local method = Store[name]
  _M[name] = function(...) return method(the_store(), ...) end
end

return _M
