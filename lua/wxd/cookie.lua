--- wxd.cookie: reading the Cookie header and writing Set-Cookie values.
--
-- Reading is lenient, as RFC 6265 section 5.4 asks of user agents and as
-- browsers send in practice: pairs split on ';', whitespace around names
-- and values dropped, one pair of double quotes around a value removed,
-- pairs without '=' or with an empty name skipped, the first of two
-- cookies with one name kept (the browser sends the most specific first).
-- Values are given as sent, not percent-decoded. At most MAX_COOKIES pairs
-- are read (the header itself is bounded by the core's header limit).
--
-- Writing is strict: a name must be a token, a value cookie-octets
-- (RFC 6265 section 4.1.1: no space, '"', ',', ';', '\' nor control
-- characters; percent-encode anything else), attributes may not carry ';'
-- or control characters. Anything else is a bug in the app and raises.
-- Defaults are the safe ones: Path=/, HttpOnly, SameSite=Lax, and Secure
-- when the request came over TLS.
--
-- @module wxd.cookie
-- @usage
-- local cookie = require "wxd.cookie"
-- cookie.parse("a=1; b=\"x\"")                       --> { a = "1", b = "x" }
-- cookie.serialize("sid", "abc", { max_age = 3600 }) --> "sid=abc; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax"

local type, tostring, error, pairs = type, tostring, error, pairs
local str_find, str_sub, str_byte, str_format, str_lower =
  string.find, string.sub, string.byte, string.format, string.lower
local tbl_concat = table.concat
local os_date = os.date
local floor = math.floor

local _M = {}

_M.MAX_COOKIES = 200

local function trim(s, i, j)
  while i <= j do
    local c = str_byte(s, i)
    if c ~= 32 and c ~= 9 then break end
    i = i + 1
  end
  while j >= i do
    local c = str_byte(s, j)
    if c ~= 32 and c ~= 9 then break end
    j = j - 1
  end
  return i, j
end

--- Parse a Cookie header.
-- @tparam ?string header the Cookie header's value (nil gives {})
-- @tparam[opt] number max at most this many pairs (default MAX_COOKIES)
-- @treturn table name → value
function _M.parse(header, max)
  local out = {}
  if type(header) ~= "string" or header == "" then
    return out
  end
  max = max or _M.MAX_COOKIES
  local n, pos, len = 0, 1, #header
  while pos <= len and n < max do
    local semi = str_find(header, ";", pos, true)
    local stop = (semi or len + 1) - 1
    local eq = str_find(header, "=", pos, true)
    if eq and eq <= stop then
      n = n + 1
      local ni, nj = trim(header, pos, eq - 1)
      if nj >= ni then
        local name = str_sub(header, ni, nj)
        if out[name] == nil then
          local vi, vj = trim(header, eq + 1, stop)
          if vj > vi and str_byte(header, vi) == 34 and str_byte(header, vj) == 34 then
            vi, vj = vi + 1, vj - 1
          end
          out[name] = str_sub(header, vi, vj)
        end
      end
    end
    if not semi then break end
    pos = semi + 1
  end
  return out
end

-- Not a cookie-octet (RFC 6265: %x21 / %x23-2B / %x2D-3A / %x3C-5B /
-- %x5D-7E): controls, space, '"', ',', ';', '\' and non-ASCII bytes.
local BAD_VALUE = '[%c "%,;\\\128-\255]'
local TOKEN = "^[%w!#$%%&'*+%-.^_`|~]+$"

local function repr(v)
  if type(v) ~= "string" then return tostring(v) end
  return (str_format("%q", v):gsub("\\\n", "\\n"))
end

local function fail(msg, level)
  error("wxd.cookie: " .. msg, level + 1)
end

-- An attribute value (Path, Domain): printable, no ';'.
local function check_attr(what, v, level)
  if type(v) ~= "string" or v == "" or str_find(v, "[%c;]") then
    fail(what .. " must be a non-empty string without ';' or control characters, got " .. repr(v), level + 1)
  end
end

local SAME_SITE = { lax = "Lax", strict = "Strict", none = "None" }

--- An HTTP-date (IMF-fixdate) for a time in seconds since the epoch.
function _M.http_date(t)
  return os_date("!%a, %d %b %Y %H:%M:%S GMT", floor(t))
end

--- Build a Set-Cookie value.
-- @tparam string name a token
-- @tparam string value cookie-octets ("" allowed)
-- @tparam[opt] table opts path (default "/"), domain, max_age (seconds),
--   expires (seconds since the epoch, or an HTTP-date string), secure
--   (default: `secure_default`), http_only (default true), same_site
--   ("Lax" (default), "Strict", "None" (needs Secure) or false for none),
--   partitioned (needs Secure)
-- @tparam[opt] boolean secure_default Secure when opts.secure is nil
-- @treturn string the header value
function _M.serialize(name, value, opts, secure_default, level)
  level = (level or 1) + 1
  if type(name) ~= "string" or not str_find(name, TOKEN) then
    fail("invalid cookie name " .. repr(name) .. " (a token: letters, digits and !#$%&'*+-.^_`|~)", level)
  end
  if type(value) == "number" then
    value = tostring(value)
  end
  if type(value) ~= "string" then
    fail("cookie " .. name .. ": value must be a string, got a " .. type(value), level)
  end
  if str_find(value, BAD_VALUE) then
    fail("cookie " .. name .. ": value " .. repr(value)
      .. " has characters a cookie cannot carry (space, '\"', ',', ';', '\\', controls); percent-encode it", level)
  end
  if opts ~= nil and type(opts) ~= "table" then
    fail("cookie " .. name .. ": options must be a table, got a " .. type(opts), level)
  end
  opts = opts or {}
  for k in pairs(opts) do
    if not (k == "path" or k == "domain" or k == "max_age" or k == "expires" or k == "secure"
        or k == "http_only" or k == "same_site" or k == "partitioned") then
      fail("cookie " .. name .. ": unknown option " .. repr(k), level)
    end
  end
  local parts = { name .. "=" .. value }
  local path = opts.path
  if path == nil then path = "/" end
  if path ~= false then
    check_attr("cookie " .. name .. ": path", path, level)
    parts[#parts + 1] = "Path=" .. path
  end
  if opts.domain ~= nil then
    check_attr("cookie " .. name .. ": domain", opts.domain, level)
    parts[#parts + 1] = "Domain=" .. opts.domain
  end
  local max_age = opts.max_age
  if max_age ~= nil then
    if type(max_age) ~= "number" or max_age % 1 ~= 0 then
      fail("cookie " .. name .. ": max_age must be an integer number of seconds, got " .. repr(max_age), level)
    end
    parts[#parts + 1] = "Max-Age=" .. str_format("%d", max_age)
  end
  local expires = opts.expires
  if expires ~= nil then
    if type(expires) == "number" then
      expires = _M.http_date(expires)
    else
      check_attr("cookie " .. name .. ": expires", expires, level)
    end
    parts[#parts + 1] = "Expires=" .. expires
  end
  local secure = opts.secure
  if secure == nil then secure = secure_default and true or false end
  local same_site = opts.same_site
  if same_site == nil then same_site = "Lax" end
  if same_site ~= false then
    local ss = type(same_site) == "string" and SAME_SITE[str_lower(same_site)]
    if not ss then
      fail("cookie " .. name .. ": same_site must be \"Lax\", \"Strict\", \"None\" or false, got " .. repr(same_site),
        level)
    end
    -- Browsers drop SameSite=None cookies that are not Secure.
    if ss == "None" and not secure then
      fail("cookie " .. name .. ": same_site \"None\" needs secure = true", level)
    end
    same_site = ss
  end
  if opts.partitioned and not secure then
    fail("cookie " .. name .. ": partitioned needs secure = true", level)
  end
  if secure then parts[#parts + 1] = "Secure" end
  if opts.http_only ~= false then parts[#parts + 1] = "HttpOnly" end
  if same_site then parts[#parts + 1] = "SameSite=" .. same_site end
  if opts.partitioned then parts[#parts + 1] = "Partitioned" end
  return tbl_concat(parts, "; ")
end

return _M
