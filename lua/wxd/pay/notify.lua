--- wxd.pay.notify: runs a payment notification's handler once, in time.
--
-- Shared by the v3 (wxd.pay) and v2 (wxd.pay.v2) notification URLs. The
-- handler runs at most once at a time per notification id, across workers
-- (a claim in wxd.store), and never again once it reported success (a
-- record kept 25 h, WeChat Pay's retry span). It runs in a task
-- (wxd.task): the request waits for it until the deadline, then answers
-- FAIL so that WeChat Pay retries, while the handler goes on.
--
-- `process` puts the order step (wxd.pay.orders: the notification checked
-- against its stored order and applied to it, durably, keyed by the
-- notification id) before the handler, within the same deadline; v3 and
-- v2 notifications go through it alike.
-- @module wxd.pay.notify

local store = require "wxd.store"
local crypto = require "wxd.crypto"
local log = require "wxd.log"
local json = require "wxd.json"
local core = require "wxd.core"
local pay_orders = require "wxd.pay.orders"

local type, tostring, pcall, xpcall = type, tostring, pcall, xpcall
local monotonic_ms = core.monotonic_ms

local _M = {}

local spawn = require("wxd.task").spawn
local traceback = debug.traceback

local function find_handler(handlers, event_type)
  return handlers[event_type] or handlers.default
end

-- Runs the handler; success only when it returned a true value
-- (`return true`); `return false, why`, `nil, why` or a raise is a failure.
local function run_handler(self, fn, n, ctx, t)
  local ok, res, why = xpcall(fn, traceback, n.data, n, ctx)
  if not ok then
    log.error("pay: notification handler failed", { path = self.path, id = n.id, error = tostring(res) })
    t.message = "handler error"
  elseif res then
    t.ok = true
    local sok, set = pcall(store.set, t.done_key, true, self.done_ttl)
    if not sok or not set then
      log.warn("pay: notification outcome not recorded", { path = self.path, id = n.id })
    end
  else
    t.message = type(why) == "string" and why or "handler refused"
  end
  t.finished = true
  local rok
  if t.lock then rok = pcall(t.lock.unlock, t.lock) else rok = pcall(store.delete, t.run_key) end
  if not rok then log.warn("pay: run claim not released", { path = self.path, id = n.id }) end
  return t.ok
end

-- The handler runs at most once at a time per notification id (across
-- workers: a store claim), and not again once it succeeded (a record kept
-- for 25 h, WeChat Pay's retry span). A duplicate that arrives while a run
-- goes on waits for it within the deadline.
function _M.dispatch(self, n, ctx, deadline)
  deadline = deadline or monotonic_ms() + self.deadline_ms
  local id = type(n.id) == "string" and n.id ~= "" and n.id or crypto.sha256_hex(json.encode(n.data))
  local key = self.prefix .. "notify:" .. crypto.sha256_hex(id)
  local t = { done_key = key .. ":done", run_key = key .. ":run" }
  if store.get(t.done_key) then return true end
  if not store.add(t.run_key, true, self.run_expire) then
    -- Taken: wait for that run's end (the key's removal) and hold the key.
    local left = (deadline - monotonic_ms()) / 1000
    t.lock = store.lock(t.run_key, { timeout = left > 0 and left or 0, expire = self.run_expire })
    if not t.lock then return nil, "a delivery of this notification is being handled" end
  end
  -- Checked again under the claim: a run in another worker may have
  -- succeeded and let go of the claim since the first look.
  if store.get(t.done_key) then
    if t.lock then t.lock:unlock() else store.delete(t.run_key) end
    return true
  end
  local fn = find_handler(self.handlers, n.event_type)
  if not fn then
    if t.lock then t.lock:unlock() else store.delete(t.run_key) end
    log.warn("pay: no handler for this event type", { path = self.path, event_type = tostring(n.event_type) })
    return nil, "no handler"
  end
  local h = spawn(run_handler, self, fn, n, ctx, t)
  if not t.finished then
    local left = deadline - monotonic_ms()
    h:wait(left > 0 and left or 0)
  end
  if t.ok then return true end
  if not t.finished then
    log.warn("pay: notification handler past the deadline; answered FAIL so that WeChat Pay retries",
      { path = self.path, id = id, deadline_ms = self.deadline_ms })
    return nil, "handler still running"
  end
  return nil, t.message
end

-- The order step in a task, so that a store that hangs still gets an
-- answer (FAIL) by the deadline; WeChat Pay's retry is then a duplicate.
-- status, order, or nil, http_status, message (as wxd.pay.orders.apply).
local function order_step(self, orders, n, deadline)
  local t = {}
  local h = spawn(function()
    local ok, st, a, b = xpcall(pay_orders.apply, traceback, orders, n)
    if ok then
      t.status, t.a, t.b = st, a, b
    else
      log.error("pay: order step failed", { path = self.path, id = n.id, error = tostring(st) })
      t.a, t.b = 500, "order step error"
    end
    t.finished = true
  end)
  if not t.finished then
    local left = deadline - monotonic_ms()
    h:wait(left > 0 and left or 0)
  end
  if not t.finished then
    log.warn("pay: order store past the deadline; answered FAIL so that WeChat Pay retries",
      { path = self.path, id = n.id })
    return nil, 503, "order store slow"
  end
  return t.status, t.a, t.b
end

--- A verified notification from here on: with `orders` (a store of
-- wxd.pay.orders.resolve) the order step first, then the handler (once
-- per id). `ctx.order` and `ctx.order_status` are set for the handler.
-- @treturn[1] true answer success (2xx / SUCCESS)
-- @treturn[2] nil
-- @treturn[2] number the HTTP status of the refusal (4xx: refused for
--   good; 5xx: WeChat Pay should retry)
-- @treturn[2] string the message
function _M.process(self, orders, n, ctx)
  local deadline = monotonic_ms() + self.deadline_ms
  if orders then
    local status, o, message = order_step(self, orders, n, deadline)
    if not status then return nil, o, message end
    ctx.order, ctx.order_status = o, status
    -- Late (recorded for reconciliation) or applied under another id: no
    -- handler run; WeChat Pay need not repeat it.
    if status == "late" or status == "already" then return true end
    -- The order holds the event durably: a handler is optional then.
    if status ~= "none" and not find_handler(self.handlers, n.event_type) then return true end
  end
  local ok, why = _M.dispatch(self, n, ctx, deadline)
  if ok then return true end
  return nil, 500, why or "not processed"
end

return _M
