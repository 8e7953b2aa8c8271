--- wxd.otlp: sends the spans wxd.trace queues (one per sampled request, one
-- per outbound wxd.http call) to an OpenTelemetry collector as OTLP/HTTP
-- JSON, in batches, from a timer of each worker.
--
-- Requests never wait for it: a span is a table appended to this worker's
-- queue; the queue is bounded (`queue`, 2048 spans), and a span that does
-- not fit, or a batch the collector refused or did not take in time, is
-- dropped and counted in wxd_trace_spans_dropped_total. At most one export
-- per worker is in flight, so a slow collector costs one waiting
-- coroutine, not one per batch.
--
-- Config: `trace.otlp = { url = "http://collector:4318/v1/traces",
--   sample = 1.0, batch = 256, queue = 2048, interval_ms = 1000,
--   timeout_ms = 2000, service_name = "wxd", headers = { ... } }`.
-- `sample` applies to new traces; a caller's traceparent decides for its
-- own (its sampled flag).
--
-- @module wxd.otlp

local wxd = require "wxd"
local json = require "wxd.json"
local timer = require "wxd.timer"
local http = require "wxd.http"
local log = require "wxd.log"
local trace = require "wxd.trace"
local metrics = require "wxd.metrics"

local type, pairs, tostring, tonumber, format, floor, pcall =
  type, pairs, tostring, tonumber, string.format, math.floor, pcall

local _M = {}

local function attr(k, v)
  local t = type(v)
  if t == "number" and v == floor(v) then return { key = k, value = { intValue = format("%d", v) } } end
  if t == "number" then return { key = k, value = { doubleValue = v } } end
  if t == "boolean" then return { key = k, value = { boolValue = v } } end
  return { key = k, value = { stringValue = tostring(v) } }
end

local function nanos(s) return format("%.0f", s * 1e9) end

--- The OTLP/HTTP JSON body for a list of spans (as wxd.trace records them).
function _M.encode(spans, service_name)
  local out = {}
  for i = 1, #spans do
    local s = spans[i]
    local attrs = {}
    for k, v in pairs(s.attrs or {}) do attrs[#attrs + 1] = attr(k, v) end
    out[i] = {
      traceId = s.trace_id, spanId = s.span_id, parentSpanId = s.parent_id or "",
      name = s.name, kind = s.kind, startTimeUnixNano = nanos(s.start_s), endTimeUnixNano = nanos(s.end_s),
      attributes = attrs, status = { code = s.error and 2 or 0 },
    }
  end
  return json.encode({ resourceSpans = { {
    resource = { attributes = { attr("service.name", service_name or "wxd"),
      attr("service.instance.id", tostring(wxd.worker_id())) } },
    scopeSpans = { { scope = { name = "wxd", version = wxd.version }, spans = out } },
  } } })
end

local exported_metric

--- Exports what is queued, one batch at a time (at most one in flight).
local busy = false
function _M.flush(cfg)
  if busy then return end
  busy = true
  local ok, err = pcall(function()
    local batch_size = tonumber(cfg.batch) or 256
    while true do
      local spans = trace.take(batch_size)
      if not spans then break end
      local headers = { ["Content-Type"] = "application/json" }
      if type(cfg.headers) == "table" then
        for k, v in pairs(cfg.headers) do headers[k] = v end
      end
      local res, kind = http.request({ method = "POST", url = cfg.url, body = _M.encode(spans, cfg.service_name),
        headers = headers, timeout = (tonumber(cfg.timeout_ms) or 2000) / 1000, trace = false })
      if not res or res.status >= 300 then
        trace.count_dropped(#spans)
        log.debug("otlp: export failed", { error = res and ("status " .. res.status) or kind, spans = #spans })
        break
      end
      exported_metric = exported_metric or metrics.builtin("counter", "wxd_trace_spans_exported_total",
        "Spans the collector accepted")
      exported_metric:inc(#spans)
    end
  end)
  busy = false
  if not ok then log.error("otlp: export failed", { error = tostring(err) }) end
end

--- Starts this worker's exporter when config.lua sets trace.otlp.url
-- (called by the server when the app loads).
function _M.start()
  if not trace.exporting() then return false end
  local cfg = wxd.config.trace.otlp
  timer.every(tonumber(cfg.interval_ms) or 1000, function() _M.flush(cfg) end)
  return true
end

return _M
