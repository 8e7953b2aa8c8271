--- wxd.pay.orders: WeChat Pay's events on the payment state machine.
--
-- What joins wxd.pay to wxd.order (docs/pay.md, "Orders"):
--
-- * a prepay records the order (CREATED) before WeChat Pay is asked, and
--   moves it to PAYING once the prepay succeeded; a failed prepay leaves it
--   CREATED, so that the same out_trade_no can be tried again;
-- * a refund moves PAID / CONFIRMED (or REFUND_FAILED) to REFUNDING before
--   WeChat Pay is asked, and to REFUND_FAILED when WeChat Pay refuses it;
-- * a verified, decrypted notification is checked against the stored
--   order (mchid, appid, amount and currency) and then drives one
--   transition keyed by the notification id.
--
-- The store is wxd.order's default (config.lua's `order` section) unless
-- the client was given another (`orders = order.new{...}`), or none
-- (`orders = false`).
-- @module wxd.pay.orders

local order = require "wxd.order"
local log = require "wxd.log"

local type, tostring, ipairs, getmetatable = type, tostring, ipairs, getmetatable
local find = string.find

local _M = {}
local apply_checked -- below

-- A notification's trade_state / refund_status → the state it moves the order to.
_M.TRADE_TARGET = { SUCCESS = "PAID", PAYERROR = "FAILED", CLOSED = "CLOSED", REVOKED = "CLOSED" }
_M.REFUND_TARGET = { SUCCESS = "REFUNDED", CLOSED = "REFUND_FAILED", ABNORMAL = "REFUND_FAILED" }

-- Statuses of wxd.order that are answers, not failures of the storage.
local function logical(status)
  return status == "not found" or status == "exists" or status == "version conflict"
    or status == "key reused for another transition" or find(status or "", "^illegal transition ") ~= nil
end
_M.logical = logical

--- The order store a client setting names: nil or true → wxd.order's
-- default store; false → none; a store from wxd.order.new → that one.
-- Returns a table of plain functions create, get, transition, or nil.
function _M.resolve(setting)
  if setting == nil or setting == true then return order end
  if setting == false then return nil end
  if type(setting) == "table" and type(setting.create) == "function" and getmetatable(setting) ~= nil then
    return {
      create = function(t) return setting:create(t) end,
      get = function(no) return setting:get(no) end,
      transition = function(no, to, opts) return setting:transition(no, to, opts) end,
      transition_checked = function(no, to, opts, expect) return setting:transition_checked(no, to, opts, expect) end,
    }
  end
  error("wxd.pay: cfg.orders must be true, false or a store from wxd.order.new", 3)
end

------------------------------------------------------------------------
-- Prepay and refund
------------------------------------------------------------------------

--- Records the order of a prepay body (CREATED). The order, or nil,
-- "order", info: info.detail "exists" (another order holds this
-- out_trade_no), "order is PAID" (not payable any more), or the storage's
-- error (info.retryable).
function _M.before_prepay(orders, body)
  local o, status = orders.create({ out_trade_no = body.out_trade_no, amount = body.amount.total,
    currency = body.amount.currency or "CNY", appid = body.appid, mchid = body.mchid,
    payer_openid = type(body.payer) == "table" and body.payer.openid or nil,
    description = type(body.description) == "string" and body.description or nil })
  if not o then
    return nil, "order", { detail = status, retryable = not logical(status) }
  end
  if o.state ~= "CREATED" and o.state ~= "PAYING" then
    return nil, "order", { detail = "order is " .. o.state, state = o.state }
  end
  return o
end

--- Moves the order to PAYING after a successful prepay (once: the key is
-- "prepay"). true, or nil, "order", info.
function _M.after_prepay(orders, no, trade_type, r)
  local o, status = orders.transition(no, "PAYING", { key = "prepay", event = "PREPAY",
    data = { trade_type = trade_type, prepay_id = r.prepay_id } })
  if o then return true end
  log.error("pay: the prepay succeeded but its order could not be marked PAYING; the prepay is not handed out",
    { out_trade_no = no, error = status })
  return nil, "order", { detail = status, retryable = not logical(status) }
end

