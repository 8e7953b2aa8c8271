--- wxd.degrade: self-healing degrade for an upstream or a named operation
-- (docs/degrade.md).
--
-- Calls go through a failure-rate window (a wxd.breaker named
-- "degrade:<name>", shared by the workers): when more than `threshold` of
-- the calls of the last `window` seconds failed (once there were
-- `min_calls`), the operation is degraded. Then reads are served from the
-- last good snapshot (kept in wxd.store at each successful read) and
-- writes go to a durable retry queue (wxd.queue) without calling the
-- upstream. After `cooldown` seconds it probes the upstream again (the
-- queue's deliveries and live calls are the probes); `probes` successes in
-- a row switch it back to normal, and the queue drains. Each switch is
-- logged and sent to wxd.alert (when present) with key "degrade:<name>".
--
-- @module wxd.degrade
-- @usage
-- local degrade = require "wxd.degrade"
-- local crm = degrade.new{ name = "crm", window = 180, threshold = 0.15, min_calls = 20,
--   send = function(payload, info)            -- delivers one write, now or from the queue
--     local res = http.post(CRM .. "/points", json.encode(payload),
--       { headers = { ["Idempotency-Key"] = info.key or info.id } })
--     return res and res.status < 300, res and res.status
--   end }
-- local profile, source = crm:read("profile:" .. openid, function() return fetch_profile(openid) end)
-- local id, how = crm:write({ openid = openid, points = 10 }, { key = "points:" .. order_no })

local type, error, tostring, pcall, setmetatable, pairs = type, error, tostring, pcall, setmetatable, pairs

local cjson = require "cjson.safe"
local log = require "wxd.log"
local metrics = require "wxd.metrics"
local breaker = require "wxd.breaker"
local store = require "wxd.store"
local queue = require "wxd.queue"

local _M = {}

-- The modules' functions (config.lua's queue and store) as objects.
local MODULE_QUEUES = {
  push = function(_, ...) return queue.push(...) end,
  consume = function(_, ...) return queue.consume(...) end,
  stats = function(_, ...) return queue.stats(...) end,
}
local MODULE_STORE = {
  get = function(_, ...) return store.get(...) end,
  set = function(_, ...) return store.set(...) end,
}

local Degrade = {}
Degrade.__index = Degrade

local KEYS = { name = true, window = true, threshold = true, min_calls = true, cooldown = true, probes = true,
  queue = true, send = true, snapshot_ttl = true, store = true, queues = true, max_attempts = true,
  visibility = true, backoff = true, concurrency = true, alert = true }

local state_metric, reads_metric, writes_metric

local function count(kind, name, how)
  if not state_metric then
    state_metric = metrics.builtin("gauge", "wxd_degrade_degraded", "1 while the operation is degraded",
      { "name" }, { max_series = 200 })
    reads_metric = metrics.builtin("counter", "wxd_degrade_reads_total",
      "Degradable reads by source (fresh, snapshot, miss)", { "name", "source" }, { max_series = 600 })
    writes_metric = metrics.builtin("counter", "wxd_degrade_writes_total",
      "Degradable writes by outcome (sent, queued, failed)", { "name", "outcome" }, { max_series = 600 })
  end
  if kind == "state" then metrics.set_value(state_metric, how, { name })
  else metrics.count(kind == "read" and reads_metric or writes_metric, { name, how }) end
end

local function alert(self, degraded, why)
  local fields = { name = self.name, window = self.window, threshold = self.threshold, error = why }
  if degraded then
    log.warn("degrade: switched to degraded mode", fields)
  else
    log.info("degrade: back to normal", fields)
  end
  count("state", self.name, degraded and 1 or 0)
  if self.alert == false then return end
  local ok, a = pcall(require, "wxd.alert")
  if not ok or type(a) ~= "table" or type(a.send) ~= "function" then return end
  local sent, err = pcall(a.send, {
    -- Its own key for the recovery: wxd.alert folds a second alert of one
    -- key within its window into the next one, and a recovery is news.
    key = "degrade:" .. self.name .. (degraded and "" or ":recovered"),
    title = degraded and ("degraded: " .. self.name) or ("recovered: " .. self.name),
    text = degraded
      and string.format("%s failed more than %d%% of its calls over %ds: reads from snapshots, writes queued",
        self.name, self.threshold * 100, self.window)
      or string.format("%s is healthy again: back to normal, the queue drains", self.name),
    fields = { name = self.name, state = degraded and "degraded" or "normal", error = why },
  })
  if not sent then log.warn("degrade: alert failed", { name = self.name, error = tostring(err) }) end
end

-- Reports one call's outcome; announces the switch when this report made it.
function Degrade:report(ok, probe, why)
  local now, before = self.b:report(ok, probe)
  if not before then return end
  if before == "closed" and now == "open" then alert(self, true, why)
  elseif now == "closed" then alert(self, false) end
end

--- "normal" or "degraded" (open, or probing after the cooldown), and the
-- breaker's state ("closed", "open", "half_open").
function Degrade:state()
  local s = self.b:state()
  return s == "closed" and "normal" or "degraded", s
end

--- The breaker's counters (calls, failures, opened, closed, ...) and the queue's.
function Degrade:stats()
  local s = self.b:stats()
  s.mode = self:state()
  s.queue = self.q:stats(self.queue)
  return s
end

--- Stops this worker's consumer of the queue (specs, scripts).
function Degrade:stop()
  if self.consumer then self.consumer:stop() end
end

