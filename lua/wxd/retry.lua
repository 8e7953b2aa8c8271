--- wxd.retry: retries with exponential backoff and full jitter, under a deadline.
--
-- Attempt n (n >= 2) waits a random time in [0, min(cap, base * 2^(n-2))]
-- seconds first ("full jitter": retries of many callers spread out instead
-- of arriving together). It stops at `attempts` attempts, or when the next
-- wait would end past the overall `deadline` (seconds from the first
-- attempt): the last result is returned then. Only results that
-- `retryable(...)` calls transient are retried; a raised error is never
-- retried (it propagates).
--
-- Retry only what is safe to repeat. wxd.http retries idempotent methods
-- (GET, HEAD, OPTIONS, PUT, DELETE) and calls marked `idempotent = true`;
-- for any other function, calling it through retry is the mark.
--
-- With `breaker`, each attempt goes through it (wxd.breaker): an open
-- breaker fails fast (`nil, "circuit open"` on the first attempt; the last
-- result on a retry), results are reported to it, and retries spend its
-- retry budget, so that they add at most its `retry_ratio` of extra calls.
--
-- @module wxd.retry
-- @usage
-- local retry = require "wxd.retry"
-- local res, err = retry.call({ attempts = 4, base = 0.1, cap = 2, deadline = 5 }, fetch_profile, openid)

local wxd_core = require "wxd.core"

local type, error, select, unpack, min, random, monotonic_ms =
  type, error, select, unpack, math.min, math.random, wxd_core.monotonic_ms

local _M = {}

local TRANSIENT_ERR = { timeout = true, connect = true, dns = true, closed = true }

--- The default classification: a transient failure is `nil, err` with err
-- "timeout", "connect", "dns" or "closed" (the kinds of wxd.http and
-- wxd.redis that say the call may succeed later), a response table with a
-- 5xx status, or a WeChat answer with errcode -1 (system busy), as a table
-- `{ errcode = -1 }` or a response whose JSON body says so. 4xx and other
-- errcodes are answers, not failures.
function _M.transient(res, err)
  if res == nil or res == false then return TRANSIENT_ERR[err] == true end
  if type(res) == "table" then
    if res.errcode == -1 then return true end
    local status = res.status
    if type(status) == "number" then
      if status >= 500 then return true end
      local body = res.body
      if type(body) == "string" and #body < 4096 and body:find('"errcode"%s*:%s*%-1[^%d]') then return true end
    end
  end
  return false
end

local function fail(msg, level) error("wxd.retry: " .. msg, level + 1) end

local function number(v, name, default, level)
  if v == nil then return default end
  if type(v) ~= "number" or v ~= v or v < 0 then fail(name .. " must be a number >= 0", level + 1) end
  return v
end

local function default_sleep(seconds) wxd_core.sleep(seconds * 1000) end

--- Checks and completes retry options (defaults: attempts 3, base 0.1,
-- cap 2, deadline none). Raises on misuse.
function _M.options(opts, level)
  level = (level or 1) + 1
  if opts == nil then opts = {} end
  if type(opts) ~= "table" then fail("options must be a table", level) end
  local o = {
    attempts = number(opts.attempts, "attempts", 3, level),
    base = number(opts.base, "base", 0.1, level),
    cap = number(opts.cap, "cap", 2, level),
    deadline = number(opts.deadline, "deadline", nil, level),
    retryable = opts.retryable or _M.transient,
    random = opts.random or random,
    sleep = opts.sleep or default_sleep,
    on_retry = opts.on_retry,
    breaker = opts.breaker,
    clock = opts.clock or monotonic_ms,
  }
  if o.attempts < 1 or o.attempts % 1 ~= 0 then fail("attempts must be an integer >= 1", level) end
  for _, k in ipairs({ "retryable", "random", "sleep", "clock" }) do
    if type(o[k]) ~= "function" then fail(k .. " must be a function", level) end
  end
  if o.on_retry ~= nil and type(o.on_retry) ~= "function" then fail("on_retry must be a function", level) end
  if o.breaker ~= nil and (type(o.breaker) ~= "table" or not o.breaker._c) then
    fail("breaker must come from wxd.breaker.new", level)
  end
  return o
