--- wxd.shdict: dictionaries shared by every worker thread of the process.
--
-- A dictionary is declared in `config.lua` with a memory cap:
--
--     shdict = { cache = "10m", counters = "64k" }
--
-- and maps string keys (1..65535 bytes) to strings, numbers or booleans,
-- each with an optional TTL in seconds. Values are copied in and out (a
-- table raises: encode it, e.g. with wxd.json). When a write does not fit,
-- expired entries are reclaimed first, then the least recently used entries
-- are evicted. The data lives in the core, not in a Lua state: it survives
-- hot reloads, and a restart empties it.
--
-- Expected failures return `nil, err` with a short stable string ("exists",
-- "not found", "not a number", "no memory"); wrong argument types raise.
--
-- Outside a server (`wxd script`, `wxd check`, your specs) there is no
-- shared config: `declare(name, size)` creates a dictionary for this Lua
-- state, and `get_dict` also creates one named in `wxd.config.shdict` when
-- `wxd.config` is set.
--
-- Methods of a dictionary `d` (all atomic; each takes the dictionary's mutex):
--
-- * `d:get(key)` → value, or nil when absent or expired
-- * `d:set(key, value [, ttl])` → true, or nil, "no memory" (larger than the
--   whole cap); `d:set(key, nil)` deletes
-- * `d:add(key, value [, ttl])` → true, or nil, "exists"
-- * `d:replace(key, value [, ttl])` → true, or nil, "not found"
-- * `d:incr(key [, by = 1 [, init [, init_ttl]]])` → the new value, or
--   nil, "not found" (absent and no init), or nil, "not a number"
-- * `d:delete(key)` → true
-- * `d:ttl(key)` → seconds left (0: no TTL), or nil, "not found"
-- * `d:wait_change(key, old, timeout)` → the key's value once it is no
--   longer `old` (nil: absent), nil when it was removed, or nil, "timeout".
--   Returns at once when the value already differs; otherwise the calling
--   coroutine waits (the worker does not), woken natively the moment any
--   worker writes, deletes or evicts the key, or it expires: no polling.
--   A write of the same value waits on. Needs a wxd coroutine to wait.
-- * `d:keys([max = 1024])` → live keys, most recently used first (0: all)
-- * `d:flush_all()` → removes everything
-- * `d:stats()` → `{ name, capacity, used, count, evictions, expired }`
--
-- @module wxd.shdict
-- @usage
-- local shdict = require "wxd.shdict"
-- local cache = assert(shdict.get_dict("cache"))
-- local ok, err = cache:set("user:42", json.encode(user), 300)
-- local hits = cache:incr("hits", 1, 0)

local core = require "wxd.core.shdict"

local type, error, tostring = type, error, tostring

local _M = {}

-- Dictionary objects of this Lua state, by name.
local dicts = {}

--- The dictionary called `name`.
-- @tparam string name as declared in config.lua
-- @treturn ?userdata the dictionary
-- @treturn ?string "no such shdict"
-- @usage local cache = assert(shdict.get_dict("cache"))
function _M.get_dict(name)
  if type(name) ~= "string" then
    error("wxd.shdict.get_dict: name must be a string, got " .. type(name), 2)
  end
  local d = dicts[name]
  if d then return d end
  d = core.find(name)
  if not d and not core.in_server() then
    -- A script or a spec that loaded an app's config: its dictionaries.
    local wxd = require "wxd"
    local sizes = type(wxd.config) == "table" and type(wxd.config.shdict) == "table" and wxd.config.shdict
    if sizes and sizes[name] then d = _M.declare(name, sizes[name]) end
  end
  if not d then return nil, "no such shdict" end
  dicts[name] = d
  return d
end

--- Creates a dictionary, outside a server only (in a server, they come
-- from config.lua, and this raises). Declaring a name again with the same
-- size returns the existing dictionary.
-- @tparam string name a-z, 0-9 and _, not starting with a digit
-- @tparam number|string size bytes, or "64k", "10m", "1g" (at least 64k)
-- @treturn userdata the dictionary
-- @usage local d = shdict.declare("test", "1m")
function _M.declare(name, size)
  if type(name) ~= "string" or not name:find("^[a-z_][a-z0-9_]*$") or #name > 63 then
    error("wxd.shdict.declare: a name is 1..63 of a-z, 0-9 and _, not starting with a digit, got "
      .. tostring(name), 2)
  end
  local bytes = require("wxd.util").parse_size(size)
  if not bytes then
    error('wxd.shdict.declare: expected a size in bytes or a string such as "64k", got ' .. tostring(size), 2)
  end
  if core.in_server() then
    error('wxd.shdict.declare: a server\'s dictionaries come from config.lua (shdict = { ' .. name
      .. ' = "1m" })', 2)
  end
  local d, err = core.declare(name, bytes)
  if not d then error("wxd.shdict.declare: " .. err, 2) end
  if dicts[name] then return dicts[name] end
  dicts[name] = d
  return d
end

--- The names of the declared dictionaries, in order of declaration (in a
-- server, as sorted from config.lua).
-- @treturn table array of names
function _M.names()
  return core.names()
end

return _M
