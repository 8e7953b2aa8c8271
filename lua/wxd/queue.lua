--- wxd.queue: a durable retry queue (docs/queue.md).
--
-- push() is durable when it returns; consumers registered with consume()
-- run in every worker's event loop and get each message at least once:
-- a handler that returns true acknowledges it; one that returns nil/false
-- or raises has it redelivered after a backoff (exponential, with
-- jitter), and after `max_attempts` it goes to the dead-letter list. A
-- delivery that takes longer than `visibility` seconds (a consumer that
-- hangs or died with its process) is redelivered too. A message is held
-- by one consumer at a time (until its visibility timeout).
--
-- Two backends with one API:
-- * "memory" (the default): messages in C shared by the workers, with an
--   fsync'd journal (core/queue.c, core/journal.c), replayed at start;
-- * "redis" (the default when store.backend is "redis"): a Stream per queue
--   with a consumer group, so several wxd nodes share the queue.
--
-- Configuration (config.lua), every key optional:
--
--     queue = { backend = "memory" | "redis",
--               path = "queue.journal",   -- memory; relative to the app; false: no journal (tests)
--               prefix = "wxd:",          -- redis keys
--               poll = 0.1 }              -- seconds between a consumer's looks for due messages
--
-- @module wxd.queue
-- @usage
-- local queue = require "wxd.queue"
-- queue.consume("crm", function(payload, info)
--   local res = http.post(url, json.encode(payload), { headers = { ["Idempotency-Key"] = info.key or info.id } })
--   return res and res.status < 300
-- end, { max_attempts = 8, visibility = 30 })
-- local id, status = queue.push("crm", { openid = openid, points = 10 }, { key = "points:" .. order_no })

local type, error, tostring, tonumber, setmetatable, xpcall, traceback, pairs =
  type, error, tostring, tonumber, setmetatable, xpcall, debug.traceback, pairs
local str_format, str_sub, math_floor, math_min, math_random = string.format, string.sub, math.floor, math.min,
  math.random

local cjson = require "cjson.safe"
local log = require "wxd.log"
local metrics = require "wxd.metrics"
local timer = require "wxd.timer"
local task = require "wxd.task"

local _M = {}

-- Payloads keep their type: "s" + a string, "j" + JSON of a table.
local function encode(payload)
  if type(payload) == "string" then return "s" .. payload end
  if type(payload) == "table" then
    local js = cjson.encode(payload)
    if not js then error("wxd.queue.push: payload must be encodable as JSON", 3) end
    return "j" .. js
  end
  error("wxd.queue.push: payload must be a string or a table, got " .. type(payload), 3)
end

local function decode(s)
  if str_sub(s, 1, 1) == "j" then return cjson.decode(str_sub(s, 2)) end
  return str_sub(s, 2)
end

local function check_name(name, what)
  if type(name) ~= "string" or #name == 0 or #name > 128 then
    error("wxd.queue." .. what .. ": queue name must be a string of 1..128 bytes", 3)
  end
end

------------------------------------------------------------------------
-- memory: core/queue.c
------------------------------------------------------------------------

local Memory = {}
Memory.__index = Memory

function Memory:push(name, key, payload, delay_ms)
  local id, status, seq = self.st:push(name, key, payload, delay_ms)
  if not id then return nil, status end
  local ok, err = self.st:sync(seq)
  if not ok then return nil, err end
  return id, status
end

function Memory:claim(name, c)
  local m, wait = self.st:claim(name, c.visibility_ms, c.max_attempts)
  if not m then return nil, wait end
  m.token = m.lease
  return m
end

function Memory:ack(_, m) self.st:ack(m.id) return true end

function Memory:nack(_, m, delay_ms, max_attempts, err)
  return self.st:nack(m.id, m.token, delay_ms, max_attempts, err)
end

function Memory:dead(name, limit) return self.st:dead(name, limit) end

function Memory:stats(name)
  return self.st:stats(name)
end

------------------------------------------------------------------------
-- redis: a Stream and a consumer group per queue
------------------------------------------------------------------------

-- Keys of queue Q (one hash slot: "{Q}"): <p>queue:{Q} the stream (entries
-- carry only the message id), :msg a hash id -> the message (JSON: id, k
-- key, p payload, a attempts, f first ms, e last error), :keys key -> id
-- while pending, :delayed a zset of ids by due time (backoff, delay),
-- :dead a list of dead messages (JSON), :seq ids, :delivered a counter.

local NOW = [[
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
]]

