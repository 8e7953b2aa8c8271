--- wxd.xml: XML ⇄ Lua tables, for WeChat messages and WeChat Pay v2.
--
-- Decoding runs expat in the core (core/xml.c) with every DOCTYPE refused
-- (hence every entity declaration: no XXE, no billion laughs), and with
-- limits on size, depth and element count. Only the five predefined
-- entities and numeric character references are understood.
--
-- The shape of a decoded message: the children of the root element become
-- fields; a leaf's text (plain text and CDATA, concatenated, nothing
-- trimmed) is a string; an element with children is a table; a name that
-- repeats among siblings becomes an array, and so does every name listed in
-- `opts.arrays` (so that `Articles.item` is an array even with one item).
-- Attributes, comments and processing instructions are dropped.
--
-- Expected failures return `nil, err, detail` where `err` is one of
-- "invalid xml", "doctype not allowed", "too large", "too deep",
-- "too many elements", "out of memory", and `detail` says where (line and
-- column) and what expat saw, never quoting the input.
--
-- @module wxd.xml
-- @usage
-- local xml = require "wxd.xml"
-- local msg, root = xml.decode(req.body, { arrays = { item = true } })
-- if not msg then return 400, "bad xml" end
-- local out = xml.encode({ ToUserName = msg.FromUserName, Content = "hi",
--                          _order = { "ToUserName", "Content" } })

local core = require "wxd.core.xml"

local type, error, pairs, tostring, next = type, error, pairs, tostring, next
local floor, huge = math.floor, math.huge
local find, format, gsub = string.find, string.format, string.gsub
local concat, sort = table.concat, table.sort

local _M = { _VERSION = "0.1.0" }

_M.MAX_BYTES = core.MAX_BYTES
_M.MAX_DEPTH = core.MAX_DEPTH
_M.MAX_ELEMENTS = core.MAX_ELEMENTS

local function limit(opts, name, default, max)
  local v = opts[name]
  if v == nil then return default end
  if type(v) ~= "number" or v ~= v or v < 1 or v > max or v % 1 ~= 0 then
    error("wxd.xml.decode: opts." .. name .. " must be an integer in 1.." .. max, 3)
  end
  return v
end

