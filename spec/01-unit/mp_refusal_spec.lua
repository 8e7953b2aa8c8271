-- wxd.mp refusals: every forged, tampered, malformed, hostile or stale
-- request gets its status and never reaches a handler; the endpoint keeps
-- serving afterwards.
local mp = require "wxd.mp"
local crypto = require "wxd.crypto"
local xml = require "wxd.xml"
local testing = require "wxd.testing"
local wxd = require "wxd"
local C = require "fixtures.mp.conf"

local APPID = "wxrefusal0000001"

local calls = 0
local function handler() calls = calls + 1; return "ok" end

local function new_app(cfg)
  local app = require("wxd.app").new()
  app:mp("/wx", cfg, { default = handler })
  return app
end

local safe_app = new_app({ token = C.token, appid = APPID, aes_key = C.key1, max_body_bytes = 4096 })
local plain_app = new_app({ token = C.token, appid = APPID, max_body_bytes = 4096 })
local safe = testing.wechat({ token = C.token, appid = APPID, aes_key = C.key1, mode = "safe" })
local plain = testing.wechat({ token = C.token, appid = APPID, mode = "plaintext" })

-- Sends and checks the status, the body and that no handler ran.
local function refused(app, req, status)
  local before = calls
  local st, _, body = app:handle(req)
  assert.equal(status, st, body)
  assert.equal(before, calls, "a handler ran")
  return body
end

local function text() return { MsgType = "text", Content = "hello" } end