-- KEYS: stream, delayed, keys, msg, seq. ARGV: key ('' none), payload, delay ms, group.
local PUSH = NOW .. [[
if ARGV[1] ~= '' then
  local id = redis.call('HGET', KEYS[3], ARGV[1])
  if id then return {id, 'duplicate'} end
end
local id = tostring(redis.call('INCR', KEYS[5]))
local m = {id = id, p = ARGV[2], a = 0, f = now}
if ARGV[1] ~= '' then
  m.k = ARGV[1]
  redis.call('HSET', KEYS[3], ARGV[1], id)
end
redis.call('HSET', KEYS[4], id, cjson.encode(m))
redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[4], '0', 'MKSTREAM')
local d = tonumber(ARGV[3])
if d > 0 then redis.call('ZADD', KEYS[2], now + d, id)
else redis.call('XADD', KEYS[1], '*', 'id', id) end
return {id, 'ok'}
]]

-- Removes message m (its JSON decoded) and appends it to the dead list.
local KILL = [[
local function kill(m, eid, now)
  m.d = now
  redis.call('RPUSH', KEYS[4], cjson.encode(m))
  redis.call('LTRIM', KEYS[4], -10000, -1)
  redis.call('HDEL', KEYS[3], m.id)
  if m.k and redis.call('HGET', KEYS[5], m.k) == m.id then redis.call('HDEL', KEYS[5], m.k) end
  redis.call('XACK', KEYS[1], ARGV[1], eid)
  redis.call('XDEL', KEYS[1], eid)
end
]]

-- KEYS: stream, delayed, msg, dead, keys. ARGV: group, consumer, visibility ms, max attempts.
-- -> {'msg', entry id, message JSON} | {'none', ms until the next delayed one is due, or -1}
local CLAIM = NOW .. KILL .. [[
redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 100)
for _, id in ipairs(due) do
  redis.call('XADD', KEYS[1], '*', 'id', id)
  redis.call('ZREM', KEYS[2], id)
end
local max = tonumber(ARGV[4])
for _ = 1, 20 do
  local entry, expired
  local c = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], '0-0', 'COUNT', 1)
  if c[2] and c[2][1] then
    entry, expired = c[2][1], true
  else
    local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
    if r and r[1] and r[1][2][1] then entry = r[1][2][1] end
  end
  if not entry then
    local nx = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {'none', nx[2] and tostring(tonumber(nx[2]) - now) or '-1'}
  end
  local eid, mid = entry[1], entry[2] and entry[2][2]
  local js = mid and redis.call('HGET', KEYS[3], mid)
  if not js then
    redis.call('XACK', KEYS[1], ARGV[1], eid)
    redis.call('XDEL', KEYS[1], eid)
  else
    local m = cjson.decode(js)
    if expired then m.e = 'visibility timeout' end
    if expired and m.a >= max then
      kill(m, eid, now)
    else
      m.a = m.a + 1
      js = cjson.encode(m)
      redis.call('HSET', KEYS[3], mid, js)
      return {'msg', eid, js}
    end
  end
end
return {'none', '0'}
]]

-- KEYS: stream, msg, keys, delivered. ARGV: group, entry id, message id.
local ACK = [[
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
local js = redis.call('HGET', KEYS[2], ARGV[3])
if not js then return 0 end
local m = cjson.decode(js)
redis.call('HDEL', KEYS[2], ARGV[3])
if m.k and redis.call('HGET', KEYS[3], m.k) == ARGV[3] then redis.call('HDEL', KEYS[3], m.k) end
redis.call('INCR', KEYS[4])
return 1
]]

-- KEYS: stream, delayed, msg, dead, keys. ARGV: group, entry id, message id, consumer, delay ms,
-- max attempts, error. -> 'retry' | 'dead' | 'stale'
local NACK = NOW .. KILL .. [[
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if not p[1] or p[1][2] ~= ARGV[4] then return 'stale' end
local js = redis.call('HGET', KEYS[3], ARGV[3])
if not js then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[1], ARGV[2])
  return 'stale'
end
local m = cjson.decode(js)
m.e = ARGV[7]
if m.a >= tonumber(ARGV[6]) then
  kill(m, ARGV[2], now)
  return 'dead'
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[3], cjson.encode(m))
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[3])
return 'retry'
]]

-- KEYS: stream, delayed, dead, delivered. ARGV: group. -> {stream length, in flight, delayed, dead, delivered}
local STATS = [[
local inflight = 0
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1])
if type(p) == 'table' and not p.err then inflight = p[1] end
return {redis.call('XLEN', KEYS[1]), inflight, redis.call('ZCARD', KEYS[2]), redis.call('LLEN', KEYS[3]),
        tonumber(redis.call('GET', KEYS[4]) or '0')}
]]