--- Decodes an XML document into a table.
-- @tparam string s the document
-- @tparam[opt] table opts `max_bytes` (default 1 MiB), `max_depth`
--   (default 32, the root is 1), `max_elements` (default 10000),
--   `arrays` (a set of element names always decoded as arrays, e.g.
--   `{ item = true }`)
-- @treturn[1] table the root's children as fields
-- @treturn[1] string the root element's name
-- @treturn[2] nil
-- @treturn[2] string "invalid xml", "doctype not allowed", "too large",
--   "too deep", "too many elements" or "out of memory"
-- @treturn[2] string detail (position and reason)
-- @usage local msg, err = xml.decode(body)
-- if not msg then log.warn("bad message", { err = err }) end
function _M.decode(s, opts)
  if type(s) ~= "string" then
    error("wxd.xml.decode: expected a string, got a " .. type(s), 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("wxd.xml.decode: opts must be a table, got a " .. type(opts), 2)
  end
  opts = opts or {}
  local arrays = opts.arrays
  if arrays ~= nil and type(arrays) ~= "table" then
    error("wxd.xml.decode: opts.arrays must be a set of names, got a " .. type(arrays), 2)
  end
  local t, root, detail = core.decode(s,
    limit(opts, "max_bytes", core.MAX_BYTES, 2147483647),
    limit(opts, "max_depth", core.MAX_DEPTH, 1000),
    limit(opts, "max_elements", core.MAX_ELEMENTS, 1e9),
    arrays)
  return t, root, detail
end

------------------------------------------------------------------------
-- Encoding
------------------------------------------------------------------------

local function check_name(name)
  if type(name) ~= "string" or not find(name, "^[%a_][%w_%.%-]*$") then
    error("wxd.xml.encode: invalid element name " .. tostring(name), 4)
  end
end

-- CDATA cannot contain "]]>": split it between two sections. Characters
-- XML 1.0 forbids (control characters but tab, CR, LF) are an error in the
-- caller's data; they are refused rather than sent to break the receiver.
local function cdata(s)
  if find(s, "[%z\1-\8\11\12\14-\31]") then
    error("wxd.xml.encode: a string contains a control character XML cannot carry", 5)
  end
  return "<![CDATA[" .. gsub(s, "%]%]>", "]]]]><![CDATA[>") .. "]]>"
end

local function number_text(n)
  if n ~= n or n == huge or n == -huge then
    error("wxd.xml.encode: cannot encode " .. tostring(n), 5)
  end
  if n == floor(n) and n > -2^53 and n < 2^53 then return format("%d", n) end
  return format("%.17g", n)
end

local function is_array(t)
  return t[1] ~= nil
end

local encode_fields

-- Appends <name>value</name> (or one element per item of an array).
local function encode_value(out, name, v, depth)
  local tv = type(v)
  if tv == "table" and is_array(v) then
    for i = 1, #v do
      if type(v[i]) == "table" and is_array(v[i]) then
        error("wxd.xml.encode: " .. name .. ": nested arrays have no XML form", 4)
      end
      encode_value(out, name, v[i], depth)
    end
    return
  end
  out[#out + 1] = "<" .. name .. ">"
  if tv == "string" then
    out[#out + 1] = cdata(v)
  elseif tv == "number" then
    out[#out + 1] = number_text(v)
  elseif tv == "boolean" then
    out[#out + 1] = v and "true" or "false"
  elseif tv == "table" then
    if depth > 64 then error("wxd.xml.encode: nested too deep (a cycle?)", 4) end
    encode_fields(out, v, depth + 1)
  else
    error("wxd.xml.encode: " .. name .. ": cannot encode a " .. tv, 4)
  end
  out[#out + 1] = "</" .. name .. ">"
end

-- Fields in _order first (in that order), then the others sorted.
encode_fields = function(out, t, depth)
  local order, seen = t._order, {}
  if order ~= nil then
    if type(order) ~= "table" then error("wxd.xml.encode: _order must be an array of names", 3) end
    for i = 1, #order do
      local name = order[i]
      if not seen[name] then
        seen[name] = true
        local v = t[name]
        if v ~= nil then
          check_name(name)
          encode_value(out, name, v, depth)
        end
      end
    end
  end
  local rest = {}
  for k in pairs(t) do
    if k ~= "_order" and not seen[k] then
      if type(k) ~= "string" then
        error("wxd.xml.encode: keys must be element names, got a " .. type(k)
              .. (type(k) == "number" and " (an array is only allowed as a field's value)" or ""), 3)
      end
      rest[#rest + 1] = k
    end
  end
  sort(rest)
  for i = 1, #rest do
    local name = rest[i]
    check_name(name)
    encode_value(out, name, t[name], depth)
  end
end

--- Encodes a table as an XML document (no declaration, no whitespace).
-- Strings become CDATA sections (a "]]>" inside is split between two),
-- numbers and booleans text, tables nested elements, arrays repeated
-- elements. Field order: the names in `tbl._order` first, in that order,
-- then the other keys sorted. Invalid names, control characters, cycles
-- and other types raise: they are bugs in the caller.
-- @tparam table tbl the fields
-- @tparam[opt="xml"] string root the root element's name
-- @treturn string
-- @usage xml.encode({ Content = "hi", _order = { "Content" } }) --> <xml><Content><![CDATA[hi]]></Content></xml>
function _M.encode(tbl, root)
  if type(tbl) ~= "table" then
    error("wxd.xml.encode: expected a table, got a " .. type(tbl), 2)
  end
  root = root or "xml"
  if type(root) ~= "string" or not find(root, "^[%a_][%w_%.%-]*$") then
    error("wxd.xml.encode: invalid root name " .. tostring(root), 2)
  end
  if next(tbl) ~= nil and is_array(tbl) then
    error("wxd.xml.encode: the root table must have named fields, not be an array", 2)
  end
  local out = { "<" .. root .. ">" }
  encode_fields(out, tbl, 1)
  out[#out + 1] = "</" .. root .. ">"
  return concat(out)
end

return _M
