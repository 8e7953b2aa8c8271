-- wxd.crypto's ciphers against an independent implementation: the openssl
-- command line (AES-CBC, AES-ECB), and Node's crypto module for AES-GCM
-- (`openssl enc` refuses AEAD ciphers). Inputs are random, with every length
-- 0..4096 checked in-process and every AES block-boundary length (16k-1,
-- 16k, 16k+1) checked against the CLI for AES-256-CBC, WeChat's cipher.
--
-- To stay fast, all inputs are written into one temp dir and each cipher's
-- CLI calls run as one shell script; a failure prints the key and IV.
local crypto = require "wxd.crypto"
local H = require "helpers"

local hex = crypto.hex_encode
local dir

local function path(name) return dir .. "/" .. name end
local function read(name) return (assert(H.read_file(path(name)), "missing " .. name)) end
local function sh(script)
  local out, code = H.sh("cd " .. dir .. " && sh " .. script)
  assert(code == 0, out)
  return out
end

-- 16k-1, 16k, 16k+1 within 0..4096, for a given block size.
local function boundaries(block)
  local seen, out = {}, {}
  for k = 0, 4096 / block do
    for _, n in ipairs({ block * k - 1, block * k, block * k + 1 }) do
      if n >= 0 and n <= 4096 and not seen[n] then
        seen[n] = true
        out[#out + 1] = n
      end
    end
  end
  return out
end

-- A sample for the variants that do not need every boundary.
local function sample()
  local out = { 0, 1, 15, 16, 17, 31, 32, 33, 47, 48, 49, 255, 256, 257, 1023, 1024, 1025, 4079, 4080, 4081,
                4095, 4096 }
  for _ = 1, 10 do out[#out + 1] = math.random(0, 4096) end
  return out
end

-- PKCS#7 written here in Lua, independently of core/crypto.c.
local function pkcs7(s, block)
  local p = block - #s % block
  return s .. string.rep(string.char(p), p)
end

-- Random plaintexts p<n> for every length, shared by all ciphers.
local plain = {}

setup(function()
  math.randomseed(os.time())
  dir = H.tmpdir()
  for n = 0, 4096 do
    plain[n] = crypto.random_bytes(n)
  end
end)

teardown(function() if dir then os.execute("rm -rf " .. dir) end end)

describe("in-process round trips, every length 0..4096", function()
  local configs = {
    { "AES-128-CBC/16", 16, 16 }, { "AES-192-CBC/16", 24, 16 }, { "AES-256-CBC/16", 32, 16 },
    { "AES-256-CBC/32 (WeChat)", 32, 32 }, { "AES-128-CBC/32", 16, 32 },
  }
  for _, c in ipairs(configs) do
    it(c[1], function()
      local key, iv, block = crypto.random_bytes(c[2]), crypto.random_bytes(16), c[3]
      for n = 0, 4096 do
        local ct = crypto.aes_cbc_encrypt(key, iv, plain[n], block)
        assert(#ct == n + block - n % block, "length " .. n)
        local pt = crypto.aes_cbc_decrypt(key, iv, ct, block)
        if pt ~= plain[n] then error("round trip failed at length " .. n) end
      end
    end)
  end

  it("AES-ECB (128, 256)", function()
    for _, klen in ipairs({ 16, 32 }) do
      local key = crypto.random_bytes(klen)
      for n = 0, 4096 do
        local ct = crypto.aes_ecb_encrypt(key, plain[n])
        assert(#ct == n + 16 - n % 16, "length " .. n)
        if crypto.aes_ecb_decrypt(key, ct) ~= plain[n] then error("round trip failed at length " .. n) end
      end
    end
  end)

  it("AES-GCM (128, 192, 256), with and without AAD", function()
    for _, klen in ipairs({ 16, 24, 32 }) do
      local key, nonce = crypto.random_bytes(klen), crypto.random_bytes(12)
      for n = 0, 4096 do
        local aad = n % 3 == 0 and "" or plain[n % 97]
        local ct = crypto.aes_gcm_encrypt(key, nonce, plain[n], aad)
        assert(#ct == n + 16, "length " .. n)
        if crypto.aes_gcm_decrypt(key, nonce, ct, aad) ~= plain[n] then
          error("round trip failed at length " .. n)
        end
      end
    end
  end)
end)

describe("AES-CBC against `openssl enc`", function()
  -- Encrypts every listed length with the CLI and compares bytes with ours;
  -- ours decrypts the CLI's output; the CLI decrypts ours for every
  -- `every`-th length. `block` 32 uses -nopad over our Lua PKCS#7.
  local function check(cipher, klen, block, lengths, every)
    local key, iv = crypto.random_bytes(klen), crypto.random_bytes(16)
    local tag = cipher .. block
    local nopad = block ~= 16 and " -nopad" or ""
    local lines = { "set -e" }
    for i, n in ipairs(lengths) do
      local input = block ~= 16 and pkcs7(plain[n], block) or plain[n]
      H.write_file(path(tag .. "p" .. n), input)
      lines[#lines + 1] = string.format("openssl enc -%s -K %s -iv %s%s -in %sp%d -out %sc%d", cipher, hex(key),
        hex(iv), nopad, tag, n, tag, n)
      if (i - 1) % every == 0 then
        H.write_file(path(tag .. "o" .. n), crypto.aes_cbc_encrypt(key, iv, plain[n], block))
        lines[#lines + 1] = string.format("openssl enc -d -%s -K %s -iv %s%s -in %so%d -out %sd%d", cipher,
          hex(key), hex(iv), nopad, tag, n, tag, n)
      end
    end
    H.write_file(path(tag .. ".sh"), table.concat(lines, "\n") .. "\n")
    sh(tag .. ".sh")
    local ctx = " (" .. cipher .. ", pad " .. block .. ", key " .. hex(key) .. ", iv " .. hex(iv) .. ")"
    for i, n in ipairs(lengths) do
      local theirs = read(tag .. "c" .. n)
      local ours = crypto.aes_cbc_encrypt(key, iv, plain[n], block)
      if theirs ~= ours then error("ciphertexts differ at length " .. n .. ctx) end
      if crypto.aes_cbc_decrypt(key, iv, theirs, block) ~= plain[n] then
        error("cannot decrypt the CLI's ciphertext at length " .. n .. ctx)
      end
      if (i - 1) % every == 0 then
        local back = read(tag .. "d" .. n)
        if block ~= 16 then
          local p = back:byte(#back)
          back = back:sub(1, #back - p)
        end
        if back ~= plain[n] then error("the CLI cannot decrypt ours at length " .. n .. ctx) end
      end
    end
    return #lengths
  end

  it("AES-256-CBC: every block-boundary length 0..4096", function()
    assert.equal(769, check("aes-256-cbc", 32, 16, boundaries(16), 8))
  end)

  it("AES-256-CBC with WeChat's 32-byte pad block: every 32-byte boundary", function()
    check("aes-256-cbc", 32, 32, boundaries(32), 8)
  end)

  it("AES-128-CBC and AES-192-CBC: a sample of lengths", function()
    check("aes-128-cbc", 16, 16, sample(), 1)
    check("aes-192-cbc", 24, 16, sample(), 1)
  end)
end)

describe("AES-ECB against `openssl enc`", function()
  it("AES-128-ECB and AES-256-ECB: a sample of lengths", function()
    for _, c in ipairs({ { "aes-128-ecb", 16 }, { "aes-256-ecb", 32 } }) do
      local key = crypto.random_bytes(c[2])
      local lines = { "set -e" }
      local lengths = sample()
      for _, n in ipairs(lengths) do
        H.write_file(path(c[1] .. "p" .. n), plain[n])
        H.write_file(path(c[1] .. "o" .. n), crypto.aes_ecb_encrypt(key, plain[n]))
        lines[#lines + 1] = string.format("openssl enc -%s -K %s -in %sp%d -out %sc%d", c[1], hex(key), c[1], n,
          c[1], n)
        lines[#lines + 1] = string.format("openssl enc -d -%s -K %s -in %so%d -out %sd%d", c[1], hex(key), c[1],
          n, c[1], n)
      end
      H.write_file(path(c[1] .. ".sh"), table.concat(lines, "\n") .. "\n")
      sh(c[1] .. ".sh")
      for _, n in ipairs(lengths) do
        assert.equal(hex(read(c[1] .. "c" .. n)), hex(crypto.aes_ecb_encrypt(key, plain[n])), c[1] .. " " .. n)
        assert.equal(plain[n], crypto.aes_ecb_decrypt(key, read(c[1] .. "c" .. n)))
        assert.equal(plain[n], read(c[1] .. "d" .. n))
      end
    end
  end)
end)

describe("AES-GCM against Node's crypto module", function()
  local has_node = H.sh("command -v node"):find("node") ~= nil

  local JS = [[
const crypto = require('crypto'), fs = require('fs');
const [dir, keyhex, noncehex, aadhex, ...lens] = process.argv.slice(2);
const alg = 'aes-' + (keyhex.length * 4) + '-gcm';
const key = Buffer.from(keyhex, 'hex'), iv = Buffer.from(noncehex, 'hex'), aad = Buffer.from(aadhex, 'hex');
for (const n of lens) {
  const c = crypto.createCipheriv(alg, key, iv);
  c.setAAD(aad);
  const p = fs.readFileSync(dir + '/gp' + n);
  fs.writeFileSync(dir + '/gc' + n, Buffer.concat([c.update(p), c.final(), c.getAuthTag()]));
  const o = fs.readFileSync(dir + '/go' + n);
  const d = crypto.createDecipheriv(alg, key, iv);
  d.setAAD(aad);
  d.setAuthTag(o.subarray(o.length - 16));
  fs.writeFileSync(dir + '/gd' + n, Buffer.concat([d.update(o.subarray(0, o.length - 16)), d.final()]));
}
]]

  for _, klen in ipairs({ 16, 32 }) do
    it("AES-" .. klen * 8 .. "-GCM: every block-boundary length 0..4096, both ways", function()
      if not has_node then
        pending("node is not installed: GCM is checked against the spec's test cases only")
        return
      end
      local key, nonce, aad = crypto.random_bytes(klen), crypto.random_bytes(12), crypto.random_bytes(20)
      local lengths = boundaries(16)
      for _, n in ipairs(lengths) do
        H.write_file(path("gp" .. n), plain[n])
        H.write_file(path("go" .. n), crypto.aes_gcm_encrypt(key, nonce, plain[n], aad))
      end
      H.write_file(path("gcm.js"), JS)
      local out, code = H.sh(string.format("node %s %s %s %s %s %s", path("gcm.js"), dir, hex(key), hex(nonce),
        hex(aad), table.concat(lengths, " ")))
      assert(code == 0, out)
      for _, n in ipairs(lengths) do
        local theirs = read("gc" .. n)
        if theirs ~= crypto.aes_gcm_encrypt(key, nonce, plain[n], aad) then
          error("ciphertexts differ at length " .. n .. " (key " .. hex(key) .. ")")
        end
        if crypto.aes_gcm_decrypt(key, nonce, theirs, aad) ~= plain[n] then
          error("cannot decrypt Node's ciphertext at length " .. n)
        end
        if read("gd" .. n) ~= plain[n] then error("Node cannot decrypt ours at length " .. n) end
      end
    end)
  end
end)
