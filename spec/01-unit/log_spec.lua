local log = require "wxd.log"

describe("wxd.log", function()
  it("masks openids and phone numbers", function()
    assert.equal("oAbc****wxyz", log.mask("oAbcdefghijklmnopqrstuvwxyz"))
    assert.equal("138****5678", log.mask("13812345678"))
    assert.equal("****", log.mask("abcd"))
  end)

  it("never keeps secrets, and masks identifiers at any depth", function()
    local out = log.scrub({ app_secret = "s3cr3t", access_token = "tok", session_key = "k",
      user = { openid = "oAbcdefghijklmnop", phone = "13812345678" }, order = "A1" })
    assert.equal("***", out.app_secret)
    assert.equal("***", out.access_token)
    assert.equal("***", out.session_key)
    assert.equal("oAbc****mnop", out.user.openid)
    assert.equal("138****5678", out.user.phone)
    assert.equal("A1", out.order)
  end)

  it("hides every secret name config refuses, too", function()
    local out = log.scrub({ mch_key = "k", apiv3_key = "k", api_v3_key = "k", sign_key = "k",
      cert_path = "/etc/wxd/cert.pem" })
    assert.equal("***", out.mch_key)
    assert.equal("***", out.apiv3_key)
    assert.equal("***", out.api_v3_key)
    assert.equal("***", out.sign_key)
    assert.equal("/etc/wxd/cert.pem", out.cert_path)
  end)

  it("hides secrets whatever the spelling of their names: any case, with or without - and _", function()
    local names = { "sessionKey", "session-key", "SESSION_KEY", "encodingAESKey", "EncodingAESKey", "aesKey",
                    "apiKey", "api-key", "apiV3Key", "APIv3Key", "mchKey", "mch-key", "privateKey",
                    "private-key", "appSecret", "AppSecret", "app-secret", "accessToken", "access_token",
                    "access-token", "refreshToken", "jsapiTicket", "Authorization", "X-Api-Key", "key",
                    "paySignKey", "js_code", "jsCode", "passPhrase", "Password" }
    local fields = {}
    for i, name in ipairs(names) do fields[name] = "secret-value-" .. i end
    local out = log.scrub(fields)
    for _, name in ipairs(names) do assert.equal("***", out[name], name) end
  end)

  it("keeps what is not a secret: identifiers of keys, errors, counts", function()
    local out = log.scrub({ errcode = 40001, credential = "access_token", expires_in = 7200, path = "/wx",
                            cert_path = "/etc/wxd/cert.pem", msg_type = "text", reply_type = "news" })
    assert.same({ errcode = 40001, credential = "access_token", expires_in = 7200, path = "/wx",
                  cert_path = "/etc/wxd/cert.pem", msg_type = "text", reply_type = "news" }, out)
  end)

  it("masks the openid of a whole message (FromUserName, ToUserName) and WeChat's spellings of ids", function()
    local msg = { ToUserName = "gh_0123456789ab", FromUserName = "oAbcdefghijklmnopqrstuvwxyz", CreateTime = "1700000000",
                  MsgType = "text", Content = "hi", MsgId = "24000000000000001" }
    local out = log.scrub({ message = msg })
    assert.equal("oAbc****wxyz", out.message.FromUserName)
    assert.equal("gh_0****89ab", out.message.ToUserName)
    assert.equal("hi", out.message.Content)
    assert.equal("24000000000000001", out.message.MsgId)
    out = log.scrub(msg)
    assert.equal("oAbc****wxyz", out.FromUserName)
    out = log.scrub({ openId = "oAbcdefghijklmnop", OpenID = "oAbcdefghijklmnop", unionId = "uAbcdefghijklmnop",
                      phoneNumber = "13812345678", purePhoneNumber = "13812345678", touser = "oAbcdefghijklmnop",
                      ExternalUserID = "wmAbcdefghijklmnop", ["open-id"] = "oAbcdefghijklmnop" })
    assert.same({ openId = "oAbc****mnop", OpenID = "oAbc****mnop", unionId = "uAbc****mnop",
                  phoneNumber = "138****5678", purePhoneNumber = "138****5678", touser = "oAbc****mnop",
                  ExternalUserID = "wmAb****mnop", ["open-id"] = "oAbc****mnop" }, out)
  end)

  it("renames fields that would clash with the line's own", function()
    local out = log.scrub({ msg = "a", level = "b", ts = 1, worker = 2, other = 3 })
    assert.same({ field_msg = "a", field_level = "b", field_ts = 1, field_worker = 2, other = 3 }, out)
  end)

  it("cuts very long values", function()
    local out = log.scrub({ error = string.rep("e", 10000) })
    assert.is_true(#out.error < 4100)
    assert.truthy(out.error:find("(truncated)", 1, true))
  end)

  it("raises when fields are not a table", function()
    assert.has_error(function() log.info("x", "not a table") end)
  end)
end)
