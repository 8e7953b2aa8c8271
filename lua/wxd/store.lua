--- wxd.store: the one store API of wxd, for idempotency keys, replay nonces,
-- deduplication, counters and locks.
--
-- Backends: "memory" (the default, zero setup) keeps everything in a shared
-- dictionary of the process (`wxd.shdict`): every worker sees the same data,
-- it survives hot reloads, and a restart empties it. A "redis" backend for
-- several wxd nodes is planned (issue 4) with the same semantics.
--
-- Configuration (config.lua): `store = { backend = "memory", shdict = NAME }`.
-- NAME defaults to "wxd_store", a 16 MiB dictionary the server creates
-- when config.lua does not declare one of that name.
--
-- Values are strings, numbers or booleans (encode tables with cjson).
-- Expected failures return nil, err; wrong argument types raise.
-- @module wxd.store
-- @usage
-- local store = require "wxd.store"
-- local first = store.add("msg:" .. msg_id, true, 30)   -- nil, "exists" on a retry
-- local lk = assert(store.lock("refund:" .. no, { timeout = 3 }))
-- ... ; lk:unlock()

local shdict = require "wxd.shdict"
local lock = require "wxd.lock"

local type, error = type, error

local _M = {}

local DEFAULT_DICT = "wxd_store"
local DEFAULT_SIZE = "16m"

local backend_dict -- the dictionary of this Lua state, found on first use
local dict_name

local function settings()
  local wxd = require "wxd"
  local cfg = type(wxd.config) == "table" and wxd.config.store or nil
  if cfg ~= nil and type(cfg) ~= "table" then
    error("wxd.store: config.store must be a table", 3)
  end
  cfg = cfg or {}
  local backend = cfg.backend or "memory"
  if backend ~= "memory" then
    error('wxd.store: backend "' .. tostring(backend) .. '" is not available yet (only "memory")', 3)
  end
  return cfg.shdict or DEFAULT_DICT
end

local function dict()
  if backend_dict then return backend_dict end
  local name = settings()
  local d = shdict.get_dict(name)
  if not d and name == DEFAULT_DICT and not require("wxd.core.shdict").in_server() then
    -- wxd script and wxd check have no server to create it.
    d = shdict.declare(DEFAULT_DICT, DEFAULT_SIZE)
  end
  if not d then
    error('wxd.store: no shdict "' .. name .. '" (declare it in config.lua: shdict = { ' .. name .. ' = "16m" })', 3)
  end
  backend_dict, dict_name = d, name
  return d
end

local function check_key(key)
  if type(key) ~= "string" or key == "" then
    error("wxd.store: key must be a non-empty string, got " .. type(key), 3)
  end
end

--- The value of key, or nil when absent or expired.
function _M.get(key)
  check_key(key)
  return dict():get(key)
end

--- Sets key to value (nil deletes), expiring after ttl seconds (none: never).
-- @treturn ?boolean true
-- @treturn ?string "no memory"
function _M.set(key, value, ttl)
  check_key(key)
  return dict():set(key, value, ttl)
end

--- Sets key only when it is absent: the first of concurrent callers wins.
-- @treturn ?boolean true when this call set it
-- @treturn ?string "exists", "no memory"
function _M.add(key, value, ttl)
  check_key(key)
  return dict():add(key, value, ttl)
end

--- Adds `by` (default 1) to a number, creating it at 0 (with ttl) if absent.
-- @treturn ?number the new value
-- @treturn ?string "not a number", "no memory"
function _M.incr(key, by, ttl)
  check_key(key)
  return dict():incr(key, by or 1, 0, ttl)
end

--- Removes key.
function _M.delete(key)
  check_key(key)
  return dict():delete(key)
end

--- Compare-and-set: when key holds `old` (nil: absent), it gets `new`
-- (nil: deleted), atomically across workers.
-- @treturn ?boolean true when swapped
-- @treturn ?string "mismatch" (someone else changed it), "no memory"
-- @usage store.cas("token:" .. appid, bad_token, nil) -- drop exactly that token
function _M.cas(key, old, new, ttl)
  check_key(key)
  return dict():cas(key, old, new, ttl)
end

--- The remaining seconds of key's TTL.
function _M.ttl(key)
  check_key(key)
  return dict():ttl(key)
end

--- Takes a lock across workers (and, with Redis, nodes) on `key`.
-- @tparam string key
-- @tparam[opt] table opts `timeout` (seconds to wait, default 5),
--   `expire` (seconds the lock lasts at most, default 30)
-- @treturn ?table the held lock: call :unlock() when done
-- @treturn ?string "timeout", "no memory"
function _M.lock(key, opts)
  check_key(key)
  dict()
  local lk = lock.new(dict_name, opts)
  local ok, err = lk:lock(key)
  if not ok then return nil, err end
  return lk
end

return _M
