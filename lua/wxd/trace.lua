--- wxd.trace: the trace context of the running request, its propagation to
-- outbound calls, and the spans the OTLP exporter (wxd.otlp) sends.
--
-- The core gives every request a W3C trace context (core/trace.c): the
-- caller's trace id from a valid `traceparent` (or a new one), a new span
-- id, and a request id (a sane `X-Request-Id`, or the core's own). This
-- module reads it for the running request's coroutine: log lines carry the
-- ids, wxd.http sends `traceparent`, `tracestate` and `X-Request-Id` on, and
-- the openid of the request (the `trace.openid_header` header, default
-- X-OpenID, or the one an Official Account message carries) is forwarded only
-- to hosts listed in `trace.forward_openid_to`.
--
-- `trace = false` in config.lua turns all of this off: the core makes no
-- ids (current() is nil, log lines carry none, no spans), and outbound
-- calls only pass on a traceparent, tracestate and X-Request-Id the caller
-- sent.
--
-- Config (section `trace`, all optional):
--   openid_header = "X-OpenID"   -- false: never read an openid from headers
--   forward_openid_to = { "api.internal", "*.svc.cluster.local" }
--   otlp = { url = "http://collector:4318/v1/traces", sample = 1.0, ... } (see wxd.otlp)
--
-- @module wxd.trace

local wxd = require "wxd"
local core_http = require "wxd.core.http"
local metrics = require "wxd.metrics"

local type, tonumber, tostring, sub, lower = type, tonumber, tostring, string.sub, string.lower
local now = wxd.now
local trace_context, set_openid, new_span_id, incoming_trace, span_context, gray_of = core_http.trace_context,
  core_http.set_openid, core_http.new_span_id, core_http.incoming_trace, core_http.span_context, core_http.gray

local _M = {}

_M.new_span_id = new_span_id
_M.new_trace_id = core_http.new_trace_id
--- Parses a traceparent value: trace_id, parent_id, flags, or nil when it
-- is invalid under the W3C rules.
_M.parse_traceparent = core_http.parse_traceparent

local function section()
  local cfg = wxd.config
  return cfg and type(cfg.trace) == "table" and cfg.trace or nil
end

-- The request header the openid comes from, lower case (nil: none).
local header_cache_src, header_cache = nil, "x-openid"
local function openid_header()
  local t = section()
  local h = t and t.openid_header
  if h == nil then return "x-openid" end
  if h == false then return nil end
  if h ~= header_cache_src then header_cache_src, header_cache = h, lower(tostring(h)) end
  return header_cache
end

--- The request header the openid is read from (lower case), or nil when
-- trace.openid_header is false.
_M.openid_header = openid_header

--- The sampling decision for a context: the caller's when it sent one
-- (its sampled flag), else the configured ratio applied to the trace id
-- (the same decision on every node for one trace).
local function sampled(trace_id, parent_id, flags)
  if parent_id then return flags % 2 == 1 end
  local t = section()
  local rate = t and type(t.otlp) == "table" and tonumber(t.otlp.sample or 1) or 0
  if rate <= 0 then return false end
  if rate >= 1 then return true end
  return tonumber(sub(trace_id, 17, 24), 16) / 4294967296 < rate
end

--- The running request's trace context, or nil outside a request handler:
-- { trace_id, span_id, parent_id (nil for a new trace), sampled,
--   traceparent (as sent on outbound calls), tracestate, request_id, openid,
--   gray (the request's colour, see wxd.gray) }.
-- A new table per call; `req.trace` caches one per request.
function _M.current()
  local tid, sid, pid, flags, rid, tstate, openid = trace_context(openid_header())
  if not tid then return nil end
  local s = sampled(tid, pid, flags)
  return {
    trace_id = tid, span_id = sid, parent_id = pid, sampled = s,
    traceparent = "00-" .. tid .. "-" .. sid .. (s and "-01" or "-00"),
    tracestate = tstate, request_id = rid, openid = openid, gray = gray_of(),
  }
end

--- The ids for a log line: trace_id, span_id, request_id, openid (nil
-- outside a request).
function _M.ids()
  local tid, sid, _, _, rid, _, openid = trace_context(openid_header())
  return tid, sid, rid, openid
end

--- Records the openid of the running request (an Official Account
-- message's sender): logged masked, forwarded to allowed hosts. Returns
-- false outside a request or for a value that is not an identifier.
function _M.set_openid(openid)
  if type(openid) ~= "string" then return false end
  return set_openid(openid)
end

-- Whether `host` is on the openid allow-list: exact names, or "*.suffix".
local function openid_allowed(host)
  local t = section()
  local list = t and t.forward_openid_to
  if type(list) ~= "table" then return false end
  host = lower(host)
  for i = 1, #list do
    local h = lower(tostring(list[i]))
    if h == host then return true end
    if sub(h, 1, 2) == "*." and #host > #h - 1 and sub(host, -(#h - 1)) == sub(h, 2) then return true end
  end
  return false
end
_M.openid_allowed = openid_allowed

--- For wxd.http: the headers an outbound call to `host` carries, or nil
-- outside a request. `span_id` is the client span's id when the call is
-- recorded as a span of its own (the callee's parent), else the request's.
-- @treturn ?table ctx the request's context (as current())
-- @treturn ?table headers name → value
function _M.outbound(host, span_id)
  local ctx = _M.current()
  if not ctx then
    -- trace = false: what the caller sent passes on unchanged (a hop that
    -- does not trace keeps its caller's trace whole); of our own only the
    -- gray colour, which routes the next service (docs/gray.md).
    local tp, tstate, rid = incoming_trace()
    local gray = gray_of()
    if not (tp or rid or gray) then return nil end
    return { gray = gray }, { traceparent = tp, tracestate = tstate, ["x-request-id"] = rid, ["x-wxd-gray"] = gray }
  end
  local h = {
    traceparent = "00-" .. ctx.trace_id .. "-" .. (span_id or ctx.span_id) .. (ctx.sampled and "-01" or "-00"),
    ["x-request-id"] = ctx.request_id,
  }
  if ctx.tracestate then h.tracestate = ctx.tracestate end
  -- The gray colour goes everywhere (it is no secret); wxd.http adds it
  -- to the baggage header as well.
  if ctx.gray then h["x-wxd-gray"] = ctx.gray end
  if ctx.openid and openid_allowed(host) then
    local t = section()
    h[(t and type(t.openid_header) == "string") and lower(t.openid_header) or "x-openid"] = ctx.openid
  end
  return ctx, h
end

------------------------------------------------------------------------
-- Spans for the exporter (wxd.otlp drains the queue from a timer).
------------------------------------------------------------------------

local queue, qn = {}, 0
local QUEUE_MAX_DEFAULT = 2048
local dropped = 0

--- Whether spans are being exported at all (an OTLP url is configured).
function _M.exporting()
  local t = section()
  return t ~= nil and type(t.otlp) == "table" and type(t.otlp.url) == "string"
end

local drop_metric
local function count_drop(n)
  dropped = dropped + n
  drop_metric = drop_metric or metrics.builtin("counter", "wxd_trace_spans_dropped_total",
    "Spans not exported because the queue was full (collector slow or down) or the export failed")
  drop_metric:inc(n)
end

local function queue_max()
  local t = section()
  return t and t.otlp and tonumber(t.otlp.queue) or QUEUE_MAX_DEFAULT
end

--- Whether a span would be queued now; when not, it is counted as dropped
-- (callers then skip building it).
function _M.room()
  if qn < queue_max() then return true end
  count_drop(1)
  return false
end

--- Queues a finished span (a table as wxd.otlp encodes it). Never waits:
-- past the bound, the span is dropped and counted.
function _M.record(span)
  if qn >= queue_max() then
    count_drop(1)
    return false
  end
  qn = qn + 1
  queue[qn] = span
  return true
end

--- Takes up to n queued spans (oldest first).
function _M.take(n)
  if qn == 0 then return nil end
  local out = {}
  n = n < qn and n or qn
  for i = 1, n do out[i] = queue[i] end
  local rest = {}
  for i = n + 1, qn do rest[#rest + 1] = queue[i] end
  queue, qn = rest, #rest
  return out
end

--- Counts spans lost after they were queued (a failed export).
function _M.count_dropped(n) count_drop(n) end

function _M.queued() return qn end

--- The server's wrapper calls this after a request when exporting: the
-- request's server span, from its first byte to now.
local rate_of, rate = nil, 0 -- the sampling rate, read again when wxd.config changes
function _M.finish_request(raw, status)
  if wxd.config ~= rate_of then
    rate_of = wxd.config
    local t = section()
    rate = t and type(t.otlp) == "table" and tonumber(t.otlp.sample or 1) or 0
  end
  -- sampled(), decided in C: an unsampled request costs no strings and no
  -- clock read.
  local tid, sid, pid, elapsed = span_context(rate)
  if not tid or not _M.room() then return end
  local end_s = now()
  local start_s = end_s - elapsed
  _M.record({
    trace_id = tid, span_id = sid, parent_id = pid, kind = 2, -- SERVER
    name = (raw.method or "") .. " " .. (raw.route or "unmatched"),
    start_s = start_s, end_s = end_s, error = status >= 500,
    attrs = { ["http.request.method"] = raw.method, ["http.route"] = raw.route,
      ["http.response.status_code"] = status, ["url.path"] = raw.path },
  })
end

return _M