local function snapshot_key(self, key) return "degrade:" .. self.name .. ":" .. key end

--- Reads through the upstream when it is healthy, from the last good
-- snapshot when it is not (or when this call fails).
-- @tparam string key what the snapshot is kept under
-- @tparam function fetch returns the value (a table, string, number or boolean), or nil, err on failure
-- @return the value, and "fresh" | "snapshot"; or nil, err ("degraded" when degraded with no snapshot)
function Degrade:read(key, fetch)
  if type(key) ~= "string" or key == "" then error("wxd.degrade.read: key must be a non-empty string", 2) end
  if type(fetch) ~= "function" then error("wxd.degrade.read: fetch must be a function", 2) end
  local allowed, probe = self.b:allow()
  local err = "degraded"
  if allowed then
    local ok, v, e = pcall(fetch)
    if ok and v ~= nil then
      self:report(true, probe)
      local js = cjson.encode({ v = v })
      if js then
        local _, serr = self.store:set(snapshot_key(self, key), js, self.snapshot_ttl)
        if serr then log.warn("degrade: snapshot not kept", { name = self.name, error = tostring(serr) }) end
      end
      count("read", self.name, "fresh")
      return v, "fresh"
    end
    err = ok and tostring(e or "no value") or tostring(v)
    self:report(false, probe, err)
  end
  local js = self.store:get(snapshot_key(self, key))
  local snap = type(js) == "string" and cjson.decode(js)
  if type(snap) == "table" and snap.v ~= nil then
    count("read", self.name, "snapshot")
    return snap.v, "snapshot"
  end
  count("read", self.name, "miss")
  return nil, err
end

local function call_send(self, payload, info)
  local ok, res, e = pcall(self.send, payload, info)
  if ok and res then return true end
  return false, ok and tostring(e or "failed") or tostring(res)
end

--- Sends a write now when healthy; queues it when degraded, or when
-- sending it now fails (it is delivered later by `send`, at least once).
-- @param payload a string or a table
-- @tparam[opt] table opts `key`: the write's idempotency key (info.key in send; a write of a key that
--   is still queued is not queued twice)
-- @return "sent" | "queued", and the queue's message id when queued; or nil, err (the queue failed)
function Degrade:write(payload, opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("wxd.degrade.write: opts must be a table", 2) end
  local allowed, probe = self.b:allow()
  if allowed then
    local ok, err = call_send(self, payload, { key = opts.key, attempt = 0, queue = self.queue })
    self:report(ok, probe, err)
    if ok then
      count("write", self.name, "sent")
      return "sent"
    end
  end
  local id, status = self.q:push(self.queue, payload, { key = opts.key })
  if not id then
    count("write", self.name, "failed")
    return nil, status
  end
  count("write", self.name, "queued")
  return "queued", id
end

--- A degradable operation (see the module's description).
-- @tparam table opts `name` (required), `window` (180 s), `threshold` (0.15), `min_calls` (20),
--   `cooldown` (30 s), `probes` (3), `send` (required for write: `send(payload, info)` -> true on
--   success), `queue` (the queue's name, default "degrade:<name>"), `queues` (a wxd.queue.new object;
--   default the one of config.lua), `store` (a wxd.store object; default the one of config.lua),
--   `snapshot_ttl` (seconds; default none), `max_attempts`, `visibility`, `backoff`, `concurrency`
--   (the queue consumer's), `alert` (false: no wxd.alert)
function _M.new(opts)
  if type(opts) ~= "table" then error("wxd.degrade.new: expected a table of options", 2) end
  for k in pairs(opts) do
    if not KEYS[k] then error("wxd.degrade.new: unknown option " .. tostring(k), 2) end
  end
  local name = opts.name
  if type(name) ~= "string" or #name == 0 or #name > 50 then
    error("wxd.degrade.new: name must be a string of 1..50 bytes", 2)
  end
  if opts.send ~= nil and type(opts.send) ~= "function" then error("wxd.degrade.new: send must be a function", 2) end
  local threshold = opts.threshold or 0.15
  if type(threshold) ~= "number" or threshold <= 0 or threshold > 1 then
    error("wxd.degrade.new: threshold must be in (0, 1]", 2)
  end
  local self = setmetatable({
    name = name, window = opts.window or 180, threshold = threshold, send = opts.send,
    queue = opts.queue or ("degrade:" .. name), q = opts.queues or MODULE_QUEUES, store = opts.store or MODULE_STORE,
    snapshot_ttl = opts.snapshot_ttl, alert = opts.alert,
  }, Degrade)
  -- "More than threshold": the breaker opens at >= its rate, so a hair above.
  local b, err = breaker.new("degrade:" .. name, { failures = 0, failure_rate = math.min(1, threshold + 1e-9),
    min_calls = opts.min_calls or 20, window = self.window, cooldown = opts.cooldown or 30,
    probes = opts.probes or 3, is_failure = function(ok) return not ok end })
  if not b then error("wxd.degrade.new: " .. tostring(err), 2) end
  self.b = b
  if self.send then
    self.consumer = self.q:consume(self.queue, function(payload, info)
      local allowed, probe = self.b:allow()
      if not allowed then return nil, "degraded" end
      local ok, e = call_send(self, payload, info)
      self:report(ok, probe, e)
      return ok, e
    end, {
      max_attempts = opts.max_attempts or 100, visibility = opts.visibility, backoff = opts.backoff,
      concurrency = opts.concurrency, ready = function() return (self.b:state()) ~= "open" end,
    })
  end
  return self
end

return _M
