--- wxd.json: JSON that keeps arrays arrays.
--
-- Every JSON the framework writes or reads goes through here: the tables
-- handlers return, `res:json`, `req:json`, log fields, the WeChat clients.
-- A Lua table cannot tell an empty list from an empty object, so an empty
-- table encodes as `{}` unless it is marked with `json.array`; decoded
-- arrays carry the mark, so `[]` decodes and encodes back as `[]`.
-- Strings come out as valid UTF-8 whatever they hold (each invalid piece
-- becomes U+FFFD). The full contract is docs/json.md.
--
-- @module wxd.json
-- @usage
-- local json = require "wxd.json"
-- local list = json.array()                 -- encodes as [] while empty
-- list[#list + 1] = { id = "1" }
-- local s = json.encode({ orders = list })  --> {"orders":[{"id":"1"}]}
-- local v, err, detail = json.decode(body)  -- nil, "invalid json", "expected ',' or '}': ..."

local core = require "wxd.core.json"

local type, error, getmetatable, setmetatable = type, error, getmetatable, setmetatable

local ARRAY = core.array_mt

local _M = {}

--- The value of JSON null (equal to `cjson.null` and to wxd.redis's null).
_M.null = core.null

--- Encode a value as JSON text.
-- Tables marked with `json.array` are arrays; other tables are arrays when
-- all keys are positive integers (holes become null), objects when all keys
-- are strings, `{}` when empty. What has no JSON form raises (it is a bug in
-- the caller): functions, NaN and infinities, excessively sparse arrays,
-- tables mixing indexes and string keys, nesting over 256 levels. The error
-- names the place: `wxd.json: cannot encode a function at $.items[2].cb`.
-- @param v a table, string, number, boolean, nil or `json.null`
-- @treturn string JSON text
_M.encode = core.encode

--- Decode JSON text (RFC 8259; a top-level scalar is allowed).
-- Arrays come back marked as arrays, objects as plain tables, null as
-- `json.null`. Bad input is an expected failure.
-- @tparam string s JSON text
-- @return the value
-- @treturn[2] nil
-- @treturn[2] string `"invalid json"`
-- @treturn[2] string what and where, e.g. `"expected ':': unexpected '}' at byte 7"`
_M.decode = core.decode

--- Mark a table as a JSON array, so that it encodes as `[]` while empty.
-- @tparam[opt] table t the table (a new empty one when nil); it must have
--   no metatable of its own
-- @treturn table t
-- @usage return json.array(orders.list())
function _M.array(t)
  if t == nil then return setmetatable({}, ARRAY) end
  if type(t) ~= "table" then error("wxd.json.array: expected a table, got a " .. type(t), 2) end
  local mt = getmetatable(t)
  if mt ~= ARRAY then
    if mt ~= nil then error("wxd.json.array: the table already has a metatable", 2) end
    setmetatable(t, ARRAY)
  end
  return t
end

--- Whether a table is marked as a JSON array (by `json.array` or `decode`).
-- @param t any value
-- @treturn boolean
function _M.is_array(t)
  return type(t) == "table" and getmetatable(t) == ARRAY
end

return _M
