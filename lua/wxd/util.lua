--- wxd.util: small pure functions that modules at every level share.
--
-- This is the bottom of the Lua library: it requires nothing, so any
-- module may use it without reaching up (spec/01-unit/layers_spec.lua keeps
-- every `require` pointing down).
-- @module wxd.util

local type, tonumber, tostring = type, tonumber, tostring
local byte, char, find, format, gsub, lower, match, sub =
  string.byte, string.char, string.find, string.format, string.gsub, string.lower, string.match, string.sub
local huge = math.huge

local _M = { _VERSION = "0.1.0" }

------------------------------------------------------------------------
-- URL encoding
------------------------------------------------------------------------

local function hex_to_char(h)
  return char(tonumber(h, 16))
end

--- Percent-decodes a string.
-- Invalid escapes (`%zz`, a lone `%`) are left as they are rather than
-- rejected: a lenient decoder never turns a client's typo into a 500.
-- @tparam string s encoded string
-- @tparam[opt] boolean plus_as_space decode `+` as a space (query strings
--   and form bodies; never path segments, where `+` is a literal plus)
-- @treturn string decoded string
-- @usage util.url_decode("a%20b") --> "a b"
function _M.url_decode(s, plus_as_space)
  if plus_as_space and find(s, "+", 1, true) then
    s = gsub(s, "%+", " ")
  end
  if find(s, "%", 1, true) then
    s = gsub(s, "%%(%x%x)", hex_to_char)
  end
  return s
end

local function char_to_hex(c)
  return format("%%%02X", byte(c))
end

--- Percent-encodes a string (RFC 3986: everything but unreserved characters).
-- @tparam string s raw string
-- @treturn string encoded string, safe in a path segment or a query value
function _M.url_encode(s)
  return (gsub(s, "[^%w%-%._~]", char_to_hex))
end

------------------------------------------------------------------------
-- Sizes
------------------------------------------------------------------------

local SIZE_UNITS = { [""] = 1, k = 1024, m = 1024 ^ 2, g = 1024 ^ 3 }

--- A size in bytes: an integer, or a string of digits with an optional
-- k, m or g suffix (powers of 1024, any case): "64k", "10m", "1g", "4096".
-- @param v the value to read
-- @treturn ?number bytes, or nil when `v` is not a size
-- @usage util.parse_size("10m") --> 10485760
function _M.parse_size(v)
  if type(v) == "number" then
    if v % 1 == 0 and v >= 0 and v < huge then return v end
    return nil
  end
  if type(v) ~= "string" then return nil end
  local digits, unit = match(v, "^(%d+)([kKmMgG]?)$")
  if not digits then return nil end
  return tonumber(digits) * SIZE_UNITS[lower(unit)]
end

------------------------------------------------------------------------
-- Names of secrets
------------------------------------------------------------------------

--- A key name as secrets and personal fields are matched: lower case,
-- without "-" and "_", so that sessionKey, session-key and session_key are
-- one name.
-- @tparam string name
-- @treturn string
function _M.key_name(name)
  return (gsub(lower(tostring(name)), "[%-_]", ""))
end
local key_name = _M.key_name

-- A name that contains one of these (normalised) holds a secret. Beyond
-- the generic words: WeChat's AppSecret, EncodingAESKey and session_key,
-- WeChat Pay's APIv3 key, v2 merchant key and private key.
local SECRET_PARTS = { "secret", "password", "passwd", "passphrase", "token", "aeskey", "apikey", "apiv3key",
  "mchkey", "privatekey", "signkey", "sessionkey" }

-- Names that refer to a secret rather than hold one: a key file's path or
-- a token endpoint's URL are not secrets (secrets come from the
-- environment or from files).
local REFERENCE_SUFFIXES = { "file", "path", "url", "uri" }

--- Whether a key name looks like it holds a secret (config.lua refuses a
-- literal string under such a name; logs hide its value). Case and "-"/"_"
-- do not matter; names ending in file, path, url or uri refer to a secret
-- and are not one.
-- @param k the name (anything but a string is not a secret's name)
-- @treturn boolean
-- @usage util.is_secret_key("encodingAESKey") --> true; util.is_secret_key("key_file") --> false
function _M.is_secret_key(k)
  if type(k) ~= "string" then return false end
  local n = key_name(k)
  for i = 1, #REFERENCE_SUFFIXES do
    local s = REFERENCE_SUFFIXES[i]
    if sub(n, -#s) == s then return false end
  end
  for i = 1, #SECRET_PARTS do
    if find(n, SECRET_PARTS[i], 1, true) then return true end
  end
  return false
end

return _M
