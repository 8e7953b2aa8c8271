-- WeChat messaging over real HTTP: the official-account example, the
-- default app, and a fixture app for retries and the deadline, each a real
-- wxd process. Messages are built by wxd.testing as WeChat would send them.
local H = require "helpers"
local cjson = require "cjson"
local socket = require "socket"
local testing = require "wxd.testing"
local wxd = require "wxd"
local C = require "fixtures.mp.conf"

local APPID = "wx51ec0000000000a1"

local function env(t)
  local parts = {}
  for k, v in pairs(t) do parts[#parts + 1] = k .. "='" .. v .. "'" end
  table.sort(parts)
  return table.concat(parts, " ")
end

-- POSTs a built message; returns the parsed response.
local function post(srv, built)
  return srv:request("POST", built.url, { ["Content-Type"] = "text/xml" }, built.body)
end

local function log_lines(srv, text) return srv:log_lines(text) end

describe("examples/official-account in safe mode", function()
  local srv
  local wx = testing.wechat({ token = C.token, appid = APPID, aes_key = C.key1, mode = "safe" })
  setup(function()
    srv = H.start(H.ROOT .. "/examples/official-account", { workers = 2,
      env = env({ WXD_MP_APPID = APPID, WXD_MP_TOKEN = C.token, WXD_MP_AES_KEY = C.key1,
                  WXD_MP_SECRET = "not-used-yet" }) })
  end)
  teardown(function() srv:stop(); srv:cleanup() end)

  it("answers the URL verification", function()
    local _, echostr, qs = wx:verification("5837397520665436492")
    local r = srv:get("/wx?" .. qs)
    assert.equal(200, r.status)
    assert.equal(echostr, r.body)
  end)

  it("echoes a text message, encrypted and signed", function()
    local r = post(srv, wx:build({ MsgType = "text", Content = "你好, wxd" }))
    assert.equal(200, r.status)
    assert.truthy(r.body:find("<Encrypt>", 1, true))
    local reply = assert(wx:open_reply(r.body))
    assert.equal("text", reply.MsgType)
    assert.equal("echo: 你好, wxd", reply.Content)
    assert.equal(wx.openid, reply.ToUserName)
  end)

  it("welcomes a new follower", function()
    local r = post(srv, wx:build({ MsgType = "event", Event = "subscribe" }))
    local reply = assert(wx:open_reply(r.body))
    assert.truthy(reply.Content:find("^Welcome"))
  end)

  it("answers success to what it does not handle, in compatible mode too", function()
    local compat = testing.wechat({ token = C.token, appid = APPID, aes_key = C.key1, mode = "compatible" })
    assert.equal("success", post(srv, compat:build({ MsgType = "image", MediaId = "m", PicUrl = "http://p" })).body)
    local reply = assert(compat:open_reply(post(srv, compat:build({ MsgType = "text", Content = "c" })).body))
    assert.equal("echo: c", reply.Content)
  end)

  it("refuses forged, tampered, hostile, oversized and stale requests, logs them, and keeps serving", function()
    local plain = testing.wechat({ token = C.token, appid = APPID, mode = "plaintext" })
    local now = math.floor(wxd.now())
    local cases = {
      { 403, "forged msg_signature", wx:build({ MsgType = "text", Content = "x" }, { msg_signature = string.rep("1", 40) }) },
      { 403, "plaintext", plain:build({ MsgType = "text", Content = "x" }) },
      { 400, "wrong appid inside", wx:build({ MsgType = "text", Content = "x" }, { receive_id = "wx0000000000000000" }) },
      { 400, "tampered", wx:build({ MsgType = "text", Content = "x" }, { encrypt = "QUJDREVGR0hJSktMTU5PUA==" }) },
      { 400, "XXE inside", wx:build('<!DOCTYPE xml [<!ENTITY x SYSTEM "file:///etc/passwd">]><xml><MsgType>text</MsgType>'
                                   .. "<Content>&x;</Content></xml>") },
      { 413, "oversized", wx:build({ MsgType = "text", Content = string.rep("x", 70000) }) },
      { 403, "stale", wx:build({ MsgType = "text", Content = "x" }, { timestamp = now - 3600 }) },
    }
    for _, c in ipairs(cases) do
      local r = post(srv, c[3])
      assert.equal(c[1], r.status, c[2] .. ": " .. r.body)
    end
    local deep = wx:build({ MsgType = "text", Content = "x" })
    local r = srv:request("POST", deep.url, nil, '<!DOCTYPE x [<!ENTITY a "b">]>' .. deep.body)
    assert.equal(400, r.status)
    H.wait_until(function() return #log_lines(srv, '"msg":"mp: request refused"') >= #cases + 1 end, 5, "the log lines")
    local logged = table.concat(log_lines(srv, '"msg":"mp: request refused"'), "\n")
    for _, reason in ipairs({ "bad msg_signature", "decrypt failed", "doctype not allowed", "body over max_body_bytes",
                              "timestamp outside the window", "plaintext message" }) do
      assert.truthy(logged:find(reason, 1, true), reason)
    end
    assert.falsy(srv:log_text():find(C.key1, 1, true), "the key is never logged")
    assert.falsy(srv:log_text():find(C.token, 1, true), "the token is never logged")
    local ok = assert(wx:open_reply(post(srv, wx:build({ MsgType = "text", Content = "still here" })).body))
    assert.equal("echo: still here", ok.Content)
  end)
end)

describe("examples/official-account in plaintext mode", function()
  local srv
  local wx = testing.wechat({ token = C.token, appid = APPID, mode = "plaintext" })
  setup(function()
    srv = H.start(H.ROOT .. "/examples/official-account",
      { env = env({ WXD_MP_APPID = APPID, WXD_MP_TOKEN = C.token }) })
  end)
  teardown(function() srv:stop(); srv:cleanup() end)

  it("echoes a text message in clear and refuses a forged signature", function()
    local reply = assert(wx:open_reply(post(srv, wx:build({ MsgType = "text", Content = "plain" })).body))
    assert.equal("echo: plain", reply.Content)
    assert.equal(403, post(srv, wx:build({ MsgType = "text", Content = "x" }, { signature = string.rep("2", 40) })).status)
  end)

  it("does not start without its variables, naming the missing one", function()
    local s = H.start(H.ROOT .. "/examples/official-account", { expect_failure = true, env = "WXD_MP_TOKEN= WXD_MP_APPID=" })
    H.wait_until(function() return s:exit_code() end, 10, "wxd to exit")
    assert.equal(1, s:exit_code())
    assert.truthy(s:log_text():find("WXD_MP_APPID", 1, true))
    s:cleanup()
  end)
end)

describe("the default app", function()
  it("starts without any WeChat variable, serves its routes and says /wx is not mounted", function()
    local srv = H.start(H.ROOT, { env = "WXD_MP_APPID= WXD_MP_TOKEN= WXD_MP_AES_KEY=" })
    assert.equal(200, srv:get("/health").status)
    assert.equal(404, srv:get("/wx").status)
    assert.equal(1, #log_lines(srv, "/wx not mounted"))
    srv:stop()
    srv:cleanup()
  end)

  it("answers WeChat at /wx once the variables are set", function()
    local srv = H.start(H.ROOT, { workers = 2,
      env = env({ WXD_MP_APPID = APPID, WXD_MP_TOKEN = C.token, WXD_MP_AES_KEY = C.key2 }) })
    local wx = testing.wechat({ token = C.token, appid = APPID, aes_key = C.key2 })
    local reply = assert(wx:open_reply(post(srv, wx:build({ MsgType = "text", Content = "root" })).body))
    assert.equal("echo: root", reply.Content)
    assert.truthy(assert(wx:open_reply(post(srv, wx:build({ MsgType = "event", Event = "subscribe" })).body))
      .Content:find("^Welcome"))
    assert.equal(200, srv:get("/health").status)
    assert.equal(0, #log_lines(srv, "/wx not mounted"))
    srv:stop()
    srv:cleanup()
  end)
end)

describe("retries and the deadline over HTTP", function()
  local srv
  local wx = testing.wechat({ token = C.token, appid = APPID, aes_key = C.key1 })
  setup(function()
    srv = H.start(H.app("mp"), { workers = 2,
      env = env({ WXD_MP_APPID = APPID, WXD_MP_TOKEN = C.token, WXD_MP_AES_KEY = C.key1, SPEC_MP_DEADLINE_MS = 800 }) })
  end)
  teardown(function() srv:stop(); srv:cleanup() end)

  local function runs(id) return cjson.decode(srv:get("/runs?id=" .. id).body).runs end

  it("runs the handler once when the same message arrives 3 times at once, and all get the same reply", function()
    local msg = wx:message({ MsgType = "text", Content = "sleep:300" })
    local conns = {}
    for i = 1, 3 do
      local b = wx:build(msg, { nonce = tostring(1000 + i) })
      local c = srv:connect(10)
      c:send("POST " .. b.url .. " HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: " .. #b.body
        .. "\r\n\r\n" .. b.body)
      conns[i] = c
    end
    local replies = {}
    for i, c in ipairs(conns) do
      local out = H.read_all(c, 10)
      c:close()
      local r = H.parse_responses(out)[1]
      assert.equal(200, r.status)
      replies[i] = assert(wx:open_reply(r.body))
    end
    assert.equal(1, runs(msg.MsgId))
    assert.truthy(replies[1].Content:find("^run 1 on worker %d of " .. msg.MsgId .. "$"), replies[1].Content)
    assert.same(replies[1], replies[2])
    assert.same(replies[1], replies[3])
  end)

  it("gives a later retry the same reply without running the handler again", function()
    local msg = wx:message({ MsgType = "text", Content = "again" })
    local first = assert(wx:open_reply(post(srv, wx:build(msg)).body))
    for i = 1, 2 do
      assert.same(first, assert(wx:open_reply(post(srv, wx:build(msg, { nonce = "7" .. i })).body)))
    end
    assert.equal(1, runs(msg.MsgId))
  end)

  it("answers success in time to a slow handler and logs its late reply as not delivered", function()
    local msg = wx:message({ MsgType = "text", Content = "sleep:2500" })
    local t0 = socket.gettime()
    local r = post(srv, wx:build(msg))
    local took = socket.gettime() - t0
    assert.equal(200, r.status)
    assert.equal("success", r.body)
    assert.truthy(took >= 0.7 and took < 2.3, "answered after " .. took .. " s (deadline 0.8 s, handler 2.5 s)")
    H.wait_until(function() return #log_lines(srv, "late reply dropped: no customer-service sender") == 1 end,
      10, "the late reply line")
    local line = cjson.decode(log_lines(srv, "late reply dropped")[1])
    assert.equal("o_te****0000", line.openid, "the openid is masked")
    assert.equal(1, runs(msg.MsgId))
    -- The worker served other requests meanwhile and still does.
    assert.equal(200, srv:get("/runs?id=x").status)
  end)
end)
