-- Trace context: an incoming W3C traceparent is kept (same trace id, a new
-- span id), a malformed one replaced; X-Request-Id accepted or generated and
-- echoed; outbound wxd.http calls carry the trace id with the calling span
-- as parent and the request id, the openid only to allowed hosts; log lines
-- written during a request carry the ids.
local H = require "helpers"
local cjson = require "cjson"

local APP = H.app("obs")
local TID = "4bf92f3577b34da6a3ce929d0e0e4736"
local PID = "00f067aa0ba902b7"

local function hex(s, n) return type(s) == "string" and #s == n and s:match("^[0-9a-f]+$") ~= nil end

describe("trace context", function()
  local srv, up

  setup(function()
    up = H.start(APP, { workers = 1 })
    srv = H.start(APP, { workers = 2 })
  end)

  teardown(function()
    for _, s in ipairs({ srv, up }) do
      if s then
        s:stop()
        s:cleanup()
      end
    end
  end)

  local function ctx(headers)
    local r = srv:get("/ctx", headers)
    assert.equal(200, r.status)
    return cjson.decode(r.body), r
  end

  it("keeps a valid traceparent's trace id, with a new span whose parent is the caller's", function()
    local c, r = ctx({ traceparent = "00-" .. TID .. "-" .. PID .. "-01", tracestate = "congo=t61rcWkgMzE" })
    assert.equal(TID, c.trace_id)
    assert.equal(PID, c.parent_id)
    assert.is_true(hex(c.span_id, 16))
    assert.not_equal(PID, c.span_id)
    assert.equal("congo=t61rcWkgMzE", c.tracestate)
    assert.equal("00-" .. TID .. "-" .. c.span_id .. "-01", c.traceparent)
    assert.equal(c.request_id, r.headers["x-request-id"])
    -- A later version may append fields: the known ones are read.
    c = ctx({ traceparent = "cc-" .. TID .. "-" .. PID .. "-01-what-the-future-holds" })
    assert.equal(TID, c.trace_id)
    assert.equal(PID, c.parent_id)
  end)

  it("replaces a malformed traceparent by a new trace (and ignores its tracestate)", function()
    local bad = {
      "ff-" .. TID .. "-" .. PID .. "-01",                          -- version ff
      "00-00000000000000000000000000000000-" .. PID .. "-01",       -- all-zero trace id
      "00-" .. TID .. "-0000000000000000-01",                       -- all-zero parent id
      "00-" .. TID:upper() .. "-" .. PID .. "-01",                  -- upper-case hex
      "00-" .. TID:sub(2) .. "-" .. PID .. "-01",                   -- short trace id
      "00-" .. TID .. "-" .. PID .. "-01-extra",                    -- version 00 with more
      "00-" .. TID .. "-" .. PID .. "-1",                           -- short flags
      "00-" .. TID:sub(1, 31) .. "g-" .. PID .. "-01",              -- not hex
      "00_" .. TID .. "_" .. PID .. "_01",                          -- wrong separators
      "0-" .. TID .. "-" .. PID .. "-01",
      "",
    }
    local seen = {}
    for _, tp in ipairs(bad) do
      local c = ctx({ traceparent = tp, tracestate = "a=b" })
      assert.is_true(hex(c.trace_id, 32), tp)
      assert.not_equal(TID, c.trace_id, tp)
      assert.is_false(c.parent_id, tp)
      assert.is_false(c.tracestate, tp)
      assert.is_nil(seen[c.trace_id], "trace ids repeat")
      seen[c.trace_id] = true
    end
    -- Without any traceparent: a new trace too.
    local c = ctx()
    assert.is_true(hex(c.trace_id, 32))
    assert.is_false(c.parent_id)
  end)

  it("accepts a sane X-Request-Id and echoes it; replaces others", function()
    local c, r = ctx({ ["X-Request-Id"] = "req-2026.12:03_abc" })
    assert.equal("req-2026.12:03_abc", c.request_id)
    assert.equal("req-2026.12:03_abc", r.headers["x-request-id"])
    for _, bad in ipairs({ "has space", string.rep("a", 65), "semi;colon", "quote\"" }) do
      c, r = ctx({ ["X-Request-Id"] = bad })
      assert.is_true(hex(c.request_id, 18), bad)
      assert.equal(c.request_id, r.headers["x-request-id"])
    end
    -- Every response carries one, errors included.
    local e = srv:get("/fail")
    assert.equal(500, e.status)
    assert.is_true(hex(e.headers["x-request-id"], 18))
    assert.is_true(hex(srv:get("/nope").headers["x-request-id"], 18))
  end)

  it("sends the trace id, the calling span as parent and the request id on outbound calls", function()
    local url = "http://127.0.0.1:" .. up.port .. "/echo"
    local r = srv:get("/call?url=" .. url, { traceparent = "00-" .. TID .. "-" .. PID .. "-01",
      tracestate = "k=v", ["X-Request-Id"] = "outer-1", ["X-OpenID"] = "oABCD1234efgh5678" })
    assert.equal(200, r.status)
    local body = cjson.decode(r.body)
    local got = cjson.decode(body.upstream)
    assert.equal(TID, body.trace_id)
    assert.equal("00-" .. TID .. "-" .. body.span_id .. "-01", got.traceparent)
    assert.equal("k=v", got.tracestate)
    assert.equal("outer-1", got.request_id)
    -- 127.0.0.1 is on the fixture's forward_openid_to list.
    assert.equal("oABCD1234efgh5678", got.openid)
    -- The upstream's request continues the same trace.
    H.wait_until(function() return #up:log_lines('"request_id":"outer-1"') > 0 end, 5, "the upstream's access line")
    local line = cjson.decode(up:log_lines('"request_id":"outer-1"')[1])
    assert.equal(TID, line.trace_id)

    -- Without an incoming context: a new trace, still propagated.
    r = srv:get("/call?url=" .. url)
    body = cjson.decode(r.body)
    got = cjson.decode(body.upstream)
    assert.equal("00-" .. body.trace_id .. "-" .. body.span_id .. "-00", got.traceparent)
    assert.is_false(got.openid)
  end)

  it("keeps the context in a task that outlives its request", function()
    local r = srv:get("/later?url=http://127.0.0.1:" .. up.port .. "/echo",
      { ["X-Request-Id"] = "later-1", ["X-OpenID"] = "oLATER1234efgh5678" })
    assert.equal(200, r.status)
    local c = cjson.decode(r.body)
    local line, access
    H.wait_until(function()
      for _, l in ipairs(srv:log_lines('"msg":"task after request"')) do
        local v = cjson.decode(l)
        if v.request_id == "later-1" then line = v end
      end
      for _, l in ipairs(up:log_lines('"msg":"access"')) do
        local v = cjson.decode(l)
        if v.request_id == "later-1" then access = v end
      end
      return line and access
    end, 10, "the task's log line and its call at the upstream")
    assert.equal(c.trace_id, line.trace_id)
    assert.equal(c.span_id, line.span_id)
    assert.equal("oLAT****5678", line.openid)
    assert.equal(c.trace_id, access.trace_id)
  end)

  it("takes an openid of the allowed characters only (no NUL byte cutting it short)", function()
    local function set(v)
      local r = srv:get("/set-openid?v=" .. v)
      assert.equal(200, r.status, r.body)
      return cjson.decode(r.body)
    end
    assert.same({ took = true, openid = "oABCD1234efgh5678" }, set("oABCD1234efgh5678"))
    assert.same({ took = false, openid = false }, set("oABCD%00efgh5678"))
    assert.same({ took = false, openid = false }, set("oABCD%20efgh"))
  end)

  it("forwards the openid only to allowed hosts", function()
    local r = srv:get("/call?url=http://localhost:" .. up.port .. "/echo", { ["X-OpenID"] = "oABCD1234efgh5678" })
    local got = cjson.decode(cjson.decode(r.body).upstream)
    assert.is_false(got.openid)
    assert.is_string(got.traceparent)
  end)

  it("writes the ids on log lines of the request, with openid and phone masked", function()
    local c = ctx({ traceparent = "00-" .. TID .. "-" .. PID .. "-01", ["X-OpenID"] = "oABCD1234efgh5678",
      ["X-Request-Id"] = "log-check-1" })
    H.wait_until(function() return #srv:log_lines('"msg":"in handler"') > 0 end, 5, "the handler's log line")
    local line
    for _, l in ipairs(srv:log_lines('"msg":"in handler"')) do
      local v = cjson.decode(l)
      if v.request_id == "log-check-1" then line = v end
    end
    assert.truthy(line)
    assert.equal(TID, line.trace_id)
    assert.equal(c.span_id, line.span_id)
    assert.equal("oABC****5678", line.openid)
    assert.equal("138****5678", line.phone)
    assert.falsy(srv:log_text():find("oABCD1234efgh5678", 1, true))
    -- The access line too (buffered: written on the worker's next tick).
    local access
    H.wait_until(function()
      for _, l in ipairs(srv:log_lines('"msg":"access"')) do
        local v = cjson.decode(l)
        if v.request_id == "log-check-1" then access = v end
      end
      return access
    end, 5, "an access line with the request id")
    assert.equal(c.span_id, access.span_id)
  end)
end)

describe("examples/hello GET /upstream", function()
  it("returns the body of WXD_HELLO_UPSTREAM, fetched under the request's trace", function()
    local up = H.start(APP, { workers = 1 })
    local hello = H.start(H.ROOT .. "/examples/hello",
      { env = "WXD_HELLO_UPSTREAM=http://127.0.0.1:" .. up.port .. "/echo" })
    local r = hello:get("/upstream", { traceparent = "00-" .. TID .. "-" .. PID .. "-01" })
    hello:stop()
    hello:cleanup()
    up:stop()
    up:cleanup()
    assert.equal(200, r.status)
    local got = cjson.decode(r.body)
    assert.truthy(got.traceparent:match("^00%-" .. TID .. "%-%x+%-01$"), got.traceparent)
    assert.equal(r.headers["x-request-id"], got.request_id)
  end)
end)

describe("WXD_LOG_FORMAT=text", function()
  it("writes the same fields for a human, tracebacks on lines of their own", function()
    local dir = H.tmpdir()
    H.write_file(dir .. "/t.lua", [[
local log = require "wxd.log"
log.info("order paid", { openid = "oABCD1234efgh5678", mobile = "13812345678", n = 3 })
log.error("handler error", { error = "boom\nstack traceback:\n\tapp.lua:3: in main chunk" })
]])
    local out = H.sh("WXD_LOG_FORMAT=text " .. H.WXD .. " script " .. dir .. "/t.lua")
    local lines = {}
    for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.truthy(lines[1]:match("^[%d:.]+ INFO  order paid "), out)
    assert.truthy(lines[1]:find("openid=oABC****5678", 1, true), out)
    assert.truthy(lines[1]:find("mobile=138****5678", 1, true), out)
    assert.truthy(lines[1]:find("n=3", 1, true), out)
    assert.truthy(lines[2]:match("ERROR handler error$"), out)
    assert.equal("  error:", lines[3])
    assert.equal("    boom", lines[4])
    assert.equal("    stack traceback:", lines[5])
    assert.equal("    \tapp.lua:3: in main chunk", lines[6])
    os.execute("rm -rf " .. dir)
  end)
end)

describe("wxd.trace.parse_traceparent", function()
  local trace = require "wxd.trace"
  it("follows the W3C rules", function()
    local t, p, f = trace.parse_traceparent("00-" .. TID .. "-" .. PID .. "-09")
    assert.same({ TID, PID, 9 }, { t, p, f })
    assert.is_nil(trace.parse_traceparent("ff-" .. TID .. "-" .. PID .. "-01"))
    assert.is_nil(trace.parse_traceparent("00-" .. TID .. "-" .. PID .. "-0g"))
    assert.is_nil((trace.parse_traceparent("01-" .. TID .. "-" .. PID .. "-01x")))
    assert.truthy(trace.parse_traceparent("01-" .. TID .. "-" .. PID .. "-01-x"))
  end)

  it("has no context outside a request", function()
    assert.is_nil(trace.current())
    assert.is_nil(trace.ids())
    assert.is_false(trace.set_openid("oABCD1234efgh5678"))
    assert.is_true(#trace.new_trace_id() == 32 and #trace.new_span_id() == 16)
  end)
end)
