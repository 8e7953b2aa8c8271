--- wxd.lock: a lock shared by every worker thread, stored in a shdict.
--
-- The lock of a key is an entry of the dictionary whose value is the
-- holder's random token, added only if absent and given an expiry, so that
-- a holder that died (an error before unlock, a request cut short) cannot
-- block the key for longer than `expire`. Only the holder's token unlocks:
-- unlocking compares and deletes under the dictionary's mutex.
--
-- A waiter yields its coroutine, never the worker: it is woken when the key
-- is removed (unlock, delete, eviction, flush), when the holder's lock
-- expires, or at its timeout. Nothing polls. Waiting needs a wxd coroutine
-- (a handler, a timer callback, a script's main chunk); a VM that shuts down
-- cancels its waits.
--
-- Use one lock object per holder (e.g. per request): an object holds at most
-- one key at a time.
--
-- @module wxd.lock
-- @usage
-- local lock = require "wxd.lock"
-- local lk = lock.new("locks", { timeout = 5, expire = 30 })
-- local ok, err = lk:lock("order:" .. id)
-- if not ok then return 503, { error = err } end  -- "timeout"
-- ... the critical section ...
-- lk:unlock()

local shdict = require "wxd.shdict"
local core = require "wxd.core.shdict"
local monotonic_ms = require("wxd.core").monotonic_ms

local type, error, setmetatable, tostring = type, error, setmetatable, tostring

local _M = {}

local Lock = {}
Lock.__index = Lock

local function seconds(opts, name, default, min_exclusive)
  local v = opts[name]
  if v == nil then return default end
  if type(v) ~= "number" or v ~= v or v < 0 or v > 1e9 or (min_exclusive and v == 0) then
    error("wxd.lock.new: " .. name .. " must be a number of seconds" .. (min_exclusive and " > 0" or " >= 0")
      .. ", got " .. tostring(v), 3)
  end
  return v
end

--- A lock object over dictionary `dict_name`.
-- @tparam string dict_name a shdict declared in config.lua
-- @tparam[opt] table opts `timeout`: seconds lock() waits (default 5; 0:
--   one try); `expire`: seconds a held lock lasts unless unlocked before
--   (default 30)
-- @treturn table the lock object; raises when the dictionary does not exist
-- @usage local lk = lock.new("locks", { timeout = 2 })
function _M.new(dict_name, opts)
  if type(dict_name) ~= "string" then
    error("wxd.lock.new: dict_name must be a string, got " .. type(dict_name), 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("wxd.lock.new: opts must be a table, got " .. type(opts), 2)
  end
  opts = opts or {}
  local timeout = seconds(opts, "timeout", 5, false)
  local expire = seconds(opts, "expire", 30, true)
  local d = shdict.get_dict(dict_name)
  if not d then
    error('wxd.lock.new: no such shdict "' .. dict_name .. '" (declare it in config.lua: shdict = { '
      .. dict_name .. ' = "1m" })', 2)
  end
  return setmetatable({ dict = d, timeout = timeout, expire = expire, token = core.token(), key = nil }, Lock)
end

--- Takes the lock of `key`, waiting up to the object's timeout.
-- @tparam string key
-- @treturn ?boolean true once held
-- @treturn ?string "timeout", "already locked" (this object holds a key),
--   "no memory" (the dictionary cannot store the lock)
-- @usage local ok, err = lk:lock("refund:" .. out_refund_no)
function Lock:lock(key)
  if type(key) ~= "string" then
    error("wxd.lock: key must be a string, got " .. type(key), 2)
  end
  if self.key then return nil, "already locked" end
  local d, token, expire = self.dict, self.token, self.expire
  local deadline = monotonic_ms() + self.timeout * 1000
  while true do
    local left = deadline - monotonic_ms()
    if left < 0 then left = 0 end
    local ok, err = d:_lock(key, token, expire, left)
    if ok then
      self.key = key
      return true
    end
    if err ~= "wait" then return nil, err end
  end
end

--- Releases the lock this object holds.
-- @treturn ?boolean true when released
-- @treturn ?string "not locked" (this object holds nothing), "expired" (the
--   lock expired, and may now be someone else's: it is left alone)
function Lock:unlock()
  local key = self.key
  if not key then return nil, "not locked" end
  self.key = nil
  local ok = self.dict:_unlock(key, self.token)
  if not ok then return nil, "expired" end
  return true
end

--- The key this object holds, or nil (it may have expired meanwhile).
-- @treturn ?string
function Lock:held()
  return self.key
end

return _M
