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