local GROUP = "wxd"

local Redis = {}
Redis.__index = Redis

function Redis:keys(name)
  local base = self.prefix .. "queue:{" .. name .. "}"
  return { stream = base, delayed = base .. ":delayed", keys = base .. ":keys", msg = base .. ":msg",
    seq = base .. ":seq", dead = base .. ":dead", delivered = base .. ":delivered" }
end

-- This worker's consumer name in the group: unique per process, worker and
-- generation; a dead process's deliveries are claimed after their visibility.
local consumer_name
local function consumer()
  if not consumer_name then
    local wxd = require "wxd"
    consumer_name = str_format("%s-w%s-%s", tostring(os.getenv("HOSTNAME") or "wxd"), tostring(wxd.worker_id()),
      require("wxd.crypto").hex_encode(require("wxd.crypto").random_bytes(6)))
  end
  return consumer_name
end

function Redis:push(name, key, payload, delay_ms)
  local k = self:keys(name)
  local res, err = self.r:eval(PUSH, { k.stream, k.delayed, k.keys, k.msg, k.seq },
    { key or "", payload, str_format("%d", delay_ms or 0), GROUP })
  if not res then return nil, err end
  return res[1], res[2]
end

function Redis:claim(name, c)
  local k = self:keys(name)
  local res, err = self.r:eval(CLAIM, { k.stream, k.delayed, k.msg, k.dead, k.keys },
    { GROUP, consumer(), str_format("%d", c.visibility_ms), str_format("%d", c.max_attempts) })
  if not res then return nil, nil, err end
  if res[1] ~= "msg" then
    local wait = tonumber(res[2])
    return nil, wait and wait >= 0 and wait or nil
  end
  local m = cjson.decode(res[3])
  if type(m) ~= "table" then return nil, nil, "bad message" end
  return { id = m.id, key = m.k, payload = m.p, attempt = m.a, first_at = (tonumber(m.f) or 0) / 1000,
    last_error = m.e, token = { entry = res[2], consumer = consumer() } }
end

function Redis:ack(name, m)
  local k = self:keys(name)
  return self.r:eval(ACK, { k.stream, k.msg, k.keys, k.delivered }, { GROUP, m.token.entry, m.id })
end

function Redis:nack(name, m, delay_ms, max_attempts, err)
  local k = self:keys(name)
  local res, e = self.r:eval(NACK, { k.stream, k.delayed, k.msg, k.dead, k.keys },
    { GROUP, m.token.entry, m.id, m.token.consumer, str_format("%d", delay_ms), str_format("%d", max_attempts),
      str_sub(err, 1, 1024) })
  if not res then return nil, e end
  return res
end

function Redis:dead(name, limit)
  local k = self:keys(name)
  local res, err = self.r:call("LRANGE", k.dead, 0, (limit or 100) - 1)
  if not res then return nil, err end
  local out = {}
  for i, js in ipairs(res) do
    local m = cjson.decode(js) or {}
    out[i] = { id = m.id, key = m.k, payload = m.p, attempts = m.a, last_error = m.e, at = (tonumber(m.d) or 0) / 1000 }
  end
  return out
end

function Redis:stats(name)
  local k = self:keys(name)
  local res, err = self.r:eval(STATS, { k.stream, k.delayed, k.dead, k.delivered }, { GROUP })
  if not res then return nil, err end
  return { pending = res[1] - res[2] + res[3], inflight = res[2], dead = res[4], delivered = res[5] }
end

------------------------------------------------------------------------
-- Consumers
------------------------------------------------------------------------

local Queues = {}
Queues.__index = Queues

local delivered_metric

local function count(m, name, outcome)
  if not delivered_metric then
    delivered_metric = metrics.builtin("counter", "wxd_queue_deliveries_total",
      "Queue deliveries by queue and outcome (ok, retry, dead, stale)", { "queue", "outcome" }, { max_series = 400 })
  end
  metrics.count(delivered_metric, { name, outcome })
  return m
end

-- Backoff before attempt n + 1: base * 2^(n-1) seconds, at most max, with
-- jitter (a random point in the upper half) so retries spread out.
local function backoff_ms(c, attempt)
  local full = math_min(c.backoff_max, c.backoff_base * 2 ^ (attempt - 1))
  return math_floor(full * 1000 * (0.5 + 0.5 * math_random()))
end

