--- wxd.server: the glue the C core calls to read config and load an app.
-- Not for apps: use wxd.app.
-- @module wxd.server

local config = require "wxd.config"
local log = require "wxd.log"
local trace = require "wxd.trace"
local wxd = require "wxd"

local type, xpcall, traceback, io_open, rawget = type, xpcall, debug.traceback, io.open, rawget

local _M = {}

local function exists(path)
  local f = io_open(path, "r")
  if f then f:close() return true end
  return false
end

--- Reads and validates APPDIR/config.lua (defaults when there is none).
-- @treturn table|nil config
-- @treturn string error naming the file and the key
function _M.read_config(appdir)
  local path = appdir .. "/config.lua"
  local cfg, err = config.load(exists(path) and path or nil)
  if not cfg then
    err = tostring(err)
    -- Syntax errors already name the file; validation errors do not.
    if err:sub(1, #path) ~= path then err = path .. ": " .. err end
    return nil, err
  end
  return cfg
end

local PLAIN = { ["content-type"] = "text/plain; charset=utf-8" }

--- Loads APPDIR/app.lua and returns the request handler the core calls with
-- each raw request, in the request's coroutine.
-- @treturn function|nil handler
-- @treturn string error (file, line and message)
function _M.load_app(appdir, _worker, generation)
  local cfg, err = _M.read_config(appdir)
  if not cfg then return nil, err end
  -- The core has read the key with it; the app has no use for it.
  if cfg.https then cfg.https.key_passphrase = nil end
  wxd.config = cfg
  wxd.app_dir = appdir
  wxd.generation = generation or 1
  local chunk, lerr = loadfile(appdir .. "/app.lua")
  if not chunk then return nil, lerr end
  local ok, app = xpcall(chunk, traceback)
  if not ok then return nil, "app.lua failed while loading: " .. tostring(app) end
  if type(app) ~= "table" or type(app.handle) ~= "function" then
    return nil, appdir .. "/app.lua must return an app: local app = require(\"wxd.app\").new() ... return app"
  end
  local handle = app.handle
  -- Alerts (docs/alerts.md): a bad section fails the load like a bad config.
  if cfg.alert ~= nil then
    local started, aerr = require("wxd.alert").start()
    if not started then return nil, appdir .. "/config.lua: " .. tostring(aerr) end
  end
  -- With gray rules, each request is counted by its final colour (wxd.mp
  -- may colour a message once it knows the sender), failed ones included.
  local count_gray = cfg.gray and require("wxd.gray").count or nil
  -- Routes with their own body limit: the core asks the router for the
  -- limit of each request with a body before reading it.
  if app._body_limits then
    require("wxd.core.http").set_body_limit(function(method, path) return app:body_limit(method, path) end)
  end

  -- The fifth value is the matched route pattern (nil: none), which the
  -- core's request metrics are labelled with.
  -- With spans exported, each request's server span is recorded too, and
  -- this worker's exporter runs from a timer.
  if trace.exporting() then
    require("wxd.otlp").start()
    return function(raw)
      local ok2, status, headers, body = xpcall(handle, traceback, app, raw)
      trace.finish_request(raw, ok2 and status or 500)
      if count_gray then count_gray(rawget(raw, "gray")) end
      if ok2 then return status, headers, body, nil, raw.route end
      log.error("handler error", { id = raw.id, method = raw.method, path = raw.path, error = status })
      return 500, PLAIN, "internal server error (request id " .. raw.id .. ")\n", true, raw.route
    end
  end
  return function(raw)
    local ok2, status, headers, body = xpcall(handle, traceback, app, raw)
    if count_gray then count_gray(rawget(raw, "gray")) end
    if ok2 then return status, headers, body, nil, raw.route end
    log.error("handler error", { id = raw.id, method = raw.method, path = raw.path, error = status })
    -- The fourth value tells the core the handler failed: a response that
    -- was already streaming is cut short instead of ended cleanly.
    return 500, PLAIN, "internal server error (request id " .. raw.id .. ")\n", true, raw.route
  end
end

return _M
