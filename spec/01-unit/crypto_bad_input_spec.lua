-- wxd.crypto on bad input: every expected failure is `nil, err` with one
-- stable string (and no partial output), every programmer error raises, and
-- nothing crashes. Error messages never carry key bytes or passphrases.
local crypto = require "wxd.crypto"
local H = require "helpers"

-- Calls fn and checks it returned exactly nil, err.
local function fails(err, fn, ...)
  local n = select("#", fn(...))
  local v, e = fn(...)
  assert.is_nil(v)
  assert.equal(err, e)
  assert.equal(2, n)
end

local function raises(pattern, fn, ...)
  local args = { n = select("#", ...), ... }
  local ok, e = pcall(fn, unpack(args, 1, args.n))
  assert.is_false(ok, "expected an error matching " .. pattern)
  assert.truthy(tostring(e):find(pattern), tostring(e))
  return tostring(e)
end

local KEY = string.rep("k", 32)
local IV = string.rep("i", 16)

describe("base64 decoding is strict", function()
  local bad = {
    "Zm9v!", "Zm9v\n", " Zm9v", "Zm9v ", "Zm9\0v", "Zm9", "Zm9vY", "Zm=v", "=Zm9", "Zm9v====", "Zg=", "Zg===",
    "Zm9vYg=", "Zg", "A", "A===", "====", "=", "==", "Zm9v\r\nYmFy", "Zm9v-_==", "Zm\2009v", "Zm9vYmFy=",
  }
  for _, s in ipairs(bad) do
    it(string.format("standard alphabet refuses %q", s), function()
      fails("invalid base64", crypto.base64_decode, s)
    end)
  end

  it("URL-safe alphabet refuses +, /, a bad length and bad padding", function()
    for _, s in ipairs({ "+/+/", "Zm9v+", "A", "Zm9vY", "Zg=", "Zg===", "Z=g=", "Zm9v\n" }) do
      fails("invalid base64", crypto.base64url_decode, s)
    end
  end)

  it("refuses a last character whose unused bits are not zero (one encoding per byte string)", function()
    assert.equal("A", crypto.base64_decode("QQ=="))
    fails("invalid base64", crypto.base64_decode, "QR==")
    fails("invalid base64", crypto.base64_decode, "Zh==")
    fails("invalid base64", crypto.base64_decode, "Zm9=")
    fails("invalid base64", crypto.base64url_decode, "QR")
    fails("invalid base64", crypto.base64url_decode, "Zm9")
    fails("invalid base64", crypto.base64url_decode, "Zm9=")
  end)

  it("accepts a last character only when re-encoding gives it back, for every tail", function()
    local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    for _, prefix in ipairs({ "", "x" }) do -- a last byte alone (4 unused bits), or after another (2)
      for b = 0, 255 do
        local enc = crypto.base64_encode(prefix .. string.char(b))
        local head, pad = enc:match("^(.-).(=+)$")
        local accepted = 0
        for i = 1, 64 do
          local s = head .. alphabet:sub(i, i) .. pad
          local out = crypto.base64_decode(s)
          if out then
            accepted = accepted + 1
            assert.equal(s, crypto.base64_encode(out))
          end
        end
        -- 4 unused bits leave 4 characters of 64, 2 unused bits 16.
        assert.equal(prefix == "" and 4 or 16, accepted, enc)
      end
    end
  end)

  it("ignores those bits only when asked (an EncodingAESKey is 43 random characters)", function()
    assert.equal("f", crypto.base64_decode("Zh==", { ignore_tail_bits = true }))
    assert.equal("fo", crypto.base64_decode("Zm9=", { ignore_tail_bits = true }))
    fails("invalid base64", crypto.base64_decode, "Zh=", { ignore_tail_bits = true })
    fails("invalid base64", crypto.base64_decode, "Z!==", { ignore_tail_bits = true })
    assert.has_error(function() crypto.base64_decode("QQ==", true) end)
  end)

  it("a corrupted character anywhere is caught", function()
    local good = crypto.base64_encode(crypto.random_bytes(300))
    for i = 1, #good, 7 do
      local s = good:sub(1, i - 1) .. "*" .. good:sub(i + 1)
      fails("invalid base64", crypto.base64_decode, s)
    end
  end)
end)

describe("hex decoding is strict", function()
  it("refuses odd lengths and non-hex characters", function()
    for _, s in ipairs({ "a", "abc", "zz", "0g", " 00", "00 ", "0x00", "\0\0" }) do
      fails("invalid hex", crypto.hex_decode, s)
    end
  end)
end)