local function deliver(self, name, c, m)
  local payload = m.payload and decode(m.payload)
  local info = { id = m.id, key = m.key, attempt = m.attempt, first_at = m.first_at, last_error = m.last_error,
    queue = name }
  local ok, res, err = xpcall(c.handler, traceback, payload, info)
  if ok and res then
    local _, e = self.impl:ack(name, m)
    if e then log.warn("queue ack failed", { queue = name, id = m.id, error = tostring(e) }) end
    count(m, name, "ok")
    return
  end
  local why = ok and tostring(err or ("handler returned " .. tostring(res))) or tostring(res)
  local out, e = self.impl:nack(name, m, backoff_ms(c, m.attempt), c.max_attempts, why)
  if not out then
    -- The message stays in flight and comes back after its visibility timeout.
    log.warn("queue retry failed", { queue = name, id = m.id, error = tostring(e) })
    return
  end
  count(m, name, out)
  local fields = { queue = name, id = m.id, key = m.key, attempt = m.attempt, error = why }
  if out == "dead" then log.error("queue message dead", fields)
  elseif out == "retry" then log.warn("queue delivery failed, retrying", fields) end
end

local CONSUME_KEYS = { max_attempts = true, visibility = true, backoff = true, concurrency = true, poll = true,
  ready = true }

local function consume_settings(name, handler, opts)
  check_name(name, "consume")
  if type(handler) ~= "function" then error("wxd.queue.consume: handler must be a function", 3) end
  opts = opts or {}
  if type(opts) ~= "table" then error("wxd.queue.consume: opts must be a table", 3) end
  for k in pairs(opts) do
    if not CONSUME_KEYS[k] then error("wxd.queue.consume: unknown option " .. tostring(k), 3) end
  end
  local function num(v, def, lo, what)
    if v == nil then return def end
    if type(v) ~= "number" or v < lo then error("wxd.queue.consume: " .. what .. " must be a number >= " .. lo, 4) end
    return v
  end
  if opts.ready ~= nil and type(opts.ready) ~= "function" then error("wxd.queue.consume: ready must be a function", 3) end
  local b = opts.backoff or {}
  if type(b) ~= "table" then error("wxd.queue.consume: backoff must be a table { base =, max = }", 3) end
  return {
    handler = handler,
    max_attempts = math_floor(num(opts.max_attempts, 8, 1, "max_attempts")),
    visibility_ms = math_floor(num(opts.visibility, 30, 0.001, "visibility") * 1000),
    backoff_base = num(b.base, 1, 0, "backoff.base"),
    backoff_max = num(b.max, 300, 0, "backoff.max"),
    concurrency = math_floor(num(opts.concurrency, 4, 1, "concurrency")),
    ready = opts.ready,
  }, opts.poll
end

local Consumer = {}
Consumer.__index = Consumer

--- Stops this consumer (its deliveries in progress finish).
function Consumer:stop()
  if self.timer then self.timer:cancel() end
  if self.stats_timer then self.stats_timer:cancel() end
  self.stopped = true
end

local gauge_metric

-- Worker 0 copies the queue's counts into /metrics every few seconds.
local function start_stats(self, name)
  if not gauge_metric then
    gauge_metric = metrics.builtin("gauge", "wxd_queue_messages", "Messages in a queue by state (pending, inflight, dead)",
      { "queue", "state" }, { max_series = 600 })
  end
  return timer.every(5000, function()
    local s = self.impl:stats(name)
    if type(s) ~= "table" then return end
    for _, k in ipairs({ "pending", "inflight", "dead" }) do metrics.set_value(gauge_metric, s[k], { name, k }) end
  end, { worker = 0 })
end

--- Registers the consumer of queue `name` in this worker (every worker
-- that runs the app registers its own; a message goes to one of them).
function Queues:consume(name, handler, opts)
  local c, poll = consume_settings(name, handler, opts)
  local con = setmetatable({ running = 0 }, Consumer)
  local function claim()
    -- A reload stops the replaced generation's timer: its loops end, and
    -- the new generation's consumer takes over.
    if con.stopped or not con.timer:active() then return nil end
    if c.ready and not c.ready() then return nil end
    local m, _, err = self.impl:claim(name, c)
    if err then log.warn("queue claim failed", { queue = name, error = tostring(err) }) end
    return m
  end
  -- Each slot delivers messages one after another while some are due; the
  -- timer refills the slots.
  local function slot(m)
    while m do
      local ok, e = xpcall(deliver, traceback, self, name, c, m)
      if not ok then log.error("queue delivery error", { queue = name, error = tostring(e) }) end
      m = claim()
    end
    con.running = con.running - 1
  end
  local busy = false
  local function drain()
    if busy then return end
    busy = true
    while con.running < c.concurrency do
      local m = claim()
      if not m then break end
      con.running = con.running + 1
      task.spawn(slot, m)
    end
    busy = false
  end
  con.timer = timer.every(math_floor((poll or self.poll) * 1000), drain)
  con.stats_timer = start_stats(self, name)
  return con
