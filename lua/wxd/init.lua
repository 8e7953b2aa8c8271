--- wxd: the runtime's Lua entry point.
-- `local wxd = require "wxd"` gives the native primitives (sleep, now, log)
-- and, loaded on first use, the library modules (wxd.app, wxd.config, ...).
-- @module wxd

local core = require "wxd.core"

local _M = {
  version = core.version,
  --- Suspends the calling coroutine for `ms` milliseconds; the worker keeps
  -- serving other requests meanwhile. Raises outside a request handler,
  -- timer or script main chunk (e.g. inside your own coroutine.wrap).
  sleep = core.sleep,
  --- Wall-clock seconds since the epoch, with sub-second precision.
  now = core.now,
  --- A monotonic clock in milliseconds, for measuring durations.
  monotonic_ms = core.monotonic_ms,
  --- The worker index (0-based), -1 in `wxd script`.
  worker_id = core.worker_id,
  --- The running app's validated configuration (set when the app loads).
  config = nil,
  --- The app's directory (set when the app loads; nil in `wxd script`).
  app_dir = nil,
  --- The app generation this code belongs to: 1 at start, +1 per reload.
  generation = nil,
}

-- Library modules load lazily so that `require "wxd"` stays cheap and no
-- module cycle forms (wxd.app may itself require "wxd").
local lazy = { app = "wxd.app", log = "wxd.log", config_loader = "wxd.config", timer = "wxd.timer", crypto = "wxd.crypto",
  shdict = "wxd.shdict", lock = "wxd.lock", store = "wxd.store", xml = "wxd.xml",
  mp = "wxd.mp", testing = "wxd.testing", http = "wxd.http", redis = "wxd.redis",
  wechat = "wxd.wechat", pay = "wxd.pay", miniprogram = "wxd.miniprogram", json = "wxd.json", task = "wxd.task",
  order = "wxd.order", ws = "wxd.ws", limit = "wxd.limit", breaker = "wxd.breaker", retry = "wxd.retry",
  metrics = "wxd.metrics", trace = "wxd.trace", gray = "wxd.gray", alert = "wxd.alert" }

return setmetatable(_M, {
  __index = function(t, k)
    local name = lazy[k]
    if not name then return nil end
    local m = require(name)
    rawset(t, k, m)
    return m
  end,
})
