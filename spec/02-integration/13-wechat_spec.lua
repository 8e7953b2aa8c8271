-- Credentials across workers: real wxd processes (2 workers) whose
-- handlers call WeChat through wxd.wechat, against the fake WeChat API
-- server (spec/fixtures/apps/fakewx), itself a wxd process.
local H = require "helpers"
local cjson = require "cjson"
local crypto = require "wxd.crypto"
local testing = require "wxd.testing"
local wxd = require "wxd"

local APPID, SECRET = "wxfake0000000001", "fake-secret-0123456789"
local SESSION_KEY = "tiihtNczf5v6AKRyjwEUhQ=="

local function env(t)
  local parts = {}
  for k, v in pairs(t) do parts[#parts + 1] = k .. "='" .. tostring(v) .. "'" end
  table.sort(parts)
  return table.concat(parts, " ")
end

-- n requests at once, each on its own connection; the parsed responses.
local function concurrent_get(srv, path, n)
  local batches = {}
  for i = 1, n do batches[i] = { "GET " .. path .. " HTTP/1.1\r\nHost: x\r\n\r\n" } end
  local out = {}
  for i, resps in ipairs(H.pipelined(srv, batches)) do
    assert(#resps == 1, "request " .. i .. ": " .. #resps .. " responses")
    out[i] = resps[1]
  end
  return out
end

local function json(r) return cjson.decode(r.body) end

describe("wxd.wechat credentials across workers", function()
  local fake, base

  local function ctl(method, path, body)
    local r = fake:request(method, path, { ["Content-Type"] = "application/json" }, body and cjson.encode(body))
    assert.equal(200, r.status, r.body)
    return json(r)
  end
  local function counts() return ctl("GET", "/_ctl/counts") end

  local function start_client(extra)
    local e = { SPEC_WX_SECRET = SECRET, WXD_WECHAT_API_BASE = base }
    for k, v in pairs(extra or {}) do e[k] = v end
    return H.start(H.app("wxclient"), { workers = 2, env = env(e) })
  end

  setup(function()
    fake = H.start(H.app("fakewx"), { workers = 1 })
    base = "http://127.0.0.1:" .. fake.port
  end)
  teardown(function()
    fake:stop()
    fake:cleanup()
  end)
  before_each(function() ctl("POST", "/_ctl/reset") end)

  describe("a fresh server", function()
    local srv
    setup(function() srv = start_client() end)
    teardown(function() srv:stop(); srv:cleanup() end)

    it("fetches one token for 200 concurrent requests on 2 workers", function()
      ctl("POST", "/_ctl/config", { token_delay_ms = 300 }) -- everyone arrives during the fetch
      local rs = concurrent_get(srv, "/api", 200)
      local tokens, workers = {}, {}
      for i, r in ipairs(rs) do
        assert.equal(200, r.status, "request " .. i .. ": " .. tostring(r.body))
        local b = json(r)
        tokens[b.token] = true
        workers[b.worker] = true
      end
      assert.equal(1, counts().stable_token)
      assert.equal(1, #(function() local l = {} for t in pairs(tokens) do l[#l + 1] = t end return l end)())
      assert.truthy(workers[0] and workers[1], "both workers served")
      ctl("POST", "/_ctl/config", { token_delay_ms = 0 })
    end)

    it("replaces a token revoked at WeChat with exactly one refresh, and the calls succeed", function()
      assert.equal(200, srv:get("/api").status)
      local before = counts().stable_token
      local old = ctl("GET", "/_ctl/state").current
      ctl("POST", "/_ctl/revoke", { rotate = true })
      local rs = concurrent_get(srv, "/api", 50)
      for i, r in ipairs(rs) do
        assert.equal(200, r.status, "request " .. i .. ": " .. tostring(r.body))
        assert.are_not.equal(old, json(r).token)
      end
      assert.equal(before + 1, counts().stable_token)
      assert.equal(0, counts().stable_force)
    end)

    it("leaves rate limits to the caller: no refresh on 45009", function()
      assert.equal(200, srv:get("/api").status)
      local before = counts().stable_token
      ctl("POST", "/_ctl/config", { fail = { errcode = 45009, errmsg = "reach max api daily quota limit", times = 1 } })
      local r = srv:get("/api")
      assert.equal(502, r.status)
      assert.equal("wechat", json(r).error)
      assert.equal(45009, json(r).info.errcode)
      assert.equal(before, counts().stable_token)
      assert.equal(200, srv:get("/api").status)
    end)
  end)

  it("fetches one token for two processes sharing one Redis", function()
    local url = os.getenv("WXD_TEST_REDIS_URL")
    assert(url, "spec/run.sh starts a redis-server and sets WXD_TEST_REDIS_URL")
    local prefix = "spec:" .. wxd.crypto.nonce(8) .. ":" -- no token of an earlier run
    local a = start_client({ SPEC_REDIS_URL = url, SPEC_STORE_PREFIX = prefix })
    local b = start_client({ SPEC_REDIS_URL = url, SPEC_STORE_PREFIX = prefix })
    local ok, err = pcall(function()
      ctl("POST", "/_ctl/config", { token_delay_ms = 300 })
      -- 100 connections to each process, all sent before any is read.
      local conns = {}
      for i = 1, 200 do conns[i] = (i % 2 == 0 and a or b):connect(10) end
      for i = 1, 200 do conns[i]:send("GET /api HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") end
      local tokens = {}
      for i = 1, 200 do
        local raw = H.read_all(conns[i], 15)
        local pok, rs = pcall(H.parse_responses, raw)
        assert(pok and #rs == 1, "one response expected, got: " .. ("%q"):format(raw))
        local r = rs[1]
        conns[i]:close()
        assert.equal(200, r and r.status, "request " .. i .. ": " .. tostring(r and r.body))
        tokens[json(r).token] = true
      end
      assert.equal(1, counts().stable_token)
      local n = 0
      for _ in pairs(tokens) do n = n + 1 end
      assert.equal(1, n)
      ctl("POST", "/_ctl/config", { token_delay_ms = 0 })
      -- A revocation seen by both processes: still one refresh in all.
      ctl("POST", "/_ctl/revoke", { rotate = true })
      for _, s in ipairs({ a, b, a, b }) do assert.equal(200, s:get("/api").status) end
      assert.equal(2, counts().stable_token)
    end)
    a:stop(); a:cleanup()
    b:stop(); b:cleanup()
    assert(ok, err)
  end)

  it("shares a failed fetch with the callers that waited for it: 50 requests while WeChat is down, 1 call", function()
    for _, url in ipairs({ false, os.getenv("WXD_TEST_REDIS_URL") }) do
      ctl("POST", "/_ctl/reset")
      local srv = start_client({ SPEC_REDIS_URL = url or nil, SPEC_STORE_PREFIX = "down:" .. wxd.crypto.nonce(8) .. ":" })
      local ok, err = pcall(function()
        ctl("POST", "/_ctl/config", { down = true, token_delay_ms = 20 })
        local rs = concurrent_get(srv, "/api", 50)
        for i, r in ipairs(rs) do
          assert.equal(502, r.status, "request " .. i)
          assert.equal("status", json(r).error)
        end
        assert.equal(1, counts().stable_token, url and "with the Redis store" or "with the memory store")
        ctl("POST", "/_ctl/config", { down = false, token_delay_ms = 0 })
      end)
      srv:stop(); srv:cleanup()
      assert(ok, err)
    end
  end)

  it("refreshes before expiry in the background; no request waits for it", function()
    -- Tokens live 12 s; renewal is due 8 s before the end, so after ~4 s.
    ctl("POST", "/_ctl/config", { expires_in = 12 })
    local srv = start_client({ SPEC_WX_REFRESH_BEFORE = 8, SPEC_WX_EXPIRY_MARGIN = 2, SPEC_WX_CHECK_MS = 200 })
    local ok, err = pcall(function()
      local seen, order = {}, {}
      local t0 = wxd.monotonic_ms()
      while wxd.monotonic_ms() - t0 < 7000 do
        local r = srv:get("/api")
        assert.equal(200, r.status, r.body)
        local tok = json(r).token
        if not seen[tok] then seen[tok] = true; order[#order + 1] = tok end
        wxd.sleep(50)
      end
      assert.is_true(#order >= 2, "the token was renewed while requests went on")
      local stats = json(srv:get("/stats"))
      assert.equal(1, stats.blocking_refreshes, "only the very first request waited for a fetch")
      assert.is_true(stats.background_refreshes >= 1)
      assert.equal(1 + stats.background_refreshes, counts().stable_token)
    end)
    srv:stop()
    srv:cleanup()
    assert(ok, err)
  end)

  it("keeps the valid token in use while WeChat is down, retrying with backoff", function()
    ctl("POST", "/_ctl/config", { expires_in = 14 })
    local srv = start_client({ SPEC_WX_REFRESH_BEFORE = 12, SPEC_WX_EXPIRY_MARGIN = 2, SPEC_WX_CHECK_MS = 200 })
    local ok, err = pcall(function()
      local first = json(srv:get("/api")).token
      ctl("POST", "/_ctl/config", { down = true })
      -- Due after 2 s; WeChat answers 503 from then on.
      local t0 = wxd.monotonic_ms()
      while wxd.monotonic_ms() - t0 < 5000 do
        local r = srv:get("/api")
        assert.equal(200, r.status, r.body)
        assert.equal(first, json(r).token)
        wxd.sleep(100)
      end
      local fails = {}
      for l in srv:log_text():gmatch("[^\n]+") do
        if l:find("background refresh failed", 1, true) then fails[#fails + 1] = cjson.decode(l) end
      end
      -- Attempts at ~2, 3, 5 s: the wait doubles (1 s, 2 s, ...), no hammering.
      assert.is_true(#fails >= 2 and #fails <= 4, #fails .. " failed attempts in 3 s")
      assert.equal(1, fails[1].retry_in_s)
      assert.equal(2, fails[2].retry_in_s)
      assert.equal("status", fails[1].error)
      ctl("POST", "/_ctl/config", { down = false })
      H.wait_until(function() return json(srv:get("/api")).token ~= first end, 8, "the renewed token")
      local stats = json(srv:get("/stats"))
      assert.equal(1, stats.blocking_refreshes)
    end)
    srv:stop()
    srv:cleanup()
    assert(ok, err)
  end)

  it("never writes the secret, a token or a session key to its logs", function()
    local srv = start_client()
    local mini = H.start(H.ROOT .. "/examples/miniprogram", { workers = 1, env = env({
      WXD_MINI_APPID = APPID, WXD_MINI_SECRET = SECRET, WXD_WECHAT_API_BASE = base }) })
    local ok, err = pcall(function()
      assert.equal(200, srv:get("/api").status)
      ctl("POST", "/_ctl/revoke", { rotate = true })
      assert.equal(200, srv:get("/api").status)
      local r = mini:request("POST", "/login", { ["Content-Type"] = "application/json" }, '{"code":"logcheck"}')
      assert.equal(200, r.status, r.body)
      local state = ctl("GET", "/_ctl/state")
      for _, s in ipairs({ srv, mini, fake }) do
        local text = s:log_text()
        assert.is_nil(text:find(SECRET, 1, true), "secret in a log")
        assert.is_nil(text:find("TOKEN-", 1, true), "a token in a log")
        assert.is_nil(text:find(state.current, 1, true), "the token in a log")
        assert.is_nil(text:find(SESSION_KEY, 1, true), "a session key in a log")
      end
    end)
    srv:stop(); srv:cleanup()
    mini:stop(); mini:cleanup()
    assert(ok, err)
  end)

  describe("examples/official-account with WXD_MP_SECRET", function()
    local srv
    local TOKEN, AES = "spectoken", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
    setup(function()
      srv = H.start(H.ROOT .. "/examples/official-account", { workers = 2, env = env({
        WXD_MP_APPID = APPID, WXD_MP_TOKEN = TOKEN, WXD_MP_AES_KEY = AES, WXD_MP_SECRET = SECRET,
        WXD_WECHAT_API_BASE = base }) })
    end)
    teardown(function() srv:stop(); srv:cleanup() end)

    it("serves the JS-SDK configuration of a page", function()
      local url = "https://shop.example/item?id=7&from=share"
      local r = srv:get("/jssdk/config?url=" .. crypto.url_encode(url .. "#reviews"))
      assert.equal(200, r.status, r.body)
      local conf = json(r)
      local ticket = ctl("GET", "/_ctl/state").jsapi
      assert.equal(APPID, conf.appId)
      assert.equal(require("wxd.wechat").jssdk_signature(ticket, conf.nonceStr, conf.timestamp, url), conf.signature)
      local expect = crypto.sha1_hex("jsapi_ticket=" .. ticket .. "&noncestr=" .. conf.nonceStr .. "&timestamp="
                                     .. conf.timestamp .. "&url=" .. url)
      assert.equal(expect, conf.signature)
      for _ = 1, 5 do assert.equal(200, srv:get("/jssdk/config?url=" .. crypto.url_encode(url)).status) end
      assert.equal(1, counts().ticket)
      assert.equal(400, srv:get("/jssdk/config").status)
      assert.equal(400, srv:get("/jssdk/config?url=javascript%3Aalert(1)").status)
    end)

    it("still echoes messages", function()
      local wx = testing.wechat({ token = TOKEN, appid = APPID, aes_key = AES, mode = "safe" })
      local built = wx:build({ MsgType = "text", Content = "hi" })
      local r = srv:request("POST", built.url, { ["Content-Type"] = "text/xml" }, built.body)
      assert.equal("echo: hi", assert(wx:open_reply(r.body)).Content)
    end)
  end)

  it("serves /jssdk/config from the default app when WXD_MP_SECRET is set", function()
    local srv = H.start(H.ROOT, { workers = 1, env = env({ WXD_MP_APPID = APPID, WXD_MP_TOKEN = "t",
      WXD_MP_SECRET = SECRET, WXD_WECHAT_API_BASE = base }) })
    local ok, err = pcall(function()
      local r = srv:get("/jssdk/config?url=" .. crypto.url_encode("https://a.example/p"))
      assert.equal(200, r.status, r.body)
      local conf = json(r)
      assert.equal(require("wxd.wechat").jssdk_signature(ctl("GET", "/_ctl/state").jsapi, conf.nonceStr,
        conf.timestamp, "https://a.example/p"), conf.signature)
    end)
    srv:stop(); srv:cleanup()
    assert(ok, err)
  end)

  it("sends a reply that missed the deadline through the customer-service API", function()
    local C = require "fixtures.mp.conf"
    local srv = H.start(H.app("mp"), { workers = 2, env = env({
      WXD_MP_APPID = APPID, WXD_MP_TOKEN = C.token, WXD_MP_AES_KEY = C.key1, SPEC_MP_DEADLINE_MS = 500,
      WXD_MP_SECRET = SECRET, WXD_WECHAT_API_BASE = base }) })
    local ok, err = pcall(function()
      local wx = testing.wechat({ token = C.token, appid = APPID, aes_key = C.key1, mode = "safe" })
      local msg = wx:message({ MsgType = "text", Content = "sleep:1200" })
      local built = wx:build(msg)
      local r = srv:request("POST", built.url, { ["Content-Type"] = "text/xml" }, built.body)
      assert.equal("success", r.body)
      local msgs
      H.wait_until(function()
        msgs = ctl("GET", "/_ctl/messages")
        return #msgs == 1
      end, 10, "the customer-service message")
      assert.equal(wx.openid, msgs[1].touser)
      assert.equal("text", msgs[1].msgtype)
      assert.truthy(msgs[1].text.content:find("^run 1 on worker %d of " .. msg.MsgId .. "$"), msgs[1].text.content)
      -- Logged once the API has answered, which is after the fake recorded it.
      H.wait_until(function()
        return srv:log_text():find("late reply sent through the customer-service API", 1, true)
      end, 10, "the late-reply log line")
    end)
    srv:stop(); srv:cleanup()
    assert(ok, err)
  end)

  describe("examples/miniprogram", function()
    local srv
    setup(function()
      srv = H.start(H.ROOT .. "/examples/miniprogram", { workers = 2, env = env({
        WXD_MINI_APPID = APPID, WXD_MINI_SECRET = SECRET, WXD_WECHAT_API_BASE = base }) })
    end)
    teardown(function() srv:stop(); srv:cleanup() end)

    local function post(path, body, token)
      local h = { ["Content-Type"] = "application/json" }
      if token then h.Authorization = "Bearer " .. token end
      return srv:request("POST", path, h, cjson.encode(body))
    end

    -- encryptedData as WeChat makes it for this appid, with the fake's session key.
    local function encrypted(data)
      local iv = crypto.random_bytes(16)
      local ct = crypto.aes_cbc_encrypt(crypto.base64_decode(SESSION_KEY), iv, cjson.encode(data), 16)
      return crypto.base64_encode(ct), crypto.base64_encode(iv)
    end

    it("logs in with a code, then decrypts the user's data with the session kept on the server", function()
      local r = post("/login", { code = "c0ffee" })
      assert.equal(200, r.status, r.body)
      local login = json(r)
      assert.equal("oc0ffee-openid", login.openid)
      assert.is_nil(login.session_key, "the session key stays on the server")
      assert.is_nil(r.body:find(SESSION_KEY, 1, true))
      local enc, iv = encrypted({ openId = "oc0ffee-openid", nickName = "wxd",
                                  watermark = { appid = APPID, timestamp = math.floor(wxd.now()) } })
      local d = post("/decrypt", { encryptedData = enc, iv = iv }, login.token)
      assert.equal(200, d.status, d.body)
      assert.equal("wxd", json(d).nickName)
      local phone = post("/phone", { code = "p1" }, login.token)
      assert.equal(200, phone.status, phone.body)
      assert.equal("13800138000", json(phone).purePhoneNumber)
    end)

    it("refuses bad codes, missing sessions and foreign or tampered data", function()
      local bad = post("/login", { code = "bad" })
      assert.equal(401, bad.status)
      assert.equal(400, post("/login", {}).status)
      assert.equal(401, post("/decrypt", { encryptedData = "x", iv = "y" }).status)
      assert.equal(401, post("/decrypt", { encryptedData = "x", iv = "y" }, "forged-token").status)
      local login = json(post("/login", { code = "c2" }))
      local enc, iv = encrypted({ watermark = { appid = "wxother", timestamp = math.floor(wxd.now()) } })
      local r = post("/decrypt", { encryptedData = enc, iv = iv }, login.token)
      assert.equal(400, r.status)
      assert.equal("watermark appid mismatch", json(r).error)
      local enc2, iv2 = encrypted({ watermark = { appid = APPID, timestamp = math.floor(wxd.now()) } })
      local raw = crypto.base64_decode(enc2)
      local tampered = crypto.base64_encode(raw:sub(1, -2) .. string.char((raw:byte(-1) + 1) % 256))
      local t = post("/decrypt", { encryptedData = tampered, iv = iv2 }, login.token)
      assert.equal(400, t.status)
      assert.equal("decrypt failed", json(t).error)
    end)
  end)
end)