end

--- The wait before attempt n (n >= 2), for the options o.
function _M.delay(o, n)
  return o.random() * min(o.cap, o.base * 2 ^ (n - 2))
end

local function pack(...) return { n = select("#", ...), ... } end

--- Called when a report opens a breaker: `on_breaker_open(c, url, ...)`
-- with the breaker's core object, the URL when wxd.http made the call, and
-- the failing call's results. Set by wxd.alert (`alert.on_breaker_open`);
-- nil otherwise. Exactly one report sees each opening, in whichever worker.
_M.on_breaker_open = nil

--- Reports a result to a breaker's core object `c`; returns its state, and
-- the state before when this report changed it.
function _M.report(c, ok, probe, url, ...)
  local state, from = c:report(ok, probe)
  if from and state == "open" and _M.on_breaker_open then
    local fine, err = pcall(_M.on_breaker_open, c, url, ...)
    if not fine then require("wxd.log").error("wxd.retry: on_breaker_open failed", { error = tostring(err) }) end
  end
  return state, from
end

--- Runs `fn(attempt, remaining)` (remaining: seconds left before the
-- deadline, or nil) under checked options `o` (from options()).
-- @return the last attempt's results, or nil, "circuit open"
function _M.run(o, fn)
  local clock = o.clock
  local deadline_ms = o.deadline and clock() + o.deadline * 1000
  local br = o.breaker and o.breaker._c
  local last
  for n = 1, o.attempts do
    if n > 1 then
      local wait = _M.delay(o, n)
      if deadline_ms and clock() + wait * 1000 >= deadline_ms then break end
      if o.on_retry then o.on_retry(n, wait, unpack(last, 1, last.n)) end
      if wait > 0 then o.sleep(wait) end
    end
    local probe
    if br then
      local ok, why = br:allow(n > 1)
      if not ok then
        if n == 1 then return nil, "circuit open" end
        break -- open now, or the retry budget is spent: no more calls
      end
      probe = why
    end
    local remaining = deadline_ms and (deadline_ms - clock()) / 1000
    local r = pack(pcall(fn, n, remaining))
    if not r[1] then
      if br then _M.report(br, false, probe, o.url, nil, r[2]) end
      error(r[2], 0)
    end
    last = pack(unpack(r, 2, r.n))
    local transient = o.retryable(unpack(last, 1, last.n))
    if br then _M.report(br, not transient, probe, o.url, unpack(last, 1, last.n)) end
    if not transient then break end
  end
  return unpack(last, 1, last.n)
end

--- Calls `fn(...)`, retrying transient failures.
-- @tparam table opts `attempts` (3, the first included), `base` (0.1 s),
--   `cap` (2 s), `deadline` (seconds, overall), `retryable(...)` (default
--   retry.transient), `breaker`, `on_retry(attempt, wait, ...)` (called
--   with the last results before each wait), and for specs `random()`
--   (in [0, 1)), `sleep(seconds)` and `clock()` (ms, monotonic)
-- @param fn the function
-- @return fn's results of the last attempt
function _M.call(opts, fn, ...)
  if type(fn) ~= "function" then fail("call needs a function", 2) end
  local o = _M.options(opts, 2)
  local args = pack(...)
  return _M.run(o, function() return fn(unpack(args, 1, args.n)) end)
end

--- `fn` with retries: `local get = retry.wrap(opts, get_user)`.
function _M.wrap(opts, fn)
  if type(fn) ~= "function" then fail("wrap needs a function", 2) end
  local o = _M.options(opts, 2)
  return function(...)
    local args = pack(...)
    return _M.run(o, function() return fn(unpack(args, 1, args.n)) end)
  end
end

return _M
