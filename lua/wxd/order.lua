--- wxd.order: payment orders on the core's state machine (docs/order.md).
--
-- The transition table is C data (core/paystate.c): this module never
-- decides legality. Two backends with one API:
--
-- * "memory" (the default): orders shared by every worker of the process,
--   in C behind a mutex, with an append-only journal on disk (fsync'd
--   before a call returns; replayed and compacted at start).
-- * "redis" (the default when config.lua says store = { backend = "redis" }):
--   each change is one atomic script on the server, so several wxd nodes
--   share the orders; it also PUBLISHes the change on
--   "wxd:topic:order/<out_trade_no>".
--
-- Configuration (config.lua), every key optional:
--
--     order = { backend = "memory" | "redis",
--               journal = "orders.journal",  -- memory; relative to the app; false: no journal
--               prefix = "wxd:",             -- redis keys
--               close_after = 1800,          -- seconds until an unpaid order closes; 0: never
--               close_interval = 5,          -- seconds between scans for them
--               hook_retries = 8,            -- attempts of a failing hook
--               retain = { final_days = 30, settled_days = 400, sweep_interval = 3600,
--                          batch = 1000, archive = "orders.archive.jsonl" } }  -- false: keep all
--
-- Every call that changes or reads an order returns only once the change is
-- durable; it yields the calling coroutine meanwhile.
-- @module wxd.order
-- @usage
-- local order = require "wxd.order"
-- local o, err = order.create{ out_trade_no = no, amount = 100, currency = "CNY",
--                              appid = appid, mchid = mchid, payer_openid = openid }
-- local o, status = order.transition(no, "PAID", { key = notify_id, event = "TRANSACTION.SUCCESS" })
-- -- status: "ok" or "duplicate"; on nil, status is "illegal transition CLOSED -> PAID", ...

local type, error, tostring, tonumber, pairs, ipairs, setmetatable, xpcall, traceback =
  type, error, tostring, tonumber, pairs, ipairs, setmetatable, xpcall, debug.traceback
local str_format, str_find, math_floor, math_min = string.format, string.find, math.floor, math.min

local core = require "wxd.core.order"
local cjson = require "cjson.safe"
local log = require "wxd.log"
local metrics = require "wxd.metrics"

local _M = {}

local STATES = core.states()
local IS_STATE = {}
for _, s in ipairs(STATES) do IS_STATE[s] = true end
_M.STATES = STATES

