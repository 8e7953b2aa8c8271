--- wxd.metrics: Prometheus counters, gauges and histograms for apps (and
-- for the library's own metrics), shared by every worker and shown by GET
-- /metrics on the admin listener.
--
-- Values live in C (core/metrics.c), one array per worker: an increment is
-- a cached table lookup and a store into this worker's array, no lock. A
-- scrape sums the workers. Declaring the same name again (another worker,
-- a reload) returns the same metric; a different type, labels or buckets
-- raise. Each metric accepts at most `max_series` label sets (default 1000):
-- one more raises "...: more than N label sets (cardinality limit)", so a
-- label fed from request data cannot grow memory without bound.
--
-- @module wxd.metrics
-- @usage
-- local metrics = require "wxd.metrics"
-- local orders = metrics.counter("shop_orders_total", "Orders placed", { "channel" })
-- orders:inc(1, { channel = "mp" })          -- or orders:inc(1, { "mp" })
-- local queue = metrics.gauge("shop_queue_depth", "Jobs waiting")
-- queue:set(12)
-- local lat = metrics.histogram("shop_pay_seconds", "Pay call time", { "api" },
--   { buckets = { 0.05, 0.1, 0.5, 1, 5 } })
-- lat:observe(0.23, { api = "jsapi" })

local core = require "wxd.core.metrics"

local type, error, tostring, concat, setmetatable, pcall = type, error, tostring, table.concat, setmetatable, pcall
local unpack = unpack or table.unpack -- luacheck: ignore
local c_family, c_series, c_add, c_observe, c_set, c_add_shared, c_value =
  core.family, core.series, core.add, core.observe, core.set, core.add_shared, core.value

local _M = {}

--- false when config.lua says `metrics = false`: GET /metrics is off, the
-- core counts no requests and the library's own metrics (count, observe,
-- set_value below) count nothing. App metrics still work (m:value()), but
-- nothing shows them.
_M.enabled = core.enabled ~= false

_M.DEFAULT_BUCKETS = { 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10 }

local Metric = {}
Metric.__index = Metric

-- The label values in label order, from a list or a name → value map.
local function values_of(self, labels)
  local names, n = self.labels, #self.labels
  if n == 0 then return nil end
  if type(labels) ~= "table" then
    error("wxd.metrics: " .. self.name .. ": labels { " .. concat(names, ", ") .. " } are required", 4)
  end
  local out = {}
  for i = 1, n do
    local v = labels[i]
    if v == nil then v = labels[names[i]] end
    if v == nil then error("wxd.metrics: " .. self.name .. ": label " .. names[i] .. " is missing", 4) end
    out[i] = tostring(v)
  end
  return out
end

-- The series' first slot, from this VM's cache or the registry.
local function slot_of(self, labels)
  local n = #self.labels
  if n == 0 then return self.slot end
  local key
  if n == 1 and type(labels) == "table" then
    local v = labels[1]
    if v == nil then v = labels[self.labels[1]] end
    key = v ~= nil and tostring(v) or nil
  end
  local vals
  if not key then
    vals = values_of(self, labels)
    key = concat(vals, "\0")
  end
  local slot = self.cache[key]
  if slot then return slot end
  vals = vals or values_of(self, labels)
  local s, err = c_series(self.id, unpack(vals, 1, n))
  if not s then error("wxd.metrics: " .. err, 3) end
  self.cache[key] = s
  return s
end

--- Counter: adds `n` (default 1, never negative).
function Metric:inc(n, labels)
  if type(n) == "table" then n, labels = 1, n end
  n = n or 1
  if self.kind == "counter" then
    if type(n) ~= "number" or n < 0 then error("wxd.metrics: " .. self.name .. ": a counter only goes up", 2) end
    c_add(slot_of(self, labels), n)
  else
    c_add_shared(slot_of(self, labels), n)
  end
end

--- Gauge: sets the value (one value for the whole process).
function Metric:set(v, labels)
  if self.kind ~= "gauge" then error("wxd.metrics: " .. self.name .. ": set() is for gauges", 2) end
  if type(v) ~= "number" then error("wxd.metrics: " .. self.name .. ": value must be a number", 2) end
  c_set(slot_of(self, labels), v)
end

--- Gauge: subtracts `n` (default 1).
function Metric:dec(n, labels)
  if self.kind ~= "gauge" then error("wxd.metrics: " .. self.name .. ": dec() is for gauges", 2) end
  if type(n) == "table" then n, labels = 1, n end
  c_add_shared(slot_of(self, labels), -(n or 1))
end

