-- GET /metrics shows what the core keeps about circuit breakers (state,
-- calls by result, transitions, retries) and the WebSocket publishes it
-- dropped for a worker whose queue was full, read back by Debian's
-- python3-prometheus-client parser.
local H = require "helpers"
local cjson = require "cjson"
local socket = require "socket"

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

-- The parsed exposition; fails the spec when the parser refuses it.
local function scrape(srv, admin)
  local c = assert(socket.connect("127.0.0.1", admin))
  c:send("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
  local r = H.parse_responses((H.read_all(c, 5)))[1]
  c:close()
  assert.equal(200, r.status)
  local file, script = srv.dir .. "/metrics.txt", srv.dir .. "/parse.py"
  H.write_file(file, r.body)
  H.write_file(script, PARSE)
  local out, code = H.sh("/usr/bin/python3 " .. script .. " " .. file)
  assert(code == 0, "prometheus_client refused /metrics:\n" .. out .. "\n" .. r.body:sub(1, 3000))
  return cjson.decode(out)
end

local function value(parsed, name, labels)
  for _, s in ipairs(parsed.samples) do
    if s[1] == name then
      local match = true
      for k, v in pairs(labels) do
        if s[2][k] ~= v then match = false end
      end
      if match then return s[3] end
    end
  end
  return nil
end

describe("/metrics", function()
  local servers = {}
  local function start(app, opts)
    local s = H.start(app, opts)
    servers[#servers + 1] = s
    return s
  end
  teardown(function()
    for _, s in ipairs(servers) do
      s:stop()
      s:cleanup()
    end
  end)

  it("shows each breaker's state, calls, transitions and retries", function()
    local upstream = start(H.app("wecom"))
    local admin = H.free_port()
    local srv = start(H.app("alert"), { workers = 2, args = "--admin 127.0.0.1:" .. admin })
    local fail_url = "http://127.0.0.1:" .. upstream.port .. "/fail"
    -- Breaker "up" opens after 3 failures (cooldown an hour); 2 more are refused.
    for _ = 1, 3 do assert.equal(503, srv:get_json("/breaker?url=" .. fail_url).upstream) end
    for _ = 1, 2 do assert.equal("circuit open", srv:get_json("/breaker?url=" .. fail_url).upstream) end
    local m = scrape(srv, admin)
    assert.equal("gauge", m.families.wxd_breaker_state)
    assert.equal("counter", m.families.wxd_breaker_calls)
    assert.equal(1, value(m, "wxd_breaker_state", { breaker = "up", state = "open" }))
    assert.equal(0, value(m, "wxd_breaker_state", { breaker = "up", state = "closed" }))
    assert.equal(0, value(m, "wxd_breaker_state", { breaker = "up", state = "half_open" }))
    assert.equal(3, value(m, "wxd_breaker_calls_total", { breaker = "up", result = "failure" }))
    assert.equal(0, value(m, "wxd_breaker_calls_total", { breaker = "up", result = "success" }))
    assert.equal(2, value(m, "wxd_breaker_calls_total", { breaker = "up", result = "rejected" }))
    assert.equal(1, value(m, "wxd_breaker_transitions_total", { breaker = "up", to = "open" }))
    assert.equal(0, value(m, "wxd_breaker_transitions_total", { breaker = "up", to = "closed" }))
    assert.equal(0, value(m, "wxd_breaker_retries_total", { breaker = "up", result = "allowed" }))
    assert.equal(0, value(m, "wxd_breaker_retries_total", { breaker = "up", result = "denied" }))
  end)

  it("counts the WebSocket publishes dropped for a worker whose queue is full", function()
    local admin = H.free_port()
    local srv = start(H.app("ws"), { workers = 1, args = "--admin 127.0.0.1:" .. admin })
    -- A subscriber on the one worker; the handler below publishes without
    -- yielding, so nothing is delivered meanwhile and the queue only grows.
    local c = srv:connect(10)
    assert(c:send("GET /mute?topic=drops HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
      .. "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"))
    local head = assert(c:receive("*l"))
    assert.truthy(head:find(" 101 ", 1, true))
    repeat local l = assert(c:receive("*l")) until l == ""
    local h = assert(c:receive(2))
    assert.truthy(assert(c:receive(h:byte(2) % 128)):find("^subscribed"))
    assert.equal(0, value(scrape(srv, admin), "wxd_ws_publish_dropped_total", { worker = "0" }))
    -- 70 publishes of 1 MiB: 63 fit in the worker's 64 MiB queue, 7 are dropped.
    local r = srv:get_json("/publish-many?topic=drops&n=70&size=1048576")
    assert.equal(63, r.reached)
    local m = scrape(srv, admin)
    assert.equal("counter", m.families.wxd_ws_publish_dropped)
    assert.equal(7, value(m, "wxd_ws_publish_dropped_total", { worker = "0" }))
    c:close()
  end)
end)
