-- wxd.alert against a fake WeCom group robot (spec/fixtures/apps/wecom, a
-- wxd app that keeps every message it receives): a storm of 1,000 failed
-- upstream calls over two workers gives one markdown alert with the
-- failing URL, WeChat's errcode, a trace id of the storm and count 1000
-- folded in; the storm's requests neither fail nor wait when the robot is
-- down or hangs (a bounded queue, a timeout, drops counted in /metrics);
-- the robot's rate limit holds across workers; content is cut to 4096
-- bytes of valid UTF-8; an opened breaker raises an alert by config alone;
-- two nodes sharing a Redis store send one alert between them.
local H = require "helpers"
local cjson = require "cjson"
local socket = require "socket"

local ROBOT_APP, APP = H.app("wecom"), H.app("alert")

local function metric(admin, name, labels)
  local c = assert(socket.connect("127.0.0.1", admin))
  c:send("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
  local body = H.parse_responses((H.read_all(c, 5)))[1].body
  c:close()
  local sel = name .. (labels and ("{" .. labels .. "}") or "")
  local start = body:find("\n" .. sel .. " ", 1, true)
  if not start then return 0 end
  return tonumber(body:match("^ ([%d.e+]+)", start + 1 + #sel)) or 0
end

-- What the robot received: { n, hanging, messages = { { at, body, content } } }.
local function received(robot)
  local r = cjson.decode(robot:get("/received").body)
  for _, m in ipairs(r.messages) do
    local b = cjson.decode(m.body)
    m.msgtype, m.content = b.msgtype, b.markdown and b.markdown.content
  end
  return r
end

local function field(content, name)
  return content:match("\n> " .. name .. ": ([^\n]*)")
end

local function count_of(content)
  return tonumber(content:match("\n> count: %*%*(%d+)%*%*"))
end

-- Whether s is valid UTF-8 (no overlongs, surrogates or values past U+10FFFF).
local function valid_utf8(s)
  local i, n = 1, #s
  while i <= n do
    local c = s:byte(i)
    local len, min
    if c < 0x80 then len, min = 1, 0
    elseif c >= 0xC2 and c <= 0xDF then len, min = 2, 0x80
    elseif c >= 0xE0 and c <= 0xEF then len, min = 3, 0x800
    elseif c >= 0xF0 and c <= 0xF4 then len, min = 4, 0x10000
    else return false end
    local cp = len == 1 and c or (c % (2 ^ (7 - len)))
    for j = 1, len - 1 do
      local b = s:byte(i + j)
      if not b or b < 0x80 or b > 0xBF then return false end
      cp = cp * 64 + (b - 0x80)
    end
    if cp < min or cp > 0x10FFFF or (cp >= 0xD800 and cp <= 0xDFFF) then return false end
    i = i + len
  end
  return true
end

-- `total` GET requests of `path_of(i)` over `conns` connections (pipelined,
-- every connection in flight at once), each with its own trace id.
-- Returns the responses, the trace ids sent and the seconds it took.
local function storm(srvs, total, conns, path_of)
  local batches, tids = {}, {}
  for c = 1, conns do batches[c] = {} end
  for i = 1, total do
    local tid = string.format("%032x", 0xa1e47000 + i)
    tids[tid] = true
    local b = batches[(i - 1) % conns + 1]
    b[#b + 1] = "GET " .. path_of(i) .. " HTTP/1.1\r\nHost: x\r\ntraceparent: 00-" .. tid .. "-00f067aa0ba902b7-01\r\n\r\n"
  end
  local t0 = socket.gettime()
  local out = {}
  -- Spread over the servers given (one or several nodes).
  local per = {}
  for c = 1, conns do
    local s = (c - 1) % #srvs + 1
    per[s] = per[s] or {}
    per[s][#per[s] + 1] = batches[c]
  end
  for s, bs in pairs(per) do
    for _, resps in ipairs(H.pipelined(srvs[s], bs)) do
      for _, r in ipairs(resps) do out[#out + 1] = r end
    end
  end
  return out, tids, socket.gettime() - t0
end

describe("wxd.alert", function()
  local servers = {}
  local function start(app, opts)
    local s = H.start(app, opts)
    servers[#servers + 1] = s
    return s
  end
  local function webhook(robot, key) return "http://127.0.0.1:" .. robot.port .. "/cgi-bin/webhook/send?key=" .. (key or "k") end

  after_each(function()
    for _, s in ipairs(servers) do
      s:stop()
      s:cleanup()
    end
    servers = {}
  end)

  it("sends one alert for a storm of 1,000 failures over two workers, count folded in", function()
    local robot = start(ROBOT_APP)
    local admin = H.free_port()
    local WAIT = 6
    local srv = start(APP, { workers = 2, args = "--admin 127.0.0.1:" .. admin,
      env = "ALERT_WEBHOOK='" .. webhook(robot) .. "' ALERT_ON_FAILURE=1 ALERT_WINDOW=600 ALERT_WAIT=" .. WAIT })
    local fail_url = "http://127.0.0.1:" .. robot.port .. "/fail"
    local resps, tids, took = storm({ srv }, 1000, 20, function() return "/call?url=" .. fail_url end)
    assert.equal(1000, #resps)
    local workers = {}
    for _, r in ipairs(resps) do
      assert.equal(200, r.status) -- alerting never fails a request
      local b = cjson.decode(r.body)
      assert.equal(503, b.upstream)
      workers[b.worker] = true
    end
    assert.truthy(workers[0] and workers[1], "the storm reached both workers")

    local key = "upstream:127.0.0.1:" .. robot.port
    io.stderr:write(string.format("\n  storm of 1000 failures over 2 workers: %.2f s\n", took))
    if took < WAIT - 1 then
      -- The usual case: the storm ended within the first alert's wait, so
      -- that alert carries all of it and nothing is left for another.
      H.wait_until(function() return metric(admin, "wxd_alerts_total", 'outcome="sent"') >= 1 end, 30, "the alert")
      local got = received(robot)
      assert.equal(1, got.n)
      assert.equal(1000, count_of(got.messages[1].content))
      local left = srv:get_json("/pending?key=" .. key)
      assert.equal(0, left.n)
      assert.is_false(left.sample)
      assert.equal(1, metric(admin, "wxd_alerts_total", 'outcome="sent"'))
    else
      -- A loaded machine stretched the storm past the wait: the rest is
      -- folded into the window's next alert; nothing lost, nothing twice.
      local sum
      H.wait_until(function()
        sum = 0
        for _, m in ipairs(received(robot).messages) do sum = sum + count_of(m.content) end
        return sum >= 1000
      end, 660, "every failure in an alert")
      assert.equal(1000, sum)
      assert.is_true(received(robot).n <= 2)
    end

    local m = received(robot).messages[1]
    assert.equal("markdown", m.msgtype)
    assert.equal("application/json", m.content_type)
    assert.is_true(#m.content <= 4096)
    assert.truthy(m.content:find("upstream failing: 127.0.0.1:" .. robot.port, 1, true))
    assert.equal(key, field(m.content, "key"))
    assert.equal(fail_url, field(m.content, "url"))
    assert.equal("-1", field(m.content, "errcode"))
    assert.equal("503", field(m.content, "status"))
    assert.truthy(tids[field(m.content, "trace_id")], "the trace id of one of the storm's requests")
    assert.equal("spec-node", field(m.content, "source"))
    assert.is_true(metric(admin, "wxd_alerts_total", 'outcome="suppressed"') >= 998)
  end)

  it("never holds a request while the robot hangs: bounded queue, a timeout, drops counted", function()
    local robot = start(ROBOT_APP, { env = "WECOM_HANG_MS=60000" })
    local admin = H.free_port()
    local srv = start(APP, { workers = 2, args = "--admin 127.0.0.1:" .. admin,
      env = "ALERT_WEBHOOK='" .. webhook(robot) .. "' ALERT_ON_FAILURE=1 ALERT_QUEUE=2 ALERT_TIMEOUT=50" })
    -- The first alert goes out and hangs at the robot.
    assert.equal(200, srv:get("/send?key=first").status)
    H.wait_until(function() return received(robot).hanging >= 1 end, 10, "a message hanging at the robot")
    -- A storm of alerts of 60 keys and 500 failed calls meanwhile.
    local fail_url = "http://127.0.0.1:" .. robot.port .. "/fail"
    local resps = storm({ srv }, 560, 8, function(i)
      return i <= 60 and ("/send?key=k" .. i) or ("/call?url=" .. fail_url)
    end)
    for _, r in ipairs(resps) do assert.equal(200, r.status) end
    -- Every request was answered while the robot still held the first message.
    local got = received(robot)
    assert.equal(0, got.n)
    assert.is_true(got.hanging >= 1)
    H.wait_until(function() return metric(admin, "wxd_alerts_total", 'outcome="dropped"') >= 1 end, 30, "drops counted")
    -- A queue of 2 per worker, one message in flight per worker: the rest were dropped.
    local stats = srv:get_json("/stats")
    assert.is_true(stats.queued <= 2)
  end)

  it("keeps serving with the robot down, and counts the failed sends", function()
    local admin = H.free_port()
    local srv = start(APP, { workers = 2, args = "--admin 127.0.0.1:" .. admin,
      env = "ALERT_WEBHOOK='http://127.0.0.1:" .. H.free_port() .. "/cgi-bin/webhook/send?key=k' ALERT_ON_FAILURE=1" })
    local resps = storm({ srv }, 100, 4, function(i) return "/send?key=down" .. (i % 5) end)
    for _, r in ipairs(resps) do assert.equal(200, r.status) end
    H.wait_until(function() return metric(admin, "wxd_alerts_total", 'outcome="failed"') >= 5 end, 30,
      "the five keys' alerts counted as failed")
    assert.equal(0, metric(admin, "wxd_alerts_total", 'outcome="sent"'))
  end)

  it("holds the robot's rate across workers; the others wait", function()
    local robot = start(ROBOT_APP)
    local admin = H.free_port()
    local srv = start(APP, { workers = 2, args = "--admin 127.0.0.1:" .. admin,
      env = "ALERT_WEBHOOK='" .. webhook(robot) .. "' ALERT_RATE=3 ALERT_RATE_PERIOD=3600" })
    local resps = storm({ srv }, 20, 20, function(i) return "/send?key=rate" .. i end)
    local workers = {}
    for _, r in ipairs(resps) do
      assert.equal(200, r.status)
      workers[cjson.decode(r.body).worker] = true
    end
    assert.truthy(workers[0] and workers[1], "keys on both workers")
    -- 3 sent, 17 waiting for a slot (each counted once as deferred); a
    -- limit per worker would send 6 and never defer 17.
    H.wait_until(function() return metric(admin, "wxd_alerts_total", 'outcome="deferred"') >= 17 end, 30,
      "seventeen alerts deferred")
    assert.equal(3, received(robot).n)
    assert.equal(3, metric(admin, "wxd_alerts_total", 'outcome="sent"'))
  end)

  it("bounds the keys a worker keeps: one more is dropped and counted", function()
    local robot = start(ROBOT_APP)
    local srv = start(APP, { workers = 1,
      env = "ALERT_WEBHOOK='" .. webhook(robot) .. "' ALERT_WAIT=600 ALERT_MAX_KEYS=2" })
    for _, k in ipairs({ "a", "b", "c" }) do assert.equal(200, srv:get("/send?key=" .. k).status) end
    H.wait_until(function()
      local st = srv:get_json("/stats")
      return st.pending == 0 and st.dropped == 1
    end, 10, "two keys watched, the third dropped")
    assert.equal(2, srv:get_json("/stats").watched)
    assert.equal(0, srv:get_json("/pending?key=c").n)
  end)

  it("cuts the content to 4096 bytes of valid UTF-8, and uses the robot's key", function()
    local robot = start(ROBOT_APP, { env = "WECOM_KEY=s3cret" })
    local srv = start(APP, { env = "ALERT_WEBHOOK='" .. webhook(robot, "s3cret") .. "'" })
    local text = string.rep("上游告警", 1000) -- 12,000 bytes, 3 per character
    local r = srv:request("POST", "/send?key=big&title=big", nil, text)
    assert.equal(200, r.status)
    H.wait_until(function() return received(robot).n >= 1 end, 10, "the alert")
    local m = received(robot).messages[1]
    assert.is_true(#m.content <= 4096, #m.content .. " bytes")
    assert.is_true(#m.content > 4000)
    assert.is_true(valid_utf8(m.content))
    assert.truthy(m.content:find("(truncated)", 1, true))
  end)

  it("raises an alert when a breaker opens, by config alone", function()
    local robot = start(ROBOT_APP)
    local srv = start(APP, { workers = 2,
      env = "ALERT_WEBHOOK='" .. webhook(robot) .. "' ALERT_ON_BREAKER=1" })
    local fail_url = "http://127.0.0.1:" .. robot.port .. "/fail"
    for _ = 1, 3 do assert.equal(200, srv:get("/breaker?url=" .. fail_url).status) end
    assert.equal("circuit open", cjson.decode(srv:get("/breaker?url=" .. fail_url).body).upstream)
    H.wait_until(function() return received(robot).n >= 1 end, 10, "the alert")
    local got = received(robot)
    assert.equal(1, got.n) -- on_upstream_failure is off: only the breaker's
    local c = got.messages[1].content
    assert.truthy(c:find("circuit breaker open: up", 1, true))
    assert.equal("breaker:up", field(c, "key"))
    assert.equal(1, count_of(c))
    assert.equal(fail_url, field(c, "url"))
    assert.equal("-1", field(c, "errcode"))
    assert.equal("3", field(c, "consecutive_failures"))
  end)

  it("sends a key's counted events after a reload replaced the worker that counted them", function()
    local robot = start(ROBOT_APP)
    local admin = H.free_port()
    local srv = start(APP, { workers = 1, args = "--admin 127.0.0.1:" .. admin,
      env = "ALERT_WEBHOOK='" .. webhook(robot) .. "' ALERT_WAIT=5 ALERT_WINDOW=600" })
    for _ = 1, 3 do assert.equal(200, srv:get("/send?key=across-reload").status) end
    -- Counted in the store; its alert is due in 5 s, but the generation
    -- that counted it is replaced now.
    H.wait_until(function() return srv:get_json("/pending?key=across-reload").n == 3 end, 10, "the count in the store")
    srv:signal("HUP")
    H.wait_until(function() return H.status(admin).generation == 2 end, 20, "generation 2")
    assert.equal(0, received(robot).n)
    H.wait_until(function() return received(robot).n >= 1 end, 30, "the alert from the new generation")
    assert.equal(3, count_of(received(robot).messages[1].content))
    assert.equal("across-reload", field(received(robot).messages[1].content, "key"))
  end)

  it("refuses a bad alert section at load", function()
    local dir = H.tmpdir()
    H.sh("cp " .. APP .. "/app.lua " .. dir .. "/")
    H.write_file(dir .. "/config.lua", 'return { alert = { webhook = "ftp://x", window = 60 } }')
    local out, code = H.sh(H.WXD .. " check " .. dir)
    os.execute("rm -rf " .. dir)
    assert.is_not.equal(0, code)
    assert.truthy(out:find("config.alert.webhook", 1, true), out)
  end)

  it("sends one alert between two nodes sharing a Redis store", function()
    local robot = start(ROBOT_APP)
    local prefix = "alertspec" .. os.time() .. ":"
    local env = "ALERT_WEBHOOK='" .. webhook(robot) .. "' ALERT_ON_FAILURE=1 ALERT_WINDOW=600 ALERT_WAIT=6"
      .. " ALERT_REDIS=" .. H.redis_url() .. " ALERT_PREFIX=" .. prefix
    local a = start(APP, { workers = 1, env = env })
    local b = start(APP, { workers = 1, env = env })
    local fail_url = "http://127.0.0.1:" .. robot.port .. "/fail"
    local resps, _, took = storm({ a, b }, 200, 4, function() return "/call?url=" .. fail_url end)
    for _, r in ipairs(resps) do assert.equal(200, r.status) end
    local sum
    H.wait_until(function()
      sum = 0
      for _, m in ipairs(received(robot).messages) do sum = sum + count_of(m.content) end
      return sum >= 200
    end, 660, "every failure in an alert")
    assert.equal(200, sum)
    if took < 5 then assert.equal(1, received(robot).n) end
  end)
end)
