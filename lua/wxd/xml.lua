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

local type, error = type, error

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

--- Encodes a table as an XML document (no declaration, no whitespace).
-- Strings become CDATA sections (a "]]>" inside is split between two),
-- numbers and booleans text, tables nested elements, arrays repeated
-- elements. Field order: the names in `tbl._order` first, in that order,
-- then the other keys sorted. Invalid names, control characters, cycles
-- and other types raise: they are bugs in the caller. A table may have at
-- most 65 levels.
-- @tparam table tbl the fields
-- @tparam[opt="xml"] string root the root element's name
-- @treturn string
-- @usage xml.encode({ Content = "hi", _order = { "Content" } }) --> <xml><Content><![CDATA[hi]]></Content></xml>
_M.encode = core.encode -- one native call (core/xml.c): no string patterns per element

return _M
