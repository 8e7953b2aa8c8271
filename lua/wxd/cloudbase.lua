--- wxd.cloudbase: WeChat CloudBase (云开发) cloud functions, both ways.
--
-- Out: `invoke` calls a cloud function through WeChat's HTTP API
-- (POST /tcb/invokecloudfunction?access_token=&env=&name=, the body being
-- the function's event), with the access_token of a wxd.wechat client and a
-- 3-second deadline: CloudBase's default function timeout, so that a caller
-- is not held longer than the function may run. `invoke_async` hands the
-- call to the durable retry queue (wxd.queue) instead, and `consume`
-- registers the queue's consumer that makes the calls.
--
-- In: a cloud function calls wxd through a signed internal API
-- (wxd.internal). It gives up after its own timeout (3 s by default), so
-- `handler` answers within a deadline (2.5 s by default) even when the
-- work takes longer, and `enqueue` hands the event to wxd.queue and answers
-- 202 at once.
--
-- Errors are those of wxd.wechat (`"wechat"` with info.errcode,
-- `"timeout"`, `"status"`, ...), and `"json"` for an answer without
-- resp_data. docs/internal-api.md has the contract.
-- @module wxd.cloudbase
-- @usage
-- local cloudbase = require "wxd.cloudbase"
-- local wx = require("wxd.wechat").client(wxd.config.mp)
-- local result, err, info = cloudbase.invoke{ env = "prod-4g2x", name = "sum", data = { a = 1, b = 2 } }

local wechat = require "wxd.wechat"
local json = require "wxd.json"
local log = require "wxd.log"
local task = require "wxd.task"

local type, error, tostring, select, unpack = type, error, tostring, select, unpack
local find = string.find

local _M = { _VERSION = "0.1.0" }

_M.DEFAULT_TIMEOUT = 3         -- seconds: CloudBase's default function timeout
_M.DEFAULT_DEADLINE_MS = 2500  -- inbound: answer before the calling function's 3 s run out
_M.DEFAULT_QUEUE = "wxd.cloudbase"
_M.PATH = "/tcb/invokecloudfunction"

local function fail(msg, level) error("wxd.cloudbase: " .. msg, level + 1) end

local function section()
  local wxd = require "wxd"
  local c = type(wxd.config) == "table" and wxd.config.cloudbase or nil
  if c ~= nil and type(c) ~= "table" then fail("config.cloudbase must be a table", 3) end
  return c or {}
end

-- The wxd.wechat client for a call: opts.client, else the one made for
-- opts.appid (or config.cloudbase.appid), else the only one there is.
local function client_of(opts, level)
  if opts.client ~= nil then
    if type(opts.client) ~= "table" or type(opts.client.call) ~= "function" then
      fail("client must be a wxd.wechat client", level + 1)
    end
    return opts.client
  end
  local appid = opts.appid or section().appid
  local c = wechat.client_for(appid)
  if not c then
    fail(appid and ("no wxd.wechat client for appid " .. tostring(appid) .. ": make it with wxd.wechat.client{...}")
      or "no wxd.wechat client, or several: pass client = or appid =", level + 1)
  end
  return c
end

local function check_name(what, v, level)
  -- CloudBase's own rules: env ids and function names are short words.
  if type(v) ~= "string" or not find(v, "^[%w_%-]+$") or #v > 128 then
    fail(what .. " must be a CloudBase " .. what .. " (letters, digits, _ and -), got " .. tostring(v), level + 1)
  end
end

local function call_args(opts, level)
  if type(opts) ~= "table" then fail("expected a table { env =, name =, data = }", level + 1) end
  local env = opts.env or section().env
  check_name("env", env, level + 1)
  check_name("name", opts.name, level + 1)
  local data = opts.data
  if data ~= nil and type(data) ~= "table" and type(data) ~= "string" then
    fail("data must be a table (sent as JSON) or a string", level + 1)
  end
  local timeout = opts.timeout or section().timeout or _M.DEFAULT_TIMEOUT
  if type(timeout) ~= "number" or timeout <= 0 or timeout > 60 then fail("timeout must be 0..60 seconds", level + 1) end
  return env, data, timeout
end

--- Calls a cloud function and waits for its result.
-- @tparam table opts `env` (the CloudBase environment id; default
--   config.cloudbase.env), `name` (the function), `data` (its event: a
--   table sent as JSON, or a string sent as is; default `{}`), `client`
--   (a wxd.wechat client) or `appid` (the client made for it; default
--   config.cloudbase.appid, else the only client), `timeout` (seconds,
--   default config.cloudbase.timeout or 3)
-- @return the function's return value (resp_data, decoded when it is JSON,
--   else the string)
-- @treturn ?string on failure: a kind of wxd.wechat ("wechat", "timeout", ...)
-- @treturn ?table info (`errcode`, `errmsg`; `detail`); on success `{ resp_data = raw }`
function _M.invoke(opts)
  local env, data, timeout = call_args(opts, 2)
  local c = client_of(opts, 2)
  local call = { query = { env = env, name = opts.name }, timeout = timeout }
  if type(data) == "string" then call.body = data else call.json = data or {} end
  local res, err, info = c:call("POST", _M.PATH, call)
  if not res then return nil, err, info end
  local raw = res.resp_data
  if type(raw) ~= "string" then return nil, "json", { detail = "no resp_data in the answer" } end
  local value = json.decode(raw)
  if value == nil then value = raw end
  return value, nil, { resp_data = raw }
end

