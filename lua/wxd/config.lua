--- wxd.config: load and validate an app's `config.lua`.
--
-- A config file is Lua that returns a table. It runs in a small sandbox
-- (no io, no require, no os but os.getenv) because it is read at every
-- reload by every worker and should describe, not act. Secrets are never
-- written in it: `env("WXD_MP_SECRET")` names an environment variable, and
-- a literal string under a secret-looking key is refused.
--
-- Errors are returned, not raised (a bad config is an expected failure of
-- a reload), as lines `config.<key>: <what is wrong>`; the caller prefixes
-- the file name.
--
-- @module wxd.config
-- @usage
-- local cfg, err = require("wxd.config").load("config.lua")
-- if not cfg then error("config.lua: " .. err) end

local type         = type
local pairs        = pairs
local ipairs       = ipairs
local next         = next
local error        = error
local pcall        = pcall
local assert       = assert
local select       = select
local tostring     = tostring
local tonumber     = tonumber
local loadfile     = loadfile
local setfenv      = setfenv
local setmetatable = setmetatable
local getmetatable = getmetatable
local os_getenv    = os.getenv
local io_open      = io.open
local str_find     = string.find
local str_sub      = string.sub
local str_lower    = string.lower
local str_upper    = string.upper
local str_gsub     = string.gsub
local str_format   = string.format
local str_byte     = string.byte
local tbl_concat   = table.concat
local tbl_sort     = table.sort
local math_min     = math.min
local math_huge    = math.huge
local string_lib   = string
local table_lib    = table
local math_lib     = math
local unpack       = unpack

local util  = require "wxd.util"
local redis = require "wxd.redis"

local _M = { _VERSION = "0.1.0" }


------------------------------------------------------------------------
-- Defaults and schema
------------------------------------------------------------------------

-- Order matters only for error messages and docs.
local LIMIT_KEYS = {
  "max_header_bytes", "max_body_bytes", "max_uri_bytes",
  "header_timeout_ms", "body_timeout_ms", "keepalive_timeout_ms",
  "max_requests_per_connection", "shutdown_timeout_ms", "send_timeout_ms",
  "stall_timeout_ms", "lua_memory_bytes",
}

local LIMIT_DEFAULTS = {
  max_header_bytes            = 16384,
  max_body_bytes              = 1048576,
  max_uri_bytes               = 8192,
  header_timeout_ms           = 10000,
  body_timeout_ms             = 30000,
  keepalive_timeout_ms        = 75000,
  max_requests_per_connection = 10000,
  shutdown_timeout_ms         = 10000,
  send_timeout_ms             = 60000,
  -- A worker loop that has not turned for this long is stuck (docs/runaway.md).
  stall_timeout_ms            = 2000,
  -- What one generation's Lua state may hold while handlers run; the handler
  -- that takes it past is stopped with a 503 (docs/runaway.md).
  lua_memory_bytes            = 1073741824,
}

local LOG_LEVELS = { debug = true, info = true, warn = true, error = true }

-- Sections that later features own; accepted as free-form tables for now
-- (their modules validate them).
local FREE_SECTIONS = { "mp", "pay", "miniprogram", "token", "app", "order", "websocket", "trace", "internal",
                        "cloudbase", "alert", "queue", "degrade" }

local TOP_KEYS = { "listen", "workers", "steering", "limits", "log", "admin_listen", "shdict", "https", "redis", "store",
  "gray", "metrics" }
