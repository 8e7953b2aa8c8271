-- wxd.mp: WeChat's published sample values, the three modes with every
-- message type, the reply builders, dispatch, Mini Program JSON, WeCom and
-- key rotation. Requests go through app:handle, built by wxd.testing.
local mp = require "wxd.mp"
local crypto = require "wxd.crypto"
local xml = require "wxd.xml"
local testing = require "wxd.testing"
local wxd = require "wxd"
local messages = require "fixtures.mp.messages"
local C = require "fixtures.mp.conf"

local S = C.sample

local function new_app(cfg, handlers)
  local app = require("wxd.app").new()
  app:mp(cfg.path or "/wx", cfg, handlers)
  return app
end

describe("wxd.mp with WeChat's published sample", function()
  it("computes the URL signature of a published vector", function()
    assert.equal("a9993e364706816aba3e25717850c26c9cd0d89d", mp.signature("c", "a", "b"))
  end)

  it("derives the AES key from the EncodingAESKey", function()
    local k = mp.aes_key(S.aes_key)
    assert.equal(S.aes_key_hex, crypto.hex_encode(k.key))
    assert.equal("wxd.mp.aes_key (hidden)", tostring(k))
    assert.is_nil(mp.aes_key("short"))
    assert.is_nil(mp.aes_key(string.rep("!", 43)))
  end)

  it("verifies the sample msg_signature", function()
    assert.equal(S.msg_signature, mp.signature(S.token, S.timestamp, S.nonce, S.encrypt))
  end)

  it("decrypts the sample Encrypt value to the published message and appid", function()
    local msg = mp.decrypt(S.aes_key, S.encrypt, S.appid)
    assert.equal(S.message, msg)
    assert.equal(293, #msg)
    -- The layout, checked by hand: random prefix, length, message, appid, pad 21.
    local k = mp.aes_key(S.aes_key)
    local plain = crypto.aes_cbc_decrypt(k.key, k.key:sub(1, 16), crypto.base64_decode(S.encrypt), 32)
    assert.equal(S.random, plain:sub(1, 16))
    assert.equal("\0\0\1\37", plain:sub(17, 20))
    assert.equal(S.appid, plain:sub(-#S.appid))
    local raw = crypto.aes_cbc_decrypt(k.key, k.key:sub(1, 16), crypto.base64_decode(S.encrypt), 255)
    assert.equal(#plain, #raw)
    assert.equal(20 + 293 + 18 + 21, #crypto.base64_decode(S.encrypt))
  end)

  it("encrypts the sample message with the same random prefix to the same ciphertext", function()
    assert.equal(S.encrypt, mp.encrypt(S.aes_key, S.message, S.appid, S.random))
  end)

  it("refuses the sample for another appid", function()
    assert.same({ nil, "decrypt failed" }, { mp.decrypt(S.aes_key, S.encrypt, "wxb11529c136998cb7") })
    assert.same({ nil, "decrypt failed" }, { mp.decrypt(S.aes_key, S.encrypt, "") })
  end)

  it("accepts the sample as a real request (timestamp window off) and encrypts the reply", function()
    local got
    local app = new_app({ token = S.token, appid = S.appid, aes_key = S.aes_key, timestamp_window = false },
      { text = function(msg) got = msg; return "hello back" end })
    local body = "<xml><ToUserName><![CDATA[asdasdasd]]></ToUserName><Encrypt><![CDATA[" .. S.encrypt
      .. "]]></Encrypt></xml>"
    local status, headers, out = app:handle({ method = "POST", path = "/wx", version = "1.1", body = body,
      query_string = "signature=x&timestamp=" .. S.timestamp .. "&nonce=" .. S.nonce
        .. "&openid=asdasdasdsadasd&encrypt_type=aes&msg_signature=" .. S.msg_signature,
      headers = {}, remote_addr = "127.0.0.1", remote_port = 1, id = "sample" })
    assert.equal(200, status)
    assert.truthy(headers["content-type"]:find("xml", 1, true))
    assert.equal("hello", got.Content)
    assert.equal("12345", got.MsgId)
    assert.equal("http://wechat.laravel.so/server", got.URL)
    local wx = testing.wechat({ token = S.token, appid = S.appid, aes_key = S.aes_key })
    local reply = assert(wx:open_reply(out))
    assert.same({ "asdasdasdsadasd", "asdasdasd", "text", "hello back" },
      { reply.ToUserName, reply.FromUserName, reply.MsgType, reply.Content })
  end)

  it("refuses the sample with the default timestamp window (it is from 2016)", function()
    local app = new_app({ token = S.token, appid = S.appid, aes_key = S.aes_key }, { default = function() end })
    local status = app:handle({ method = "POST", path = "/wx", version = "1.1", headers = {},
      body = "<xml><Encrypt><![CDATA[" .. S.encrypt .. "]]></Encrypt></xml>",
      query_string = "timestamp=" .. S.timestamp .. "&nonce=" .. S.nonce .. "&encrypt_type=aes&msg_signature="
        .. S.msg_signature })
    assert.equal(403, status)
  end)
end)

describe("wxd.mp round trips", function()
  for _, mode in ipairs({ "plaintext", "compatible", "safe" }) do
    describe("in " .. mode .. " mode", function()
      local appid = "wx" .. mode .. "000000000000"
      local seen = {}
      local function echo(msg, ctx)
        seen[#seen + 1] = { msg = msg, ctx = ctx }
        return mp.reply.text(msg.MsgType .. ":" .. (msg.Event or msg.Content or msg.MediaId or ""))
      end
      local cfg = { token = C.token, appid = appid }
      if mode ~= "plaintext" then cfg.aes_key = C.key1 end
      local app = new_app(cfg, { text = echo, image = echo, voice = echo, video = echo, shortvideo = echo,
                                 location = echo, link = echo, event = echo })
      local wx = testing.wechat({ token = C.token, appid = appid, aes_key = mode ~= "plaintext" and C.key1 or nil,
                                  mode = mode })

      it("answers the URL verification with echostr", function()
        local req, echostr = wx:verification()
        local status, headers, body = app:handle(req)
        assert.equal(200, status)
        assert.equal(echostr, body)
        assert.equal("text/plain; charset=utf-8", headers["content-type"])
      end)

      for _, m in ipairs(messages) do
        it("delivers " .. m.name .. " and replies", function()
          local n = #seen
          local reply, status, body = wx:send(app, m.xml)
          assert.equal(200, status, body)
          assert.equal(n + 1, #seen, "the handler ran once")
          local got = seen[#seen]
          assert.equal(mode, got.ctx.mode)
          assert.equal("xml", got.ctx.format)
          for k, v in pairs(m.fields) do
            if type(v) == "table" then
              for k2, v2 in pairs(v) do assert.same(v2, got.msg[k][k2]) end
            else
              assert.equal(v, got.msg[k], k)
            end
          end
          assert.equal("table", type(reply), tostring(body))
          assert.equal(messages.USER, reply.ToUserName)
          assert.equal(messages.ACCOUNT, reply.FromUserName)
          assert.equal("text", reply.MsgType)
          assert.equal(got.msg.MsgType .. ":", reply.Content:sub(1, #got.msg.MsgType + 1))
          assert.truthy(math.abs(tonumber(reply.CreateTime) - wxd.now()) < 60)
          if mode ~= "plaintext" then
            assert.truthy(body:find("<Encrypt>", 1, true), "encrypted reply")
            assert.falsy(body:find(messages.USER, 1, true), "nothing in clear")
          else
            assert.falsy(body:find("<Encrypt>", 1, true))
          end
        end)
      end

      it("answers success when the handler returns nothing", function()
        local quiet = new_app(cfg, { default = function() end })
        local reply, status, body = wx:send(quiet, { MsgType = "text", Content = "x" })
        assert.equal(200, status)
        assert.equal("success", reply)
        assert.equal("success", body)
      end)
    end)
  end
end)

describe("wxd.mp reply builders", function()
  local builders = {
    { "text", function() return mp.reply.text("hi <there> ]]>") end,
      function(r) assert.equal("hi <there> ]]>", r.Content) end },
    { "image", function() return mp.reply.image("MEDIA_I") end,
      function(r) assert.same({ MediaId = "MEDIA_I" }, r.Image) end },
    { "voice", function() return mp.reply.voice("MEDIA_V") end,
      function(r) assert.same({ MediaId = "MEDIA_V" }, r.Voice) end },
    { "video", function() return mp.reply.video("MEDIA_VI", "title", "desc") end,
      function(r) assert.same({ MediaId = "MEDIA_VI", Title = "title", Description = "desc" }, r.Video) end },
    { "music", function()
        return mp.reply.music({ title = "t", description = "d", music_url = "http://m/1.mp3",
                                hq_music_url = "http://m/1hq.mp3", thumb_media_id = "TH" })
      end,
      function(r)
        assert.same({ Title = "t", Description = "d", MusicUrl = "http://m/1.mp3", HQMusicUrl = "http://m/1hq.mp3",
                      ThumbMediaId = "TH" }, r.Music)
      end },
    { "news", function()
        return mp.reply.news({ { title = "a", description = "da", pic_url = "http://p/a.jpg", url = "http://u/a" },
                               { Title = "b", Url = "http://u/b" } })
      end,
      function(r)
        assert.equal("2", r.ArticleCount)
        assert.same({ { Title = "a", Description = "da", PicUrl = "http://p/a.jpg", Url = "http://u/a" },
                      { Title = "b", Url = "http://u/b" } }, r.Articles.item)
      end },
    { "transfer_customer_service", function() return mp.reply.transfer_customer_service("kf2001@test") end,
      function(r) assert.same({ KfAccount = "kf2001@test" }, r.TransInfo) end },
  }

  for _, mode in ipairs({ "plaintext", "compatible", "safe" }) do
    for _, b in ipairs(builders) do
      it("sends a " .. b[1] .. " reply in " .. mode .. " mode", function()
        local appid = "wxreply" .. mode
        local cfg = { token = C.token, appid = appid, aes_key = mode ~= "plaintext" and C.key2 or nil }
        local app = new_app(cfg, { text = b[2] })
        local wx = testing.wechat({ token = C.token, appid = appid, aes_key = cfg.aes_key, mode = mode })
        local reply, status, body = wx:send(app, { MsgType = "text", Content = "q" })
        assert.equal(200, status)
        assert.equal("table", type(reply), body)
        assert.equal(b[1], reply.MsgType)
        assert.equal(wx.openid, reply.ToUserName)
        assert.equal(wx.account, reply.FromUserName)
        b[3](reply)
        local _, plain = wx:open_reply(body)
        assert.truthy(plain:find("^<xml><ToUserName>"), "WeChat's field order")
      end)
    end
  end

  it("writes the fields in WeChat's order", function()
    local s = mp.render(mp.reply.news({ { title = "a", url = "u" } }), { FromUserName = "o", ToUserName = "gh" }, "xml")
    assert.truthy(s:find("^<xml><ToUserName><!%[CDATA%[o%]%]></ToUserName><FromUserName><!%[CDATA%[gh%]%]>"
      .. "</FromUserName><CreateTime>%d+</CreateTime><MsgType><!%[CDATA%[news%]%]></MsgType><ArticleCount>1"
      .. "</ArticleCount><Articles><item><Title><!%[CDATA%[a%]%]></Title><Url><!%[CDATA%[u%]%]></Url></item>"
      .. "</Articles></xml>$"), s)
  end)

  it("raises for misuse", function()
    assert.has_error(function() mp.reply.text(1) end)
    assert.has_error(function() mp.reply.image(nil) end)
    assert.has_error(function() mp.reply.news({}) end)
    assert.has_error(function() mp.reply.news({ {}, {}, {}, {}, {}, {}, {}, {}, {} }) end)
    assert.has_error(function() mp.reply.music("x") end)
    assert.has_error(function() mp.reply.video("m", 1) end)
  end)
end)

describe("wxd.mp dispatch", function()
  local calls
  local function mark(name) return function() calls[#calls + 1] = name end end
  local app = new_app({ token = C.token, appid = "wxdispatch" }, {
    text = mark("text"),
    event = { subscribe = mark("subscribe"), click = mark("click"), default = mark("event default") },
    default = mark("default"),
  })
  local wx = testing.wechat({ token = C.token })
  before_each(function() calls = {} end)

  it("routes by MsgType, by Event (also lower-cased), then to the defaults", function()
    wx:send(app, { MsgType = "text", Content = "x" })
    wx:send(app, { MsgType = "event", Event = "subscribe" })
    wx:send(app, { MsgType = "event", Event = "CLICK", EventKey = "K", CreateTime = 1 })
    wx:send(app, { MsgType = "event", Event = "VIEW", CreateTime = 2 })
    wx:send(app, { MsgType = "image", MediaId = "m" })
    wx:send(app, { MsgType = "miniprogrampage", Title = "t" })
    assert.same({ "text", "subscribe", "click", "event default", "default", "default" }, calls)
  end)

  it("takes one function for every event, or for everything", function()
    local got = {}
    local a = new_app({ token = C.token }, { event = function(msg) got[#got + 1] = msg.Event end })
    wx:send(a, { MsgType = "event", Event = "SCAN", CreateTime = 3 })
    wx:send(a, { MsgType = "event", Event = "LOCATION", CreateTime = 3 })
    assert.same({ "SCAN", "LOCATION" }, got)
    local b = new_app({ token = C.token, path = "/all" }, function(msg) return "got " .. msg.MsgType end)
    local wb = testing.wechat({ token = C.token, path = "/all" })
    assert.equal("got voice", (wb:send(b, { MsgType = "voice", MediaId = "v" })).Content)
  end)

  it("answers success when no handler matches", function()
    local a = new_app({ token = C.token }, { text = mark("text") })
    assert.equal("success", (wx:send(a, { MsgType = "image", MediaId = "m" })))
    assert.same({}, calls)
  end)

  it("answers success when a handler raises or returns something else (and logs it)", function()
    local a = new_app({ token = C.token }, { text = function() error("handler bug (expected in this spec)") end,
                                            image = function() return 42 end })
    assert.equal("success", (wx:send(a, { MsgType = "text", Content = "x" })))
    assert.equal("success", (wx:send(a, { MsgType = "image", MediaId = "m" })))
  end)

  it("gives handlers the request and the context", function()
    local ctx
    local a = new_app({ token = C.token, appid = "wxctx" }, { text = function(_, c) ctx = c end })
    wx:send(a, { MsgType = "text", Content = "x" })
    assert.equal("mp", ctx.kind)
    assert.equal("plaintext", ctx.mode)
    assert.equal("wxctx", ctx.appid)
    assert.equal("/wx", ctx.req.path)
    assert.equal(mp.reply, ctx.reply)
  end)

  it("refuses bad configuration when mounting", function()
    local function mount(cfg, h) return function() new_app(cfg, h or {}) end end
    assert.has_error(mount({}))
    assert.has_error(mount({ token = "" }))
    assert.has_error(mount({ token = "t", aes_key = "short", appid = "wx" }))
    assert.has_error(mount({ token = "t", aes_key = C.key1 }), "wxd.mp: cfg.appid is needed to check encrypted messages")
    assert.has_error(mount({ token = "t", kind = "wecom", corp_id = "ww" }))
    assert.has_error(mount({ token = "t", kind = "nope" }))
    assert.has_error(mount({ token = "t", deadline_ms = -1 }))
    assert.has_error(mount({ token = "t", timestamp_window = "5" }))
    assert.has_error(mount({ token = "t" }, { text = "not a function" }))
    assert.has_error(mount({ token = "t" }, { event = { subscribe = 1 } }))
    local ok, err = pcall(mount({ token = "t", aes_key = "x" .. C.key1:sub(2, 42), appid = "wx" }))
    assert.is_false(ok)
    assert.falsy(tostring(err):find(C.key1:sub(2, 42), 1, true), "the key is not in the message")
  end)
end)

describe("wxd.mp key rotation", function()
  local app = new_app({ token = C.token, appid = "wxrotate", aes_key = { C.key2, C.key1 } },
    { text = function(msg) return "got " .. msg.Content end })

  it("accepts messages under the new and the previous key, and replies with the key that worked", function()
    for _, k in ipairs({ C.key1, C.key2 }) do
      local wx = testing.wechat({ token = C.token, appid = "wxrotate", aes_key = k })
      local reply, status, body = wx:send(app, { MsgType = "text", Content = "k" })
      assert.equal(200, status)
      assert.equal("got k", reply.Content)
      local other = testing.wechat({ token = C.token, appid = "wxrotate", aes_key = k == C.key1 and C.key2 or C.key1 })
      assert.same({ nil, "decrypt failed" }, { other:open_reply(body) })
    end
  end)

  it("refuses a message under a key it does not have", function()
    local wx = testing.wechat({ token = C.token, appid = "wxrotate", aes_key = string.rep("A", 43) })
    local _, status = wx:send(app, { MsgType = "text", Content = "k" })
    assert.equal(400, status)
  end)
end)

describe("wxd.mp for the Mini Program", function()
  local got, events = nil, 0
  local cfg = { token = C.token, appid = "wxmini0000000001", kind = "miniprogram", aes_key = C.key1,
                allow_plaintext = true, path = "/mini" }
  local app = new_app(cfg, {
    text = function(msg) got = msg; return mp.reply.transfer_customer_service() end,
    event = { user_enter_tempsession = function(msg) got = msg end },
    miniprogrampage = function(msg) got = msg end,
  })

  for _, fmt in ipairs({ "json", "xml" }) do
    for _, mode in ipairs({ "plaintext", "safe" }) do
      it("takes " .. fmt .. " messages in " .. mode .. " mode", function()
        local wx = testing.wechat({ token = C.token, appid = cfg.appid, aes_key = C.key1, mode = mode,
                                    format = fmt, path = "/mini" })
        got = nil
        local reply, status, body = wx:send(app, { MsgType = "text", Content = "你好" })
        assert.equal(200, status, body)
        assert.equal("你好", got.Content)
        assert.equal("transfer_customer_service", reply.MsgType)
        assert.equal(wx.openid, reply.ToUserName)
        if fmt == "json" then assert.truthy(body:find("^{")) else assert.truthy(body:find("^<xml>")) end
        got = nil
        -- An event is known by its whole document: a new CreateTime makes another one.
        events = events + 1
        assert.equal("success", (wx:send(app, { MsgType = "event", Event = "user_enter_tempsession",
                                               SessionFrom = "wxapp", CreateTime = events })))
        assert.equal("wxapp", got.SessionFrom)
        got = nil
        wx:send(app, { MsgType = "miniprogrampage", Title = "t", AppId = "wxa", PagePath = "p", ThumbUrl = "u",
                       ThumbMediaId = "m" })
        assert.equal("p", got.PagePath)
      end)
    end
  end

  it("keeps a JSON MsgId's every digit", function()
    local wx = testing.wechat({ token = C.token, mode = "plaintext", format = "json", path = "/mini" })
    got = nil
    local _, status = wx:send(app, '{"ToUserName":"gh","FromUserName":"o","CreateTime":1,"MsgType":"text",'
      .. '"Content":"x","MsgId":23456789012345679}')
    assert.equal(200, status)
    assert.equal("23456789012345679", got.MsgId)
  end)

  it("reads the digits of the object's own MsgId, however the JSON is written", function()
    local wx = testing.wechat({ token = C.token, mode = "plaintext", format = "json", path = "/mini" })
    local head = '{"ToUserName":"gh","FromUserName":"o","CreateTime":1,"MsgType":"text","Content":"x",'
    local cases = {
      -- pretty-printed, nested ids before and after, brackets and quotes in strings
      { '{\n  "MsgId" :\t 23456789012345677 ,\n  "A": {"MsgId": 1, "B": ["}", {"MsgId": 2}]},\n'
        .. '  "C": "\\"MsgId\\": 3 ]}", "ToUserName": "gh", "MsgType": "text", "Content": "x"\n}',
        "23456789012345677" },
      { head .. '"N":{"MsgId":42},"MsgId":23456789012345681}', "23456789012345681" },
      -- an escaped name is the same name to cjson
      { head .. '"\\u004dsgId":23456789012345683}', "23456789012345683" },
      -- a repeated member: cjson keeps the last one, and so does the id
      { head .. '"MsgId":1,"MsgId":23456789012345685}', "23456789012345685" },
      -- a MsgId that is not an integer keeps cjson's reading
      { head .. '"MsgId":1.5}', "1.5" },
    }
    for i, c in ipairs(cases) do
      got = nil
      local _, status, body = wx:send(app, c[1])
      assert.equal(200, status, body)
      assert.equal(c[2], got.MsgId, "case " .. i)
    end
  end)

  it("verifies its URL like the Official Account", function()
    local wx = testing.wechat({ token = C.token, mode = "plaintext", path = "/mini" })
    local req, echostr = wx:verification()
    local status, _, body = app:handle(req)
    assert.equal(200, status)
    assert.equal(echostr, body)
  end)
end)

describe("wxd.mp for WeCom", function()
  local got
  local cfg = { token = C.token, corp_id = C.corp_id, kind = "wecom", aes_key = C.key2, path = "/wecom" }
  local app = new_app(cfg, { text = function(msg, ctx) got = { msg, ctx }; return "re: " .. msg.Content end })
  local wx = testing.wechat({ token = C.token, corp_id = C.corp_id, kind = "wecom", aes_key = C.key2, path = "/wecom" })

  it("answers the verification with the decrypted echostr", function()
    local req, echostr = wx:verification("4998843251737417152")
    local status, _, body = app:handle(req)
    assert.equal(200, status)
    assert.equal(echostr, body)
    assert.falsy(req.query_string:find(echostr, 1, true), "echostr travels encrypted")
  end)

  it("refuses a verification with a forged msg_signature or for another CorpID", function()
    local req = wx:verification("1", { signature = string.rep("0", 40) })
    assert.equal(403, (app:handle(req)))
    local other = testing.wechat({ token = C.token, corp_id = "wwother", kind = "wecom", aes_key = C.key2, path = "/wecom" })
    assert.equal(400, (app:handle((other:verification("1")))))
  end)

  it("takes an encrypted message with CorpID inside and encrypts the reply", function()
    local reply, status, body = wx:send(app, { MsgType = "text", Content = "hi", AgentID = "1000002" })
    assert.equal(200, status)
    assert.equal("hi", got[1].Content)
    assert.equal("wecom", got[2].kind)
    assert.equal("safe", got[2].mode)
    assert.equal("re: hi", reply.Content)
    assert.truthy(body:find("<Encrypt>", 1, true))
  end)

  it("refuses a message without encryption", function()
    local plain = testing.wechat({ token = C.token, mode = "plaintext", path = "/wecom" })
    local _, status = plain:send(app, { MsgType = "text", Content = "hi" })
    assert.equal(400, status)
  end)
end)

describe("wxd.testing", function()
  it("opens only replies signed with the token", function()
    local wx = testing.wechat({ token = C.token, appid = C.appid, aes_key = C.key1 })
    local enc = mp.encrypt(C.key1, "<xml><Content>x</Content></xml>", C.appid)
    local good = xml.encode({ Encrypt = enc, MsgSignature = mp.signature(C.token, "1", "n", enc), TimeStamp = 1,
                              Nonce = "n" })
    assert.equal("x", (wx:open_reply(good)).Content)
    local bad = xml.encode({ Encrypt = enc, MsgSignature = mp.signature("other", "1", "n", enc), TimeStamp = 1,
                             Nonce = "n" })
    assert.same({ nil, "bad reply signature" }, { wx:open_reply(bad) })
    assert.equal("success", (wx:open_reply("success")))
  end)

  it("fills WeChat's fields and gives each message a fresh MsgId", function()
    local wx = testing.wechat({ token = C.token })
    local a, b = wx:message({ MsgType = "text" }), wx:message({ MsgType = "text" })
    assert.not_equal(a.MsgId, b.MsgId)
    assert.equal("gh_test_account", a.ToUserName)
    assert.is_nil(wx:message({ MsgType = "event", Event = "CLICK" }).MsgId)
  end)
end)
