-- wxd.wechat and wxd.miniprogram: published vectors, and a client run in
-- this script against the fake WeChat API server (spec/fixtures/apps/fakewx).
local H = require "helpers"
local wechat = require "wxd.wechat"
local mini = require "wxd.miniprogram"
local http = require "wxd.http"
local store = require "wxd.store"
local cjson = require "cjson"
local wxd = require "wxd"

local APPID, SECRET = "wxfake0000000001", "fake-secret-0123456789"

-- WeChat's Mini Program demo data (open-ability/signature), as published.
local SAMPLE = {
  appid = "wx4f4bc4dec97d474b",
  session_key = "tiihtNczf5v6AKRyjwEUhQ==",
  iv = "r7BXXKkLb8qrSNn05n0qiA==",
  encrypted = "CiyLU1Aw2KjvrjMdj8YKliAjtP4gsMZMQmRzooG2xrDcvSnxIMXFufNstNGTyaGS9uT5geRa0W4oTOb1WT7fJlAC"
    .. "+oNPdbB+3hVbJSRgv+4lGOETKUQz6OYStslQ142dNCuabNPGBzlooOmB231qMM85d2/fV6ChevvXvQP8Hkue1poOFtnEtpyxV"
    .. "LW1zAo6/1Xx1COxFvrc2d7UL/lmHInNlxuacJXwu0fjpXfz/YqYzBIBzD6WUfTIF9GRHpOn/Hz7saL8xz+W//FRAUid1OksQa"
    .. "Qx4CMs8LOddcQhULW4ucetDf96JcR3g0gfRK4PC7E/r7Z6xNrXd2UIeorGj5Ef7b1pJAYB6Y5anaHqZ9J6nKEBvB4DnNLIVWS"
    .. "gARns/8wR2SiRS7MNACwTyrGvt9ts8p12PKFdlqYTopNHR1Vf7XjfhQlVsAJdNiKdYmYVoKlaRv85IfVunYzO0IKXsyl7JCUj"
    .. "CpoG20f0a04COwfneQAGGwd5oa+T8yO5hzuyDb/XcxxmK01EpqOyuxINew==",
  timestamp = 1477314187,
}

describe("wxd.wechat.jssdk_signature", function()
  it("matches the JS-SDK documentation's example", function()
    assert.equal("0f9de62fce790f9a083d5c99e95740ceb90c27ed", wechat.jssdk_signature(
      "sM4AOVdWfPE4DxkXGEs8VMCPGGVi4C3VM0P37wVUCFvkVAy_90u5h9nbSlYy3-Sl-HhTdfl2fzFy1AOcHKP7qg",
      "Wm3WZYTPz0wzccnW", 1414587457, "http://mp.weixin.qq.com?params=value"))
  end)

  it("drops the #fragment and takes the timestamp as a string too", function()
    local a = wechat.jssdk_signature("t", "n", 1414587457, "https://x.example/p?a=1#section")
    local b = wechat.jssdk_signature("t", "n", "1414587457", "https://x.example/p?a=1")
    assert.equal(a, b)
  end)

  it("raises on wrong argument types", function()
    assert.has_error(function() wechat.jssdk_signature(nil, "n", 1, "u") end)
    assert.has_error(function() wechat.jssdk_signature("t", "n", {}, "u") end)
  end)
end)

