-- Crypto micro-benchmark: what one call of wxd.crypto costs, next to
-- `openssl speed` on the same machine. Run with `build/wxd script
-- spec/bench/crypto.lua` (or `make bench-crypto`, which `make bench` calls).
--
--   AES-256-CBC decrypt of a 1 KiB WeChat message: 32-byte key, IV = the
--   key's first 16 bytes, 32-byte PKCS#7 padding; 1000 bytes of plaintext
--   make exactly 1024 bytes of ciphertext. Peer: `openssl speed -evp
--   aes-256-cbc -decrypt -bytes 1024` (1024-byte blocks per second).
--   RSA-2048 verify: SHA256withRSA over a WeChat Pay v3 style message.
--   Peer: `openssl speed rsa2048`, verify/s.
--
-- A ratio near 1 means our binding adds nothing to OpenSSL's own cost. Note
-- what each side counts: `openssl speed` keys its cipher context once and
-- then only calls EVP_DecryptUpdate, while each of our calls is a whole
-- message decryption (key schedule, IV, update, final, padding check, a Lua
-- string out). For RSA both sides do a whole verification, but ours also
-- hashes the message.
--
-- Environment: BENCH_CRYPTO_SECONDS (per measurement, default 3).
local crypto = require "wxd.crypto"
local wxd = require "wxd"

local SECONDS = tonumber(os.getenv("BENCH_CRYPTO_SECONDS") or "3")

local function sh(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("*a")
  p:close()
  return out
end

-- Calls fn in batches until `SECONDS` have passed; returns calls per second.
local function rate(fn, batch)
  for _ = 1, batch do fn() end -- warm up (and let the JIT settle)
  local n, t0 = 0, wxd.monotonic_ms()
  local elapsed
  repeat
    for _ = 1, batch do fn() end
    n = n + batch
    elapsed = (wxd.monotonic_ms() - t0) / 1000
  until elapsed >= SECONDS
  return n / elapsed
end

-- openssl speed -mr: "+R:<count>:<alg>:<seconds>" (ciphers) and
-- "+R2:<count>:<bits>:<seconds>" (RSA verify).
local function openssl_rate(out, prefix)
  local count, secs = out:match("\n%" .. prefix .. ":(%d+):[^:]+:([%d%.]+)")
  if not count then return nil end
  return tonumber(count) / tonumber(secs)
end

local function fmt(x) return x and string.format("%12.0f", x) or "         n/a" end
local function ratio(a, b) return (a and b and b > 0) and string.format("%.2f", a / b) or "n/a" end

-- ---- AES-256-CBC, WeChat style

local key = crypto.random_bytes(32)
local iv = key:sub(1, 16)
local xml = "<xml><ToUserName><![CDATA[gh_1234567890ab]]></ToUserName>" .. string.rep("x", 2000)
local msg = crypto.random_bytes(16) .. "\0\0\3\206" .. xml:sub(1, 1000 - 16 - 4 - 18) .. "wx1234567890abcdef"
assert(#msg == 1000)
local ct = crypto.aes_cbc_encrypt(key, iv, msg, 32)
assert(#ct == 1024)
assert(crypto.aes_cbc_decrypt(key, iv, ct, 32) == msg)
local b64 = crypto.base64_encode(ct)

local decrypt = crypto.aes_cbc_decrypt
local ours_aes = rate(function() return decrypt(key, iv, ct, 32) end, 10000)
local b64dec = crypto.base64_decode
local ours_aes_b64 = rate(function() return decrypt(key, iv, b64dec(b64), 32) end, 10000)
local speed_aes_out = sh(string.format("openssl speed -mr -elapsed -seconds %d -evp aes-256-cbc -decrypt -bytes 1024",
  SECONDS))
local theirs_aes = openssl_rate(speed_aes_out, "+R")

-- ---- RSA-2048 verify

local tmp = sh("mktemp -d /tmp/wxd-bench-crypto.XXXXXX"):gsub("%s+$", "")
sh("openssl genrsa -out " .. tmp .. "/key.pem 2048")
local f = assert(io.open(tmp .. "/key.pem"))
local priv = assert(crypto.load_private_key(f:read("*a")))
f:close()
os.execute("rm -rf " .. tmp)
local pub = assert(crypto.load_public_key(priv:public_pem()))
local message = "POST\n/v3/pay/transactions/jsapi\n1554208460\n593BEC0C930BF1AFEB40B4A08C8FB242\n"
  .. '{"appid":"wxd678efh567hg6787","mchid":"1230000109","description":"Image形象店-深圳腾大-QQ公仔"}\n'
local sig = priv:sign(message)
assert(pub:verify(message, sig))
local ours_rsa = rate(function() return pub:verify(message, sig) end, 500)
local speed_rsa_out = sh(string.format("openssl speed -mr -elapsed -seconds %d rsa2048", SECONDS))
local theirs_rsa = openssl_rate(speed_rsa_out, "+R2")

-- ---- report

print(string.format("== wxd crypto benchmark: %s, %s, %d s per measurement",
  (sh("openssl version"):gsub("%s+$", "")), (sh("uname -m"):gsub("%s+$", "")), SECONDS))
print(string.format("  %-48s %12s %12s %7s", "operation", "wxd ops/s", "openssl/s", "ratio"))
print(string.format("  %-48s %s %s %7s", "AES-256-CBC decrypt, 1 KiB WeChat message", fmt(ours_aes), fmt(theirs_aes),
  ratio(ours_aes, theirs_aes)))
print(string.format("  %-48s %s %s %7s", "  same, from base64 (as it arrives)", fmt(ours_aes_b64), fmt(theirs_aes),
  ratio(ours_aes_b64, theirs_aes)))
print(string.format("  %-48s %s %s %7s", "RSA-2048 SHA256withRSA verify", fmt(ours_rsa), fmt(theirs_rsa),
  ratio(ours_rsa, theirs_rsa)))
if not theirs_aes or not theirs_rsa then
  io.stderr:write("bench-crypto: could not parse `openssl speed` output:\n", speed_aes_out, speed_rsa_out, "\n")
  return 1
end
return 0
