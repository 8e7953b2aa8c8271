-- GET /metrics on the admin listener, read back by an independent parser
-- (Debian's python3-prometheus-client): counts equal the requests sent over
-- two workers, routes are labelled by pattern, histogram buckets are
-- cumulative, app metrics (wxd.metrics) are shared by the workers and their
-- label sets are bounded.
local H = require "helpers"
local cjson = require "cjson"

local APP = H.app("obs")

-- Parses the exposition with prometheus_client and prints JSON:
-- { families = { name = type }, samples = { {name, labels, value}, ... } }.
local PARSE = [[
import json, sys
from prometheus_client.parser import text_string_to_metric_families
fams, samples = {}, []
for f in text_string_to_metric_families(open(sys.argv[1], encoding="utf-8").read()):
    fams[f.name] = f.type
    for s in f.samples:
        samples.append([s.name, s.labels, s.value])
print(json.dumps({"families": fams, "samples": samples}))
]]

local function scrape_raw(admin)
  local socket = require "socket"
  local c = assert(socket.connect("127.0.0.1", admin))
  c:send("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
  local out = H.read_all(c, 5)
  c:close()
  return H.parse_responses(out)[1]
end

-- The parsed exposition; fails the spec when the parser refuses it.
local function scrape(srv, admin)
  local r = scrape_raw(admin)
  assert.equal(200, r.status)
  assert.truthy(r.headers["content-type"]:find("version=0.0.4", 1, true))
  local file, script = srv.dir .. "/metrics.txt", srv.dir .. "/parse.py"
  H.write_file(file, r.body)
  H.write_file(script, PARSE)
  -- /usr/bin/python3: the Debian package's interpreter, whatever else is on PATH.
  local out, code = H.sh("/usr/bin/python3 " .. script .. " " .. file)
  assert(code == 0, "prometheus_client refused /metrics:\n" .. out .. "\n" .. r.body:sub(1, 3000))
  return cjson.decode(out), r.body
end

-- The value of the sample called name whose labels include `labels`.
local function value(parsed, name, labels)
  for _, s in ipairs(parsed.samples) do
    if s[1] == name then
      local match = true
      for k, v in pairs(labels or {}) do
        if s[2][k] ~= v then match = false end
      end
      if match then return s[3] end
    end
  end
  return nil
end

local function samples_named(parsed, name)
  local out = {}
  for _, s in ipairs(parsed.samples) do
    if s[1] == name then out[#out + 1] = s end
  end
  return out
end

describe("GET /metrics", function()
  local srv, admin

  setup(function()
    admin = H.free_port()
    srv = H.start(APP, { workers = 2, args = "--admin 127.0.0.1:" .. admin })
  end)

  teardown(function()
    if srv then
      srv:stop()
      srv:cleanup()
    end
  end)

  it("counts every request over two workers, by route pattern, method and status class", function()
    local before = scrape(srv, admin)
    local base = value(before, "wxd_http_requests_total", { route = "/items/:id", method = "GET", status = "2xx" }) or 0
    -- One connection per request: hash steering spreads them over both workers.
    for i = 1, 40 do assert.equal(200, srv:get("/items/" .. i).status) end
    for i = 1, 7 do assert.equal(404, srv:get("/nope/" .. i).status) end
    for _ = 1, 3 do assert.equal(500, srv:get("/fail").status) end
    local st = H.status(admin)
    assert.is_true(st.workers[1].requests > 0 and st.workers[2].requests > 0,
      "both workers served: " .. st.workers[1].requests .. "/" .. st.workers[2].requests)

    local m, text = scrape(srv, admin)
    assert.equal("counter", m.families.wxd_http_requests)
    assert.equal(base + 40, value(m, "wxd_http_requests_total", { route = "/items/:id", method = "GET", status = "2xx" }))
    assert.is_true(value(m, "wxd_http_requests_total", { route = "unmatched", method = "GET", status = "4xx" }) >= 7)
    assert.equal(3, value(m, "wxd_http_requests_total", { route = "/fail", method = "GET", status = "5xx" }))
    -- Never the raw path.
    assert.falsy(text:find("/items/1", 1, true))
    assert.falsy(text:find("/nope/", 1, true))
    -- The duration histogram saw the same requests.
    assert.equal(base + 40, value(m, "wxd_http_request_duration_seconds_count", { route = "/items/:id" }))
    assert.equal(0, value(m, "wxd_http_requests_in_flight"))
    assert.equal(2, value(m, "wxd_workers"))
    assert.equal(1, value(m, "wxd_generation"))
  end)

  it("makes histogram buckets cumulative, ending at _count", function()
    for _, v in ipairs({ 0.5, 5, 5, 50, 500, 7 }) do assert.equal(200, srv:get("/observe?v=" .. v).status) end
    local m = scrape(srv, admin)
    assert.equal("histogram", m.families.obs_size)
    local buckets = {}
    for _, s in ipairs(samples_named(m, "obs_size_bucket")) do buckets[s[2].le] = s[3] end
    assert.same({ ["1"] = 1, ["10"] = 4, ["100"] = 5, ["+Inf"] = 6 }, buckets)
    assert.equal(6, value(m, "obs_size_count", { unit = "b" }))
    assert.near(567.5, value(m, "obs_size_sum", { unit = "b" }), 1e-9)
    -- Every histogram in the exposition is cumulative.
    local last = {}
    for _, s in ipairs(m.samples) do
      if s[1]:match("_bucket$") then
        local key = s[1]
        for k, v in pairs(s[2]) do if k ~= "le" then key = key .. "|" .. k .. "=" .. v end end
        assert.is_true(s[3] >= (last[key] or 0), key .. " decreases at le=" .. s[2].le)
        last[key] = s[3]
      end
    end
  end)

  it("sums an app counter incremented on both workers; a gauge is one value", function()
    for _ = 1, 30 do assert.equal(200, srv:get("/hit?kind=a").status) end
    for _ = 1, 12 do assert.equal(200, srv:get("/hit?kind=b").status) end
    assert.equal(200, srv:get("/gauge?v=7").status)
    assert.equal(200, srv:get("/gauge?v=42").status)
    local m = scrape(srv, admin)
    assert.equal(30, value(m, "obs_hits_total", { kind = "a" }))
    assert.equal(12, value(m, "obs_hits_total", { kind = "b" }))
    assert.equal(42, value(m, "obs_level"))
  end)

  it("bounds label sets: past max_series an increment raises a clear error", function()
    for i = 1, 5 do assert.equal(200, srv:get("/capped?v=" .. i).status) end
    -- Known label sets still count.
    assert.equal(200, srv:get("/capped?v=1").status)
    local r = srv:get("/capped?v=6")
    assert.equal(500, r.status)
    assert.truthy(r.body:find("obs_capped_total: more than 5 label sets (cardinality limit)", 1, true), r.body)
    local m = scrape(srv, admin)
    assert.equal(5, #samples_named(m, "obs_capped_total"))
    assert.equal(2, value(m, "obs_capped_total", { v = "1" }))
  end)

  it("shows shared dictionaries and answers 404 elsewhere", function()
    local m = scrape(srv, admin)
    assert.equal(4 * 1024 * 1024, value(m, "wxd_shdict_capacity_bytes", { dict = "spans" }))
    assert.is_number(value(m, "wxd_shdict_evictions_total", { dict = "spans" }))
    local socket = require "socket"
    local c = assert(socket.connect("127.0.0.1", admin))
    c:send("GET /metricsx HTTP/1.1\r\nHost: x\r\n\r\n")
    local out = H.read_all(c, 5)
    c:close()
    assert.equal(404, H.parse_responses(out)[1].status)
  end)
end)

describe("wxd.metrics in wxd script", function()
  local metrics = require "wxd.metrics"

  it("refuses bad names, labels and redeclarations with a different shape", function()
    assert.has_error(function() metrics.counter("bad name") end)
    assert.has_error(function() metrics.counter("ok_total", "", { "le", "le" }) end)
    assert.has_error(function() metrics.histogram("h_le", "", { "le" }) end)
    local c = metrics.counter("script_total", "x", { "a" })
    assert.equal(c.id, metrics.counter("script_total", "x", { "a" }).id)
    assert.has_error(function() metrics.gauge("script_total", "x", { "a" }) end)
    assert.has_error(function() metrics.counter("script_total", "x", { "b" }) end)
    assert.has_error(function() c:inc(-1, { a = "x" }) end)
    assert.has_error(function() c:inc(1) end) -- labels missing
    c:inc(2, { a = "x" })
    c:inc({ "x" })
    assert.equal(3, c:value({ a = "x" }))
  end)

  it("escapes label values and refuses ones that are not UTF-8", function()
    local c = metrics.counter("script_esc_total", "help with \\ and\nnewline", { "v" })
    c:inc(1, { v = 'a"b\\c\nd' })
    assert.has_error(function() c:inc(1, { v = "\255" }) end, "wxd.metrics: script_esc_total: label v: value is not valid UTF-8")
    assert.has_error(function() c:inc(1, { v = "\237\160\128" }) end) -- a surrogate
    local text = metrics.render()
    assert.truthy(text:find('script_esc_total{v="a\\"b\\\\c\\nd"} 1', 1, true), text)
    assert.truthy(text:find("# HELP script_esc_total help with \\\\ and\\nnewline", 1, true))
  end)
end)
