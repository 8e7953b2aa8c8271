-- Topic delivery is observable on /metrics: wxd_ws_publish_delivery_seconds
-- (from a publish to its frame written to the last subscriber, once per
-- publish and worker with subscribers) and wxd_ws_publish_dropped_total;
-- WebSocket handshakes count under their route pattern and leave the
-- in-flight gauge once answered.
local H = require "helpers"

local KEY = "dGhlIHNhbXBsZSBub25jZQ=="

local function connect(srv, path)
  local c = srv:connect(10)
  assert(c:send("GET " .. path .. " HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    .. "Sec-WebSocket-Key: " .. KEY .. "\r\nSec-WebSocket-Version: 13\r\n\r\n"))
  local status = assert(c:receive("*l"))
  assert.truthy(status:find("^HTTP/1%.1 101"), status)
  repeat local l = assert(c:receive("*l")) until l == ""
  return c
end

-- One unmasked server text frame (short: under 126 bytes).
local function read_text(c)
  local h = assert(c:receive(2))
  local len = h:byte(2) % 128
  assert(len < 126, "a short frame")
  return assert(c:receive(len))
end

local function scrape(admin)
  local socket = require "socket"
  local c = assert(socket.connect("127.0.0.1", admin))
  c:send("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
  local out = H.read_all(c, 5)
  c:close()
  local r = H.parse_responses(out)[1]
  assert.equal(200, r.status)
  return r.body
end

local function sample(text, name)
  local v = text:match("\n" .. name:gsub("[%[%]%+%-%.\"{}=]", "%%%0") .. " ([%d%.e%+%-]+)\n")
  return v and tonumber(v)
end

describe("websocket topic metrics", function()
  local srv, admin

  setup(function()
    admin = H.free_port()
    srv = H.start(H.app("ws"), { workers = 2, args = "--admin 127.0.0.1:" .. admin })
  end)

  teardown(function()
    if srv then
      srv:stop()
      srv:cleanup()
    end
  end)

  it("observes each publish's delivery once per worker with subscribers", function()
    -- Subscribers on both workers (hash steering spreads connections).
    local subs, seen = {}, {}
    H.wait_until(function()
      local c = connect(srv, "/sub?topic=metrics")
      local worker = read_text(c):match("^subscribed (%d+)$")
      seen[worker] = true
      subs[#subs + 1] = c
      return seen["0"] and seen["1"]
    end, 10, "subscribers on both workers")

    local text = scrape(admin)
    assert.truthy(text:find("# TYPE wxd_ws_publish_delivery_seconds histogram", 1, true), text)
    assert.truthy(text:find("# TYPE wxd_ws_publish_dropped_total counter", 1, true), text)
    assert.equal(0, sample(text, 'wxd_ws_publish_dropped_total{worker="0"}'))
    assert.equal(0, sample(text, 'wxd_ws_publish_dropped_total{worker="1"}'))
    local before = sample(text, "wxd_ws_publish_delivery_seconds_count") or 0

    for i = 1, 3 do
      local r = srv:get("/publish?topic=metrics&text=m" .. i)
      assert.equal(200, r.status)
      for _, c in ipairs(subs) do assert.equal("m" .. i, read_text(c)) end
    end
    -- Observed once the worker has written its last subscriber: 3 publishes x 2 workers.
    H.wait_until(function()
      return sample(scrape(admin), "wxd_ws_publish_delivery_seconds_count") == before + 6
    end, 5, "6 more delivery observations")
    text = scrape(admin)
    local sum = sample(text, "wxd_ws_publish_delivery_seconds_sum")
    assert.is_true(sum > 0 and sum < 60, "a delivery time in seconds: " .. tostring(sum))
    assert.equal(before + 6, sample(text, 'wxd_ws_publish_delivery_seconds_bucket{le="+Inf"}'))
    -- A publish nobody subscribes to is not observed (the one behind it is).
    assert.equal(200, srv:get("/publish?topic=nobody&text=x").status)
    assert.equal(200, srv:get("/publish?topic=metrics&text=m4").status)
    for _, c in ipairs(subs) do assert.equal("m4", read_text(c)) end
    H.wait_until(function()
      return sample(scrape(admin), "wxd_ws_publish_delivery_seconds_count") >= before + 8
    end, 5, "2 more delivery observations")
    assert.equal(before + 8, sample(scrape(admin), "wxd_ws_publish_delivery_seconds_count"))
    for _, c in ipairs(subs) do c:close() end
  end)

  it("counts WebSocket handshakes under their route pattern, not as unmatched", function()
    local before = sample(scrape(admin), 'wxd_http_requests_total{route="/sub",method="GET",status="1xx"}') or 0
    local c1, c2 = connect(srv, "/sub?topic=a"), connect(srv, "/sub?topic=b")
    read_text(c1)
    read_text(c2)
    assert.equal(before + 2, sample(scrape(admin), 'wxd_http_requests_total{route="/sub",method="GET",status="1xx"}'))
    c1:close()
    c2:close()
  end)

  it("takes a WebSocket handshake out of wxd_http_requests_in_flight once answered", function()
    local before = sample(scrape(admin), "wxd_http_requests_in_flight")
    local conns = {}
    for i = 1, 3 do
      conns[i] = connect(srv, "/sub?topic=inflight")
      read_text(conns[i])
    end
    -- The handlers run on (in ws:receive), but the requests were answered (101).
    assert.equal(before, sample(scrape(admin), "wxd_http_requests_in_flight"))
    for _, c in ipairs(conns) do c:close() end
  end)
end)
