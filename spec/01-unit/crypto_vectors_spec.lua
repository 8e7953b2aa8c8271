-- wxd.crypto against published test vectors: FIPS 180 (SHA), RFC 1321
-- (MD5), RFC 2202 / RFC 4231 (HMAC), NIST SP 800-38A (AES-CBC, AES-ECB), the
-- GCM specification's test cases (McGrew & Viega), RFC 4648 (base64, base16)
-- and WeChat's own samples (/work/shared/VECTORS.md). A round trip through
-- our own code proves nothing about compatibility; these do.
local crypto = require "wxd.crypto"

local hex = crypto.hex_encode
local function unhex(s) return assert(crypto.hex_decode((s:gsub("%s+", "")))) end

describe("digests (FIPS 180-4, RFC 1321)", function()
  local million_a = string.rep("a", 1000000)
  local two_blocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"

  it("SHA-1", function()
    assert.equal("a9993e364706816aba3e25717850c26c9cd0d89d", crypto.sha1_hex("abc"))
    assert.equal("84983e441c3bd26ebaae4aa1f95129e5e54670f1", crypto.sha1_hex(two_blocks))
    assert.equal("34aa973cd4c4daa4f61eeb2bdbad27316534016f", crypto.sha1_hex(million_a))
    assert.equal("da39a3ee5e6b4b0d3255bfef95601890afd80709", crypto.sha1_hex(""))
    assert.equal(unhex("a9993e364706816aba3e25717850c26c9cd0d89d"), crypto.sha1("abc"))
  end)

  it("SHA-256", function()
    assert.equal("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", crypto.sha256_hex("abc"))
    assert.equal("248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1", crypto.sha256_hex(two_blocks))
    assert.equal("cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0", crypto.sha256_hex(million_a))
    assert.equal("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", crypto.sha256_hex(""))
    assert.equal(32, #crypto.sha256("abc"))
    assert.equal(unhex("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"), crypto.sha256("abc"))
  end)

  it("MD5 (RFC 1321 test suite)", function()
    local suite = {
      [""] = "d41d8cd98f00b204e9800998ecf8427e",
      ["a"] = "0cc175b9c0f1b6a831c399e269772661",
      ["abc"] = "900150983cd24fb0d6963f7d28e17f72",
      ["message digest"] = "f96b697d7cb7938d525a2f31aaf161d0",
      ["abcdefghijklmnopqrstuvwxyz"] = "c3fcd3d76192e4007dfb496cca67e13b",
      ["ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"] = "d174ab98d277d9f5a5611c2c9f419d9f",
      [string.rep("1234567890", 8)] = "57edf4a22be3c955ac49da2e2107b67a",
    }
    for input, want in pairs(suite) do
      assert.equal(want, crypto.md5_hex(input), "md5 of " .. input)
      assert.equal(unhex(want), crypto.md5(input))
    end
  end)

  it("digests binary input with NUL bytes", function()
    assert.are_not.equal(crypto.sha256_hex("a\0b"), crypto.sha256_hex("a"))
  end)
end)

describe("HMAC", function()
  local function rep(byte, n) return string.rep(string.char(byte), n) end
  local key25 = unhex("0102030405060708090a0b0c0d0e0f10111213141516171819")

  it("HMAC-SHA256 (RFC 4231 test cases 1-7)", function()
    local cases = {
      { rep(0x0b, 20), "Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7" },
      { "Jefe", "what do ya want for nothing?", "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843" },
      { rep(0xaa, 20), rep(0xdd, 50), "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe" },
      { key25, rep(0xcd, 50), "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b" },
      { rep(0xaa, 131), "Test Using Larger Than Block-Size Key - Hash Key First",
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54" },
      { rep(0xaa, 131), "This is a test using a larger than block-size key and a larger than block-size data. "
          .. "The key needs to be hashed before being used by the HMAC algorithm.",
        "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2" },
    }
    for i, c in ipairs(cases) do
      assert.equal(c[3], crypto.hmac_sha256_hex(c[1], c[2]), "case " .. i)
      assert.equal(unhex(c[3]), crypto.hmac_sha256(c[1], c[2]))
    end
    -- Test case 5 is truncated to 128 bits.
    assert.equal("a3b6167473100ee06e0c796c2955552b",
      crypto.hmac_sha256_hex(rep(0x0c, 20), "Test With Truncation"):sub(1, 32))
  end)

  it("HMAC-SHA1 (RFC 2202 test cases 1-7)", function()
    local cases = {
      { rep(0x0b, 20), "Hi There", "b617318655057264e28bc0b6fb378c8ef146be00" },
      { "Jefe", "what do ya want for nothing?", "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79" },
      { rep(0xaa, 20), rep(0xdd, 50), "125d7342b9ac11cd91a39af48aa17b4f63f175d3" },
      { key25, rep(0xcd, 50), "4c9007f4026250c6bc8414f9bf50c86c2d7235da" },
      { rep(0x0c, 20), "Test With Truncation", "4c1a03424b55e07fe7f27be1d58bb9324a9a5a04" },
      { rep(0xaa, 80), "Test Using Larger Than Block-Size Key - Hash Key First",
        "aa4ae5e15272d00e95705637ce8a3b55ed402112" },
      { rep(0xaa, 80), "Test Using Larger Than Block-Size Key and Larger Than One Block-Size Data",
        "e8e99d0f45237d786d6bbaa7965c7808bbff1a91" },
    }
    for i, c in ipairs(cases) do
      assert.equal(c[3], crypto.hmac_sha1_hex(c[1], c[2]), "case " .. i)
      assert.equal(unhex(c[3]), crypto.hmac_sha1(c[1], c[2]))
    end
  end)

  it("accepts an empty key and an empty message", function()
    assert.equal(64, #crypto.hmac_sha256_hex("", ""))
    assert.equal(crypto.hmac_sha256_hex("", "x"), crypto.hmac_sha256_hex("", "x"))
  end)
end)

describe("RFC 4648 encodings", function()
  local b64 = { [""] = "", f = "Zg==", fo = "Zm8=", foo = "Zm9v", foob = "Zm9vYg==", fooba = "Zm9vYmE=",
                foobar = "Zm9vYmFy" }
  local b16 = { [""] = "", f = "66", fo = "666F", foo = "666F6F", foob = "666F6F62", fooba = "666F6F6261",
                foobar = "666F6F626172" }

  it("base64 (section 10 vectors) both ways", function()
    for raw, enc in pairs(b64) do
      assert.equal(enc, crypto.base64_encode(raw))
      assert.equal(raw, crypto.base64_decode(enc))
    end
  end)

  it("base64url: unpadded by default, padded on request, decodes both", function()
    for raw, enc in pairs(b64) do
      local unpadded = enc:gsub("=", "")
      assert.equal(unpadded, crypto.base64url_encode(raw))
      assert.equal(enc, crypto.base64url_encode(raw, true))
      assert.equal(raw, crypto.base64url_decode(unpadded))
      assert.equal(raw, crypto.base64url_decode(enc))
    end
    -- The two alphabets differ in exactly two characters (section 5).
    assert.equal("-_-_", crypto.base64url_encode("\251\255\191"))
    assert.equal("+/+/", crypto.base64_encode("\251\255\191"))
    assert.equal("\251\255\191", crypto.base64url_decode("-_-_"))
  end)

  it("base16 (section 10 vectors), upper and lower case", function()
    for raw, enc in pairs(b16) do
      assert.equal(enc, crypto.hex_encode(raw, true))
      assert.equal(enc:lower(), crypto.hex_encode(raw))
      assert.equal(raw, crypto.hex_decode(enc))
      assert.equal(raw, crypto.hex_decode(enc:lower()))
    end
  end)

  it("every byte value survives both encodings", function()
    local all = {}
    for i = 0, 255 do all[#all + 1] = string.char(i) end
    all = table.concat(all)
    assert.equal(all, crypto.base64_decode(crypto.base64_encode(all)))
    assert.equal(all, crypto.base64url_decode(crypto.base64url_encode(all)))
    assert.equal(all, crypto.hex_decode(crypto.hex_encode(all)))
  end)
end)

-- NIST SP 800-38A, appendix F: the four-block plaintext and its ciphertexts.
local SP800_PLAIN = unhex([[6bc1bee22e409f96e93d7e117393172a ae2d8a571e03ac9c9eb76fac45af8e51
  30c81c46a35ce411e5fbc1191a0a52ef f69f2445df4f9b17ad2b417be66c3710]])
local SP800_IV = unhex("000102030405060708090a0b0c0d0e0f")
local SP800_KEYS = {
  [128] = unhex("2b7e151628aed2a6abf7158809cf4f3c"),
  [192] = unhex("8e73b0f7da0e6452c810f32b809079e562f8ead2522c6b7b"),
  [256] = unhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4"),
}

describe("AES-CBC (NIST SP 800-38A F.2)", function()
  local cbc = {
    [128] = [[7649abac8119b246cee98e9b12e9197d 5086cb9b507219ee95db113a917678b2
              73bed6b8e3c1743b7116e69e22229516 3ff1caa1681fac09120eca307586e1a7]],
    [192] = [[4f021db243bc633d7178183a9fa071e8 b4d9ada9ad7dedf4e5e738763f69145a
              571b242012fb7ae07fa9baac3df102e0 08b0e27988598881d920a9e64f5615cd]],
    [256] = [[f58c4c04d6e5f1ba779eabfb5f7bfbd6 9cfc4e967edb808d679f777bc6702c7d
              39f23369a9d9bacfa530e26304231461 b2eb05e2c39be9fcda6c19078c6a9d1b]],
  }
  for bits, want in pairs(cbc) do
    it("CBC-AES" .. bits .. ".Encrypt / .Decrypt", function()
      local key = SP800_KEYS[bits]
      local ct = crypto.aes_cbc_encrypt(key, SP800_IV, SP800_PLAIN)
      -- The vector has no padding: our output is the vector plus one block
      -- of PKCS#7 padding (CBC is prefix-consistent).
      assert.equal(80, #ct)
      assert.equal(hex(unhex(want)), hex(ct:sub(1, 64)))
      assert.equal(SP800_PLAIN, crypto.aes_cbc_decrypt(key, SP800_IV, ct))
      -- Each prefix of whole vector blocks plus its own pad block decrypts too.
      for n = 1, 4 do
        local c = crypto.aes_cbc_encrypt(key, SP800_IV, SP800_PLAIN:sub(1, 16 * n))
        assert.equal(hex(unhex(want):sub(1, 16 * n)), hex(c:sub(1, 16 * n)))
      end
    end)
  end
end)

describe("AES-ECB (NIST SP 800-38A F.1)", function()
  local ecb = {
    [128] = [[3ad77bb40d7a3660a89ecaf32466ef97 f5d3d58503b9699de785895a96fdbaaf
              43b1cd7f598ece23881b00e3ed030688 7b0c785e27e8ad3f8223207104725dd4]],
    [256] = [[f3eed1bdb5d2a03c064b5a7e3db181f8 591ccb10d410ed26dc5ba74a31362870
              b6ed21b99ca6f4f9f153e7b1beafed1d 23304b7a39f9f3ff067d8d8f9e24ecc7]],
  }
  for bits, want in pairs(ecb) do
    it("ECB-AES" .. bits .. ".Encrypt / .Decrypt", function()
      local ct = crypto.aes_ecb_encrypt(SP800_KEYS[bits], SP800_PLAIN)
      assert.equal(80, #ct)
      assert.equal(hex(unhex(want)), hex(ct:sub(1, 64)))
      assert.equal(SP800_PLAIN, crypto.aes_ecb_decrypt(SP800_KEYS[bits], ct))
    end)
  end
end)

describe("AES-GCM (the GCM specification's test cases)", function()
  local K1 = "feffe9928665731c6d6a8f9467308308"
  local P = [[d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72
              1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255]]
  local P60 = [[d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72
                1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39]]
  local A = "feedfacedeadbeeffeedfacedeadbeefabaddad2"
  local IV60 = [[9313225df88406e555909c5aff5269aa6a7a9538534f7da1e4c303d2a318a728
                 c3c0c95156809539fcf0e2429a6b525416aedbf5a0de6a57a637b39b]]
  local cases = {
    { n = 1, k = string.rep("00", 16), iv = string.rep("00", 12), p = "", a = "", c = "",
      t = "58e2fccefa7e3061367f1d57a4e7455a" },
    { n = 2, k = string.rep("00", 16), iv = string.rep("00", 12), p = string.rep("00", 16), a = "",
      c = "0388dace60b6a392f328c2b971b2fe78", t = "ab6e47d42cec13bdf53a67b21257bddf" },
    { n = 3, k = K1, iv = "cafebabefacedbaddecaf888", p = P, a = "",
      c = [[42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e
            21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091473f5985]],
      t = "4d5c2af327cd64a62cf35abd2ba6fab4" },
    { n = 4, k = K1, iv = "cafebabefacedbaddecaf888", p = P60, a = A,
      c = [[42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e
            21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091]],
      t = "5bc94fbc3221a5db94fae95ae7121a47" },
    { n = 5, k = K1, iv = "cafebabefacedbad", p = P60, a = A,
      c = [[61353b4c2806934a777ff51fa22a4755699b2a714fcdc6f83766e5f97b6c7423
            73806900e49f24b22b097544d4896b424989b5e1ebac0f07c23f4598]],
      t = "3612d2e79e3b0785561be14aaca2fccb" },
    { n = 6, k = K1, iv = IV60, p = P60, a = A,
      c = [[8ce24998625615b603a033aca13fb894be9112a5c3a211a8ba262a3cca7e2ca7
            01e4a9a4fba43c90ccdcb281d48c7c6fd62875d2aca417034c34aee5]],
      t = "619cc5aefffe0bfa462af43c1699d050" },
    { n = 13, k = string.rep("00", 32), iv = string.rep("00", 12), p = "", a = "", c = "",
      t = "530f8afbc74536b9a963b4f1c4cb738b" },
    { n = 14, k = string.rep("00", 32), iv = string.rep("00", 12), p = string.rep("00", 16), a = "",
      c = "cea7403d4d606b6e074ec5d3baf39d18", t = "d0d1c8a799996bf0265b98b5d48ab919" },
    { n = 15, k = K1 .. K1, iv = "cafebabefacedbaddecaf888", p = P, a = "",
      c = [[522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa
            8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad]],
      t = "b094dac5d93471bdec1a502270e3cc6c" },
    { n = 16, k = K1 .. K1, iv = "cafebabefacedbaddecaf888", p = P60, a = A,
      c = [[522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa
            8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662]],
      t = "76fc6ece0f4e1768cddf8853bb2d551b" },
    { n = 17, k = K1 .. K1, iv = "cafebabefacedbad", p = P60, a = A,
      c = [[c3762df1ca787d32ae47c13bf19844cbaf1ae14d0b976afac52ff7d79bba9de0
            feb582d33934a4f0954cc2363bc73f7862ac430e64abe499f47c9b1f]],
      t = "3a337dbf46a792c45e454913fe2ea8f2" },
    { n = 18, k = K1 .. K1, iv = IV60, p = P60, a = A,
      c = [[5a8def2f0c9e53f1f75d7853659e2a20eeb2b22aafde6419a058ab4f6f746bf4
            0fc0c3b780f244452da3ebf1c5d82cdea2418997200ef82e44ae7e3f]],
      t = "a44a8266ee1c8eb0c8b5d4cf5ae9f19a" },
  }
  for _, c in ipairs(cases) do
    it("test case " .. c.n, function()
      local k, iv, p, a = unhex(c.k), unhex(c.iv), unhex(c.p), unhex(c.a)
      local want = unhex(c.c) .. unhex(c.t)
      assert.equal(hex(want), hex(crypto.aes_gcm_encrypt(k, iv, p, a)))
      assert.equal(hex(p), hex(crypto.aes_gcm_decrypt(k, iv, want, a)))
      if c.a == "" then -- an omitted aad is the empty one
        assert.equal(hex(want), hex(crypto.aes_gcm_encrypt(k, iv, p)))
        assert.equal(hex(p), hex(crypto.aes_gcm_decrypt(k, iv, want)))
      end
    end)
  end
end)

describe("WeChat samples (VECTORS.md)", function()
  it("Official Account safe mode: EncodingAESKey, decrypt, re-encrypt (32-byte padding)", function()
    -- "G" has unused bits set: an EncodingAESKey is not an encoder's output.
    assert.is_nil((crypto.base64_decode("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG" .. "=")))
    local key = crypto.base64_decode("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG" .. "=", { ignore_tail_bits = true })
    assert.equal("69b71d79f8218a39259a7a29aabb2dbafc31cb3d35db7e39ebbf3d0010831051", hex(key))
    -- luacheck: push ignore 631 (test vectors, verbatim)
    local b64 = "rTNFcsut4LfGuAFKEUVVpwcaCOTJzOd9twZdIW910jb3k+iicx2uvhttIZ3Qg9Qgty3BEF2xbOrz6boTfb30dMomcgrkTqdFPwnhqbk+kIQ7rZiwny9D7NUrTgA5kpX3KsZvrXzUZyP2x9YOlxbgm572lmxKvM7HAQQhIQ/p6HBmoY30bGXFK0BtIu1pW9TjhOYrLQoU18nWYjWqDA1ynkmOytpv7QRI1P1+0NoxL0q2zO1DgeSvnE8CZGo/o5Ap/WHK5W2RAsinpzN4/LjPnmB6U01I5XCoJoC0GK/yMZycd2Oh8Nq6+wBkC1U85oy0ktOY4nLvsQMLrourmMGdZHuTbqpeJ8Ao/5PRYJ+WBvRUwPfGKBL2+2IKZF49vAJqkcGWSHGE76ZN2erXeuNazf/o9o3lIE3q739o4c8t9QGPe31GT2Go/rOz1BsrASwvauNulCh+++yz+CQzBIuikA=="
    -- luacheck: pop
    local ct = assert(crypto.base64_decode(b64))
    local iv = key:sub(1, 16)
    local plain = assert(crypto.aes_cbc_decrypt(key, iv, ct, 32))
    -- luacheck: push ignore 631 (test vectors, verbatim)
    local msg = "<xml><URL><![CDATA[http://wechat.laravel.so/server]]></URL><ToUserName><![CDATA[asdasdasd]]></ToUserName><FromUserName><![CDATA[asdasdasdsadasd]]></FromUserName><CreateTime>1234567898</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[hello]]></Content><MsgId>12345</MsgId></xml>"
    -- luacheck: pop
    assert.equal("d43123b161a4ba84", plain:sub(1, 16))
    local b1, b2, b3, b4 = plain:byte(17, 20)
    local len = ((b1 * 256 + b2) * 256 + b3) * 256 + b4
    assert.equal(293, len)
    assert.equal(msg, plain:sub(21, 20 + len))
    assert.equal("wxb11529c136998cb6", plain:sub(21 + len))
    -- Pad byte 21: a 32-byte pad block. With 16, 21 is not a valid pad value.
    local nil_, err = crypto.aes_cbc_decrypt(key, iv, ct, 16)
    assert.is_nil(nil_)
    assert.equal("decrypt failed", err)
    assert.equal(b64, crypto.base64_encode(crypto.aes_cbc_encrypt(key, iv, plain, 32)))
    -- The message signature: sha1 of the sorted token, timestamp, nonce, ciphertext.
    local parts = { "pamtest", "1458300676", "260774613", b64 }
    table.sort(parts)
    assert.equal("4f3ad57b6989f09f4eb392acce4f9e93942ed890", crypto.sha1_hex(table.concat(parts)))
  end)

  it("URL signature: sha1 of sorted strings", function()
    local parts = { "c", "a", "b" }
    table.sort(parts)
    assert.equal("a9993e364706816aba3e25717850c26c9cd0d89d", crypto.sha1_hex(table.concat(parts)))
  end)

  it("JS-SDK signature", function()
    local s = "jsapi_ticket=sM4AOVdWfPE4DxkXGEs8VMCPGGVi4C3VM0P37wVUCFvkVAy_90u5h9nbSlYy3-Sl-HhTdfl2fzFy1AOcHKP7qg"
      .. "&noncestr=Wm3WZYTPz0wzccnW&timestamp=1414587457&url=http://mp.weixin.qq.com?params=value"
    assert.equal("0f9de62fce790f9a083d5c99e95740ceb90c27ed", crypto.sha1_hex(s))
  end)

  it("Mini Program user data: AES-128-CBC, 16-byte padding", function()
    -- luacheck: push ignore 631 (test vectors, verbatim)
    local data = [[CiyLU1Aw2KjvrjMdj8YKliAjtP4gsMZMQmRzooG2xrDcvSnxIMXFufNstNGTyaGS9uT5geRa0W4oTOb1WT7fJlAC+oNPdbB+3hVbJSRgv+4lGOETKUQz6OYStslQ142d
      NCuabNPGBzlooOmB231qMM85d2/fV6ChevvXvQP8Hkue1poOFtnEtpyxVLW1zAo6/1Xx1COxFvrc2d7UL/lmHInNlxuacJXwu0fjpXfz/YqYzBIBzD6WUfTIF9GRHpOn
      /Hz7saL8xz+W//FRAUid1OksQaQx4CMs8LOddcQhULW4ucetDf96JcR3g0gfRK4PC7E/r7Z6xNrXd2UIeorGj5Ef7b1pJAYB6Y5anaHqZ9J6nKEBvB4DnNLIVWSgARns
      /8wR2SiRS7MNACwTyrGvt9ts8p12PKFdlqYTopNHR1Vf7XjfhQlVsAJdNiKdYmYVoKlaRv85IfVunYzO0IKXsyl7JCUjCpoG20f0a04COwfneQAGGwd5oa+T8yO5hzuyDb/XcxxmK01EpqOyuxINew==]]
    -- luacheck: pop
    data = data:gsub("%s+", "")
    assert.equal(536, #data)
    -- Strict decoding refuses the literal with its line breaks.
    assert.is_nil((crypto.base64_decode(data:sub(1, 128) .. "\n" .. data:sub(129))))
    local key = assert(crypto.base64_decode("tiihtNczf5v6AKRyjwEUhQ=="))
    local iv = assert(crypto.base64_decode("r7BXXKkLb8qrSNn05n0qiA=="))
    local json = assert(crypto.aes_cbc_decrypt(key, iv, assert(crypto.base64_decode(data)), 16))
    local t = require("cjson").decode(json)
    assert.equal("oGZUI0egBJY1zhBYw2KhdUfwVJJE", t.openId)
    assert.equal("ocMvos6NjeKLIBqg5Mr9QjxrP1FA", t.unionId)
    assert.equal(1477314187, t.watermark.timestamp)
    assert.equal("wx4f4bc4dec97d474b", t.watermark.appid)
    -- The pad was 7 bytes: re-encrypting gives the same bytes back.
    assert.equal(data, crypto.base64_encode(crypto.aes_cbc_encrypt(key, iv, json, 16)))
  end)

  it("WeChat Pay v2 sign: MD5 and HMAC-SHA256, upper-case hex", function()
    local key = "192006250b4c09247ec02edce69f6a2d"
    local s = "appid=wxd930ea5d5a258f4f&body=test&device_info=1000&mch_id=10000100&nonce_str=ibuaiVcKdpRxkhJA"
      .. "&key=" .. key
    assert.equal("9A0A8659F005D6984697E2CA0A9CF3B7", crypto.md5_hex(s):upper())
    assert.equal("9A0A8659F005D6984697E2CA0A9CF3B7", crypto.hex_encode(crypto.md5(s), true))
    assert.equal("6A9AE1657590FD6257D693A078E1C3E4BB6BA4DC30B23E0EE2496E54170DACD6",
      crypto.hmac_sha256_hex(key, s):upper())
  end)

  it("WeChat Pay v3 AES-GCM (wechatpay-go utils/aes_test.go, AES-128-GCM)", function()
    local ct = crypto.base64_decode("FsdXzxryWfKwvLJKf8LG/ToRPTRh8RN9wROC")
    local aad = "Dl56FrqWQJF1t9LtC3vEUsniZKvbqdR8"
    assert.equal("Hello World", crypto.aes_gcm_decrypt("testAPIv3Key0000", "wCq51qZv4Yfg", ct, aad))
    assert.equal(ct, crypto.aes_gcm_encrypt("testAPIv3Key0000", "wCq51qZv4Yfg", "Hello World", aad))
  end)
end)