--- Moves the order of a refund to REFUNDING before WeChat Pay is asked.
-- The order's version before, or nil, "order", info.
function _M.before_refund(orders, r)
  local no = r.out_trade_no
  local o, err = orders.get(no)
  if not o then return nil, "order", { detail = err, retryable = not logical(err) } end
  if o.state == "REFUNDING" then return o.version end -- a retry, or another refund under way
  if o.state ~= "PAID" and o.state ~= "CONFIRMED" and o.state ~= "REFUND_FAILED" then
    return nil, "order", { detail = "order is " .. o.state, state = o.state }
  end
  local key = "refund:" .. r.out_refund_no .. ":v" .. o.version
  local moved, status = orders.transition(no, "REFUNDING", { key = key, event = "REFUND",
    version = o.version, data = { out_refund_no = r.out_refund_no, refund = r.amount.refund } })
  if not moved then return nil, "order", { detail = status, retryable = not logical(status) } end
  return o.version
end

--- WeChat Pay refused the refund for good (a signed error that is not
-- retryable): REFUNDING → REFUND_FAILED. Failing here is only logged: the
-- order stays REFUNDING, which a refund notification or a retry settles.
function _M.refund_refused(orders, r, version, info)
  local o, status = orders.transition(r.out_trade_no, "REFUND_FAILED", {
    key = "refund:" .. r.out_refund_no .. ":refused:v" .. tostring(version), event = "REFUND.REFUSED",
    data = { out_refund_no = r.out_refund_no, code = info and info.code } })
  if not o then
    log.warn("pay: refused refund not recorded on its order", { out_trade_no = r.out_trade_no, error = status })
  end
end

------------------------------------------------------------------------
-- Notifications
------------------------------------------------------------------------

local function refuse(http_status, message, fields)
  fields.reason = message
  if http_status >= 500 then
    log.warn("pay: notification not applied to its order; answered FAIL so that WeChat Pay retries", fields)
  else
    log.error("pay: notification refused: it does not match a stored order", fields)
  end
  return nil, http_status, message
end

-- Whether this event was applied already under another notification id
-- (the same transaction or refund notified twice).
local function applied_before(o, to, key, d)
  for _, e in ipairs(o.history) do
    if e.to == to and e.key ~= key and type(e.data) == "table" then
      if d.refund_id ~= nil then
        if e.data.refund_id == d.refund_id then return true end
      elseif d.transaction_id ~= nil and e.data.transaction_id == d.transaction_id then
        return true
      end
    end
  end
  return false
end

local function has_late(o, key)
  for _, e in ipairs(o.late or {}) do
    if e.key == key then return true end
  end
  return false
end

-- What follows a transition that did not happen: a late event recorded,
-- an event applied already, or a refusal.
local function after_refusal(orders, no, to, id, status, fields)
  fields.error = status
  if not logical(status) then return refuse(503, "order store unavailable", fields) end
  if status == "not found" then return refuse(400, "unknown order", fields) end
  local now_o, gerr = orders.get(no)
  if not now_o then
    fields.error = gerr
    return refuse(503, "order store unavailable", fields)
  end
  -- Late events are recorded by wxd.order (durably, once per key; logged,
  -- counted, given to on_late): WeChat Pay need not repeat them.
  if has_late(now_o, id) then return "late", now_o end
  if now_o.state == to then return "already", now_o end
  return refuse(409, status, fields)
end

local MISMATCH = { ["mchid mismatch"] = true, ["appid mismatch"] = true, ["amount mismatch"] = true,
  ["currency mismatch"] = true }

local function plain_json_string(v)
  return type(v) == "string" and find(v, "^[%w_%-]+$") ~= nil
end

