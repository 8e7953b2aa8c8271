-- Observability switched off in config.lua: `metrics = false` answers GET
-- /metrics with a 404 that says why; `trace = false` makes no trace context
-- (no ids in the handler, log lines or the access line) and generates no
-- traceparent on outbound calls, passing on only what the caller sent. On
-- (the default) is what 23-metrics_spec and 24-trace_spec show; the same
-- app here shows the two side by side.
local H = require "helpers"
local cjson = require "cjson"
local socket = require "socket"

local APP = H.app("obs")
local TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

local function admin_get(port, path)
  local c = assert(socket.connect("127.0.0.1", port))
  c:send("GET " .. path .. " HTTP/1.1\r\nHost: x\r\n\r\n")
  local out = H.read_all(c, 5)
  c:close()
  return H.parse_responses(out)[1]
end

local function hex(s, n) return type(s) == "string" and #s == n and s:match("^[0-9a-f]+$") ~= nil end

-- The JSON lines of srv's log with `text` whose field `k` is `v`.
local function lines_with(srv, text, k, v)
  local out = {}
  for _, l in ipairs(srv:log_lines(text)) do
    local ok, line = pcall(cjson.decode, l)
    if ok and line[k] == v then out[#out + 1] = line end
  end
  return out
end

describe("metrics = false, trace = false", function()
  local up, on, off, on_admin, off_admin

  setup(function()
    up = H.start(APP, { workers = 1 })
    on_admin, off_admin = H.free_port(), H.free_port()
    on = H.start(APP, { workers = 2, args = "--admin 127.0.0.1:" .. on_admin })
    off = H.start(APP, { workers = 2, args = "--admin 127.0.0.1:" .. off_admin,
      env = "OBS_METRICS=off OBS_TRACE=off" })
  end)

  teardown(function()
    for _, s in ipairs({ up, on, off }) do
      if s then
        s:stop()
        s:cleanup()
      end
    end
  end)

  it("answers GET /metrics with a 404 saying metrics are off (on: the exposition)", function()
    assert.equal(200, off:get("/hello").status)
    local r = admin_get(off_admin, "/metrics")
    assert.equal(404, r.status)
    assert.truthy(r.body:find("metrics are off", 1, true), r.body)
    assert.equal(200, admin_get(off_admin, "/status").status)
    assert.equal(200, on:get("/hello").status)
    r = admin_get(on_admin, "/metrics")
    assert.equal(200, r.status)
    assert.truthy(r.body:find('wxd_http_requests_total{route="/hello",method="GET",status="2xx"}', 1, true))
  end)

  it("counts requests in their handler (on)", function()
    local function in_flight()
      return tonumber(admin_get(on_admin, "/metrics").body:match("\nwxd_http_requests_in_flight (%d+)"))
    end
    local c = on:connect()
    c:send("GET /wait?ms=1000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    H.wait_until(function() return in_flight() == 1 end, 5, "one request in flight")
    assert.truthy(H.read_all(c, 10):find("waited", 1, true))
    c:close()
    H.wait_until(function() return in_flight() == 0 end, 5, "none in flight")
  end)

  it("makes no trace context: none in the handler, on log lines or the access line", function()
    local r = off:get("/has-trace", { traceparent = TP, ["X-Request-Id"] = "off-req-1" })
    assert.equal(200, r.status)
    assert.same({ trace = false, current = false }, cjson.decode(r.body))
    -- The response still names a request id: the core's own.
    local rid = r.headers["x-request-id"]
    assert.is_true(hex(rid, 18), rid)
    local handler, access
    H.wait_until(function()
      handler = lines_with(off, '"msg":"has trace"', "msg", "has trace")[1]
      access = lines_with(off, '"msg":"access"', "id", rid)[1]
      return handler and access
    end, 5, "the handler's and the access log line")
    assert.is_nil(handler.trace_id)
    assert.is_nil(handler.span_id)
    assert.is_nil(access.trace_id)
    assert.is_nil(access.span_id)
    -- On: the same request has a context.
    r = on:get("/has-trace", { traceparent = TP })
    assert.same({ trace = true, current = true }, cjson.decode(r.body))
  end)

  it("generates no traceparent on outbound calls; passes on the caller's unchanged", function()
    local url = "http://127.0.0.1:" .. up.port .. "/echo"
    local got = cjson.decode(cjson.decode(off:get("/call?url=" .. url).body).upstream)
    assert.is_false(got.traceparent)
    assert.is_false(got.tracestate)
    assert.is_false(got.request_id)
    got = cjson.decode(cjson.decode(off:get("/call?url=" .. url, { traceparent = TP, tracestate = "k=v",
      ["X-Request-Id"] = "outer-off", ["X-OpenID"] = "oABCD1234efgh5678" }).body).upstream)
    assert.equal(TP, got.traceparent)
    assert.equal("k=v", got.tracestate)
    assert.equal("outer-off", got.request_id)
    assert.is_false(got.openid) -- openid propagation is part of the trace context
    -- A malformed traceparent is not passed on (nor its tracestate).
    got = cjson.decode(cjson.decode(off:get("/call?url=" .. url,
      { traceparent = "ff-" .. TP:sub(4), tracestate = "k=v" }).body).upstream)
    assert.is_false(got.traceparent)
    assert.is_false(got.tracestate)
    -- On: a traceparent of wxd's own, a new trace.
    got = cjson.decode(cjson.decode(on:get("/call?url=" .. url).body).upstream)
    assert.truthy(got.traceparent:match("^00%-%x+%-%x+%-0[01]$"), got.traceparent)
    assert.is_true(hex(got.request_id, 18))
  end)
end)

describe("config: metrics and trace switches", function()
  local config = require "wxd.config"

  it("take booleans (metrics) and false (trace)", function()
    local cfg = assert(config.validate({ metrics = false, trace = false }))
    assert.is_false(cfg.metrics)
    assert.is_false(cfg.trace)
    assert.is_true(assert(config.validate({})).metrics)
    local _, err = config.validate({ metrics = "no" })
    assert.truthy(err:find("config.metrics: expected true or false", 1, true), err)
    _, err = config.validate({ trace = true })
    assert.truthy(err:find("config.trace: expected a table", 1, true), err)
  end)

  it("need a restart: a reload that changes them says so", function()
    local dir = H.tmpdir()
    os.execute("cp " .. APP .. "/app.lua " .. APP .. "/config.lua " .. dir .. "/")
    local admin = H.free_port()
    local srv = H.start(dir, { args = "--admin 127.0.0.1:" .. admin })
    finally(function()
      srv:stop()
      srv:cleanup()
      os.execute("rm -rf " .. dir)
    end)
    local cfg = H.read_file(dir .. "/config.lua")
    H.write_file(dir .. "/config.lua", (cfg:gsub('metrics = os.getenv%("OBS_METRICS"%) ~= "off"', "metrics = false")))
    srv:signal("HUP")
    H.wait_until(function() return #srv:log_lines('"restart_needed":["metrics"]') > 0 end, 10,
      "a reload that names metrics as needing a restart")
    -- Still on until the restart.
    assert.equal(200, admin_get(admin, "/metrics").status)
  end)
end)

-- The exporter decides in C (wxd.core.http.span_context) whether a
-- request's span is sampled; req.trace.sampled (wxd.trace, Lua) must say the
-- same for every request, or a trace would lose spans between the two.
describe("OTLP sampling", function()
  it("exports exactly the spans req.trace calls sampled", function()
    local collector = H.start(APP, { workers = 1 })
    local srv = H.start(APP, { workers = 1,
      env = "OBS_OTLP_SAMPLE=0.5 OBS_OTLP_URL=http://127.0.0.1:" .. collector.port .. "/v1/traces" })
    finally(function()
      for _, s in ipairs({ srv, collector }) do
        s:stop()
        s:cleanup()
      end
    end)
    local want, n = {}, 0
    for i = 1, 40 do
      -- A third come with a caller's traceparent: its flag decides.
      local h = i % 3 == 0 and { traceparent = string.format("00-%032x-00f067aa0ba902b7-0%d", i, i % 2) } or nil
      local c = cjson.decode(srv:get("/ctx", h).body)
      if c.traceparent:sub(-2) == "01" then
        want[c.span_id] = true
        n = n + 1
      end
    end
    assert.is_true(n > 5 and n < 35, "a sample of 0.5 sampled " .. n .. " of 40")
    -- A sentinel the caller marked sampled: once it arrived, so did every
    -- span queued before it (one worker: one queue, sent in order).
    local last = cjson.decode(srv:get("/ctx",
      { traceparent = "00-" .. string.rep("ab", 16) .. "-00f067aa0ba902b7-01" }).body).span_id
    local got
    H.wait_until(function()
      got = {}
      local r = collector:get("/collected")
      for _, b in ipairs(cjson.decode(r.body).batches) do
        for _, rs in ipairs(cjson.decode(b).resourceSpans) do
          for _, ss in ipairs(rs.scopeSpans) do
            for _, s in ipairs(ss.spans) do got[s.spanId] = true end
          end
        end
      end
      return got[last]
    end, 10, "the sentinel span at the collector")
    got[last] = nil
    assert.same(want, got)
  end)

  -- A request nothing asked about: the exporter decides on the drawn ids
  -- before writing them out; the access line writes them later. Both must
  -- be the same trace, and the decision the rule's on that trace id.
  it("decides on a new trace's ids the way the ids later show", function()
    local collector = H.start(APP, { workers = 1 })
    local srv = H.start(APP, { workers = 1,
      env = "OBS_OTLP_SAMPLE=0.5 OBS_OTLP_URL=http://127.0.0.1:" .. collector.port .. "/v1/traces" })
    finally(function()
      for _, s in ipairs({ srv, collector }) do
        s:stop()
        s:cleanup()
      end
    end)
    local ids = {}
    for i = 1, 40 do
      local r = srv:get("/hello", { ["X-Request-Id"] = "drawn-" .. i })
      assert.equal(200, r.status)
    end
    local last = cjson.decode(srv:get("/ctx",
      { traceparent = "00-" .. string.rep("cd", 16) .. "-00f067aa0ba902b7-01" }).body).span_id
    H.wait_until(function()
      for _, l in ipairs(srv:log_lines('"msg":"access"')) do
        local v = cjson.decode(l)
        if v.request_id and v.request_id:match("^drawn%-") then ids[v.request_id] = v.trace_id end
      end
      local n = 0
      for _ in pairs(ids) do n = n + 1 end
      return n == 40
    end, 10, "40 access lines with trace ids")
    local want, n = {}, 0
    for _, tid in pairs(ids) do
      if tonumber(tid:sub(17, 24), 16) / 4294967296 < 0.5 then
        want[tid] = true
        n = n + 1
      end
    end
    assert.is_true(n > 5 and n < 35, "a sample of 0.5 sampled " .. n .. " of 40")
    local got, seen_last
    H.wait_until(function()
      got, seen_last = {}, false
      local r = collector:get("/collected")
      for _, b in ipairs(cjson.decode(r.body).batches) do
        for _, rs in ipairs(cjson.decode(b).resourceSpans) do
          for _, ss in ipairs(rs.scopeSpans) do
            for _, sp in ipairs(ss.spans) do
              if sp.spanId == last then seen_last = true
              elseif sp.name == "GET /hello" then got[sp.traceId] = true end
            end
          end
        end
      end
      return seen_last
    end, 10, "the sentinel span at the collector")
    assert.same(want, got)
  end)
end)