describe("AES-CBC bad input", function()
  local ct = crypto.aes_cbc_encrypt(KEY, IV, "attack at dawn, not before")

  it("gives nil, \"invalid key\" for keys of the wrong size, in every mode", function()
    for _, n in ipairs({ 0, 1, 15, 17, 23, 25, 31, 33, 64 }) do
      local key = string.rep("\7", n)
      fails("invalid key", crypto.aes_cbc_decrypt, key, IV, ct)
      fails("invalid key", crypto.aes_cbc_encrypt, key, IV, "x")
      fails("invalid key", crypto.aes_ecb_decrypt, key, ct)
      fails("invalid key", crypto.aes_gcm_decrypt, key, "123456789012", ct)
      fails("invalid key", crypto.aes_gcm_encrypt, key, "123456789012", "x")
    end
  end)

  it("raises on an IV of the wrong size when encrypting", function()
    raises("IV must be 16 bytes", crypto.aes_cbc_encrypt, KEY, "short", "x")
  end)

  it("fails on an IV of the wrong size when decrypting (it came with the message)", function()
    fails("decrypt failed", crypto.aes_cbc_decrypt, KEY, "short", ct)
    fails("decrypt failed", crypto.aes_cbc_decrypt, KEY, IV .. "x", ct)
  end)

  it("fails on empty, truncated and non-block-multiple ciphertext", function()
    fails("decrypt failed", crypto.aes_cbc_decrypt, KEY, IV, "")
    for cut = 1, 15 do
      fails("decrypt failed", crypto.aes_cbc_decrypt, KEY, IV, ct:sub(1, #ct - cut))
      fails("decrypt failed", crypto.aes_cbc_decrypt, KEY, IV, ct .. string.rep("x", cut))
    end
  end)

  it("fails with a wrong key", function()
    -- A wrong key turns the last block into noise; the pad check catches all
    -- but about 1 in 256 keys, so the key is fixed here.
    fails("decrypt failed", crypto.aes_cbc_decrypt, string.rep("K", 32), IV, ct)
  end)

  -- Builds a ciphertext whose last plaintext block is `last` (16 bytes), by
  -- flipping the block before it (CBC malleability).
  local function forge(last, key)
    key = key or KEY
    local c = crypto.aes_cbc_encrypt(key, IV, string.rep("p", 16)) -- 2 blocks, pad block of 0x10
    local c1, c2 = c:sub(1, 16), c:sub(17, 32)
    local out = {}
    for i = 1, 16 do
      out[i] = string.char(bit.bxor(c1:byte(i), 0x10, last:byte(i)))
    end
    return table.concat(out) .. c2
  end

  it("forged blocks with a valid padding decrypt (the forging works)", function()
    for p = 1, 16 do
      local last = string.rep("z", 16 - p) .. string.rep(string.char(p), p)
      local pt = assert(crypto.aes_cbc_decrypt(KEY, IV, forge(last)))
      assert.equal(32 - p, #pt)
      assert.equal(string.rep("z", 16 - p), pt:sub(17))
    end
  end)

  it("every malformed padding gives the same error", function()
    -- Pad value 0, and every value above the pad block.
    for v = 0, 255 do
      if v == 0 or v > 16 then
        fails("decrypt failed", crypto.aes_cbc_decrypt, KEY, IV, forge(string.rep("z", 15) .. string.char(v)))
      end
    end
    -- For every pad value 2..16, each pad byte wrong in turn.
    for p = 2, 16 do
      for wrong = 2, p do
        local bytes = {}
        for i = 1, 16 do bytes[i] = i > 16 - p and p or 0x7a end
        bytes[17 - wrong] = bit.bxor(p, 0x40)
        local last = string.char(unpack(bytes))
        fails("decrypt failed", crypto.aes_cbc_decrypt, KEY, IV, forge(last))
      end
    end
  end)

  it("a 32-byte pad block allows pad values 1..32 and nothing above", function()
    local c = crypto.aes_cbc_encrypt(KEY, IV, string.rep("q", 31), 32) -- pad 1
    assert.equal(32, #c)
    assert.equal(string.rep("q", 31), crypto.aes_cbc_decrypt(KEY, IV, c, 32))
    local c2 = crypto.aes_cbc_encrypt(KEY, IV, "", 32) -- 32 bytes of 32
    assert.equal("", crypto.aes_cbc_decrypt(KEY, IV, c2, 32))
    fails("decrypt failed", crypto.aes_cbc_decrypt, KEY, IV, c2, 16) -- 32 > 16
    -- A pad value larger than the ciphertext itself.
    local one = forge(string.rep("z", 15) .. string.char(20)):sub(17)
    local iv2 = forge(string.rep("z", 15) .. string.char(20)):sub(1, 16)
    fails("decrypt failed", crypto.aes_cbc_decrypt, KEY, iv2, one, 32)
    fails("decrypt failed", crypto.aes_cbc_decrypt, KEY, IV, forge(string.rep("z", 15) .. string.char(33)), 32)
  end)

  it("raises on a pad block out of range", function()
    for _, b in ipairs({ 0, -1, 256, 1000, 1.5 }) do
      raises("expected an integer in 1..255", crypto.aes_cbc_decrypt, KEY, IV, ct, b)
    end
    raises("pad_block must be a number", crypto.aes_cbc_decrypt, KEY, IV, ct, "16")
    for _, b in ipairs({ 0, 1, 8, 15, 17, 24, 256 }) do
      assert.has_error(function() crypto.aes_cbc_encrypt(KEY, IV, "x", b) end)
    end
  end)
end)

describe("AES-ECB bad input", function()
  local ct = crypto.aes_ecb_encrypt(KEY, "refund notification body")
  it("fails on truncated, empty and non-block-multiple ciphertext", function()
    fails("decrypt failed", crypto.aes_ecb_decrypt, KEY, "")
    fails("decrypt failed", crypto.aes_ecb_decrypt, KEY, ct:sub(1, -2))
    fails("decrypt failed", crypto.aes_ecb_decrypt, KEY, ct .. "x")
    fails("decrypt failed", crypto.aes_ecb_decrypt, string.rep("K", 32), ct)
  end)
  it("fails when the last block's padding is broken", function()
    -- Replacing the last block with another block of the same message
    -- (ECB!) leaves a last plaintext block of letters: no valid pad.
    fails("decrypt failed", crypto.aes_ecb_decrypt, KEY, ct:sub(1, 16) .. ct:sub(1, 16))
  end)
end)

describe("AES-GCM bad input", function()
  local key, nonce, aad = string.rep("g", 32), "123456789012", "transaction"
  local ct = crypto.aes_gcm_encrypt(key, nonce, "pay 100 yuan", aad)

  it("every flipped bit of ciphertext or tag is refused", function()
    for i = 1, #ct do
      for b = 0, 7 do
        local s = ct:sub(1, i - 1) .. string.char(bit.bxor(ct:byte(i), bit.lshift(1, b))) .. ct:sub(i + 1)
        fails("decrypt failed", crypto.aes_gcm_decrypt, key, nonce, s, aad)
      end
    end
  end)

  it("a wrong, missing or extra AAD is refused", function()
    fails("decrypt failed", crypto.aes_gcm_decrypt, key, nonce, ct, "transactioN")
    fails("decrypt failed", crypto.aes_gcm_decrypt, key, nonce, ct)
    fails("decrypt failed", crypto.aes_gcm_decrypt, key, nonce, ct, "")
    fails("decrypt failed", crypto.aes_gcm_decrypt, key, nonce, ct, aad .. "\0")
    local noaad = crypto.aes_gcm_encrypt(key, nonce, "x")
    fails("decrypt failed", crypto.aes_gcm_decrypt, key, nonce, noaad, "a")
  end)

  it("a wrong nonce, a nonce of another length or an empty one is refused", function()
    fails("decrypt failed", crypto.aes_gcm_decrypt, key, "123456789013", ct, aad)
    fails("decrypt failed", crypto.aes_gcm_decrypt, key, "12345678901", ct, aad)
    fails("decrypt failed", crypto.aes_gcm_decrypt, key, "1234567890123", ct, aad)
    fails("decrypt failed", crypto.aes_gcm_decrypt, key, "", ct, aad)
    fails("decrypt failed", crypto.aes_gcm_decrypt, key, string.rep("n", 129), ct, aad)
  end)

  it("a wrong key, a truncated tag or a too-short input is refused", function()
    fails("decrypt failed", crypto.aes_gcm_decrypt, string.rep("G", 32), nonce, ct, aad)
    for cut = 1, #ct do
      fails("decrypt failed", crypto.aes_gcm_decrypt, key, nonce, ct:sub(1, #ct - cut), aad)
    end
    fails("decrypt failed", crypto.aes_gcm_decrypt, key, nonce, ct .. "x", aad)
  end)

  it("raises on a bad nonce when encrypting", function()
    raises("nonce must be 1..128 bytes", crypto.aes_gcm_encrypt, key, "", "x")
    raises("nonce must be 1..128 bytes", crypto.aes_gcm_encrypt, key, string.rep("n", 129), "x")
  end)
end)

describe("argument types", function()
  it("numbers, nil and tables where bytes belong raise", function()
    local calls = {
      function(x) return crypto.sha256(x) end,
      function(x) return crypto.hmac_sha256(x, "m") end,
      function(x) return crypto.hmac_sha256("k", x) end,
      function(x) return crypto.equals(x, "a") end,
      function(x) return crypto.base64_encode(x) end,
      function(x) return crypto.base64_decode(x) end,
      function(x) return crypto.hex_decode(x) end,
      function(x) return crypto.aes_cbc_encrypt(KEY, IV, x) end,
      function(x) return crypto.aes_cbc_decrypt(x, IV, "") end,
      function(x) return crypto.aes_gcm_decrypt(KEY, "123456789012", x) end,
      function(x) return crypto.aes_gcm_decrypt(KEY, "123456789012", string.rep("x", 16), x) end,
      function(x) return crypto.load_private_key(x) end,
      function(x) return crypto.load_certificate(x) end,
      function(x) return crypto.load_pkcs12(x, "pass") end,
      function(x) return crypto.load_pkcs12("der", x) end,
    }
    for i, f in ipairs(calls) do
      for _, v in ipairs({ 12, {}, true }) do
        assert.has_error(function() f(v) end, nil, "call " .. i)
      end
      if i ~= 11 then -- aad may be nil
        assert.has_error(function() f(nil) end, nil, "call " .. i)
      end
    end
  end)

  it("random_bytes and nonce check their counts", function()
    for _, n in ipairs({ -1, 1.5, 2 ^ 21, "8" }) do
      assert.has_error(function() crypto.random_bytes(n) end)
    end
    for _, n in ipairs({ 0, -1, 4097, 2.5 }) do
      assert.has_error(function() crypto.nonce(n) end)
    end
    assert.equal("", crypto.random_bytes(0))
  end)
end)

describe("keys, certificates and PKCS#12 from bad input", function()
  local dir, pem, cert_pem, p12
  setup(function()
    dir = H.tmpdir()
    local out, code = H.sh(string.format([[
      cd %s && openssl genrsa -out key.pem 2048 &&
      openssl req -new -x509 -key key.pem -subj /CN=bad-input -days 1 -out cert.pem &&
      openssl pkcs12 -export -inkey key.pem -in cert.pem -passout pass:1900009191 -out b.p12 &&
      openssl pkcs8 -topk8 -in key.pem -passout pass:s3cret-pass -out enc.pem &&
      openssl ecparam -name prime256v1 -genkey -noout -out ec.pem &&
      openssl req -new -x509 -key ec.pem -subj /CN=ec -days 1 -out eccert.pem]], dir))
    assert(code == 0, out)
    pem, cert_pem, p12 = H.read_file(dir .. "/key.pem"), H.read_file(dir .. "/cert.pem"), H.read_file(dir .. "/b.p12")
  end)
  teardown(function() os.execute("rm -rf " .. dir) end)

  it("garbage PEM gives nil, 'invalid key'", function()
    local body = pem:match("%-%-%-%-%-\n(.-)\n%-%-%-%-%-END")
    local cases = {
      "", "garbage", "-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n",
      "-----BEGIN PRIVATE KEY-----\nnot base64 at all!!\n-----END PRIVATE KEY-----\n",
      pem:sub(1, math.floor(#pem / 2)),
      pem:sub(1, 40) .. "A" .. pem:sub(42),
      "-----BEGIN PRIVATE KEY-----\n" .. body:sub(1, 200) .. "\n-----END PRIVATE KEY-----\n",
      cert_pem, string.rep("\0", 100),
    }
    for i, s in ipairs(cases) do
      local k, err = crypto.load_private_key(s)
      assert.is_nil(k, "case " .. i)
      assert.equal("invalid key", err)
      fails("invalid key", crypto.load_public_key, s)
    end
  end)

  it("a private key is not a public key and vice versa; EC keys are refused", function()
    local key = assert(crypto.load_private_key(pem))
    fails("invalid key", crypto.load_public_key, pem)
    fails("invalid key", crypto.load_private_key, key:public_pem())
    fails("invalid key", crypto.load_private_key, H.read_file(dir .. "/ec.pem"))
    local ec = assert(crypto.load_certificate(H.read_file(dir .. "/eccert.pem")))
    fails("invalid key", ec.public_key, ec)
  end)

  it("an encrypted key needs its passphrase, and the error never shows it", function()
    local enc = H.read_file(dir .. "/enc.pem")
    fails("invalid key", crypto.load_private_key, enc)
    local k, err = crypto.load_private_key(enc, "wrong-pass")
    assert.is_nil(k)
    assert.equal("invalid key", err)
    assert.truthy(crypto.load_private_key(enc, "s3cret-pass"))
  end)

  it("garbage certificates give nil, 'invalid certificate'", function()
    for _, s in ipairs({ "", "garbage", pem, cert_pem:sub(1, 300), (cert_pem:gsub("MII", "MIJ")) }) do
      fails("invalid certificate", crypto.load_certificate, s)
      fails("invalid certificate", crypto.load_certificates, s)
    end
    -- A bundle with one good and one broken certificate is refused whole.
    fails("invalid certificate", crypto.load_certificates, cert_pem .. cert_pem:sub(1, 300))
  end)

  it("PKCS#12: wrong passphrase, garbage and truncation", function()
    fails("bad passphrase", crypto.load_pkcs12, p12, "wrong")
    fails("bad passphrase", crypto.load_pkcs12, p12, "")
    fails("invalid pkcs12", crypto.load_pkcs12, "garbage", "1900009191")
    fails("invalid pkcs12", crypto.load_pkcs12, "", "1900009191")
    fails("invalid pkcs12", crypto.load_pkcs12, p12:sub(1, #p12 - 10), "1900009191")
    fails("invalid pkcs12", crypto.load_pkcs12, p12 .. "x", "1900009191")
    fails("invalid pkcs12", crypto.load_pkcs12, pem, "1900009191")
    local k = crypto.load_pkcs12(p12, "1900009191")
    assert.truthy(k)
  end)

  it("bad signatures and ciphertexts", function()
    local key = assert(crypto.load_private_key(pem))
    local sig = key:sign("message")
    fails("bad signature", key.verify, key, "messagE", sig)
    fails("bad signature", key.verify, key, "message", sig:sub(2))
    fails("bad signature", key.verify, key, "message", "")
    fails("bad signature", key.verify, key, "message", sig .. "\0")
    local flipped = string.char(bit.bxor(sig:byte(100), 1))
    fails("bad signature", key.verify, key, "message", sig:sub(1, 99) .. flipped .. sig:sub(101))
    local ct = key:encrypt("secret")
    fails("decrypt failed", key.decrypt, key, ct:sub(2))
    fails("decrypt failed", key.decrypt, key, "")
    fails("decrypt failed", key.decrypt, key, string.rep("\255", 256))
    fails("decrypt failed", key.decrypt, key, ct:sub(1, 99) .. string.char(bit.bxor(ct:byte(100), 1)) .. ct:sub(101))
    -- A ciphertext shorter than the modulus is refused (RFC 8017 7.1.2),
    -- also one whose missing byte was a leading zero (1 in 256 ciphertexts:
    -- the same number, which OpenSSL alone would decrypt).
    local zero_led
    for _ = 1, 5000 do
      local c = key:encrypt("secret")
      if c:byte(1) == 0 then zero_led = c break end
    end
    assert.truthy(zero_led, "no ciphertext with a leading zero in 5000")
    assert.equal("secret", key:decrypt(zero_led))
    fails("decrypt failed", key.decrypt, key, zero_led:sub(2))
    fails("message too long", key.encrypt, key, string.rep("x", 215))
    assert.truthy(key:encrypt(string.rep("x", 214)))
  end)

  it("private operations on a public key and use after close raise", function()
    local key = assert(crypto.load_private_key(pem))
    local pub = assert(crypto.load_public_key(key:public_pem()))
    raises("sign needs a private key", pub.sign, pub, "m")
    raises("decrypt needs a private key", pub.decrypt, pub, "m")
    key:close()
    key:close() -- idempotent
    raises("closed key", key.sign, key, "m")
    assert.equal("wxd.crypto.key (closed)", tostring(key))
    local cert = assert(crypto.load_certificate(cert_pem))
    cert:close()
    raises("closed certificate", cert.serial, cert)
    -- Methods check their receiver.
    raises("bad argument", pub.verify, cert, "m", "s")
  end)

  it("tostring of a key shows no key material", function()
    local key = assert(crypto.load_private_key(pem))
    local s = tostring(key)
    assert.truthy(s:find("^wxd%.crypto%.key %(RSA%-2048 private%)"), s)
    assert.is_true(#s < 64)
    assert.equal("wxd.crypto.key", getmetatable(key))
  end)

  it("verify refuses garbage CA bundles", function()
    local cert = assert(crypto.load_certificate(cert_pem))
    fails("invalid ca bundle", cert.verify, cert, "garbage")
    fails("invalid ca bundle", cert.verify, cert, {})
    fails("invalid ca bundle", cert.verify, cert, { "not a cert" })
    assert.has_error(function() cert:verify(42) end)
  end)
end)
