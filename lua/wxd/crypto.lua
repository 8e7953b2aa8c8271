--- wxd.crypto: digests, HMAC, encodings, randomness, AES and RSA.
--
-- A thin layer over the native module `wxd.core.crypto` (core/crypto.c,
-- core/rsa.c on OpenSSL 3): good names, defaults and argument checks.
-- docs/crypto.md is the full contract of every function.
--
-- Two kinds of failure:
--
-- * expected ones (a bad signature, a wrong GCM tag, bad padding, corrupted
--   base64, garbage PEM, a wrong passphrase) return `nil, err` with a short
--   stable `err`: "decrypt failed" (every AES and RSA decryption failure,
--   whatever the cause: no padding oracle), "bad signature",
--   "invalid base64", "invalid hex", "invalid key" (also an AES key that is
--   not 16, 24 or 32 bytes), "invalid certificate",
--   "invalid pkcs12", "bad passphrase", "invalid ca bundle",
--   "certificate verify failed", "message too long";
-- * programmer errors raise: an argument of the wrong type (numbers are not
--   taken for strings), a pad block out of range, an IV of the wrong size
--   when encrypting.
--
-- @module wxd.crypto
-- @usage
-- local crypto = require "wxd.crypto"
-- local key = crypto.base64_decode(encoding_aes_key .. "=", { ignore_tail_bits = true })
-- local xml, err = crypto.aes_cbc_decrypt(key, key:sub(1, 16), crypto.base64_decode(body), 32)
-- if not xml then return 400, { error = err } end

local core = require "wxd.core.crypto"
local util = require "wxd.util"

