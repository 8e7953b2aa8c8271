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
local timer = require "wxd.timer"
local http = require "wxd.http"
local log = require "wxd.log"
local trace = require "wxd.trace"
local metrics = require "wxd.metrics"
local core_otlp = require "wxd.core.otlp"

local type, pairs, tostring, tonumber, pcall = type, pairs, tostring, tonumber, pcall

local _M = {}

--- The OTLP/HTTP JSON body for a list of spans (as wxd.trace records them),
-- written in C (core/otlp.c): attribute values that are not strings,
-- numbers or booleans are left out.
function _M.encode(spans, service_name)
  return core_otlp.encode(spans, tostring(service_name or "wxd"), tostring(wxd.worker_id()), tostring(wxd.version or ""))
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