--- Whether from -> to is a legal transition (the core's table).
-- @treturn boolean legal
-- @treturn boolean whether an illegal one counts as a late event
function _M.legal(from, to) return core.legal(from, to) end

local function now_ms()
  return math_floor(require("wxd.core").now() * 1000)
end

local function decode_entries(list)
  for _, e in ipairs(list or {}) do
    if type(e.data) == "string" then e.data = cjson.decode(e.data) end
  end
end

local function change_text(o, e)
  return str_format('{"out_trade_no":%s,"from":"%s","state":"%s","version":%d,"event":%s,"at":%d}',
    cjson.encode(o.out_trade_no), e.from, e.to, o.version, e.event and cjson.encode(e.event) or "null", e.at)
end

------------------------------------------------------------------------
-- Hooks (per Lua state, hence per app generation)
------------------------------------------------------------------------

local hooks = { on_enter = {}, on_late = nil }

-- By default a change goes to the WebSocket subscribers of its topic (all
-- workers; every node when websocket.cluster_topics is on).
local function ws_publish(topic, text)
  return require("wxd.ws").publish(topic, text)
end
local publisher = ws_publish
local hook_retries = 8

local function run_hook(name, fn, o, ev, attempt)
  local delay = attempt == 1 and 0 or math_min(100 * 2 ^ (attempt - 2), 30000)
  require("wxd.timer").after(delay, function()
    local ok, err = xpcall(fn, traceback, o, ev)
    if ok then return end
    local fields = { hook = name, out_trade_no = o.out_trade_no, attempt = attempt, error = tostring(err) }
    if attempt >= hook_retries then
      log.error("order hook failed for good", fields)
      return
    end
    log.warn("order hook failed, retrying", fields)
    run_hook(name, fn, o, ev, attempt + 1)
  end)
end

-- Redis mode publishes from its script (nodes deliver what arrives on
-- "wxd:topic:*"): calling the publisher there too would deliver twice.
local function after_transition(o, backend)
  local ev = o.history[#o.history]
  if publisher and backend == "memory" then
    local ok, err = xpcall(publisher, traceback, "order/" .. o.out_trade_no, change_text(o, ev))
    if not ok then log.error("order publisher failed", { out_trade_no = o.out_trade_no, error = tostring(err) }) end
  end
  local fn = hooks.on_enter[o.state]
  if fn then run_hook("on_enter." .. o.state, fn, o, ev, 1) end
end

local function after_late(self, no, to, opts, msg)
  local o = self:get(no)
  local ev = { from = o and o.state, to = to, event = opts.event, key = opts.key, data = opts.data, at = now_ms() }
  log.warn("order late event", { out_trade_no = no, error = msg, event = opts.event, event_key = opts.key })
  if hooks.on_late and o then run_hook("on_late", hooks.on_late, o, ev, 1) end
end

local function check_hook(fn, what)
  if type(fn) ~= "function" then error("wxd.order: " .. what .. " must be a function, got " .. type(fn), 3) end
end

--- Runs fn(order, event) after each durable transition into `state` made by
-- this process (event: the history entry). A failing hook is logged and
-- retried with backoff; it never undoes the transition.
function _M.on_enter(state, fn)
  if not IS_STATE[state] then error("wxd.order.on_enter: unknown state " .. tostring(state), 2) end
  check_hook(fn, "on_enter." .. state)
  hooks.on_enter[state] = fn
end

--- Runs fn(order, event) for each late event (e.g. PAID for a CLOSED order).
function _M.on_late(fn)
  check_hook(fn, "on_late")
  hooks.on_late = fn
end

--- Registers several hooks: `{ on_enter = { PAID = fn, ... }, on_late = fn }`.
function _M.hooks(t)
  if type(t) ~= "table" then error("wxd.order.hooks: expected a table, got " .. type(t), 2) end
  for state, fn in pairs(t.on_enter or {}) do
    if not IS_STATE[state] then error("wxd.order.hooks: unknown state " .. tostring(state), 2) end
    check_hook(fn, "on_enter." .. state)
    hooks.on_enter[state] = fn
  end
  if t.on_late ~= nil then
    check_hook(t.on_late, "on_late")
    hooks.on_late = t.on_late
  end
end

--- Sets fn(topic, text) to be called with each change in embedded mode
-- (Redis mode publishes from its script): by default wxd.ws.publish, so
-- WebSocket clients subscribed to "order/<out_trade_no>" see every change.
-- false turns publishing off; nil restores the default.
function _M.set_publisher(fn)
  if fn == nil then
    publisher = ws_publish
    return
  end
  if fn ~= false then check_hook(fn, "publisher") end
  publisher = fn or nil
end

------------------------------------------------------------------------
-- Argument checks (programmer errors raise)
------------------------------------------------------------------------

local CREATE_STRINGS = { "appid", "mchid", "payer_openid", "description", "key" }

local function check_create(t)
  if type(t) ~= "table" then error("wxd.order.create: expected a table, got " .. type(t), 3) end
  if type(t.out_trade_no) ~= "string" or not str_find(t.out_trade_no, "^[%w_%-|*@.]+$") or #t.out_trade_no > 64 then
    error("wxd.order.create: out_trade_no must be 1..64 of [A-Za-z0-9_-|*@.]", 3)
  end
  if type(t.amount) ~= "number" or t.amount ~= math_floor(t.amount) or t.amount < 0 or t.amount > 2 ^ 53 then
    error("wxd.order.create: amount must be a non-negative integer (fen)", 3)
  end
  if t.currency ~= nil and type(t.currency) ~= "string" then error("wxd.order.create: currency must be a string", 3) end
  for _, k in ipairs(CREATE_STRINGS) do
    if t[k] ~= nil and type(t[k]) ~= "string" then error("wxd.order.create: " .. k .. " must be a string", 3) end
  end
end

local function check_transition(no, to, opts)
  if type(no) ~= "string" then error("wxd.order.transition: out_trade_no must be a string", 3) end
  if not IS_STATE[to] then error("wxd.order.transition: unknown state " .. tostring(to), 3) end
  if type(opts) ~= "table" or type(opts.key) ~= "string" or opts.key == "" then
    error("wxd.order.transition: opts.key (the idempotency key) must be a non-empty string", 3)
  end
  if opts.event ~= nil and type(opts.event) ~= "string" then error("wxd.order.transition: event must be a string", 3) end
  if opts.version ~= nil and type(opts.version) ~= "number" then
    error("wxd.order.transition: version must be a number", 3)
  end
end

------------------------------------------------------------------------
-- memory: the core's store and journal
------------------------------------------------------------------------

local Memory = {}
Memory.__index = Memory

function Memory:create(t)
  local o, status = self.st:create{ out_trade_no = t.out_trade_no, amount = t.amount, currency = t.currency or "CNY",
    appid = t.appid, mchid = t.mchid, payer_openid = t.payer_openid, description = t.description, key = t.key }
  if o then decode_entries(o.history) decode_entries(o.late) end
  return o, status
end

function Memory:get(no)
  local o, err = self.st:get(no)
  if not o then return nil, err end
  decode_entries(o.history)
  decode_entries(o.late)
  return o
end

function Memory:transition(no, to, opts)
  local data = opts.data
  local o, status, late = self.st:transition(no, to, opts.key, opts.event, data, opts.version)
  if o then
    decode_entries(o.history)
    decode_entries(o.late)
  end
  return o, status, late
end

function Memory:transition_checked(no, to, opts, expect)
  local o, status, late = self.st:transition_checked(no, to, opts.key, opts.event, opts.data, expect.mchid,
    expect.appid, expect.amount, expect.currency, expect.ref)
  if o then
    decode_entries(o.history)
    decode_entries(o.late)
  end
  return o, status, late
end

function Memory:due(cutoff_ms, limit) return self.st:due(cutoff_ms, limit) end

function Memory:forget_due(final_cutoff, settled_cutoff, limit)
  return self.st:forget_due(final_cutoff, settled_cutoff, limit, self.archive or nil)
end

function Memory:stats() return self.st:stats() end

------------------------------------------------------------------------
-- redis: one script per change
------------------------------------------------------------------------

-- KEYS: order, unpaid zset. ARGV: the new order (JSON), close deadline (ms, 0: none).
local CREATE = [[
local cur = redis.call('GET', KEYS[1])
local n = cjson.decode(ARGV[1])
if cur then
  local o = cjson.decode(cur)
  if (n.key and n.key == o.key) or (o.amount == n.amount and o.currency == n.currency and o.appid == n.appid
      and o.mchid == n.mchid and o.payer_openid == n.payer_openid) then
    return {'duplicate', cur}
  end
  return {'exists'}
end
n.state = 'CREATED'
n.version = 0
n.history = {}
n.late = {}
local js = cjson.encode(n)
redis.call('SET', KEYS[1], js)
if ARGV[2] ~= '0' then redis.call('ZADD', KEYS[2], ARGV[2], n.out_trade_no) end
return {'ok', js}
]]

-- KEYS: order, unpaid zset, late counter. ARGV: to, key, event ('' none),
-- data JSON ('' none), now ms, expected version ('' any), the legal pairs
-- (" FROM>TO ... ", from the core), the late targets (" PAID ... "), the
-- channel to publish on, the key's expiry in state `to` (ms, '0': none;
-- retention).
local TRANSITION = [[
local cur = redis.call('GET', KEYS[1])
if not cur then return {'not found'} end
local o = cjson.decode(cur)
local to, key = ARGV[1], ARGV[2]
local event = ARGV[3] ~= '' and ARGV[3] or nil
local now = tonumber(ARGV[5])
for _, e in ipairs(o.history) do
  if e.key == key then
    if e.to == to then return {'duplicate', cur} end
    return {'key reused for another transition'}
  end
end
for _, e in ipairs(o.late) do
  if e.key == key then return {'illegal transition ' .. e.from .. ' -> ' .. e.to} end
end
if ARGV[6] ~= '' and tonumber(ARGV[6]) ~= o.version then return {'version conflict'} end
local from = o.state
local entry = {from = from, to = to, event = event, key = key, at = now}
if ARGV[4] ~= '' then entry.data = ARGV[4] end
if not string.find(ARGV[7], ' ' .. from .. '>' .. to .. ' ', 1, true) then
  local msg = 'illegal transition ' .. from .. ' -> ' .. to
  if from ~= to and string.find(ARGV[8], ' ' .. to .. ' ', 1, true) then
    o.late[#o.late + 1] = entry
    redis.call('SET', KEYS[1], cjson.encode(o), 'KEEPTTL')
    redis.call('INCR', KEYS[3])
    return {msg, '', 'late'}
  end
  return {msg}
end
o.history[#o.history + 1] = entry
o.state = to
o.version = o.version + 1
o.updated_at = now
local js = cjson.encode(o)
redis.call('SET', KEYS[1], js)
if ARGV[10] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[10]) else redis.call('PERSIST', KEYS[1]) end
if to ~= 'CREATED' and to ~= 'PAYING' then redis.call('ZREM', KEYS[2], o.out_trade_no) end
redis.call('PUBLISH', ARGV[9], '{"out_trade_no":' .. cjson.encode(o.out_trade_no) .. ',"from":"' .. from
  .. '","state":"' .. to .. '","version":' .. string.format('%d', o.version) .. ',"event":' .. cjson.encode(event)
  .. ',"at":' .. string.format('%d', now) .. '}')
return {'ok', js}
]]

local PAIRS, LATE_TARGETS = core.pairs()

local Redis = {}
Redis.__index = Redis

-- cjson in Redis writes an empty list as {}: make both lists lists again.
local function redis_order(js)
  local o = cjson.decode(js)
  if type(o) ~= "table" then return nil, "bad order record" end
  o.history = o.history or {}
  o.late = o.late or {}
  o.key = nil
  decode_entries(o.history)
  decode_entries(o.late)
  return o
end

function Redis:k(no) return self.prefix .. "order:" .. no end

function Redis:create(t)
  local now = now_ms()
  local n = { out_trade_no = t.out_trade_no, amount = t.amount, currency = t.currency or "CNY", appid = t.appid,
    mchid = t.mchid, payer_openid = t.payer_openid, description = t.description, key = t.key,
    created_at = now, updated_at = now }
  local deadline = self.close_after > 0 and str_format("%d", now + self.close_after * 1000) or "0"
  local res, err, detail = self.r:eval(CREATE, { self:k(t.out_trade_no), self.prefix .. "order:unpaid" },
    { cjson.encode(n), deadline })
  if not res then return nil, err, detail end
  if res[1] == "ok" or res[1] == "duplicate" then return redis_order(res[2]), res[1] end
  return nil, res[1]
end

function Redis:get(no)
  local js, err, detail = self.r:call("GET", self:k(no))
  if not js then return nil, err, detail end
  if js == self.null then return nil, "not found" end
  return redis_order(js)
end

function Redis:transition(no, to, opts)
  local data = opts.data or ""
  local res, err, detail = self.r:eval(TRANSITION,
    { self:k(no), self.prefix .. "order:unpaid", self.prefix .. "order:late" },
    { to, opts.key, opts.event or "", data, str_format("%d", now_ms()),
      opts.version and str_format("%d", opts.version) or "", PAIRS, LATE_TARGETS, "wxd:topic:order/" .. no,
      self.expire_ms[to] or "0" })
  if not res then return nil, err, detail end
  if res[1] == "ok" or res[1] == "duplicate" then return redis_order(res[2]), res[1] end
  return nil, res[1], res[3]
end

function Redis:due(cutoff_ms, limit)
  -- The zset holds deadlines, not creation times: cutoff is "now" here.
  local res, err = self.r:call("ZRANGEBYSCORE", self.prefix .. "order:unpaid", "-inf",
    str_format("%d", cutoff_ms + self.close_after * 1000), "LIMIT", 0, limit or 100)
  if not res then return nil, err end
  return res
end

-- Redis forgets by itself: each key expires (retention set by TRANSITION).
function Redis.forget_due() return 0 end

function Redis:stats()
  local v = self.r:call("GET", self.prefix .. "order:late")
  return { late = tonumber(v) or 0 }
end

------------------------------------------------------------------------
-- The API
------------------------------------------------------------------------

local Orders = {}
Orders.__index = Orders

local function resolve_path(p)
  if p:sub(1, 1) == "/" then return p end
  local dir = require("wxd").app_dir
  return dir and (dir .. "/" .. p) or p
end

local DAY_MS = 86400 * 1000
-- Retention (docs/order.md, "Retention"). Final orders: WeChat Pay retries
-- a notification for about 24 h, and a month covers a monthly
-- reconciliation. Settled orders: a refund is allowed up to a year after
-- the payment, plus a month for its notification and reconciliation.
local RETAIN_DEFAULTS = { final_days = 30, settled_days = 400, sweep_interval = 3600, batch = 1000 }
local RETAIN_KEYS = { final_days = true, settled_days = true, sweep_interval = true, batch = true, archive = true }

-- The checked retention settings, or false (keep every order).
local function retain_config(r)
  if r == false then return false end
  if r ~= nil and type(r) ~= "table" then error("wxd.order: retain must be a table or false", 3) end
  r = r or {}
  for k in pairs(r) do
    if not RETAIN_KEYS[k] then error("wxd.order: unknown retain setting " .. tostring(k), 3) end
  end
  local c = {}
  for k, default in pairs(RETAIN_DEFAULTS) do
    local v = r[k]
    if v == nil then v = default end
    if type(v) ~= "number" or v ~= v or v <= 0 or v == math.huge then -- v ~= v: NaN
      error("wxd.order: retain." .. k .. " must be a number > 0", 3)
    end
    c[k] = v
  end
  if c.batch ~= math_floor(c.batch) then error("wxd.order: retain.batch must be an integer > 0", 3) end
  if r.archive ~= nil and r.archive ~= false and (type(r.archive) ~= "string" or r.archive == "") then
    error("wxd.order: retain.archive must be a path or false", 3)
  end
  c.archive = r.archive
  return c
end

local RETAIN_FINAL, RETAIN_SETTLED = core.retention()

-- Redis mode: each key's expiry (ms, as text) in each state; none when kept.
local function expire_ms(retain)
  local t = {}
  if not retain then return t end
  -- At least 1 ms: "0" would mean no expiry.
  local final, settled = math.max(1, retain.final_days * DAY_MS), math.max(1, retain.settled_days * DAY_MS)
  for _, st in ipairs(RETAIN_FINAL) do t[st] = str_format("%d", final) end
  for _, st in ipairs(RETAIN_SETTLED) do t[st] = str_format("%d", settled) end
  return t
end

--- An order store with its own settings (the module's functions use the
-- one of config.lua). Stores of the same journal path share their orders.
-- @tparam[opt] table cfg as the `order` section of config.lua, plus
--   `redis` (a URL; default the `redis` of config.lua)
-- @treturn table an object with create, get, transition, close_due, stats
function _M.new(cfg)
  if cfg ~= nil and type(cfg) ~= "table" then error("wxd.order.new: expected a table, got " .. type(cfg), 2) end
  cfg = cfg or {}
  local wxd = require "wxd"
  local conf = type(wxd.config) == "table" and wxd.config or {}
  local backend = cfg.backend or (conf.store and conf.store.backend == "redis" and "redis") or "memory"
  local close_after = cfg.close_after or 1800
  if type(close_after) ~= "number" or close_after < 0 then error("wxd.order: close_after must be seconds >= 0", 2) end
  local retain = retain_config(cfg.retain)
  -- Redis keys that expire are deleted with no archive: only when asked.
  if backend == "redis" and cfg.retain == nil then retain = false end
  local impl
  if backend == "memory" then
    local journal = cfg.journal
    if journal == nil then journal = wxd.app_dir and "orders.journal" or false end
    if journal ~= false and type(journal) ~= "string" then error("wxd.order: journal must be a path or false", 2) end
    local st, err = core.open(journal and resolve_path(journal) or nil)
    if not st then error("wxd.order: " .. err, 2) end
    -- The archive: next to the journal unless said otherwise; none without
    -- a journal (memory only) unless a path is given.
    local archive = retain and retain.archive
    if archive == nil and journal then
      archive = (resolve_path(journal):match("^(.*)/[^/]*$") or ".") .. "/orders.archive.jsonl"
    elseif archive then
      archive = resolve_path(archive)
    end
    impl = setmetatable({ st = st, archive = archive or false }, Memory)
  elseif backend == "redis" then
    local redis = require "wxd.redis"
    local url = cfg.redis or conf.redis
    if url == nil then error('wxd.order: backend "redis" needs redis = "redis://..." in config.lua', 2) end
    local prefix = cfg.prefix or "wxd:"
    if type(prefix) ~= "string" then error("wxd.order: prefix must be a string", 2) end
    if retain and retain.archive then error("wxd.order: retain.archive is for the memory backend (Redis keys expire)", 2) end
    impl = setmetatable({ r = redis.new(url), prefix = prefix, null = redis.null, close_after = close_after,
      expire_ms = expire_ms(retain) }, Redis)
  else
    error('wxd.order: unknown backend "' .. tostring(backend) .. '" (expected "memory" or "redis")', 2)
  end
  return setmetatable({ impl = impl, backend = backend, close_after = close_after, retain = retain }, Orders)
end

--- Creates an order in state CREATED.
-- @treturn ?table the order
-- @treturn string "ok" | "duplicate" (the same order again, or the same key) | "exists" (another order
--   has this out_trade_no) | an I/O error
function Orders:create(t)
  check_create(t)
  return self.impl:create(t)
end

--- The order, or nil, "not found".
function Orders:get(no)
  if type(no) ~= "string" then error("wxd.order.get: out_trade_no must be a string", 2) end
  return self.impl:get(no)
end

--- Moves an order to state `to`, once per opts.key.
-- @tparam string no out_trade_no
-- @tparam string to the new state
-- @tparam table opts `key` (idempotency key, required), `event`, `data` (a table, kept in the history),
--   `version` (only when the order is at this version)
-- @treturn ?table the order
-- @treturn string "ok" | "duplicate" | "illegal transition FROM -> TO" | "not found" | "version conflict" |
--   "key reused for another transition" | an I/O error
function Orders:transition(no, to, opts)
  check_transition(no, to, opts)
  local args = opts
  if opts.data ~= nil then
    local text = cjson.encode(opts.data)
    if not text then error("wxd.order.transition: data must be encodable as JSON", 2) end
    args = { key = opts.key, event = opts.event, version = opts.version, data = text }
  end
  local o, status, late = self.impl:transition(no, to, args)
  if o and status == "ok" then after_transition(o, self.backend)
  elseif late == "late" then after_late(self, no, to, opts, status) end
  return o, status
end

--- wxd.pay's notification step in one call where the backend has it
-- (memory): the order checked against `expect` and moved, under one lock.
-- `expect`: mchid, appid (false: not compared), amount, currency, ref
-- (the JSON text `"transaction_id":"..."`: an entry into `to` under another
-- key whose data holds it means the event was applied before). Returns as
-- transition, or nil, "mchid mismatch" | "appid mismatch" | "amount
-- mismatch" | "currency mismatch", or o, "already"; or false when the
-- backend has no such call (the caller checks in Lua then).
function Orders:transition_checked(no, to, opts, expect)
  if not self.impl.transition_checked then return false end
  check_transition(no, to, opts)
  local args = opts
  if opts.data ~= nil then
    local text = cjson.encode(opts.data)
    if not text then error("wxd.order.transition_checked: data must be encodable as JSON", 2) end
    args = { key = opts.key, event = opts.event, data = text }
  end
  local o, status, late = self.impl:transition_checked(no, to, args, expect)
  if o and status == "ok" then after_transition(o, self.backend)
  elseif late == "late" then after_late(self, no, to, opts, status) end
  return o, status
end

--- Closes unpaid (CREATED or PAYING) orders older than close_after; the
-- closer timer calls it. Returns how many it closed.
function Orders:close_due(limit)
  if self.close_after <= 0 then return 0 end
  local due, err = self.impl:due(now_ms() - self.close_after * 1000, limit or 100)
  if not due then return nil, err end
  local n = 0
  for _, no in ipairs(due) do
    local o, status = self:transition(no, "CLOSED", { key = "auto-close", event = "AUTO_CLOSE" })
    if o and status == "ok" then n = n + 1 end
  end
  return n
end

--- Forgets (memory backend) at most `limit` orders that are due under the
-- retention: archived, then dropped from memory and the journal. Redis keys
-- expire by themselves (0). `now_ms` (default: now) is for specs and tools.
-- @treturn ?number how many were forgotten
-- @treturn ?string "archive <path>: <error>" (nothing forgotten), "journal: <error>", ...
function Orders:forget_due(limit, now_ms_)
  if not self.retain then return 0 end
  if limit ~= nil and (type(limit) ~= "number" or limit < 1) then
    error("wxd.order.forget_due: limit must be a number >= 1", 2)
  end
  if now_ms_ ~= nil and type(now_ms_) ~= "number" then error("wxd.order.forget_due: now_ms must be a number", 2) end
  local now = now_ms_ or now_ms()
  return self.impl:forget_due(now - self.retain.final_days * DAY_MS, now - self.retain.settled_days * DAY_MS,
    math_floor(limit or self.retain.batch))
end

--- One sweep: forget_due in batches of retain.batch until none is left,
-- letting the worker serve between batches. Returns how many it forgot, or
-- nil, err at the first failure (with the count so far).
function Orders:sweep(now_ms_)
  local total = 0
  if not self.retain then return total end
  local batch = self.retain.batch
  while true do
    local n, err = self:forget_due(batch, now_ms_)
    if not n then return nil, err, total end
    total = total + n
    if n < batch then return total end
    pcall(require("wxd.core").sleep, 0) -- between batches; outside a coroutine, straight on
  end
end

--- Counters: orders, transitions, duplicates, illegal, late, commits, forgotten
-- (memory); late (redis).
function Orders:stats() return self.impl:stats() end

local default

local function the_orders()
  if default then return default end
  local wxd = require "wxd"
  local cfg = type(wxd.config) == "table" and wxd.config.order or nil
  if cfg ~= nil and type(cfg) ~= "table" then error("wxd.order: config.order must be a table", 3) end
  default = _M.new(cfg)
  return default
end

for _, name in ipairs({ "create", "get", "transition", "transition_checked", "close_due", "forget_due", "sweep",
  "stats" }) do
  local method = Orders[name]
  _M[name] = function(...) return method(the_orders(), ...) end
end

--- Starts the closer of unpaid orders (once per process: worker 0) when
-- config.lua sets order.close_after > 0 or leaves it unset (1800 s). Called
-- when the module loads inside a server.
local function start_closer()
  local wxd = require "wxd"
  local cfg = type(wxd.config) == "table" and wxd.config.order or nil
  if type(cfg) ~= "table" and not wxd.app_dir then return end
  cfg = type(cfg) == "table" and cfg or {}
  if cfg.hook_retries ~= nil then hook_retries = cfg.hook_retries end
  if (cfg.close_after or 1800) <= 0 or not wxd.app_dir then return end
  local every = (cfg.close_interval or 5) * 1000
  require("wxd.timer").every(every, function()
    local ok, err = pcall(_M.close_due)
    if not ok then log.error("order closer failed", { error = tostring(err) }) end
  end, { worker = 0 })
end
start_closer()

--- Starts the retention sweep (worker 0, every retain.sweep_interval
-- seconds) for the memory backend unless config.lua says retain = false.
local function start_sweeper()
  local wxd = require "wxd"
  if not wxd.app_dir then return end
  local cfg = type(wxd.config) == "table" and wxd.config.order or nil
  cfg = type(cfg) == "table" and cfg or {}
  if cfg.retain == false then return end
  local ok, retain = pcall(retain_config, cfg.retain)
  if not ok then return end -- the first order call raises with the message
  require("wxd.timer").every(retain.sweep_interval * 1000, function()
    local ok2, n, err = pcall(_M.sweep)
    if not ok2 then log.error("order sweep failed", { error = tostring(n) })
    elseif not n then log.error("order sweep failed; nothing more forgotten until the next sweep", { error = err })
    elseif n > 0 then log.info("order sweep", { forgotten = n }) end
  end, { worker = 0 })
end
start_sweeper()

-- The store's own counters, copied into /metrics every few seconds by
-- worker 0 (the store counts; this only shows it). Pay metrics can follow
-- the same way.
local function start_metrics()
  local wxd = require "wxd"
  if not wxd.app_dir then return end
  local m = metrics.builtin("counter", "wxd_order_events_total",
    "Order store counters: transitions, duplicates, illegal, late (events for a final state), commits, forgotten",
    { "kind" })
  local orders = metrics.builtin("gauge", "wxd_order_orders", "Orders in the embedded store")
  require("wxd.timer").every(5000, function()
    local ok, s = pcall(_M.stats)
    if not ok or type(s) ~= "table" then return end
    for _, k in ipairs({ "transitions", "duplicates", "illegal", "late", "commits", "forgotten" }) do
      if s[k] then metrics.set_value(m, s[k], { k }) end
    end
    if s.orders then metrics.set_value(orders, s.orders) end
  end, { worker = 0 })
end
start_metrics()

return _M
