-- wxd.internal in process: the canonical string byte for byte, the
-- example of docs/internal-api.md (its signature computed by the openssl
-- command line), key validation, and the middleware on plain request
-- tables (the integration spec 26-internal runs it in real servers).
local H = require "helpers"
local wxd = require "wxd"
local crypto = require "wxd.crypto"
local internal = require "wxd.internal"

local DOC = {
  secret = "doc-example-secret-0123456789abcdef0123",
  method = "POST", target = "/internal/refunds?notify=1", timestamp = 1796342400,
  nonce = "q3ZkP9sV2xWm7LbN4tRc", appid = "wx0123456789abcdef",
  body = '{"out_trade_no":"T20261204001","amount":990}',
  body_sha256 = "1dbc314147972e636777035dcc88eb73b7585f66e699797e992a0467ba7d7151",
  signature = "13159ab3e8a3995e3e6f7a46d4d3a39388f6d29a58fb2558f7f5e4d15f760ca1",
}

describe("wxd.internal", function()
  describe("the canonical string", function()
    it("is the scheme, method, target, timestamp, nonce, appid and the body's sha256, one per line", function()
      assert.equal("WXD1-HMAC-SHA256\nPOST\n/internal/refunds?notify=1\n1796342400\nq3ZkP9sV2xWm7LbN4tRc\n"
        .. "wx0123456789abcdef\n" .. DOC.body_sha256,
        internal.canonical("post", DOC.target, DOC.timestamp, DOC.nonce, DOC.appid, DOC.body))
    end)

    it("has an empty line without an appid and the sha256 of nothing without a body", function()
      assert.equal("WXD1-HMAC-SHA256\nGET\n/x\n1\nn\n\n" .. crypto.sha256_hex(""),
        internal.canonical("GET", "/x", 1, "n", nil, nil))
    end)

    it("gives the signature of docs/internal-api.md, also as the openssl command line computes it", function()
      local h = internal.sign({ key = { id = "doc", secret = DOC.secret }, method = DOC.method, target = DOC.target,
        timestamp = DOC.timestamp, nonce = DOC.nonce, appid = DOC.appid, body = DOC.body })
      assert.equal(DOC.signature, h["X-Wxd-Signature"])
      assert.same({ ["X-Wxd-Key"] = "doc", ["X-Wxd-Timestamp"] = "1796342400", ["X-Wxd-Nonce"] = DOC.nonce,
        ["X-Wxd-Signature"] = DOC.signature, ["X-Wechat-Appid"] = DOC.appid }, h)
      local dir = H.tmpdir()
      H.write_file(dir .. "/canonical", internal.canonical(DOC.method, DOC.target, DOC.timestamp, DOC.nonce,
        DOC.appid, DOC.body))
      local out = H.sh("openssl dgst -sha256 -hmac '" .. DOC.secret .. "' -r <" .. dir .. "/canonical")
      os.execute("rm -rf " .. dir)
      assert.equal(DOC.signature, out:match("^(%x+)"))
    end)

    it("signs with a fresh nonce and the current time by default", function()
      local k = { id = "k", secret = DOC.secret }
      local a = internal.sign({ key = k, target = "/x" })
      local b = internal.sign({ key = k, target = "/x" })
      assert.are_not.equal(a["X-Wxd-Nonce"], b["X-Wxd-Nonce"])
      assert.is_true(math.abs(tonumber(a["X-Wxd-Timestamp"]) - wxd.now()) < 5)
      assert.is_nil(a["X-Wechat-Appid"])
    end)
  end)

  describe("keys", function()
    it("refuses short secrets, bad or repeated ids and an unknown sign_with, without showing the secret", function()
      local short = "short-secret-value"
      local ok, err = pcall(internal.keyset, { { id = "a", secret = short } })
      assert.is_false(ok)
      assert.truthy(err:find("at least 32 bytes", 1, true))
      assert.is_nil(err:find(short, 1, true))
      local long = string.rep("s", 32)
      assert.has_error(function() internal.keyset({ { id = "a b", secret = long } }) end)
      assert.has_error(function() internal.keyset({ { id = "a", secret = long }, { id = "a", secret = long } }) end)
      assert.has_error(function() internal.keyset({ { id = "a", secret = long } }, "b") end)
      assert.has_error(function() internal.keyset({}) end)
      assert.has_error(function() internal.keyset({ { id = "a", secret = long, scopes = 7 } }) end)
    end)

    it("signs with the last key listed unless sign_with names another", function()
      local long = string.rep("s", 32)
      assert.equal("b", internal.keyset({ { id = "a", secret = long }, { id = "b", secret = long } }).sign_with)
      assert.equal("a", internal.keyset({ { id = "a", secret = long }, { id = "b", secret = long } }, "a").sign_with)
    end)

    it("needs keys: from opts or from config.internal (none in wxd script)", function()
      assert.has_error(function() internal.require() end)
      assert.has_error(function() internal.sign({ target = "/x" }) end)
    end)
  end)

  describe("the middleware on request tables", function()
    local secret = string.rep("m", 40)
    local mw = internal.require({ keys = { { id = "m", secret = secret } }, window = 60 })
    local function request(opts)
      local h = internal.sign({ key = { id = "m", secret = secret }, method = "POST", target = "/i?q=1",
        body = "b", timestamp = opts.timestamp })
      local headers = {}
      for k, v in pairs(h) do headers[k:lower()] = v end
      return { method = "POST", path = "/i", query_string = "q=1", body = "b", headers = headers, ctx = {} }
    end

    it("accepts a timestamp inside the window either way and refuses one outside", function()
      local now = math.floor(wxd.now())
      assert.is_nil(mw(request({ timestamp = now - 55 }), {}))
      assert.is_nil(mw(request({ timestamp = now + 55 }), {}))
      local status, body = mw(request({ timestamp = now - 65 }), {})
      assert.equal(401, status)
      assert.equal("stale timestamp", body.error)
      status, body = mw(request({ timestamp = now + 65 }), {})
      assert.equal(401, status)
      assert.equal("stale timestamp", body.error)
    end)

    it("records the key on req.ctx.internal and refuses the same request again", function()
      local req = request({})
      assert.is_nil(mw(req, {}))
      assert.equal("m", req.ctx.internal.key_id)
      local again = { method = req.method, path = req.path, query_string = req.query_string, body = req.body,
        headers = req.headers, ctx = {} }
      local status, body = mw(again, {})
      assert.equal(401, status)
      assert.equal("replayed nonce", body.error)
    end)

    it("checks a request only once behind a group's middleware (protect sees req.ctx.internal)", function()
      local req = request({})
      assert.is_nil(mw(req, {}))
      local called = 0
      local route = internal.protect({ keys = { { id = "m", secret = secret } } }, function() called = called + 1 end)
      route(req, {})
      assert.equal(1, called)
    end)

    it("lets on_fail shape the refusal", function()
      local m = internal.require({ keys = { { id = "m", secret = secret } },
        on_fail = function(_, _, status, err) return status, "refused: " .. err end })
      local status, body = m({ method = "GET", path = "/", query_string = "", body = "", headers = {}, ctx = {} }, {})
      assert.equal(401, status)
      assert.equal("refused: missing signature", body)
    end)
  end)
end)
