--- wxd.breaker: circuit breakers shared by every worker of the process.
--
-- closed → open after `failures` (5) consecutive failures, or when at
-- least `failure_rate` (0.5) of the calls of the last `window` (10 s)
-- failed, once there were `min_calls` (20) of them; open → half-open after
-- `cooldown` (5 s); half-open lets `probes` (1) calls through at a time,
-- `probes` successes close it, a failure opens it again. While open, calls
-- fail fast with `nil, "circuit open"` and the upstream is not called.
-- State changes are logged ("circuit breaker state change") and counted
-- (stats). The state lives in the core (core/breaker.c): one per name for
-- all workers, kept across hot reloads.
--
-- What is a failure: an error raised by the function (re-raised after it
-- is counted), or results that `is_failure(...)` calls so (default
-- wxd.retry.transient: timeouts, connect errors, 5xx, WeChat errcode -1).
--
-- It also holds a retry budget for wxd.retry (`retry_ratio` 0.2,
-- `retry_max` 10 tokens): retries through it add at most 20% extra calls.
--
-- @module wxd.breaker
-- @usage
-- local breaker = require "wxd.breaker"
-- local b = breaker.new("wechat_api", { failures = 5, cooldown = 10 })
-- local res, err = b:call(http.get, url)          -- nil, "circuit open" while open
-- local res, err = http.get(url, { breaker = "wechat_api" })

local core = require "wxd.core.breaker"
local retry = require "wxd.retry"

local type, error, setmetatable = type, error, setmetatable

local _M = {}

local Breaker = {}
Breaker.__index = Breaker

local KEYS = { failures = true, failure_rate = true, min_calls = true, window = true, cooldown = true,
  probes = true, retry_ratio = true, retry_max = true, is_failure = true }

-- Breaker objects of this Lua state, by name (settings live in the core).
local objects = {}

--- The breaker called `name`, made or updated with `opts`.
-- @tparam string name 1..63 bytes
-- @tparam[opt] table opts see the module's description
function _M.new(name, opts)
  if type(name) ~= "string" then error("wxd.breaker: name must be a string", 2) end
  opts = opts or {}
  if type(opts) ~= "table" then error("wxd.breaker: options must be a table", 2) end
  for k in pairs(opts) do
    if not KEYS[k] then error("wxd.breaker: unknown option " .. tostring(k), 2) end
  end
  if opts.is_failure ~= nil and type(opts.is_failure) ~= "function" then
    error("wxd.breaker: is_failure must be a function", 2)
  end
  local c, err = core.new(name, opts)
  if not c then return nil, err end
  local b = setmetatable({ name = name, _c = c, is_failure = opts.is_failure or retry.transient }, Breaker)
  objects[name] = b
  return b
end

--- The breaker object for `name` made earlier in this Lua state, or a new
-- one with default settings.
function _M.get(name)
  return objects[name] or _M.new(name)
end

--- Calls `fn(...)` through the breaker.
-- @return fn's results, or nil, "circuit open"
function Breaker:call(fn, ...)
  if type(fn) ~= "function" then error("wxd.breaker: call needs a function", 2) end
  local args = { n = select("#", ...), ... }
  return retry.run({ attempts = 1, breaker = self, retryable = self.is_failure },
    function() return fn(unpack(args, 1, args.n)) end)
end

--- For calls made by hand: `local ok, probe = b:allow()` (nil, "open"
-- while open), then `b:report(succeeded, probe)` exactly once; report
-- returns the state after it, and the state before when it changed it.
function Breaker:allow() return self._c:allow(false) end
function Breaker:report(ok, probe) return retry.report(self._c, ok, probe) end

--- "closed", "open" or "half_open", and the seconds of cooldown left.
function Breaker:state() return self._c:state() end

--- `{ name, state, calls, successes, failures, rejected, opened, half_opened, closed, retries, ... }`
function Breaker:stats() return self._c:stats() end

--- Closes it and forgets its counts.
function Breaker:reset() return self._c:reset() end

return _M