describe("wxd.miniprogram.decrypt", function()
  it("decrypts WeChat's published sample and checks its watermark", function()
    local data = assert(mini.decrypt(SAMPLE.session_key, SAMPLE.encrypted, SAMPLE.iv,
      { appid = SAMPLE.appid, now = SAMPLE.timestamp + 5 }))
    assert.equal("oGZUI0egBJY1zhBYw2KhdUfwVJJE", data.openId)
    assert.equal("ocMvos6NjeKLIBqg5Mr9QjxrP1FA", data.unionId)
    assert.equal(SAMPLE.appid, data.watermark.appid)
    assert.equal(SAMPLE.timestamp, data.watermark.timestamp)
  end)

  it("takes the base64 with line breaks, as clients send it", function()
    local wrapped = SAMPLE.encrypted:gsub("(" .. ("."):rep(64) .. ")", "%1\n")
    assert.truthy(mini.decrypt(SAMPLE.session_key, wrapped, SAMPLE.iv,
      { appid = SAMPLE.appid, max_age = false }))
  end)

  it("refuses data made for another appid", function()
    local data, err = mini.decrypt(SAMPLE.session_key, SAMPLE.encrypted, SAMPLE.iv,
      { appid = "wx0000000000000000", max_age = false })
    assert.is_nil(data)
    assert.equal("watermark appid mismatch", err)
  end)

  it("refuses an old watermark (the sample is from 2016) unless max_age allows it", function()
    local data, err = mini.decrypt(SAMPLE.session_key, SAMPLE.encrypted, SAMPLE.iv, { appid = SAMPLE.appid })
    assert.is_nil(data)
    assert.equal("watermark too old", err)
    assert.truthy(mini.decrypt(SAMPLE.session_key, SAMPLE.encrypted, SAMPLE.iv,
      { appid = SAMPLE.appid, max_age = 3600, now = SAMPLE.timestamp + 3599 }))
    assert.is_nil((mini.decrypt(SAMPLE.session_key, SAMPLE.encrypted, SAMPLE.iv,
      { appid = SAMPLE.appid, max_age = 3600, now = SAMPLE.timestamp + 3601 })))
  end)

  it("gives one error for every kind of bad ciphertext", function()
    local opts = { appid = SAMPLE.appid, max_age = false }
    local crypto = require "wxd.crypto"
    local ct = crypto.base64_decode(SAMPLE.encrypted)
    local tampered_last = crypto.base64_encode(ct:sub(1, -2) .. string.char((ct:byte(-1) + 1) % 256))
    local tampered_first = crypto.base64_encode(string.char((ct:byte(1) + 1) % 256) .. ct:sub(2))
    local cases = {
      tampered_last,                                    -- padding broken
      tampered_first,                                   -- JSON broken
      crypto.base64_encode(ct:sub(1, -2)),              -- not a whole block
      crypto.base64_encode(ct:sub(1, #ct - 16)),        -- a block short: bad padding or JSON
      "",                                               -- empty
      "not base64 !!!",                                 -- not base64
    }
    for i, enc in ipairs(cases) do
      local data, err = mini.decrypt(SAMPLE.session_key, enc, SAMPLE.iv, opts)
      assert.is_nil(data, "case " .. i)
      assert.equal("decrypt failed", err, "case " .. i)
    end
    -- A wrong key or IV gives the same answer as a tampered ciphertext.
    local _, e1 = mini.decrypt(crypto.base64_encode(("k"):rep(16)), SAMPLE.encrypted, SAMPLE.iv, opts)
    assert.equal("decrypt failed", e1)
    local _, e2 = mini.decrypt(SAMPLE.session_key, SAMPLE.encrypted, crypto.base64_encode(("i"):rep(16)), opts)
    assert.equal("decrypt failed", e2)
  end)

  it("names a session_key or iv of the wrong size", function()
    local opts = { appid = SAMPLE.appid, max_age = false }
    assert.equal("invalid session_key", select(2, mini.decrypt("abc", SAMPLE.encrypted, SAMPLE.iv, opts)))
    assert.equal("invalid iv", select(2, mini.decrypt(SAMPLE.session_key, SAMPLE.encrypted, "AAAA", opts)))
    assert.equal("decrypt failed", select(2, mini.decrypt(nil, SAMPLE.encrypted, SAMPLE.iv, opts)))
  end)

  it("raises without an appid to check", function()
    assert.has_error(function() mini.decrypt(SAMPLE.session_key, SAMPLE.encrypted, SAMPLE.iv) end)
    assert.has_error(function() mini.decrypt(SAMPLE.session_key, SAMPLE.encrypted, SAMPLE.iv, {}) end)
    assert.has_error(function()
      mini.decrypt(SAMPLE.session_key, SAMPLE.encrypted, SAMPLE.iv, { appid = "x", max_age = -1 })
    end)
  end)

  it("computes the rawData signature as sha1(rawData .. session_key), like the openssl CLI", function()
    local raw = '{"nickName":"Band","gender":1,"city":"Guangzhou"}'
    local out = H.sh("printf '%s' '" .. raw .. SAMPLE.session_key .. "' | openssl sha1")
    assert.equal(out:match("(%x+)%s*$"), mini.raw_data_signature(raw, SAMPLE.session_key))
    assert.has_error(function() mini.raw_data_signature(nil, "k") end)
  end)
end)

describe("wxd.wechat.client configuration", function()
  it("raises on missing or malformed settings, naming them", function()
    local function msg(cfg)
      local ok, err = pcall(wechat.client, cfg)
      assert.is_false(ok)
      return tostring(err)
    end
    assert.matches("cfg must be a table", msg(nil))
    assert.matches("cfg.appid", msg({ secret = "s" }))
    assert.matches("cfg.secret", msg({ appid = "wx1" }))
    assert.matches("token_mode", msg({ appid = "wx1", secret = "s", token_mode = "magic" }))
    assert.matches("api_base", msg({ appid = "wx1", secret = "s", api_base = "ftp://x" }))
    assert.matches("refresh_before", msg({ appid = "wx1", secret = "s", refresh_before = -1 }))
  end)

  it("never shows the secret", function()
    local c = wechat.client({ appid = "wx1", secret = "SECRET-VALUE-1", api_base = "http://127.0.0.1:1" })
    assert.is_nil(tostring(c):find("SECRET-VALUE-1", 1, true))
    local ok, err = pcall(wechat.client, { appid = "wx1", secret = "SECRET-VALUE-1", token_mode = 1 })
    assert.is_false(ok)
    assert.is_nil(tostring(err):find("SECRET-VALUE-1", 1, true))
  end)

  it("gives the same client for the same settings", function()
    local cfg = { appid = "wx2", secret = "s", api_base = "http://127.0.0.1:1" }
    assert.equal(wechat.client(cfg), wechat.client(cfg))
    assert.are_not.equal(wechat.client(cfg), wechat.client({ appid = "wx2", secret = "s2",
                                                             api_base = "http://127.0.0.1:1" }))
  end)
end)

describe("wxd.wechat client against the fake WeChat server", function()
  local fake, base
  local n = 0

  local function ctl(method, path, body)
    local res = assert(http.request({ method = method, url = base .. path, body = body and cjson.encode(body) }))
    assert.equal(200, res.status, res.body)
    return cjson.decode(res.body)
  end
  local function counts() return ctl("GET", "/_ctl/counts") end

  -- A fresh appid each test: credentials of earlier tests stay in the store.
  local function client(extra)
    n = n + 1
    local cfg = { appid = APPID, secret = SECRET, api_base = base, background = false }
    for k, v in pairs(extra or {}) do cfg[k] = v end
    -- The store is shared by every test of this script: start clean.
    for _, k in ipairs({ "access_token", "access_token:bad", "ticket:jsapi", "ticket:wx_card", "force_gap" }) do
      store.delete("wxd:wechat:" .. APPID .. ":" .. k)
    end
    cfg.check_ms = 1000 + n -- a distinct client object per test
    return wechat.client(cfg)
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

  it("fetches a stable_token once and reuses it from the store", function()
    local c = client()
    local t1 = assert(c:access_token())
    local t2 = assert(c:access_token())
    assert.equal(t1, t2)
    local data = assert(c:get("/cgi-bin/get_api_domain_ip"))
    assert.equal(t1, data.token)
    local k = counts()
    assert.equal(1, k.stable_token)
    assert.equal(0, k.token)
    assert.equal(1, c:stats().blocking_refreshes)
  end)

  it("uses /cgi-bin/token in token mode", function()
    local c = client({ token_mode = "token" })
    assert.truthy(c:access_token())
    local k = counts()
    assert.equal(1, k.token)
    assert.equal(0, k.stable_token)
  end)

  it("replaces a revoked token with exactly one refresh, and the call succeeds", function()
    local c = client()
    local t1 = assert(c:access_token())
    ctl("POST", "/_ctl/revoke", { rotate = true })
    local data, err = c:get("/cgi-bin/get_api_domain_ip")
    assert.is_nil(err)
    assert.are_not.equal(t1, data.token)
    local k = counts()
    assert.equal(2, k.stable_token)
    assert.equal(0, k.stable_force)
    assert.equal(1, k.api_refused)
    assert.equal(1, c:stats().invalidations)
  end)

  it("forces a stable_token refresh when WeChat keeps handing out the refused token, once per 30 s", function()
    local c = client()
    local t1 = assert(c:access_token())
    ctl("POST", "/_ctl/revoke", { rotate = false })
    local data = assert(c:get("/cgi-bin/get_api_domain_ip"))
    assert.are_not.equal(t1, data.token)
    assert.equal(1, counts().stable_force)
    -- Refused again within 30 s: no second forced refresh, a clear error.
    ctl("POST", "/_ctl/revoke", { rotate = false })
    local none, err, info = c:get("/cgi-bin/get_api_domain_ip")
    assert.is_nil(none)
    assert.equal("token", err)
    assert.matches("less than 30 s ago", info.detail)
    assert.equal(1, counts().stable_force)
  end)

  it("keeps a token another caller already put in place (compare-and-set)", function()
    local c = client()
    local t1 = assert(c:access_token())
    -- Someone else replaced it meanwhile.
    local t2 = "TOKEN-other-1"
    store.set("wxd:wechat:" .. APPID .. ":access_token", string.format("%d:%s", os.time() + 3600, t2), 3600)
    assert.is_false(c:invalidate_token(t1))
    assert.equal(t2, c:access_token())
    assert.is_true(c:invalidate_token(t2))
  end)

  it("does not treat rate limits and busy answers as token errors", function()
    local c = client()
    assert(c:access_token())
    for _, code in ipairs({ 45009, 45011, -1 }) do
      ctl("POST", "/_ctl/config", { fail = { errcode = code, errmsg = "limited", times = 1 } })
      local data, err, info = c:get("/cgi-bin/get_api_domain_ip")
      assert.is_nil(data)
      assert.equal("wechat", err)
      assert.equal(code, info.errcode)
    end
    assert.equal(1, counts().stable_token)
    assert.equal(0, c:stats().invalidations)
  end)

  it("maps transport and protocol failures to stable kinds", function()
    local c = client()
    ctl("POST", "/_ctl/config", { down = true })
    local data, err, info = c:get("/cgi-bin/get_api_domain_ip")
    assert.is_nil(data)
    assert.equal("status", err)
    assert.equal(503, info.status)
    ctl("POST", "/_ctl/config", { down = false })
    local dead = wechat.client({ appid = "wxdead", secret = "s", api_base = "http://127.0.0.1:" .. H.free_port(),
                                 background = false })
    local _, kind = dead:access_token()
    assert.equal("connect", kind)
    local slow = client({ timeout = 0.2 })
    ctl("POST", "/_ctl/config", { token_delay_ms = 1000 })
    local _, tkind = slow:access_token()
    assert.equal("timeout", tkind)
    ctl("POST", "/_ctl/config", { token_delay_ms = 0 })
    local bad = wechat.client({ appid = APPID, secret = "wrong", api_base = base, background = false })
    local _, wkind, winfo = bad:access_token()
    assert.equal("wechat", wkind)
    assert.equal(40125, winfo.errcode)
  end)

  it("fetches and caches the jsapi ticket and signs a page", function()
    local c = client()
    local cfg = assert(c:jssdk_config("https://shop.example/page?id=1#top"))
    local ticket = ctl("GET", "/_ctl/state").jsapi
    assert.equal(APPID, cfg.appId)
    assert.equal(wechat.jssdk_signature(ticket, cfg.nonceStr, cfg.timestamp, "https://shop.example/page?id=1"),
                 cfg.signature)
    assert(c:jssdk_config("https://shop.example/other"))
    assert.equal(1, counts().ticket)
    assert.equal(ticket, c:ticket("jsapi"))
    assert.are_not.equal(ticket, c:ticket("wx_card"))
    assert.equal(2, counts().ticket)
    assert.equal("invalid url", select(2, c:jssdk_config("javascript:alert(1)")))
    assert.equal("invalid url", select(2, c:jssdk_config(nil)))
    assert.has_error(function() c:ticket("other") end)
  end)

  it("gives a route handler for the JS-SDK configuration", function()
    local c = client()
    local h = c:jssdk_handler()
    local status = h({ query = {} })
    assert.equal(400, status)
    local conf = h({ query = { url = "https://x.example/" } })
    assert.equal(APPID, conf.appId)
    store.delete("wxd:wechat:" .. APPID .. ":ticket:jsapi")
    store.delete("wxd:wechat:" .. APPID .. ":access_token")
    ctl("POST", "/_ctl/config", { down = true })
    local st, body = h({ query = { url = "https://x.example/" } })
    assert.equal(502, st)
    assert.equal("status", body.kind)
    ctl("POST", "/_ctl/config", { down = false })
  end)

  it("logs in a Mini Program user and decrypts the phone number", function()
    local c = client()
    local s = assert(c:code2session("code123"))
    assert.equal("ocode123-openid", s.openid)
    assert.equal("tiihtNczf5v6AKRyjwEUhQ==", s.session_key)
    local again, err, info = c:code2session("code123") -- a code works once
    assert.is_nil(again)
    assert.equal("wechat", err)
    assert.equal(40029, info.errcode)
    assert.equal("invalid code", select(2, c:code2session("")))
    assert.equal("invalid code", select(2, c:code2session("a b")))
    local phone = assert(c:phone_number("phonecode"))
    assert.equal("13800138000", phone.purePhoneNumber)
    local _, perr, pinfo = c:phone_number("bad")
    assert.equal("wechat", perr)
    assert.equal(40029, pinfo.errcode)
  end)

  it("sends customer-service messages", function()
    local c = client()
    assert(c:send_custom({ touser = "openid-1", msgtype = "text", text = { content = "hello / 你好" } }))
    local msgs = ctl("GET", "/_ctl/messages")
    assert.equal(1, #msgs)
    assert.equal("hello / 你好", msgs[1].text.content)
    assert.has_error(function() c:send_custom("text") end)
  end)

  it("raises on programmer errors in calls", function()
    local c = client()
    assert.has_error(function() c:call("GET", "no-slash") end)
    assert.has_error(function() c:call(1, "/x") end)
    assert.has_error(function() c:get("/x", "query") end)
    assert.has_error(function() c:post("/x", "body") end)
  end)
end)

describe("wxd.wechat background refresh", function()
  local fake, base
  local function ctl(method, path, body)
    local res = assert(http.request({ method = method, url = base .. path, body = body and cjson.encode(body) }))
    return cjson.decode(res.body)
  end
  setup(function()
    fake = H.start(H.app("fakewx"), { workers = 1 })
    base = "http://127.0.0.1:" .. fake.port
  end)
  teardown(function() fake:stop(); fake:cleanup() end)

  it("does not loop when tokens live shorter than refresh_before", function()
    ctl("POST", "/_ctl/reset")
    ctl("POST", "/_ctl/config", { expires_in = 4, renew_window = 3600 }) -- every stable_token call renews
    store.delete("wxd:wechat:" .. APPID .. ":access_token")
    local c = wechat.client({ appid = APPID, secret = SECRET, api_base = base, background = true,
                              check_ms = 50, refresh_before = 300, expiry_margin = 1 })
    assert(c:access_token())
    wxd.sleep(1500)
    c.job:cancel()
    -- Ticks every 50 ms for 1.5 s: at most one refresh per half remaining
    -- life (2 s, then 1 s, ...), not one per tick.
    local n = ctl("GET", "/_ctl/counts").stable_token
    assert.is_true(n >= 2 and n <= 3, n .. " fetches")
  end)
end)