-- A payment notification in one call of the store (memory backend): the
-- same checks, in the same order, as the Lua path below, under the store's
-- lock, with one copy of the order back instead of two. false: the Lua
-- path must do it (a target that needs the order first, odd field types).
function apply_checked(orders, n, d, no, ev, fields)
  local to = _M.TRADE_TARGET[d.trade_state]
  local amount = d.amount
  if not to or (d.mchid ~= nil and type(d.mchid) ~= "string") or (d.appid ~= nil and type(d.appid) ~= "string")
      or (d.transaction_id ~= nil and not plain_json_string(d.transaction_id))
      or (type(amount) == "table" and amount.currency ~= nil and type(amount.currency) ~= "string") then
    return false
  end
  if type(amount) ~= "table" or type(amount.total) ~= "number" then
    fields.amount = type(amount) == "table" and amount.total or nil
    -- Still "unknown order" first when there is none, as the Lua path says.
    local o, err = orders.get(no)
    if not o and err == "not found" then return refuse(400, "unknown order", fields) end
    if not o then
      fields.error = err
      return refuse(503, "order store unavailable", fields)
    end
    return refuse(400, "amount mismatch", fields)
  end
  local data = { transaction_id = d.transaction_id, trade_state = d.trade_state }
  local moved, status = orders.transition_checked(no, to, { key = n.id, event = ev, data = data }, {
    mchid = d.mchid, appid = d.appid, amount = amount.total, currency = amount.currency or "CNY",
    ref = d.transaction_id ~= nil and '"transaction_id":"' .. d.transaction_id .. '"' or nil })
  if moved == false then return false end
  if moved then return status, moved end
  if MISMATCH[status] then
    if status == "amount mismatch" then fields.amount = amount.total end
    return refuse(400, status, fields)
  end
  return after_refusal(orders, no, to, n.id, status, fields)
end

--- Checks a verified notification against its order and drives the
-- transition. Returns status, order with status "ok" (moved now),
-- "duplicate" (this id moved it before), "already" (another notification
-- of the same transaction or refund did), "none" (a state that moves
-- nothing, or an event type without an order), "late" (recorded as a late
-- event: money moved for an order that no longer expected it); or nil,
-- http_status, message (refused: 4xx; storage failure: 5xx).
function _M.apply(orders, n)
  local ev = type(n.event_type) == "string" and n.event_type or ""
  local is_refund = find(ev, "^REFUND%.") ~= nil
  if not is_refund and find(ev, "^TRANSACTION%.") == nil then return "none" end
  local d = n.order_data or n.data -- a v2 notification brings its facts in v3's shape
  local no = d.out_trade_no
  local fields = { id = n.id, event_type = ev, out_trade_no = tostring(no) }
  if type(no) ~= "string" or not find(no, "^[%w_%-|*@.]+$") or #no > 64 then
    return refuse(400, "no out_trade_no", fields)
  end
  if not is_refund and orders.transition_checked then
    local st, a, b = apply_checked(orders, n, d, no, ev, fields)
    if st ~= false then return st, a, b end
  end
  local o, err = orders.get(no)
  if not o then
    if err == "not found" then return refuse(400, "unknown order", fields) end
    fields.error = err
    return refuse(503, "order store unavailable", fields)
  end
  if d.mchid ~= o.mchid then return refuse(400, "mchid mismatch", fields) end
  if not is_refund and d.appid ~= o.appid then return refuse(400, "appid mismatch", fields) end
  local amount = d.amount
  if type(amount) ~= "table" or amount.total ~= o.amount then
    fields.amount = type(amount) == "table" and amount.total or nil
    fields.expected = o.amount
    return refuse(400, "amount mismatch", fields)
  end
  -- Refund resources carry no currency; a payment's does (CNY when absent).
  if (amount.currency or (not is_refund and "CNY") or o.currency) ~= o.currency then
    return refuse(400, "currency mismatch", fields)
  end

  local to
  if is_refund then to = _M.REFUND_TARGET[d.refund_status] else to = _M.TRADE_TARGET[d.trade_state] end
  if not to then return "none", o end
  if applied_before(o, to, n.id, d) then return "already", o end
  local data = { transaction_id = d.transaction_id, trade_state = d.trade_state, refund_id = d.refund_id,
    out_refund_no = d.out_refund_no, refund_status = d.refund_status }
  if is_refund and (o.state == "PAID" or o.state == "CONFIRMED") then
    -- A refund WeChat Pay made without this client (the merchant platform,
    -- another system): into REFUNDING first, under a key of its own.
    local r, status = orders.transition(no, "REFUNDING", { key = n.id .. ":REFUNDING", event = ev, data = data })
    if not r and not logical(status) then
      fields.error = status
      return refuse(503, "order store unavailable", fields)
    end
  end
  local moved, status = orders.transition(no, to, { key = n.id, event = ev, data = data })
  if moved then return status, moved end
  return after_refusal(orders, no, to, n.id, status, fields)
end

return _M