--- Histogram: records one observation.
function Metric:observe(v, labels)
  if self.kind ~= "histogram" then error("wxd.metrics: " .. self.name .. ": observe() is for histograms", 2) end
  if type(v) ~= "number" then error("wxd.metrics: " .. self.name .. ": value must be a number", 2) end
  c_observe(self.id, slot_of(self, labels), v)
end

--- The current value summed over the workers (counters and gauges; for
-- histograms the sum of observations is not returned: use /metrics).
function Metric:value(labels)
  return c_value(slot_of(self, labels))
end

local function declare(kind, name, help, labels, opts, level)
  if type(name) ~= "string" then error("wxd.metrics: the name must be a string", level) end
  if help ~= nil and type(help) ~= "string" then error("wxd.metrics: " .. name .. ": help must be a string", level) end
  if labels ~= nil and type(labels) ~= "table" then
    error("wxd.metrics: " .. name .. ": labels must be a list of names", level)
  end
  if opts ~= nil and type(opts) ~= "table" then error("wxd.metrics: " .. name .. ": options must be a table", level) end
  labels = labels or {}
  opts = opts or {}
  local buckets = kind == "histogram" and (opts.buckets or _M.DEFAULT_BUCKETS) or nil
  local id = c_family(name, help or "", kind, labels, buckets, opts.max_series)
  local m = setmetatable({ id = id, name = name, kind = kind, labels = labels, cache = {} }, Metric)
  if #labels == 0 then m.slot = c_series(id) end
  return m
end

--- Declares (or finds) a counter.
-- @tparam string name e.g. "shop_orders_total"
-- @tparam[opt] string help
-- @tparam[opt] {string,...} labels label names
-- @tparam[opt] table opts `max_series` (1000)
function _M.counter(name, help, labels, opts) return declare("counter", name, help, labels, opts, 3) end

--- Declares (or finds) a gauge.
function _M.gauge(name, help, labels, opts) return declare("gauge", name, help, labels, opts, 3) end

--- Declares (or finds) a histogram; `opts.buckets` are the upper bounds
-- (default: DEFAULT_BUCKETS, in seconds).
function _M.histogram(name, help, labels, opts) return declare("histogram", name, help, labels, opts, 3) end

--- The whole exposition text, as GET /metrics shows the registry part.
function _M.render() return core.render() end

-- Library metrics, declared on first use by the modules that count them.
-- A label fed from data (a host, an API path) falls back to "other" once
-- its metric is full, instead of raising inside the library.
local builtin = {}

--- For the library's modules: a metric declared once per VM.
function _M.builtin(kind, name, help, labels, opts)
  local m = builtin[name]
  if not m then
    m = declare(kind, name, help, labels, opts, 3)
    m.lenient = true
    builtin[name] = m
    -- The catch-all label set exists from the start, so it always has room.
    if m.labels[1] then
      local other = {}
      for i = 1, #m.labels do other[i] = "other" end
      slot_of(m, other)
    end
  end
  return m
end

--- For the library's modules: like inc/observe, but a full metric counts
-- under label value "other" and never raises.
function _M.count(m, labels, n)
  if not _M.enabled then return end
  local ok = pcall(Metric.inc, m, n or 1, labels)
  if not ok and type(labels) == "table" then
    local other = {}
    for i = 1, #m.labels do other[i] = "other" end
    pcall(Metric.inc, m, n or 1, other)
  end
end

--- For the library's hot paths: the series of a library metric's labels,
-- resolved once and kept by the caller, then counted with `add`. The
-- second result is true when the label set did not fit (its metric is
-- full) and the series is the "other" one: a caller keeping series by
-- label values should not keep that one under them. nil when metrics are
-- off.
function _M.series(m, labels)
  if not _M.enabled then return nil end
  local ok, slot = pcall(slot_of, m, labels)
  if ok then return slot, false end
  local other = {}
  for i = 1, #m.labels do other[i] = "other" end
  return slot_of(m, other), true
end

--- Adds `n` (default 1) to a counter's series from `series`.
function _M.add(slot, n)
  if slot then c_add(slot, n or 1) end
end

--- For collectors (a timer copying numbers kept elsewhere, e.g. wxd.order's
-- stats): sets a library metric's value for the whole process, counters
-- included (the source counts; this only shows it).
function _M.set_value(m, v, labels)
  if not _M.enabled then return end
  local ok, slot = pcall(slot_of, m, labels)
  if ok then c_set(slot, v) end
end

function _M.observe(m, v, labels)
  if not _M.enabled then return end
  local ok = pcall(Metric.observe, m, v, labels)
  if not ok and type(labels) == "table" then
    local other = {}
    for i = 1, #m.labels do other[i] = "other" end
    pcall(Metric.observe, m, v, other)
  end
end

return _M
