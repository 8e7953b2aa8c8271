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

  it("raises when fields are not a table", function()
    assert.has_error(function() log.info("x", "not a table") end)
  end)
end)