local type  = type
local error = error
-- The wrappers below call core.<name>(...) and not as a tail call, so that
-- an argument error names the function ("bad argument #1 to
-- 'aes_cbc_decrypt'") instead of '?'.

local _M = { _VERSION = "0.1.0" }

------------------------------------------------------------------------
-- Digests and MACs: raw bytes, or lower-case hex with the _hex variants.
------------------------------------------------------------------------

--- MD5 of `s` (16 raw bytes). Only for protocols that require it
-- (WeChat Pay v2 signatures); never for anything new.
_M.md5 = core.md5
_M.md5_hex = core.md5_hex
--- SHA-1 of `s` (20 raw bytes); `sha1_hex` gives 40 hex characters.
_M.sha1 = core.sha1
_M.sha1_hex = core.sha1_hex
--- SHA-256 of `s` (32 raw bytes); `sha256_hex` gives 64 hex characters.
_M.sha256 = core.sha256
_M.sha256_hex = core.sha256_hex
--- HMAC-SHA256(key, msg) (32 raw bytes); `hmac_sha256_hex` gives hex.
_M.hmac_sha256 = core.hmac_sha256
_M.hmac_sha256_hex = core.hmac_sha256_hex
--- HMAC-SHA1(key, msg) (20 raw bytes); `hmac_sha1_hex` gives hex.
_M.hmac_sha1 = core.hmac_sha1
_M.hmac_sha1_hex = core.hmac_sha1_hex

--- True when the two strings are equal, in time that depends only on
-- their lengths. Use it for every signature, MAC or token comparison.
-- @usage if not crypto.equals(crypto.sha1_hex(s), req.query.signature) then return 403 end
_M.equals = core.equals

------------------------------------------------------------------------
-- Encodings
------------------------------------------------------------------------

--- Standard base64 (RFC 4648 §4) with padding.
function _M.base64_encode(s)
  local out = core.base64_encode(s)
  return out
end

--- Strict standard base64 decoding: padding required, no whitespace, no
-- other alphabet, canonical last character (its unused low bits zero, so
-- "QR==" is refused where "QQ==" is "A").
-- @tparam string s
-- @tparam[opt] table opts `ignore_tail_bits = true` accepts any unused
--   bits in the last character: only for text that no encoder wrote, like
--   a WeChat EncodingAESKey .. "=" (43 random characters)
-- @treturn[1] string the bytes
-- @treturn[2] nil
-- @treturn[2] string "invalid base64"
-- @usage local key = crypto.base64_decode(encoding_aes_key .. "=", { ignore_tail_bits = true })
function _M.base64_decode(s, opts)
  if opts ~= nil and type(opts) ~= "table" then
    error("wxd.crypto.base64_decode: opts must be a table, got a " .. type(opts), 2)
  end
  local out, err = core.base64_decode(s, false, opts ~= nil and opts.ignore_tail_bits == true)
  return out, err
end

--- URL-safe base64 (RFC 4648 §5): `-` and `_`; without padding unless
-- `pad` is true.
function _M.base64url_encode(s, pad)
  local out = core.base64_encode(s, true, pad and true or false)
  return out
end

--- Strict URL-safe base64 decoding; padding optional (but correct if present).
function _M.base64url_decode(s)
  local out, err = core.base64_decode(s, true)
  return out, err
end

--- Hex: lower case unless `upper` is true.
function _M.hex_encode(s, upper)
  local out = core.hex_encode(s, upper and true or false)
  return out
end

--- Hex decoding, either case: nil, "invalid hex" on an odd length or a
-- non-hex character.
_M.hex_decode = core.hex_decode

--- Percent-encoding (RFC 3986: everything but A-Z a-z 0-9 - . _ ~), and
-- its lenient inverse. One implementation serves the whole library: these
-- are wxd.util's url_encode/url_decode.
_M.url_encode = util.url_encode
_M.url_decode = util.url_decode

------------------------------------------------------------------------
-- Randomness (the kernel's CSPRNG, getrandom(2))
------------------------------------------------------------------------

--- `n` random bytes, 0 <= n <= 1 MiB.
_M.random_bytes = core.random_bytes

--- A random string of `n` characters (default 32, at most 4096) over
-- [A-Za-z0-9], every character uniform: WeChat's nonce_str / noncestr.
function _M.nonce(n)
  local out = core.nonce(n == nil and 32 or n)
  return out
end

------------------------------------------------------------------------
-- AES. Keys are 16, 24 or 32 bytes (AES-128/192/256), else a raised error.
------------------------------------------------------------------------

local function pad_block(b)
  if b == nil then return 16 end
  if type(b) ~= "number" then
    error("pad_block must be a number (16 for PKCS#7, 32 for WeChat messages)", 3)
  end
  return b
end

--- AES-CBC encryption with PKCS#7 padding to `pad_block` bytes (default
-- 16; WeChat's message encryption uses 32; a multiple of 16 up to 240).
-- `iv` must be 16 bytes. nil, "invalid key" for a key that is not 16, 24
-- or 32 bytes.
function _M.aes_cbc_encrypt(key, iv, plaintext, block)
  local out, err = core.aes_cbc_encrypt(key, iv, plaintext, pad_block(block))
  return out, err
end

--- AES-CBC decryption and strict PKCS#7 unpadding (pad value 1..pad_block,
-- every pad byte checked; pad_block 1..255, default 16).
-- @treturn[1] string plaintext
-- @treturn[2] nil
-- @treturn[2] string "decrypt failed" (for every failure: wrong length,
--   IV of the wrong size, bad padding)
function _M.aes_cbc_decrypt(key, iv, ciphertext, block)
  local out, err = core.aes_cbc_decrypt(key, iv, ciphertext, pad_block(block))
  return out, err
end

--- AES-GCM encryption with a 16-byte tag. Returns ciphertext .. tag (the
-- layout of WeChat Pay's `ciphertext` fields, base64-decoded). `nonce` is
-- 1..128 bytes (12 is the norm); `aad` defaults to "".
_M.aes_gcm_encrypt = core.aes_gcm_encrypt

--- AES-GCM decryption of ciphertext .. tag with associated data `aad`.
-- A wrong tag, AAD, nonce or key gives nil, "decrypt failed" and no byte
-- of plaintext.
_M.aes_gcm_decrypt = core.aes_gcm_decrypt

--- AES-ECB with PKCS#7 (16). Only for WeChat Pay v2 refund notifications
-- (`req_info`), which use it; ECB leaks patterns of the plaintext.
_M.aes_ecb_encrypt = core.aes_ecb_encrypt
_M.aes_ecb_decrypt = core.aes_ecb_decrypt

------------------------------------------------------------------------
-- RSA keys, certificates, PKCS#12
------------------------------------------------------------------------

--- An RSA private key from PEM (PKCS#1 "RSA PRIVATE KEY", PKCS#8
-- "PRIVATE KEY", or encrypted PKCS#8 / PKCS#1 with `passphrase`).
-- Returns a key object or nil, "invalid key". Methods: `sign(msg)`
-- (SHA256withRSA, PKCS#1 v1.5), `verify(msg, sig)`, `encrypt(msg)` and
-- `decrypt(ct)` (RSA-OAEP, SHA-1/MGF1), `bits()`, `is_private()`,
-- `public_pem()`, `close()`.
_M.load_private_key = core.load_private_key

--- An RSA public key from PEM ("PUBLIC KEY" or PKCS#1 "RSA PUBLIC KEY").
_M.load_public_key = core.load_public_key

--- An ECDSA P-256 private key from PEM (SEC1 or PKCS#8, unencrypted), for
-- ES256: `sign(msg)` gives r||s (64 bytes, the JOSE form), `verify(msg,
-- sig)` gives true or nil, "bad signature". Another curve: nil, "invalid key".
_M.ec_load_private_key = core.ec_load_private_key

--- An ECDSA P-256 public key from PEM ("PUBLIC KEY"), for ES256.
_M.ec_load_public_key = core.ec_load_public_key

--- The first X.509 certificate of a PEM text, or nil, "invalid certificate".
-- Methods: `serial()` (upper-case hex), `subject()`, `issuer()` (RFC 2253),
-- `not_before()`, `not_after()` (seconds since the epoch), `fingerprint()`
-- (upper-case hex SHA-256), `public_key()`, `pem()`,
-- `verify(ca [, { intermediates =, time = }])`, `close()`.
_M.load_certificate = core.load_certificate

--- Every certificate of a PEM bundle, as an array.
_M.load_certificates = core.load_certificates

--- A PKCS#12 bundle (DER bytes, e.g. apiclient_cert.p12) and its
-- passphrase (WeChat Pay: the merchant id). Returns key, certificate and an
-- array of the other certificates, or nil, "bad passphrase" /
-- "invalid pkcs12".
function _M.load_pkcs12(der, passphrase)
  if type(passphrase) ~= "string" then
    error("load_pkcs12: passphrase must be a string (WeChat Pay: the merchant id)", 2)
  end
  local key, cert, cas = core.load_pkcs12(der, passphrase)
  if not key then return nil, cert end
  return key, cert, cas
end

return _M
