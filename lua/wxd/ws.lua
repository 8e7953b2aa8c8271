--- wxd.ws: WebSocket routes and topics.
--
-- `app:ws(path, handler [, opts])` serves WebSocket connections at `path`.
-- The handshake, frames, control frames, limits and the close handshake
-- are done in C (core/ws.c); `handler(ws, req)` runs in a coroutine and
-- reads like blocking code:
--
--     app:ws("/echo", function(ws, req)
--       while true do
--         local data, kind = ws:receive()
--         if not data then return end          -- "closed" or "timeout"
--         ws:send(data, kind)
--       end
--     end)
--
-- Topics: `ws:subscribe("order/42")`, and `require("wxd.ws").publish("order/42", text)`
-- from any worker (or, with `websocket.cluster_topics`, any node through
-- Redis) writes `text` to every subscriber. See docs/websocket.md.
--
-- @module wxd.ws

local core = require "wxd.core.ws"
local wxd = require "wxd"

local type, error, pairs, ipairs, tostring, xpcall, traceback =
  type, error, pairs, ipairs, tostring, xpcall, debug.traceback
local str_lower, str_match, str_sub = string.lower, string.match, string.sub

local _M = {}

_M.utf8_valid = core.utf8_valid

-- The `websocket` section of config.lua: its keys and their defaults.
local DEFAULTS = {
  max_frame_bytes   = 1048576, -- a frame longer than this: close 1009
  max_message_bytes = 1048576, -- a message (all its fragments) longer: close 1009
  max_unsent_bytes  = 1048576, -- unread output: ws:send waits, a publish disconnects
  ping_interval_ms  = 30000,   -- a ping after this long without a byte from the client (0: never)
  idle_timeout_ms   = 120000,  -- close 1001 after this long without a byte (0: never)
  close_timeout_ms  = 5000,    -- closing: how long the client has to answer
}
local KEYS = { "origins", "cluster_topics", "protocols" }
for k in pairs(DEFAULTS) do KEYS[#KEYS + 1] = k end

local function check_number(where, k, v)
  if type(v) ~= "number" or v % 1 ~= 0 or v < 0 or v > 4294967295 then
    error(where .. "." .. k .. ": expected an integer >= 0, got " .. tostring(v), 4)
  end
  return v
end

local function check_origins(where, v)
  if v == "*" then return "*" end
  if type(v) ~= "table" then
    error(where .. '.origins: expected a list of origins ("https://example.com") or "*", got ' .. tostring(v), 4)
  end
  local set = {}
  for i, o in ipairs(v) do
    if type(o) ~= "string" or not str_match(o, "^https?://[^/]+$") then
      error(where .. ".origins[" .. i .. ']: expected "https://host[:port]", got ' .. tostring(o), 4)
    end
    set[str_lower(o)] = true
  end
  return set
end

-- Options of one route: the config's `websocket` section, then the
-- route's own, validated.
local function options(route_opts)
  local out = {}
  for k, v in pairs(DEFAULTS) do out[k] = v end
  local cfg = wxd.config and wxd.config.websocket
  for _, src in ipairs({ { cfg, "config.websocket" }, { route_opts, "app:ws options" } }) do
    local t, where = src[1], src[2]
    if t ~= nil and type(t) ~= "table" then error(where .. ": expected a table, got " .. type(t), 3) end
    for k, v in pairs(t or {}) do
      if DEFAULTS[k] then
        out[k] = check_number(where, k, v)
      elseif k == "origins" then
        out.origins = check_origins(where, v)
      elseif k == "cluster_topics" then
        if type(v) ~= "boolean" then error(where .. ".cluster_topics: expected true or false", 3) end
        out.cluster_topics = v
      elseif k == "protocols" then
        if type(v) ~= "table" then error(where .. ".protocols: expected a list of strings", 3) end
        out.protocols = v
      else
        error(where .. "." .. tostring(k) .. ": unknown key (known: " .. table.concat(KEYS, ", ") .. ")", 3)
      end
    end
  end
  if out.max_frame_bytes > out.max_message_bytes then out.max_frame_bytes = out.max_message_bytes end
  return out
end

-- Cross-site WebSocket hijacking: a browser sends the page's Origin. With
-- an allow-list, only those origins; without one, only the same origin as
-- the Host the client asked for. No Origin at all (not a browser) passes.
local function origin_allowed(req, opts)
  local origin = req.headers["origin"]
  if origin == nil then return true end
  origin = str_lower(origin)
  if opts.origins == "*" then return true end
  if opts.origins then return opts.origins[origin] == true end
  local host = req.headers["host"]
  if not host then return false end
  local o_host = str_match(origin, "^https?://([^/]+)$")
  return o_host ~= nil and o_host == str_lower(host)
end

local function pick_protocol(req, opts)
  local offered = req.headers["sec-websocket-protocol"]
  if not offered or not opts.protocols then return nil end
  for p in offered:gmatch("[^,%s]+") do
    for _, mine in ipairs(opts.protocols) do
      if p == mine then return p end
    end
  end
  return nil
end

local log

--- Mounts a WebSocket route (what `app:ws` calls).
-- @tparam table app
-- @tparam string path route pattern (params allowed: req.params)
-- @tparam function handler handler(ws, req)
-- @tparam[opt] table opts per-route options (the keys of config `websocket`)
-- @treturn table app
function _M.mount(app, path, handler, route_opts)
  if type(handler) ~= "function" then error("app:ws: handler must be a function, got " .. type(handler), 3) end
  local opts = options(route_opts)
  if opts.cluster_topics then _M.enable_cluster() end
  app:get(path, function(req, res)
    if not origin_allowed(req, opts) then
      return 403, "origin not allowed\n"
    end
    local proto = pick_protocol(req, opts)
    -- The route pattern: the handshake's line in the access log and metrics.
    opts.protocol, opts.route = proto, req.route
    local ws, err, status = core.upgrade(opts)
    opts.protocol, opts.route = nil, nil
    if not ws then
      if status == 426 then
        res.headers["sec-websocket-version"] = "13"
        res.headers["upgrade"] = "websocket"
      end
      return status, err .. "\n"
    end
    local ok, e = xpcall(handler, traceback, ws, req)
    if not ok then
      log = log or require "wxd.log"
      log.error("websocket handler error", { path = req.path, error = e })
      ws:close(1011, "handler error")
    end
    -- Returning ends the handler: the core closes with 1000 if still open.
  end)
  return app
end

------------------------------------------------------------------------
-- Topics
------------------------------------------------------------------------

local CHANNEL_PREFIX = "wxd:topic:"
_M.CHANNEL_PREFIX = CHANNEL_PREFIX

local cluster -- the Redis client, once cluster topics are on

--- Turns cluster topics on (done by `websocket.cluster_topics = true`):
-- publish goes through Redis (`PUBLISH wxd:topic:<topic>`), and worker 0
-- of every node subscribes to `wxd:topic:*` and delivers what arrives to
-- the node's subscribers.
function _M.enable_cluster()
  if cluster then return end
  if not (wxd.config and wxd.config.redis) then
    error("config.websocket.cluster_topics needs redis = \"redis://host:6379/0\" in the config", 4)
  end
  cluster = require("wxd.redis").new()
  if wxd.worker_id() == 0 then
    local n = #CHANNEL_PREFIX
    cluster:psubscribe(CHANNEL_PREFIX .. "*", function(message, channel)
      core.publish(str_sub(channel, n + 1), message)
    end)
  end
end

--- Writes `text` as a text frame to every subscriber of `topic`: in this
-- process (every worker), or with cluster topics on, on every node.
-- @tparam string topic
-- @tparam string text valid UTF-8
-- @treturn ?integer workers (local) or Redis subscribers (cluster) reached
-- @treturn ?string "invalid utf-8", or a Redis error (cluster)
-- @usage require("wxd.ws").publish("order/" .. id, json.encode(change))
function _M.publish(topic, text)
  if type(topic) ~= "string" or topic == "" then error("wxd.ws.publish: topic must be a non-empty string", 2) end
  if type(text) ~= "string" then error("wxd.ws.publish: text must be a string", 2) end
  if cluster == nil and wxd.config and wxd.config.websocket and wxd.config.websocket.cluster_topics then
    _M.enable_cluster()
  end
  if cluster then
    if not core.utf8_valid(text) then return nil, "invalid utf-8" end
    return cluster:publish(CHANNEL_PREFIX .. topic, text)
  end
  return core.publish(topic, text)
end

--- Delivers to this process's subscribers only, whatever the mode.
_M.publish_local = core.publish

return _M
