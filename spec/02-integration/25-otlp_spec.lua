-- OTLP/HTTP JSON export to a fake collector (a wxd app that keeps what it
-- receives): server and client spans arrive with the right parent links;
-- with the collector down or slow, requests still succeed and the spans
-- that could not be sent are counted as dropped in /metrics.
local H = require "helpers"
local cjson = require "cjson"
local socket = require "socket"

local APP = H.app("obs")
local TID = "4bf92f3577b34da6a3ce929d0e0e4736"
local PID = "00f067aa0ba902b7"

local function metric(admin, name)
  local c = assert(socket.connect("127.0.0.1", admin))
  c:send("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
  local body = H.parse_responses((H.read_all(c, 5)))[1].body
  c:close()
  return tonumber(body:match("\n" .. name .. " ([%d.e+]+)")) or 0
end

-- Every span the collector received so far, by span id.
local function collected(collector)
  local r = collector:get("/collected")
  local spans = {}
  for _, b in ipairs(cjson.decode(r.body).batches) do
    for _, rs in ipairs(cjson.decode(b).resourceSpans) do
      for _, ss in ipairs(rs.scopeSpans) do
        for _, s in ipairs(ss.spans) do spans[s.spanId] = s end
      end
    end
  end
  return spans
end

describe("OTLP export", function()
  local servers = {}
  local function start(opts)
    local s = H.start(APP, opts)
    servers[#servers + 1] = s
    return s
  end

  teardown(function()
    for _, s in ipairs(servers) do
      s:stop()
      s:cleanup()
    end
  end)

  it("sends server and client spans with their parent links", function()
    local collector = start({ workers = 1 })
    local srv = start({ workers = 2,
      env = "OBS_OTLP_URL=http://127.0.0.1:" .. collector.port .. "/v1/traces" })
    local r = srv:get("/call?url=http://127.0.0.1:" .. collector.port .. "/echo",
      { traceparent = "00-" .. TID .. "-" .. PID .. "-01" })
    assert.equal(200, r.status)
    local body = cjson.decode(r.body)
    local echoed = cjson.decode(body.upstream)
    local server_span, client_span
    H.wait_until(function()
      local spans = collected(collector)
      server_span = spans[body.span_id]
      client_span = nil
      for _, s in pairs(spans) do
        if s.traceId == TID and s.kind == 3 then client_span = s end
      end
      return server_span and client_span
    end, 10, "both spans at the collector")
    assert.equal(TID, server_span.traceId)
    assert.equal(PID, server_span.parentSpanId)
    assert.equal(2, server_span.kind)
    assert.equal("GET /call", server_span.name)
    assert.equal(body.span_id, client_span.parentSpanId)
    -- The callee saw the client span as its parent.
    assert.equal("00-" .. TID .. "-" .. client_span.spanId .. "-01", echoed.traceparent)
    assert.is_true(tonumber(server_span.endTimeUnixNano) >= tonumber(server_span.startTimeUnixNano))
    assert.is_true(tonumber(client_span.startTimeUnixNano) >= tonumber(server_span.startTimeUnixNano))
  end)

  it("keeps serving with the collector down, and counts the spans it drops", function()
    local admin = H.free_port()
    local srv = start({ workers = 2, args = "--admin 127.0.0.1:" .. admin,
      env = "OBS_OTLP_URL=http://127.0.0.1:" .. H.free_port() .. "/v1/traces OBS_OTLP_QUEUE=5" })
    for i = 1, 40 do assert.equal(200, srv:get("/items/" .. i).status) end
    H.wait_until(function() return metric(admin, "wxd_trace_spans_dropped_total") >= 40 end, 10,
      "every span counted as dropped")
    assert.equal(0, metric(admin, "wxd_trace_spans_exported_total"))
  end)

  it("keeps serving with a slow collector: a bounded queue, drops counted", function()
    local slow = start({ workers = 1, env = "OBS_COLLECTOR_DELAY_MS=3000" })
    local admin = H.free_port()
    local srv = start({ workers = 1, args = "--admin 127.0.0.1:" .. admin,
      env = "OBS_OTLP_URL=http://127.0.0.1:" .. slow.port .. "/v1/traces OBS_OTLP_QUEUE=5 OBS_OTLP_TIMEOUT_MS=10000" })
    -- Each export is held 3 s while requests go on: more than 5 spans in
    -- that time are dropped, and every request is still answered.
    local sent = 0
    H.wait_until(function()
      for _ = 1, 10 do
        sent = sent + 1
        assert.equal(200, srv:get("/items/" .. sent).status)
      end
      return metric(admin, "wxd_trace_spans_dropped_total") >= 1
    end, 30, "drops counted")
    assert.is_true(sent <= 300)
  end)
end)