-- Required on first use, not at load: an app that never queues a call
-- does not start the queue's machinery.
local function the_queue() return require "wxd.queue" end

--- Hands a call to the retry queue: it is made by the consumer (see
-- consume), again after failures, until it succeeds or is dead-lettered.
-- @tparam table opts as for invoke, plus `key` (a deduplication key: a call
--   with the same key still pending is not queued twice) and `queue`
--   (default config.cloudbase.queue or "wxd.cloudbase")
-- @treturn ?string the message id
-- @treturn ?string "duplicate" (with the id), or on failure the queue's
--   error
function _M.invoke_async(opts)
  local env, data, timeout = call_args(opts, 2)
  local c = client_of(opts, 2)
  local q = the_queue()
  if opts.key ~= nil and type(opts.key) ~= "string" then fail("key must be a string", 2) end
  local payload = { appid = c.appid, env = env, name = opts.name, timeout = timeout,
                    data = type(data) == "string" and data or json.encode(data or {}) }
  return q.push(opts.queue or section().queue or _M.DEFAULT_QUEUE, payload, { key = opts.key })
end

--- Registers the consumer that makes the queued calls (call it in app.lua,
-- after the wxd.wechat clients are made).
-- @tparam[opt] table opts `queue` (the name), and the options of
--   wxd.queue.consume (`max_attempts`, `visibility`, `backoff`)
-- @treturn boolean true
function _M.consume(opts)
  opts = opts or {}
  if type(opts) ~= "table" then fail("consume: opts must be a table", 2) end
  local q = the_queue()
  local name = opts.queue or section().queue or _M.DEFAULT_QUEUE
  q.consume(name, function(payload, info)
    if type(payload) == "string" then payload = json.decode(payload) end
    if type(payload) ~= "table" then return nil, "malformed message" end
    local c = wechat.client_for(payload.appid)
    if not c then return nil, "no wxd.wechat client for appid " .. tostring(payload.appid) end
    local _, err, einfo = _M.invoke({ client = c, env = payload.env, name = payload.name, data = payload.data,
                                      timeout = payload.timeout })
    if err then
      log.warn("cloudbase: queued call failed; it is retried", { name = payload.name, env = payload.env,
        error = err, errcode = einfo and einfo.errcode, attempt = info and info.attempt })
      return nil, err .. (einfo and einfo.errcode and (" " .. tostring(einfo.errcode)) or "")
    end
    return true
  end, { max_attempts = opts.max_attempts, visibility = opts.visibility, backoff = opts.backoff })
  return true
end

------------------------------------------------------------------------
-- Inbound: calls from cloud functions
------------------------------------------------------------------------

local function pack(...) return { n = select("#", ...), ... } end

--- Wraps a route handler so that it answers within a deadline: a cloud
-- function waiting for it gives up after its own timeout (3 s by default).
-- Past the deadline the answer is 503 `{ error = "deadline exceeded" }`
-- with Retry-After, and the handler goes on to its end (make it
-- idempotent, or use enqueue).
-- @tparam function fn the handler(req, res)
-- @tparam[opt] table opts `deadline_ms` (default 2500)
-- @usage g:post("/cb/order", cloudbase.handler(on_order, { deadline_ms = 2000 }))
function _M.handler(fn, opts)
  if type(fn) ~= "function" then fail("handler: expected a function", 2) end
  opts = opts or {}
  local deadline = opts.deadline_ms or _M.DEFAULT_DEADLINE_MS
  if type(deadline) ~= "number" or deadline <= 0 or deadline > 60000 then
    fail("handler: deadline_ms must be 1..60000", 2)
  end
  return function(req, res)
    local h = task.spawn(function() return pack(fn(req, res)) end)
    local r, err = h:wait(deadline)
    local status = h:status()
    if status == "done" and type(r) == "table" then return unpack(r, 1, r.n) end
    if status == "failed" then error(err, 0) end
    log.warn("cloudbase: handler past its deadline; answered 503, the handler goes on",
      { path = req.path, deadline_ms = deadline })
    res.headers["Retry-After"] = "1"
    return 503, { error = "deadline exceeded", deadline_ms = deadline }
  end
end

--- A route handler that hands each event to the retry queue and answers
-- 202 `{ id = }` at once (`duplicate = true` when its key was queued
-- already). The message is `{ body =, appid =, key_id =, path = }`: the
-- raw body, the caller's X-Wechat-Appid and signing key (wxd.internal).
-- @tparam string queue_name
-- @tparam[opt] table opts `key` (function(req) -> a deduplication key or
--   nil; default the `Idempotency-Key` header)
function _M.enqueue(queue_name, opts)
  if type(queue_name) ~= "string" or queue_name == "" then fail("enqueue: expected a queue name", 2) end
  opts = opts or {}
  local key_of = opts.key or function(req) return req.headers["idempotency-key"] end
  if type(key_of) ~= "function" then fail("enqueue: key must be a function(req)", 2) end
  return function(req)
    local q = the_queue()
    if not q then return 503, { error = "queue unavailable" } end
    local internal = req.ctx.internal
    local id, err = q.push(queue_name, { body = req.body, appid = req.headers["x-wechat-appid"],
      key_id = internal and internal.key_id, path = req.path }, { key = key_of(req) })
    if not id then
      log.error("cloudbase: event not queued", { queue = queue_name, error = tostring(err) })
      return 503, { error = "queue unavailable" }
    end
    return 202, { id = id, duplicate = err == "duplicate" or nil }
  end
end

return _M