-- Encrypts exactly `plain` (a multiple of 16 bytes, no padding added) with
-- key1: CBC ciphertext blocks do not depend on later ones, so dropping the
-- pad block that aes_cbc_encrypt appends leaves the ciphertext of `plain`.
local function raw_encrypt(p)
  assert(#p % 16 == 0)
  local k = mp.aes_key(C.key1)
  local ct = crypto.aes_cbc_encrypt(k.key, k.iv, p, 16)
  return crypto.base64_encode(ct:sub(1, #p))
end

local function be32(n)
  return string.char(math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256, math.floor(n / 256) % 256, n % 256)
end

-- A well-formed plaintext before padding.
local function layout(msg, appid, len)
  return string.rep("R", 16) .. be32(len or #msg) .. msg .. (appid or APPID)
end

local function pad_to(s, block, last, fill)
  local p = block - #s % block
  return s .. string.rep(string.char(fill or p), p - 1) .. string.char(last or p)
end

local MSG = xml.encode(safe:message(text()))

describe("wxd.mp refuses", function()
  after_each(function()
    -- The endpoint still serves a good message after each refusal.
    local reply, status = safe:send(safe_app, text())
    assert.equal(200, status)
    assert.equal("ok", reply.Content)
  end)

  describe("forged or missing signatures", function()
    it("a forged signature (plaintext)", function()
      refused(plain_app, plain:request(text(), { signature = string.rep("a", 40) }), 403)
      refused(plain_app, plain:request(text(), { signature = mp.signature("other token", "1", "2") }), 403)
    end)

    it("a signature over other values (timestamp or nonce changed)", function()
      local req = plain:request(text(), { nonce = "111" })
      req.query_string = req.query_string:gsub("nonce=111", "nonce=112")
      refused(plain_app, req, 403)
    end)

    it("a request without signature, timestamp or nonce", function()
      for _, drop in ipairs({ "signature", "timestamp", "nonce" }) do
        local req = plain:request(text())
        req.query_string = req.query_string:gsub(drop .. "=[^&]*&?", "")
        refused(plain_app, req, 400)
      end
    end)

    it("a forged msg_signature (safe mode)", function()
      refused(safe_app, safe:request(text(), { msg_signature = string.rep("0", 40) }), 403)
      refused(safe_app, safe:request(text(), { msg_signature = "" }), 400)
    end)

    it("a msg_signature made without the Encrypt value", function()
      local ts = tostring(math.floor(wxd.now()))
      refused(safe_app, safe:request(text(), { timestamp = ts, nonce = "5",
                                               msg_signature = mp.signature(C.token, ts, "5") }), 403)
    end)

    it("a forged URL verification", function()
      refused(plain_app, (plain:verification("e", { signature = string.rep("f", 40) })), 403)
      local req = plain:verification("e")
      req.query_string = req.query_string:gsub("&echostr=e", "")
      refused(plain_app, req, 400)
    end)
  end)

  describe("tampering with the ciphertext", function()
    it("a changed ciphertext under the original msg_signature", function()
      local req = safe:request(text())
      local enc = req.body:match("<Encrypt><!%[CDATA%[(.-)%]%]></Encrypt>")
      local ct = crypto.base64_decode(enc)
      local flipped = crypto.base64_encode(ct:sub(1, 40) .. string.char((ct:byte(41) + 1) % 256) .. ct:sub(42))
      local a, b = req.body:find(enc, 1, true)
      req.body = req.body:sub(1, a - 1) .. flipped .. req.body:sub(b + 1)
      assert.not_equal(enc, flipped)
      refused(safe_app, req, 403)
    end)

    it("a changed ciphertext signed again with the token: one answer for every decryption failure", function()
      local k = mp.aes_key(C.key1)
      local good = crypto.aes_cbc_encrypt(k.key, k.iv, layout(MSG), 32)
      local cases = {
        -- each is a full Encrypt value
        crypto.base64_encode(good:sub(1, -2) .. string.char((good:byte(-1) + 1) % 256)), -- last block changed
        crypto.base64_encode(string.char((good:byte(1) + 128) % 256) .. good:sub(2)),  -- first block changed
        crypto.base64_encode(good:sub(1, -17)),                                       -- last block dropped
        crypto.base64_encode(good:sub(1, -5)),                                        -- not whole blocks
        crypto.base64_encode(good .. good:sub(1, 16)),                                -- a block added
        "not base64!",
        "QUJD",                                                                       -- 3 bytes
        crypto.base64_encode(crypto.random_bytes(64)),                                -- noise
      }
      local bodies = {}
      for _, enc in ipairs(cases) do
        bodies[#bodies + 1] = refused(safe_app, safe:request(text(), { encrypt = enc }), 400)
      end
      for i = 2, #bodies do assert.equal(bodies[1], bodies[i]) end
    end)

    it("the wrong appid inside", function()
      refused(safe_app, safe:request(text(), { receive_id = "wxsomeoneelse0001" }), 400)
      refused(safe_app, safe:request(text(), { receive_id = APPID .. "x" }), 400)
      refused(safe_app, safe:request(text(), { receive_id = APPID:sub(1, -2) }), 400)
      refused(safe_app, safe:request(text(), { receive_id = "" }), 400)
    end)

    it("every malformed padding, each with a valid msg_signature", function()
      local base = layout(MSG)
      local n = #base
      local cases = {
        pad_to(base, 32, 0),            -- pad byte 0
        pad_to(base, 32, 33, 33),       -- above the pad block
        pad_to(base, 32, 255, 255),     -- far above
        pad_to(base, 32, 64, 64),
        pad_to(base, 32, nil, 0),       -- right last byte, wrong bytes before it
      }
      -- the right count but one inner pad byte off
      local p = 32 - n % 32
      if p >= 3 then
        local good = pad_to(base, 32)
        cases[#cases + 1] = good:sub(1, -3) .. string.char(p - 1) .. good:sub(-1)
        cases[#cases + 1] = good:sub(1, -(p + 1)) .. string.char(p + 1) .. good:sub(-(p - 1))
      end
      -- a pad value larger than the whole plaintext (one block of 16)
      cases[#cases + 1] = string.rep("A", 15) .. string.char(20)
      -- no padding at all: the data ends on a block boundary
      local unpadded = base .. string.rep("x", (16 - n % 16) % 16)
      cases[#cases + 1] = unpadded
      local bodies = {}
      for _, c in ipairs(cases) do
        bodies[#bodies + 1] = refused(safe_app, safe:request(text(), { encrypt = raw_encrypt(c) }), 400)
      end
      for i = 2, #bodies do assert.equal(bodies[1], bodies[i]) end
    end)

    it("a length field that does not fit, and plaintexts too short to hold one", function()
      for _, p in ipairs({
        pad_to(layout(MSG, nil, #MSG + #APPID + 1), 32),
        pad_to(layout(MSG, nil, 2 ^ 32 - 1), 32),
        pad_to(string.rep("R", 16) .. "\0\0", 32),
        pad_to("", 32),
      }) do
        refused(safe_app, safe:request(text(), { encrypt = raw_encrypt(p) }), 400)
      end
    end)
  end)

  describe("hostile XML", function()
    local XXE = '<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
      .. "<xml><ToUserName>gh</ToUserName><FromUserName>o</FromUserName><CreateTime>1</CreateTime>"
      .. "<MsgType>text</MsgType><Content>&xxe;</Content><MsgId>1</MsgId></xml>"
    local LOL = '<!DOCTYPE xml [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
      .. '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]><xml><MsgType>text</MsgType><Content>&c;</Content></xml>'

    it("DOCTYPE and entities in a plaintext message", function()
      refused(plain_app, plain:request(XXE), 400)
      refused(plain_app, plain:request(LOL), 400)
      refused(plain_app, plain:request("<!DOCTYPE xml><xml><MsgType>text</MsgType></xml>"), 400)
      refused(plain_app, plain:request("<xml><MsgType>text</MsgType><Content>&undefined;</Content></xml>"), 400)
    end)

    it("DOCTYPE and entities around and inside an encrypted message", function()
      refused(safe_app, safe:request(XXE), 400) -- inside: encrypted and signed
      refused(safe_app, safe:request(LOL), 400)
      local b = safe:build(text())
      local req = safe:request(text(), { body = '<!DOCTYPE xml [<!ENTITY e "x">]>' .. b.body })
      refused(safe_app, req, 400) -- around
    end)

    it("malformed messages", function()
      for _, s in ipairs({ "", "   ", "<xml>", "<xml><a></b></xml>", "hello", "<xml/><xml/>", '{"MsgType":"text"}',
                           string.rep("<a>", 11) .. string.rep("</a>", 11) }) do
        refused(plain_app, plain:request(s), 400)
        refused(safe_app, safe:request(s), 400)
      end
    end)

    it("a safe-mode body without Encrypt", function()
      refused(safe_app, safe:request(text(), { body = "<xml><ToUserName>gh</ToUserName></xml>" }), 400)
      refused(safe_app, safe:request(text(), { body = "<xml><Encrypt></Encrypt></xml>" }), 400)
    end)
  end)

  describe("sizes", function()
    it("a body over max_body_bytes", function()
      local big = { MsgType = "text", Content = string.rep("x", 5000) }
      refused(plain_app, plain:request(big), 413)
      refused(safe_app, safe:request(big), 413)
    end)

    it("too many elements", function()
      local many = "<xml><MsgType>text</MsgType>" .. string.rep("<a/>", 1000) .. "</xml>"
      local app = new_app({ token = C.token, appid = APPID })
      refused(app, plain:request(many), 400)
    end)
  end)

  describe("time", function()
    local now = math.floor(wxd.now())
    it("a stale or future timestamp", function()
      refused(plain_app, plain:request(text(), { timestamp = now - 301 }), 403)
      refused(plain_app, plain:request(text(), { timestamp = now + 301 }), 403)
      refused(safe_app, safe:request(text(), { timestamp = now - 3600 }), 403)
      refused(plain_app, (plain:verification("e", { timestamp = now - 1000 })), 403)
      refused(plain_app, plain:request(text(), { timestamp = "12x" }), 400)
      refused(plain_app, plain:request(text(), { timestamp = "" }), 400)
    end)

    it("within a window of its own size", function()
      local app = new_app({ token = C.token, appid = APPID, timestamp_window = 10 })
      refused(app, plain:request(text(), { timestamp = now - 30 }), 403)
      assert.equal(200, (app:handle(plain:request(text(), { timestamp = now - 5 }))))
      local reply = plain:send(plain_app, text(), { timestamp = now - 200 })
      assert.equal("ok", reply.Content)
    end)
  end)

  describe("modes", function()
    it("plaintext when encryption is configured", function()
      refused(safe_app, plain:request(text()), 403)
      local compat = new_app({ token = C.token, appid = APPID, aes_key = C.key1, allow_plaintext = true })
      assert.equal(200, (compat:handle(plain:request(text()))))
    end)

    it("an encrypted message when no key is configured", function()
      refused(plain_app, safe:request(text()), 400)
    end)

    it("an unknown encrypt_type", function()
      refused(plain_app, plain:request(text(), { encrypt_type = "des" }), 400)
    end)

    it("other methods", function()
      assert.equal(405, (plain_app:handle({ method = "PUT", path = "/wx", query_string = "", headers = {}, body = "" })))
    end)
  end)
end)
