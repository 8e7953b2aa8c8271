-- wxd.otlp.encode (core/otlp.c): the OTLP/HTTP JSON body of a batch of
-- spans, read back with wxd.json: ids, names, times in nanoseconds as
-- strings, attributes by type, status, escapes and invalid UTF-8.
local otlp = require "wxd.otlp"
local json = require "wxd.json"

local function spans_of(body)
  local t = json.decode(body)
  local rs = t.resourceSpans[1]
  return rs.scopeSpans[1].spans, rs.resource.attributes, rs.scopeSpans[1].scope
end

local function attrs_of(span)
  local out = {}
  for _, a in ipairs(span.attributes) do out[a.key] = a.value end
  return out
end

describe("wxd.otlp.encode", function()
  it("writes spans as OTLP JSON", function()
    local spans, resource, scope = spans_of(otlp.encode({
      { trace_id = string.rep("a", 32), span_id = string.rep("b", 16), kind = 2, name = "GET /orders/:id",
        start_s = 1764800000.5, end_s = 1764800001.25, error = true,
        attrs = { ["http.response.status_code"] = 503, ratio = 0.25, neg = -42, ok = false, yes = true,
                  ["url.path"] = "/a", skipped = {} } },
      { trace_id = string.rep("c", 32), span_id = string.rep("d", 16), parent_id = string.rep("e", 16), kind = 3,
        name = "GET api.example.com", start_s = 1, end_s = 2 },
    }, "shop"))
    assert.same({ stringValue = "shop" }, resource[1].value)
    assert.equal("service.name", resource[1].key)
    assert.equal("wxd", scope.name)
    assert.equal(2, #spans)
    local s = spans[1]
    assert.equal(string.rep("a", 32), s.traceId)
    assert.equal(string.rep("b", 16), s.spanId)
    assert.equal("", s.parentSpanId)
    assert.equal("GET /orders/:id", s.name)
    assert.equal(2, s.kind)
    assert.equal("1764800000500000000", s.startTimeUnixNano)
    assert.equal(string.format("%.0f", 1764800001.25 * 1e9), s.endTimeUnixNano)
    assert.same({ code = 2 }, s.status)
    assert.same({
      ["http.response.status_code"] = { intValue = "503" }, ratio = { doubleValue = 0.25 }, neg = { intValue = "-42" },
      ok = { boolValue = false }, yes = { boolValue = true }, ["url.path"] = { stringValue = "/a" },
    }, attrs_of(s))
    s = spans[2]
    assert.equal(string.rep("e", 16), s.parentSpanId)
    assert.equal(3, s.kind)
    assert.equal("1000000000", s.startTimeUnixNano)
    assert.same({ code = 0 }, s.status)
    assert.same({}, attrs_of(s))
  end)

  it("escapes what JSON needs and replaces invalid UTF-8", function()
    local spans = spans_of(otlp.encode({
      { trace_id = "t", span_id = "s", kind = 2, name = 'GET /x"y\\z\n\1é\255', start_s = 0, end_s = 0,
        attrs = { ["k\"ey"] = "v\0w" } },
    }))
    assert.equal('GET /x"y\\z\n\1é\239\191\189', spans[1].name)
    assert.same({ ["k\"ey"] = { stringValue = "v\0w" } }, attrs_of(spans[1]))
  end)

  it("writes an empty batch, and raises for a span without its ids", function()
    local spans = spans_of(otlp.encode({}))
    assert.equal(0, #spans)
    assert.has_error(function() otlp.encode({ { span_id = "s", name = "n", kind = 2, start_s = 0, end_s = 0 } }) end,
      "wxd.otlp: a span needs a string trace_id")
    assert.has_error(function() otlp.encode({ "nope" }) end, "wxd.otlp: span 1 is not a table")
  end)
end)