for _, k in ipairs(FREE_SECTIONS) do
  TOP_KEYS[#TOP_KEYS + 1] = k
end

-- The one source of the defaults: the core (core/config.c) keeps none of its
-- own and reads every value from the validated table, so a default changes
-- here only (spec/01-unit/config_spec.lua checks the core reads each one).

--- A fresh table of defaults (callers may modify it).
-- @treturn table defaults
-- @usage local d = config.defaults(); print(d.listen) --> 127.0.0.1:8080
function _M.defaults()
  local limits = {}
  for k, v in pairs(LIMIT_DEFAULTS) do
    limits[k] = v
  end
  return {
    listen  = "127.0.0.1:8080",
    workers = "auto",
    steering = "auto",
    limits  = limits,
    log     = { level = "info", access = true },
    -- Request metrics and GET /metrics (docs/observability.md); false: off.
    metrics = true,
  }
end


------------------------------------------------------------------------
-- Environment markers
------------------------------------------------------------------------

local ENV_MT = { __tostring = function(m) return 'env("' .. m.name .. '")' end }

--- Refer to an environment variable from a config file.
-- The variable is read when the config is validated (at every load or
-- reload), so rotating a secret needs no edit. An empty variable counts as
-- unset.
-- @tparam string name variable name, e.g. "WXD_MP_SECRET"
-- @tparam[opt] string|number|boolean default used when the variable is unset
-- @treturn table a marker, resolved by load()/validate()
-- @usage secret = env("WXD_MP_SECRET")
local function env(name, default)
  if type(name) ~= "string" or not str_find(name, "^[%a_][%w_]*$") then
    error("env(): expected an environment variable name, got " .. tostring(name), 2)
  end
  local td = type(default)
  if default ~= nil and td ~= "string" and td ~= "number" and td ~= "boolean" then
    error("env(" .. name .. "): the default must be a string, a number or a boolean", 2)
  end
  return setmetatable({ name = name, default = default }, ENV_MT)
end
_M.env = env

--- Whether a value is an `env()` marker.
-- @param v any value
-- @treturn boolean
function _M.is_env(v)
  return type(v) == "table" and getmetatable(v) == ENV_MT
end


------------------------------------------------------------------------
-- Helpers
------------------------------------------------------------------------

local function is_ident(k)
  return type(k) == "string" and str_find(k, "^[%a_][%w_]*$") ~= nil
end

-- "config.a.b", "config.a[1]", 'config.a["x-y"]'
local function join(path, k)
  if is_ident(k) then
    return path .. "." .. k
  elseif type(k) == "string" then
    return path .. '["' .. k .. '"]'
  end
  return path .. "[" .. tostring(k) .. "]"
end

local function repr(v)
  if type(v) == "string" then
    if #v > 60 then v = str_sub(v, 1, 57) .. "..." end
    return '"' .. str_gsub(v, '[%c"\\]', function(c)
      if c == '"' or c == "\\" then return "\\" .. c end
      return str_format("\\%03d", str_byte(c))
    end) .. '"'
  elseif type(v) == "table" then
    return "a table"
  end
  return tostring(v)
end

-- Optimal string alignment distance (Levenshtein plus transpositions), so
-- "lsiten" is one edit from "listen" like "lisen" is.
local function distance(a, b)
  local la, lb = #a, #b
  local d = {}
  for i = 0, la do
    d[i] = { [0] = i }
  end
  for j = 0, lb do
    d[0][j] = j
  end
  for i = 1, la do
    local ca = str_byte(a, i)
    for j = 1, lb do
      local cb = str_byte(b, j)
      local cost = ca == cb and 0 or 1
      local v = math_min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
      if i > 1 and j > 1 and ca == str_byte(b, j - 1) and str_byte(a, i - 1) == cb then
        v = math_min(v, d[i - 2][j - 2] + 1)
      end
      d[i][j] = v
    end
  end
  return d[la][lb]
end

-- The closest known key within 2 edits, for "did you mean".
local function suggest(k, known)
  if type(k) ~= "string" then
    return nil
  end
  local best, bestd
  for _, name in ipairs(known) do
    local d = distance(str_lower(k), name)
    if d <= 2 and (bestd == nil or d < bestd) then
      best, bestd = name, d
    end
  end
  return best
end

-- Keys sorted so that error messages come out in a stable order.
local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do
    keys[#keys + 1] = k
  end
  tbl_sort(keys, function(a, b)
    local ta, tb = type(a), type(b)
    if ta ~= tb then
      return ta < tb
    end
    if ta == "string" or ta == "number" then
      return a < b
    end
    return tostring(a) < tostring(b)
  end)
  return keys
end


------------------------------------------------------------------------
-- Secrets and env resolution
------------------------------------------------------------------------

-- Key names that hold secrets: wxd.util decides (logs hide the same names).
local is_secret_key = util.is_secret_key
_M.is_secret_key = is_secret_key

local function env_name_for(path)
  local name = str_gsub(str_sub(path, #"config." + 1), "[^%w]+", "_")
  return "WXD_" .. str_upper(name)
end

-- Copy the whole table, refusing literal secrets and replacing env markers
-- by their values (strings, or the default as given). The caller's table is
-- left as it was, so validating it again reads the environment again.
-- Paths whose value came from the environment are noted, so that typed
-- keys may accept "8080" for 8080; a missing variable leaves the key out
-- (one error, not a second one about its type).
local function resolve(t, path, ctx, seen)
  if seen[t] then
    ctx.errors[#ctx.errors + 1] = path .. ": the table contains itself"
    return {}
  end
  seen[t] = true
  local out = {}
  for _, k in ipairs(sorted_keys(t)) do
    local v = t[k]
    local kpath = join(path, k)
    if type(v) == "table" and getmetatable(v) == ENV_MT then
      local value = ctx.getenv(v.name)
      if value == "" then
        value = nil
      end
      if value == nil then
        value = v.default
      else
        ctx.from_env[kpath] = true
      end
      if value == nil then
        ctx.errors[#ctx.errors + 1] = kpath .. ": environment variable " .. v.name .. " is not set"
      end
      v = value
    elseif type(v) == "table" then
      v = resolve(v, kpath, ctx, seen)
    elseif type(v) == "string" and is_secret_key(k) then
      ctx.errors[#ctx.errors + 1] = kpath
        .. ': secrets must come from the environment; use env("' .. env_name_for(kpath) .. '")'
    end
    out[k] = v
  end
  seen[t] = nil -- only tables on the current path are a cycle
  return out
end


------------------------------------------------------------------------
-- Validation of known keys
------------------------------------------------------------------------

local function fail(ctx, path, msg)
  ctx.errors[#ctx.errors + 1] = path .. ": " .. msg
end

local function positive_integer(ctx, path, v)
  if type(v) == "string" and ctx.from_env[path] then
    v = tonumber(v) or v
  end
  if type(v) ~= "number" or v % 1 ~= 0 or v < 1 or v ~= v or v == math_huge then
    fail(ctx, path, "expected a positive integer, got " .. repr(v))
    return nil
  end
  return v
end

local function boolean(ctx, path, v)
  if type(v) == "string" and ctx.from_env[path] then
    local l = str_lower(v)
    if l == "true" or l == "1" or l == "yes" or l == "on" then
      v = true
    elseif l == "false" or l == "0" or l == "no" or l == "off" then
      v = false
    end
  end
  if type(v) ~= "boolean" then
    fail(ctx, path, "expected true or false, got " .. repr(v))
    return nil
  end
  return v
end

local LISTEN_HINT = 'expected "HOST:PORT" (e.g. "127.0.0.1:8080" or "[::1]:8080"), got '

local function check_listen(ctx, path, v)
  if type(v) ~= "string" then
    fail(ctx, path, LISTEN_HINT .. repr(v))
    return nil
  end
  local host, port = v:match("^%[([%x:%.]+)%]:(%d+)$")
  if not host then
    host, port = v:match("^([%w%.%-]+):(%d+)$")
  end
  if not host then
    fail(ctx, path, LISTEN_HINT .. repr(v))
    return nil
  end
  local n = tonumber(port)
  if n < 1 or n > 65535 then
    fail(ctx, path, "port must be in 1..65535, got " .. repr(v))
    return nil
  end
  return v
end

local function check_workers(ctx, path, v)
  if v == "auto" then
    return v
  end
  if type(v) == "string" and ctx.from_env[path] then
    v = tonumber(v) or v
  end
  if type(v) ~= "number" or v % 1 ~= 0 or v < 1 or v == math_huge then
    fail(ctx, path, 'expected a positive integer or "auto", got ' .. repr(v))
    return nil
  end
  return v
end

local function unknown(ctx, path, k, known)
  local msg = "unknown key"
  local s = suggest(k, known)
  if s then
    msg = msg .. ' (did you mean "' .. s .. '"?)'
  end
  fail(ctx, join(path, k), msg)
end

local function check_section(ctx, path, v)
  if type(v) ~= "table" then
    fail(ctx, path, "expected a table, got " .. repr(v))
    return false
  end
  return true
end

local function check_limits(ctx, path, v, out)
  if not check_section(ctx, path, v) then
    return
  end
  for _, k in ipairs(sorted_keys(v)) do
    if LIMIT_DEFAULTS[k] == nil then
      unknown(ctx, path, k, LIMIT_KEYS)
    else
      out[k] = positive_integer(ctx, join(path, k), v[k])
    end
  end
end

local LOG_KEYS = { "level", "access" }

local function check_log(ctx, path, v, out)
  if not check_section(ctx, path, v) then
    return
  end
  for _, k in ipairs(sorted_keys(v)) do
    local x = v[k]
    local kpath = join(path, k)
    if k == "level" then
      if type(x) ~= "string" or not LOG_LEVELS[x] then
        fail(ctx, kpath, 'expected one of "debug", "info", "warn", "error", got ' .. repr(x))
      else
        out.level = x
      end
    elseif k == "access" then
      out.access = boolean(ctx, kpath, x)
    else
      unknown(ctx, path, k, LOG_KEYS)
    end
  end
end

-- Shared dictionaries (wxd.shdict): `shdict = { cache = "10m", sessions = 1048576 }`.
-- The core creates them once, at start-up, with these capacities.
local SHDICT_MIN, SHDICT_MAX, SHDICT_COUNT = 65536, 1024 ^ 4, 32
--- A size in bytes (wxd.util.parse_size): an integer, or digits with an
-- optional k, m or g suffix.
-- @usage config.parse_size("10m") --> 10485760
_M.parse_size = util.parse_size

local function check_shdict(ctx, path, v, out)
  if not check_section(ctx, path, v) then
    return
  end
  local n = 0
  for _, k in ipairs(sorted_keys(v)) do
    local kpath = join(path, k)
    if type(k) ~= "string" or not str_find(k, "^[a-z_][a-z0-9_]*$") or #k > 63 then
      fail(ctx, kpath, "a dictionary name is 1..63 of a-z, 0-9 and _, not starting with a digit")
    else
      local bytes = _M.parse_size(v[k])
      if bytes == nil then
        fail(ctx, kpath, 'expected a size in bytes (an integer, or a string such as "64k" or "10m"), got '
          .. repr(v[k]))
      elseif bytes < SHDICT_MIN then
        fail(ctx, kpath, "must be at least 64k (65536 bytes), got " .. repr(v[k]))
      elseif bytes > SHDICT_MAX then
        fail(ctx, kpath, "must be at most 1024g, got " .. repr(v[k]))
      else
        out[k] = bytes
        n = n + 1
      end
    end
  end
  if n > SHDICT_COUNT then
    fail(ctx, path, "at most " .. SHDICT_COUNT .. " dictionaries, got " .. n)
  end
end

-- Redis (wxd.redis, and the store's redis backend):
-- `redis = "redis://host:6379/0"` or `redis = { url = ..., timeout = ms,
-- connect_timeout = ms, user = ..., password = env(...) }`. A password in a
-- URL must come from the environment, like every secret.
local REDIS_KEYS = { "url", "timeout", "connect_timeout", "user", "password" }

local function check_redis(ctx, path, v)
  local t, upath = v, join(path, "url")
  if type(v) == "string" then
    t, upath = { url = v }, path
  elseif type(v) ~= "table" then
    fail(ctx, path, 'expected a URL (e.g. "redis://127.0.0.1:6379/0") or a table { url = ..., timeout = ms }, got '
      .. repr(v))
    return nil
  end
  local out, ok = {}, true
  for _, k in ipairs(sorted_keys(t)) do
    local x, kpath = t[k], join(path, k)
    if k == "url" then
      if type(x) ~= "string" then
        fail(ctx, upath, 'expected a URL such as "redis://127.0.0.1:6379/0", got ' .. repr(x))
        ok = false
      else
        -- Parse errors never quote the credentials.
        local u, err = redis.parse_url(x)
        if not u then
          fail(ctx, upath, err)
          ok = false
        elseif u.password and not ctx.from_env[upath] then
          fail(ctx, upath, 'a password in the URL must come from the environment: use env("'
            .. env_name_for(upath) .. '"), or password = env(...)')
          ok = false
        end
        out.url = x
      end
    elseif k == "timeout" or k == "connect_timeout" then
      local n = positive_integer(ctx, kpath, x)
      if n and n > 1e9 then
        fail(ctx, kpath, "at most 1e9 ms")
        n = nil
      end
      out[k] = n
      ok = ok and n ~= nil
    elseif k == "user" or k == "password" then
      if type(x) ~= "string" or x == "" then
        fail(ctx, kpath, "expected a non-empty string")
        ok = false
      end
      out[k] = x
    else
      unknown(ctx, path, k, REDIS_KEYS)
      ok = false
    end
  end
  if out.url == nil and ok then
    fail(ctx, upath, 'missing: the URL of the server, e.g. "redis://127.0.0.1:6379/0"')
    ok = false
  end
  if ok and out.user and not out.password then
    fail(ctx, join(path, "user"), "a user needs a password")
    ok = false
  end
  return ok and out or nil
end

-- The store: `store = { backend = "memory", shdict = NAME }` or
-- `store = { backend = "redis", prefix = "app:" }` (with `redis`).
local STORE_KEYS = { "backend", "shdict", "prefix" }

local function check_store(ctx, path, v, has_redis)
  if not check_section(ctx, path, v) then
    return nil
  end
  local out = {}
  for _, k in ipairs(sorted_keys(v)) do
    local x, kpath = v[k], join(path, k)
    if k == "backend" then
      if x ~= "memory" and x ~= "redis" then
        fail(ctx, kpath, 'expected "memory" or "redis", got ' .. repr(x))
      elseif x == "redis" and not has_redis then
        fail(ctx, kpath, 'the redis backend needs redis = "redis://host:6379/0" in the config')
      end
      out.backend = x
    elseif k == "shdict" then
      if type(x) ~= "string" or not str_find(x, "^[a-z_][a-z0-9_]*$") then
        fail(ctx, kpath, "expected the name of a shared dictionary, got " .. repr(x))
      end
      out.shdict = x
    elseif k == "prefix" then
      if type(x) ~= "string" then
        fail(ctx, kpath, "expected a string, got " .. repr(x))
      end
      out.prefix = x
    else
      unknown(ctx, path, k, STORE_KEYS)
    end
  end
  return out
end

-- The HTTPS listener: `https = { listen, cert, key, key_passphrase,
-- client_ca, client_verify, min_version }`. Files are read by the core
-- (relative paths against the app directory), which names the file at fault.
local HTTPS_KEYS = { "listen", "cert", "key", "key_passphrase", "client_ca", "client_verify", "min_version" }
local CLIENT_VERIFY = { off = true, optional = true, require = true }

local function check_https(ctx, path, v)
  if not check_section(ctx, path, v) then
    return nil
  end
  local out = { client_verify = "off", min_version = "1.2" }
  for _, k in ipairs(sorted_keys(v)) do
    local x, kpath = v[k], join(path, k)
    if k == "listen" then
      out.listen = check_listen(ctx, kpath, x)
    elseif k == "cert" or k == "key" or k == "client_ca" or k == "key_passphrase" then
      if type(x) ~= "string" or x == "" then
        fail(ctx, kpath, "expected a non-empty string, got " .. (k == "key_passphrase" and type(x) or repr(x)))
      else
        out[k] = x
      end
    elseif k == "client_verify" then
      if not CLIENT_VERIFY[x] then
        fail(ctx, kpath, 'expected "off", "optional" or "require", got ' .. repr(x))
      else
        out.client_verify = x
      end
    elseif k == "min_version" then
      local s = (x == 1.2 or x == 1.3) and str_format("%.1f", x) or x
      if s ~= "1.2" and s ~= "1.3" then
        fail(ctx, kpath, 'expected "1.2" or "1.3", got ' .. repr(x))
      else
        out.min_version = s
      end
    else
      unknown(ctx, path, k, HTTPS_KEYS)
    end
  end
  for _, k in ipairs { "listen", "cert", "key" } do
    if v[k] == nil then fail(ctx, join(path, k), "required") end
  end
  -- A CA without verification would look like mutual TLS and be none.
  if v.client_ca ~= nil and v.client_verify == nil then
    out.client_verify = "require"
  elseif out.client_verify ~= "off" and v.client_ca == nil then
    fail(ctx, join(path, "client_ca"), 'required when client_verify is "' .. out.client_verify .. '"')
  elseif out.client_verify == "off" and v.client_ca ~= nil then
    fail(ctx, join(path, "client_verify"), 'is "off" but client_ca is set; say "optional" or "require", or drop client_ca')
  end
  return out
end

local FREE = {}
for _, k in ipairs(FREE_SECTIONS) do
  FREE[k] = true
end

--- Validate a config table (as a config file returns it) and merge it over
-- the defaults. `env()` markers in it are resolved.
-- @tparam table t the config
-- @tparam[opt] table opts `getenv`: replaces os.getenv (tests, or a
--   process that reads variables from elsewhere)
-- @treturn ?table the validated config (a new table)
-- @treturn ?string errors, one `config.<key>: ...` line each
-- @usage local cfg, err = config.validate({ listen = "0.0.0.0:80" })
function _M.validate(t, opts)
  if type(t) ~= "table" or getmetatable(t) == ENV_MT then
    return nil, "config: expected a table, got " .. repr(t)
  end
  local ctx = {
    errors   = {},
    from_env = {},
    getenv   = opts and opts.getenv or os_getenv,
  }
  t = resolve(t, "config", ctx, {})

  local out = _M.defaults()
  for _, k in ipairs(sorted_keys(t)) do
    local v = t[k]
    local path = join("config", k)
    if k == "listen" then
      if v == false then
        out.listen = false -- no plain HTTP: HTTPS only (checked below)
      else
        out.listen = check_listen(ctx, path, v)
      end
    elseif k == "https" then
      out.https = check_https(ctx, path, v)
    elseif k == "workers" then
      out.workers = check_workers(ctx, path, v)
    elseif k == "steering" then
      -- Which worker gets a new connection (core/steer.h).
      if v ~= "auto" and v ~= "cpu" and v ~= "hash" then
        fail(ctx, path, 'expected "auto", "cpu" or "hash", got ' .. repr(v))
      else
        out.steering = v
      end
    elseif k == "admin_listen" then
      -- The status endpoint (off unless set): keep it on loopback or a
      -- private network, it tells about the deployment.
      out.admin_listen = check_listen(ctx, path, v)
    elseif k == "limits" then
      check_limits(ctx, path, v, out.limits)
    elseif k == "log" then
      check_log(ctx, path, v, out.log)
    elseif k == "shdict" then
      out.shdict = {}
      check_shdict(ctx, path, v, out.shdict)
    elseif k == "redis" then
      out.redis = check_redis(ctx, path, v)
    elseif k == "store" then
      out.store = check_store(ctx, path, v, t.redis ~= nil)
    elseif k == "gray" then
      -- Gray release rules (wxd.gray): compiled here, so a bad rule fails
      -- the load or reload with its name.
      local set, errs = require("wxd.gray").compile(v, path)
      if set then
        out.gray = (set.n > 0 or set.inherit) and set or nil
      else
        for _, e in ipairs(errs) do ctx.errors[#ctx.errors + 1] = e end
      end
    elseif k == "metrics" then
      -- false: no request metrics, no GET /metrics (docs/observability.md).
      out.metrics = boolean(ctx, path, v)
    elseif k == "trace" and v == false then
      -- No trace context: no ids made, no spans (docs/observability.md).
      out.trace = false
    elseif FREE[k] then
      if check_section(ctx, path, v) then
        out[k] = v
      end
    else
      unknown(ctx, "config", k, TOP_KEYS)
    end
  end

  if t.listen == false and t.https == nil then
    fail(ctx, "config.listen", "false turns plain HTTP off, which needs an https section")
  end
  if ctx.errors[1] then
    return nil, tbl_concat(ctx.errors, "\n")
  end
  return out
end


------------------------------------------------------------------------
-- Loading
------------------------------------------------------------------------

local function copy(t)
  local c = {}
  for k, v in pairs(t) do
    c[k] = v
  end
  return c
end

-- What a config file cannot load, with a message that says why (plain
-- "attempt to call a nil value" would not).
local function sandboxed(name)
  return function(what)
    error(name .. "(" .. repr(what) .. "): config files are sandboxed (no require, dofile, loadfile or io):"
      .. " they are plain data read at every reload; keep code in app.lua and secrets in env(\"NAME\")", 2)
  end
end

-- A fresh sandbox per load: the file may assign globals, and modules such
-- as `string` are copies, so a config cannot alter the server's own.
local function sandbox()
  return {
    require  = sandboxed("require"),
    dofile   = sandboxed("dofile"),
    loadfile = sandboxed("loadfile"),
    string   = copy(string_lib),
    table    = copy(table_lib),
    math     = copy(math_lib),
    os       = { getenv = os_getenv },
    tonumber = tonumber,
    tostring = tostring,
    pairs    = pairs,
    ipairs   = ipairs,
    next     = next,
    type     = type,
    error    = error,
    assert   = assert,
    select   = select,
    unpack   = unpack,
    env      = env,
  }
end

--- Load and validate a config file.
-- @tparam ?string path file to load; nil gives the defaults
-- @tparam[opt] table opts as for validate()
-- @treturn ?table the validated config
-- @treturn ?string what is wrong (load errors name the file; validation
--   errors are `config.<key>: ...` lines, to be prefixed by the caller)
-- @usage local cfg, err = config.load("config.lua")
function _M.load(path, opts)
  if path == nil then
    return _M.defaults()
  end
  if type(path) ~= "string" then
    error("wxd.config: path must be a string or nil", 2)
  end
  -- loadfile's message for a missing file is fine, but check first so the
  -- message is the same on every Lua and says plainly what happened.
  local f = io_open(path, "rb")
  if not f then
    return nil, "cannot open " .. path
  end
  f:close()
  local chunk, err = loadfile(path)
  if not chunk then
    return nil, err
  end
  setfenv(chunk, sandbox())
  local ok, t = pcall(chunk)
  if not ok then
    return nil, tostring(t)
  end
  if type(t) ~= "table" then
    return nil, "config file must return a table, got " .. repr(t)
  end
  return _M.validate(t, opts)
end

return _M
