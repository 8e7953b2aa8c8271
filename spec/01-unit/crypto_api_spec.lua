-- wxd.crypto: the parts without published vectors (randomness, constant-time
-- comparison, module wiring).
local crypto = require "wxd.crypto"

describe("wxd.crypto module", function()
  it("is reachable as require('wxd').crypto", function()
    assert.equal(crypto, require("wxd").crypto)
  end)

  it("keeps one URL percent-encoding implementation (wxd.app's)", function()
    local app = require "wxd.app"
    assert.equal(app.url_encode, crypto.url_encode)
    assert.equal(app.url_decode, crypto.url_decode)
    assert.equal("a%20b%2Fc~_.-%E5%BE%AE", crypto.url_encode("a b/c~_.-微"))
    assert.equal("a b/c~_.-微", crypto.url_decode("a%20b%2Fc~_.-%E5%BE%AE"))
  end)
end)

describe("equals", function()
  it("compares whole strings, NUL bytes included", function()
    assert.is_true(crypto.equals("", ""))
    assert.is_true(crypto.equals("abc", "abc"))
    assert.is_false(crypto.equals("abc", "abd"))
    assert.is_false(crypto.equals("abc", "ab"))
    assert.is_false(crypto.equals("ab", "abc"))
    assert.is_false(crypto.equals("a\0b", "a\0c"))
    assert.is_true(crypto.equals("a\0b", "a\0b"))
    assert.is_false(crypto.equals("", "a"))
  end)
end)

describe("random_bytes", function()
  it("returns n bytes, different each time", function()
    for _, n in ipairs({ 0, 1, 16, 4097, 65536 }) do
      assert.equal(n, #crypto.random_bytes(n))
    end
    assert.are_not.equal(crypto.random_bytes(16), crypto.random_bytes(16))
  end)

  it("looks uniform (every byte value shows up in 64 KiB)", function()
    local s, seen, count = crypto.random_bytes(65536), {}, 0
    for i = 1, #s do
      local b = s:byte(i)
      if not seen[b] then seen[b] = true count = count + 1 end
    end
    assert.equal(256, count)
  end)

  it("never repeats small draws, across the refills of the per-thread block", function()
    -- Requests up to 256 bytes come from a 4 KiB block of DRBG output:
    -- 20,000 draws of every small size cross many refills, and no two
    -- draws (nor two 16-byte prefixes) may be equal, and every byte value
    -- shows up in the small draws too.
    local seen, values, nvalues = {}, {}, 0
    for i = 1, 20000 do
      local n = 16 + i % 241
      local s = crypto.random_bytes(n)
      assert.equal(n, #s)
      local head = s:sub(1, 16)
      assert.is_nil(seen[head], "a repeated draw after " .. i)
      seen[head] = true
      for j = 1, #s, 7 do
        local b = s:byte(j)
        if not values[b] then values[b] = true nvalues = nvalues + 1 end
      end
    end
    assert.equal(256, nvalues)
  end)
end)

describe("nonce", function()
  it("has the asked length over [A-Za-z0-9], 32 by default", function()
    assert.equal(32, #crypto.nonce())
    for _, n in ipairs({ 1, 16, 32, 4096 }) do
      local s = crypto.nonce(n)
      assert.equal(n, #s)
      assert.truthy(s:match("^[A-Za-z0-9]+$"), s)
    end
  end)

  it("uses all 62 characters about evenly", function()
    local counts, total = {}, 0
    for _ = 1, 40 do
      for ch in crypto.nonce(4096):gmatch(".") do
        counts[ch] = (counts[ch] or 0) + 1
        total = total + 1
      end
    end
    local n = 0
    for _, c in pairs(counts) do
      n = n + 1
      -- Expected 2642 each; a modulo bias (256 % 62 = 8) would put the
      -- first 8 characters 25% above the rest.
      assert.is_true(c > 2642 * 0.85 and c < 2642 * 1.15, "count " .. c)
    end
    assert.equal(62, n)
    assert.equal(40 * 4096, total)
  end)
end)

describe("AES output lengths", function()
  it("CBC pads to the pad block; GCM adds a 16-byte tag", function()
    local key, iv = string.rep("k", 32), string.rep("i", 16)
    assert.equal(16, #crypto.aes_cbc_encrypt(key, iv, ""))
    assert.equal(32, #crypto.aes_cbc_encrypt(key, iv, string.rep("x", 16)))
    assert.equal(32, #crypto.aes_cbc_encrypt(key, iv, "", 32))
    assert.equal(64, #crypto.aes_cbc_encrypt(key, iv, string.rep("x", 32), 32))
    assert.equal(240, #crypto.aes_cbc_encrypt(key, iv, "", 240))
    assert.equal(16, #crypto.aes_gcm_encrypt(key, "123456789012", ""))
    -- Large inputs go through the heap path.
    local big = crypto.random_bytes(1024 * 1024) .. "abc"
    assert.equal(big, crypto.aes_cbc_decrypt(key, iv, crypto.aes_cbc_encrypt(key, iv, big, 32), 32))
    assert.equal(big, crypto.aes_gcm_decrypt(key, "n", crypto.aes_gcm_encrypt(key, "n", big, "a"), "a"))
    assert.equal(big, crypto.base64_decode(crypto.base64_encode(big)))
    assert.equal(big, crypto.hex_decode(crypto.hex_encode(big)))
  end)
end)
