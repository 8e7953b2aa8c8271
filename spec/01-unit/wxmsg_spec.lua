-- WeChat message crypto in one native call per step (core/wxmsg.c: the
-- wx_* functions of wxd.core.crypto), checked against WeChat's published
-- sample (EasyWeChat's encryptor test), the openssl command line, and the
-- protocol spelt out here step by step with the general crypto functions.
local core = require "wxd.core.crypto"
local crypto = require "wxd.crypto"
local xml = require "wxd.xml"
local cjson = require "cjson"
local H = require "helpers"

local TOKEN, APPID = "pamtest", "wxb11529c136998cb6"
-- An EncodingAESKey is 43 random characters: its last one has unused bits set.
local KEY = assert(crypto.base64_decode("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG=", { ignore_tail_bits = true }))
local TS, NONCE, SIG = "1458300676", "260774613", "4f3ad57b6989f09f4eb392acce4f9e93942ed890"
-- luacheck: push ignore 631 (test vectors, verbatim)
local ENC = "rTNFcsut4LfGuAFKEUVVpwcaCOTJzOd9twZdIW910jb3k+iicx2uvhttIZ3Qg9Qgty3BEF2xbOrz6boTfb30dMomcgrkTqdFPwnhqbk+kIQ7rZiwny9D7NUrTgA5kpX3KsZvrXzUZyP2x9YOlxbgm572lmxKvM7HAQQhIQ/p6HBmoY30bGXFK0BtIu1pW9TjhOYrLQoU18nWYjWqDA1ynkmOytpv7QRI1P1+0NoxL0q2zO1DgeSvnE8CZGo/o5Ap/WHK5W2RAsinpzN4/LjPnmB6U01I5XCoJoC0GK/yMZycd2Oh8Nq6+wBkC1U85oy0ktOY4nLvsQMLrourmMGdZHuTbqpeJ8Ao/5PRYJ+WBvRUwPfGKBL2+2IKZF49vAJqkcGWSHGE76ZN2erXeuNazf/o9o3lIE3q739o4c8t9QGPe31GT2Go/rOz1BsrASwvauNulCh+++yz+CQzBIuikA=="
local MSG = "<xml><URL><![CDATA[http://wechat.laravel.so/server]]></URL><ToUserName><![CDATA[asdasdasd]]></ToUserName><FromUserName><![CDATA[asdasdasdsadasd]]></FromUserName><CreateTime>1234567898</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[hello]]></Content><MsgId>12345</MsgId></xml>"
-- luacheck: pop
local RANDOM = "d43123b161a4ba84"

-- The protocol step by step, with the general functions.
local function be32(n) return string.char(math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
                                            math.floor(n / 256) % 256, n % 256) end
local function reference_encrypt(key, msg, rid, random)
  return crypto.base64_encode(crypto.aes_cbc_encrypt(key, key:sub(1, 16), random .. be32(#msg) .. msg .. rid, 32))
end
local function reference_signature(...)
  local parts = { ... }
  table.sort(parts)
  return crypto.sha1_hex(table.concat(parts))
end

describe("wx_* (native WeChat message crypto)", function()
  it("reproduces WeChat's published sample", function()
    assert.equal(SIG, core.wx_signature(TOKEN, TS, NONCE, ENC))
    assert.is_true(core.wx_verify(SIG, TOKEN, TS, NONCE, ENC))
    assert.equal(MSG, core.wx_decrypt(KEY, ENC, APPID))
    assert.equal(ENC, core.wx_encrypt(KEY, MSG, APPID, RANDOM))
  end)

  it("signs as the sorted concatenation, with three or four parts", function()
    assert.equal("a9993e364706816aba3e25717850c26c9cd0d89d", core.wx_signature("c", "a", "b"))
    for _ = 1, 200 do
      local p = {}
      for i = 1, 4 do p[i] = crypto.random_bytes(math.random(0, 40)) end
      -- Prefixes of each other too: Lua orders "ab" before "abc".
      if math.random(2) == 1 then p[2] = p[1] .. "x" end
      assert.equal(reference_signature(p[1], p[2], p[3], p[4]), core.wx_signature(p[1], p[2], p[3], p[4]))
      assert.equal(reference_signature(p[1], p[2], p[3]), core.wx_signature(p[1], p[2], p[3]))
    end
  end)

  it("refuses a signature that differs anywhere, or in length", function()
    assert.is_false(core.wx_verify(SIG:sub(1, 39) .. "1", TOKEN, TS, NONCE, ENC))
    assert.is_false(core.wx_verify(SIG:upper(), TOKEN, TS, NONCE, ENC))
    assert.is_false(core.wx_verify(SIG .. "0", TOKEN, TS, NONCE, ENC))
    assert.is_false(core.wx_verify("", TOKEN, TS, NONCE, ENC))
    assert.is_false(core.wx_verify(SIG, TOKEN, TS, NONCE, ENC .. "x"))
    assert.is_false(core.wx_verify(SIG, TOKEN, TS, NONCE))
  end)

  it("round-trips any message and matches the step-by-step reference", function()
    for _, n in ipairs({ 0, 1, 11, 12, 13, 31, 32, 33, 100, 4096, 70000 }) do
      local msg, random = crypto.random_bytes(n), crypto.random_bytes(16)
      local enc = core.wx_encrypt(KEY, msg, APPID, random)
      assert.equal(reference_encrypt(KEY, msg, APPID, random), enc, "length " .. n)
      assert.equal(msg, core.wx_decrypt(KEY, enc, APPID))
      -- Fresh random bytes each time without the argument.
      assert.are_not.equal(core.wx_encrypt(KEY, msg, APPID), core.wx_encrypt(KEY, msg, APPID))
    end
  end)

  it("decrypts what the openssl command line encrypts, and the reverse", function()
    local dir = H.tmpdir()
    local msg = "<xml><Content><![CDATA[openssl]]></Content></xml>"
    local plain = crypto.random_bytes(16) .. be32(#msg) .. msg .. APPID
    local pad = 32 - #plain % 32
    H.write_file(dir .. "/p", plain .. string.rep(string.char(pad), pad))
    local hexkey, hexiv = crypto.hex_encode(KEY), crypto.hex_encode(KEY:sub(1, 16))
    local out, code = H.sh(string.format("openssl enc -aes-256-cbc -nopad -K %s -iv %s -in %s/p -out %s/c",
      hexkey, hexiv, dir, dir))
    assert.equal(0, code, out)
    assert.equal(msg, core.wx_decrypt(KEY, crypto.base64_encode(H.read_file(dir .. "/c")), APPID))
    H.write_file(dir .. "/e", crypto.base64_decode(core.wx_encrypt(KEY, msg, APPID)))
    out, code = H.sh(string.format("openssl enc -d -aes-256-cbc -nopad -K %s -iv %s -in %s/e -out %s/d",
      hexkey, hexiv, dir, dir))
    assert.equal(0, code, out)
    local d = H.read_file(dir .. "/d")
    assert.equal(msg .. APPID, d:sub(21, 20 + #msg + #APPID))
    os.execute("rm -rf " .. dir)
  end)

  it("gives one error for every way a ciphertext can be wrong", function()
    local function refused(enc, rid)
      local v, err = core.wx_decrypt(KEY, enc, rid or APPID)
      assert.is_nil(v)
      assert.equal("decrypt failed", err)
    end
    refused(ENC, "wx0000000000000000")          -- another receive id
    refused(ENC, APPID:sub(1, -2))              -- a prefix of it
    refused(ENC, "")
    refused("")
    refused("not base64!")
    refused(ENC:sub(1, -5))                     -- a truncated block
    refused(crypto.base64_encode(crypto.random_bytes(16)))      -- one block: too short
    refused(crypto.base64_encode(crypto.random_bytes(256)))     -- garbage: bad padding (almost surely)
    -- Valid padding, but a length field past the end.
    local p = crypto.random_bytes(16) .. be32(1000) .. "short" .. APPID
    refused(crypto.base64_encode(crypto.aes_cbc_encrypt(KEY, KEY:sub(1, 16), p, 32)))
    -- Padded to 16, not 32: the pad value is not what a 32-byte block gives.
    local p16 = crypto.random_bytes(16) .. be32(3) .. "abc" .. APPID .. "1234567"
    refused(crypto.base64_encode(crypto.aes_cbc_encrypt(KEY, KEY:sub(1, 16), p16, 16)))
    -- Another key.
    refused(core.wx_encrypt(crypto.random_bytes(32), MSG, APPID))
  end)

  it("seals a reply: XML or JSON, signed over its Encrypt, with the given time and nonce", function()
    local doc = core.wx_seal(TOKEN, KEY, APPID, MSG, 1458300676, "xml", "260774613", RANDOM)
    assert.equal("<xml><Encrypt><![CDATA[" .. ENC .. "]]></Encrypt><MsgSignature><![CDATA[" .. SIG
      .. "]]></MsgSignature><TimeStamp>1458300676</TimeStamp><Nonce><![CDATA[260774613]]></Nonce></xml>", doc)
    -- The same document as the general XML encoder writes.
    assert.equal(xml.encode({ Encrypt = ENC, MsgSignature = SIG, TimeStamp = 1458300676, Nonce = "260774613",
                              _order = { "Encrypt", "MsgSignature", "TimeStamp", "Nonce" } }), doc)
    local jdoc = core.wx_seal(TOKEN, KEY, APPID, MSG, 1458300676, "json", "260774613", RANDOM)
    assert.equal('{"Encrypt":"' .. ENC .. '","MsgSignature":"' .. SIG
      .. '","TimeStamp":1458300676,"Nonce":"260774613"}', jdoc)
    local j = cjson.decode(jdoc)
    assert.same({ Encrypt = ENC, MsgSignature = SIG, TimeStamp = 1458300676, Nonce = "260774613" }, j)
    -- Fresh nonce and random bytes by default; always verifiable.
    local t = xml.decode(core.wx_seal(TOKEN, KEY, APPID, "reply", 1796000000))
    assert.matches("^%w%w%w%w%w%w%w%w%w%w%w%w%w%w%w%w$", t.Nonce)
    assert.equal("1796000000", t.TimeStamp)
    assert.is_true(core.wx_verify(t.MsgSignature, TOKEN, t.TimeStamp, t.Nonce, t.Encrypt))
    assert.equal("reply", core.wx_decrypt(KEY, t.Encrypt, APPID))
  end)

  it("seals messages of every size verifiably (the scratch buffer grows and shrinks meanwhile)", function()
    for _, n in ipairs({ 0, 100, 3000, 20000, 40000, 70000, 200000, 10, 150000 }) do
      local msg = crypto.random_bytes(n)
      for _, fmt in ipairs({ "xml", "json" }) do
        local doc = core.wx_seal(TOKEN, KEY, APPID, msg, 1796000000, fmt)
        local t = fmt == "xml" and xml.decode(doc, { max_bytes = 1e6 }) or cjson.decode(doc)
        assert.is_true(core.wx_verify(t.MsgSignature, TOKEN, tostring(t.TimeStamp), t.Nonce, t.Encrypt),
          fmt .. " " .. n .. " bytes")
        assert.equal(msg, core.wx_decrypt(KEY, t.Encrypt, APPID))
      end
    end
  end)

  describe("wx_open: from the body to the message in one call", function()
    local ARRAYS = { item = true }
    local function body(enc, extra)
      return "<xml><ToUserName><![CDATA[gh_x]]></ToUserName>" .. (extra or "")
        .. (enc and ("<Encrypt><![CDATA[" .. enc .. "]]></Encrypt>") or "") .. "</xml>"
    end
    local function open(b, keys, sig)
      return core.wx_open(TOKEN, TS, NONCE, sig or SIG, b, APPID, keys or { KEY }, 65536, 10, 1000, ARRAYS)
    end

    it("opens WeChat's published sample", function()
      local msg, root, used, compatible, id = open(body(ENC))
      assert.equal("xml", root)
      assert.equal("hello", msg.Content)
      assert.equal("12345", msg.MsgId)
      assert.equal("asdasdasdsadasd", msg.FromUserName)
      assert.equal(1, used)
      assert.is_false(compatible)
      -- The dedup id of a message: its MsgId scoped by sender and account.
      assert.equal("m:" .. crypto.sha256_hex("15:asdasdasdsadasd" .. "9:asdasdasd" .. "5:12345"), id)
      -- Compatible mode: the outer document also has the plaintext fields.
      assert.is_true(select(4, open(body(ENC, "<MsgType><![CDATA[text]]></MsgType>"))))
      -- The key that decrypts, among several (a key change).
      assert.equal(2, select(3, open(body(ENC), { crypto.random_bytes(32), KEY })))
    end)

    it("gives the dedup id wxd.mp's dedup_id gives (MsgId, MsgID; events and id-less messages by digest)", function()
      local function id_of(plain, arrays)
        local t = xml.decode(core.wx_seal(TOKEN, KEY, APPID, plain, 1796000000, "xml", "n1"))
        local m, _, _, _, id = core.wx_open(TOKEN, t.TimeStamp, t.Nonce, t.MsgSignature,
          "<xml><Encrypt><![CDATA[" .. t.Encrypt .. "]]></Encrypt></xml>", APPID, { KEY }, 65536, 10, 1000,
          arrays or ARRAYS)
        assert.is_table(m)
        return id
      end
      local function by_fields(from, to, msgid)
        return "m:" .. crypto.sha256_hex(#from .. ":" .. from .. #to .. ":" .. to .. #msgid .. ":" .. msgid)
      end
      local text = "<xml><ToUserName>gh_a</ToUserName><FromUserName>o_user</FromUserName>"
        .. "<MsgType>text</MsgType><Content>hi</Content><MsgId>987</MsgId></xml>"
      assert.equal(by_fields("o_user", "gh_a", "987"), id_of(text))
      local upper = "<xml><ToUserName>gh_a</ToUserName><FromUserName>o_user</FromUserName>"
        .. "<MsgType>text</MsgType><MsgID>42</MsgID></xml>"
      assert.equal(by_fields("o_user", "gh_a", "42"), id_of(upper))
      local no_from = "<xml><ToUserName>gh_a</ToUserName><MsgId>7</MsgId></xml>"
      assert.equal(by_fields("", "gh_a", "7"), id_of(no_from))
      local event = "<xml><ToUserName>gh_a</ToUserName><FromUserName>o_user</FromUserName>"
        .. "<MsgType>event</MsgType><Event>TEMPLATESENDJOBFINISH</Event><MsgID>42</MsgID></xml>"
      assert.equal("d:" .. crypto.sha256_hex(event), id_of(event))
      local no_id = "<xml><ToUserName>gh_a</ToUserName><MsgType>text</MsgType></xml>"
      assert.equal("d:" .. crypto.sha256_hex(no_id), id_of(no_id))
      -- A sender made an array by the caller's option: not text, so the document's digest.
      local arr = "<xml><FromUserName>a</FromUserName><FromUserName>b</FromUserName><MsgId>1</MsgId></xml>"
      assert.equal("d:" .. crypto.sha256_hex(arr), id_of(arr, { FromUserName = true }))
      -- Another sender or account, another id.
      assert.are_not.equal(id_of(text), id_of((text:gsub("o_user", "o_other"))))
    end)

    it("refuses with the reason and status wxd.mp answers, checking the signature first", function()
      local function refused(status, reason, ...)
        local m, why, st = ...
        assert.is_nil(m)
        assert.equal(status, st)
        assert.matches(reason, why)
      end
      refused(403, "^bad msg_signature$", open(body(ENC), nil, SIG:sub(1, 39) .. "1")) -- SIG ends in 0
      -- A wrong key with a wrong signature: the signature is what is reported.
      refused(403, "^bad msg_signature$", open(body(ENC), { crypto.random_bytes(32) }, string.rep("0", 40)))
      refused(400, "^decrypt failed$", open(body(ENC), { crypto.random_bytes(32) }))
      refused(400, "^no Encrypt field$", open(body(nil)))
      refused(400, "^no Encrypt field$", open(body("")))
      refused(400, "^invalid xml %(line 1", open("<xml><Encrypt>"))
      refused(400, "^doctype not allowed", open('<!DOCTYPE x [<!ENTITY a "b">]><xml/>'))
      refused(400, "^too large", core.wx_open(TOKEN, TS, NONCE, SIG, body(ENC), APPID, { KEY }, 64, 10, 1000))
      -- A message that decrypts but is not XML.
      local enc = core.wx_encrypt(KEY, "not xml", APPID)
      local sig = core.wx_signature(TOKEN, TS, NONCE, enc)
      refused(400, "^decrypted message: invalid xml %(", open(body(enc), nil, sig))
      -- Another receive id inside.
      enc = core.wx_encrypt(KEY, MSG, "wx0000000000000000")
      refused(400, "^decrypt failed$", open(body(enc), nil, core.wx_signature(TOKEN, TS, NONCE, enc)))
    end)

    it("reads the outer document as expat does, whether it takes its fast path or not", function()
      -- wx_open reads WeChat's usual outer document with a scanner of its
      -- own and anything else with expat. A comment right after <xml> makes
      -- any document take expat's way: both ways must agree.
      local function outcome(doc, max_elements)
        local m, a, b, c, d = core.wx_open(TOKEN, TS, NONCE, SIG, doc, APPID, { KEY }, 65536, 10,
                                           max_elements or 1000, ARRAYS)
        if m then return { "ok", m.Content, a, b, c, d } end
        return { "refused", b, (a:gsub(" %(.*", "")) }
      end
      local function through_expat(doc) return (doc:gsub("^<xml>", "<xml><!---->", 1)) end
      local half = math.floor(#ENC / 2)
      local cases = {
        { body(ENC), "ok" },
        { "<xml>\n  <ToUserName><![CDATA[gh_x]]></ToUserName>\n\t<Encrypt><![CDATA[" .. ENC
          .. "]]></Encrypt>\r\n</xml>\n", "ok" },
        { "<xml><Encrypt>" .. ENC .. "</Encrypt></xml>", "ok" },
        { "<xml><Encrypt>" .. ENC:gsub("%+", "&#43;") .. "</Encrypt></xml>", "ok" },
        { body(ENC, "<MsgType><![CDATA[text]]></MsgType><CreateTime>1458300676</CreateTime>"), "ok" },
        { "<xml><Encrypt><![CDATA[" .. ENC .. "]]></Encrypt><Encrypt>x</Encrypt></xml>", "ok" },
        { "<xml><Encrypt>x</Encrypt><Encrypt><![CDATA[" .. ENC .. "]]></Encrypt></xml>", 403 },
        { "<xml><Encrypt><![CDATA[" .. ENC:sub(1, half) .. "]]><![CDATA[" .. ENC:sub(half + 1)
          .. "]]></Encrypt></xml>", "ok" },
        { '<xml><Encrypt a="1"><![CDATA[' .. ENC .. "]]></Encrypt></xml>", "ok" },
        { "<xml><Encrypt> " .. ENC .. " </Encrypt></xml>", 403 },
        { "<xml><Encrypt><![CDATA[" .. ENC .. "]]></Encrypt></xml>junk", 400 },
        { "<xml><Encrypt><![CDATA[" .. ENC .. "]]></Encrypt></xml><xml/>", 400 },
        { "<xml><Encrypt><![CDATA[" .. ENC .. "]]></Encrypt></Xml>", 400 },
        { "<xml><Encrypt><![CDATA[" .. ENC .. "]]></encrypt></xml>", 400 },
        { "<xml><Encrypt><E>" .. ENC .. "</E></Encrypt></xml>", 400 },
        { "<xml><ToUserName>gh_x</ToUserName></xml>", 400 },
        { "<xml><Encrypt><![CDATA[]]></Encrypt></xml>", 400 },
        { "<xml><Encrypt></Encrypt></xml>", 400 },
        { "<xml><A><![CDATA[a\r\nb]]></A><Encrypt><![CDATA[" .. ENC .. "]]></Encrypt></xml>", "ok" },
        { "<xml><A><![CDATA[\229\190\174]]></A><Encrypt><![CDATA[" .. ENC .. "]]></Encrypt></xml>", "ok" },
        { "<xml><A>\239\191\189</A><Encrypt><![CDATA[" .. ENC .. "]]></Encrypt></xml>", "ok" },
        { "<xml><A><![CDATA[\239\191\190]]></A><Encrypt><![CDATA[" .. ENC .. "]]></Encrypt></xml>", 400 },
        { "<xml><A><![CDATA[\237\160\128]]></A><Encrypt><![CDATA[" .. ENC .. "]]></Encrypt></xml>", 400 },
        { "<xml><A><![CDATA[\192\128]]></A><Encrypt><![CDATA[" .. ENC .. "]]></Encrypt></xml>", 400 },
        { "<xml><A>a]]>b</A><Encrypt><![CDATA[" .. ENC .. "]]></Encrypt></xml>", 400 },
        { "<xml><1A>a</1A><Encrypt><![CDATA[" .. ENC .. "]]></Encrypt></xml>", 400 },
        { "<xml><A>\1</A><Encrypt><![CDATA[" .. ENC .. "]]></Encrypt></xml>", 400 },
        { "<xml><Encrypt><![CDATA[" .. ENC .. "]]></Encrypt>", 400 },
        { "<xml><Encrypt><![CDATA[" .. ENC .. "]></Encrypt></xml>", 400 },
        -- The element limit counts the root: 3 elements where 2 are allowed.
        { body(ENC), 400, 2 },
      }
      for _, case in ipairs(cases) do
        local doc, want, max_elements = case[1], case[2], case[3]
        local fast, slow = outcome(doc, max_elements), outcome(through_expat(doc), max_elements)
        assert.same(slow, fast, doc)
        assert.equal(want, fast[1] == "ok" and "ok" or fast[2], doc)
        if want == "ok" then assert.equal("hello", fast[2]) end
      end
    end)

    it("raises for a key of the wrong size and other wrong arguments", function()
      assert.has_error(function() open(body(ENC), { "short" }) end)
      assert.has_error(function() open(body(ENC), "not a table") end)
      assert.has_error(function() core.wx_open(TOKEN, TS, NONCE, SIG, body(ENC), APPID, { KEY }, -1, 10, 1000) end)
    end)
  end)

  it("raises for arguments of the wrong type or size", function()
    assert.has_error(function() core.wx_signature(TOKEN, 1458300676, NONCE) end)
    assert.has_error(function() core.wx_signature(TOKEN, TS) end)
    assert.has_error(function() core.wx_decrypt(KEY:sub(1, 16), ENC, APPID) end)
    assert.has_error(function() core.wx_decrypt(KEY, nil, APPID) end)
    assert.has_error(function() core.wx_encrypt(KEY, MSG, APPID, "short") end)
    assert.has_error(function() core.wx_seal(TOKEN, KEY, APPID, MSG, 1.5) end)
    assert.has_error(function() core.wx_seal(TOKEN, KEY, APPID, MSG, 1, "yaml") end)
    assert.has_error(function() core.wx_seal(TOKEN, KEY, APPID, MSG, 1, "xml", "bad nonce!") end)
  end)
end)