end

--- Adds a message. Durable when it returns.
-- @tparam string name the queue
-- @param payload a string, or a table (JSON; the handler gets a table back)
-- @tparam[opt] table opts `key` (with a message of this key still pending or in flight, nothing is
--   added: the existing id and "duplicate"), `delay` (seconds before the first delivery)
-- @treturn ?string the message id
-- @treturn string "ok" | "duplicate" | an error ("journal: ...", Redis's errors)
function Queues:push(name, payload, opts)
  check_name(name, "push")
  opts = opts or {}
  if type(opts) ~= "table" then error("wxd.queue.push: opts must be a table", 2) end
  local key = opts.key
  if key ~= nil and (type(key) ~= "string" or #key == 0 or #key > 256) then
    error("wxd.queue.push: key must be a string of 1..256 bytes", 2)
  end
  local delay = opts.delay or 0
  if type(delay) ~= "number" or delay < 0 then error("wxd.queue.push: delay must be seconds >= 0", 2) end
  return self.impl:push(name, key, encode(payload), math_floor(delay * 1000))
end

--- The dead-letter list, oldest first: `{ { id, key, payload, attempts, last_error, at }, ... }`.
function Queues:dead(name, limit)
  check_name(name, "dead")
  local list, err = self.impl:dead(name, limit or 100)
  if not list then return nil, err end
  for _, m in ipairs(list) do m.payload = m.payload and decode(m.payload) end
  return list
end

--- `{ pending, inflight, dead, delivered }` (memory adds pushed, retried, expired, commits, compactions).
function Queues:stats(name)
  check_name(name, "stats")
  return self.impl:stats(name)
end

local function resolve_path(p)
  if p:sub(1, 1) == "/" then return p end
  local dir = require("wxd").app_dir
  return dir and (dir .. "/" .. p) or p
end

--- A queue store with its own settings (the module's functions use the
-- one of config.lua). Stores of one journal path share their messages.
-- @tparam[opt] table cfg as the `queue` section of config.lua, plus `redis` (a URL)
function _M.new(cfg)
  if cfg ~= nil and type(cfg) ~= "table" then error("wxd.queue.new: expected a table, got " .. type(cfg), 2) end
  cfg = cfg or {}
  local wxd = require "wxd"
  local conf = type(wxd.config) == "table" and wxd.config or {}
  local backend = cfg.backend or (conf.store and conf.store.backend == "redis" and "redis") or "memory"
  local poll = cfg.poll or 0.1
  if type(poll) ~= "number" or poll < 0.001 then error("wxd.queue: poll must be seconds >= 0.001", 2) end
  local impl
  if backend == "memory" then
    local path = cfg.path
    if path == nil then path = wxd.app_dir and "queue.journal" or false end
    if path ~= false and type(path) ~= "string" then error("wxd.queue: path must be a path or false", 2) end
    local st, err = require("wxd.core.queue").open(path and resolve_path(path) or nil, cfg.compact_bytes)
    if not st then error("wxd.queue: " .. err, 2) end
    impl = setmetatable({ st = st }, Memory)
  elseif backend == "redis" then
    local url = cfg.redis or conf.redis
    if url == nil then error('wxd.queue: backend "redis" needs redis = "redis://..." in config.lua', 2) end
    local prefix = cfg.prefix or "wxd:"
    if type(prefix) ~= "string" then error("wxd.queue: prefix must be a string", 2) end
    impl = setmetatable({ r = require("wxd.redis").new(url), prefix = prefix }, Redis)
  else
    error('wxd.queue: unknown backend "' .. tostring(backend) .. '" (expected "memory" or "redis")', 2)
  end
  return setmetatable({ impl = impl, backend = backend, poll = poll }, Queues)
end

local default

local function the_queues()
  if default then return default end
  local wxd = require "wxd"
  local cfg = type(wxd.config) == "table" and wxd.config.queue or nil
  if cfg ~= nil and type(cfg) ~= "table" then error("wxd.queue: config.queue must be a table", 3) end
  default = _M.new(cfg)
  return default
end

for _, name in ipairs({ "push", "consume", "dead", "stats" }) do
  local method = Queues[name]
  _M[name] = function(...) return method(the_queues(), ...) end
end

return _M
