--- wxd.redis: a Redis client on the worker's event loop.
--
-- Each command yields the calling coroutine (a handler, a timer run, a
-- script's main chunk) and never blocks the worker. One connection per
-- worker and URL is shared by every coroutine and every app generation:
-- commands of concurrent coroutines are multiplexed on it (written
-- together once per loop turn, replies matched in order), and it survives
-- hot reloads. See docs/redis.md.
--
-- Replies: a status is its string ("OK"), an integer a number, a bulk
-- string a string, a nil bulk or nil array `redis.null` (so that nil stays
-- free for errors; it is `wxd.json.null`, `cjson.null`), an array a table (errors inside it
-- are `{ err = msg }`).
--
-- Failures return `nil, err [, detail]`: `err` is "timeout" (no reply
-- within the client's timeout; the connection stays usable), "closed" (the
-- connection dropped before the reply: the command may or may not have
-- run), "connect" (cannot connect; while reconnection backs off, commands
-- fail at once with this), "auth" (AUTH refused), or the server's error
-- message ("ERR ...", "WRONGTYPE ...", "NOSCRIPT ..."). `detail` says more
-- and never holds the password. Wrong argument types raise.
--
-- @module wxd.redis
-- @usage
-- local redis = require "wxd.redis"
-- local r = redis.new()               -- the `redis` of config.lua
-- local n, err = r:incr("visits")     -- any command, by its name
-- local v = r:get("k")                -- redis.null when absent
-- local res = r:pipeline({ { "SET", "a", 1 }, { "GET", "a" } }) --> { "OK", "1" }

local core = require "wxd.core.redis"
local metrics = require "wxd.metrics"

local type, error, tostring, tonumber, setmetatable, rawget =
  type, error, tostring, tonumber, setmetatable, rawget
local str_upper, str_lower, str_find, str_format, str_gsub, str_char =
  string.upper, string.lower, string.find, string.format, string.gsub, string.char
local floor = math.floor
local unpack = unpack

local _M = {}

--- The value of a nil reply (a missing key, a nil array); equal to wxd.json.null and cjson.null.
_M.null = core.null

local DEFAULT_TIMEOUT_MS = 5000
local DEFAULT_CONNECT_MS = 1000

_M.DEFAULT_TIMEOUT_MS = DEFAULT_TIMEOUT_MS
_M.DEFAULT_CONNECT_MS = DEFAULT_CONNECT_MS

-- Commands that would break a connection shared by every coroutine:
-- subscriber mode, another database or user for everyone, transactions
-- that other coroutines' commands would land in, replies switched off.
local REFUSED = {
  SUBSCRIBE = "use r:subscribe()", PSUBSCRIBE = "use r:psubscribe()", SSUBSCRIBE = "use r:subscribe()",
  UNSUBSCRIBE = "use the handle of r:subscribe()", PUNSUBSCRIBE = "use the handle of r:psubscribe()",
  MONITOR = "it takes over the connection", SELECT = "put the database in the URL",
  AUTH = "put the credentials in the URL or the config", HELLO = "wxd speaks RESP2",
  QUIT = "the connection is shared", RESET = "the connection is shared",
  MULTI = "use r:transaction()", EXEC = "use r:transaction()", DISCARD = "use r:transaction()",
  WATCH = "the connection is shared: use r:eval() for check-and-set",
  UNWATCH = "the connection is shared", SYNC = "not a client command", PSYNC = "not a client command",
}

local function check_command(name, where, arg1)
  if type(name) ~= "string" or name == "" then
    error("wxd.redis: " .. where .. ": the command name must be a non-empty string, got " .. type(name), 3)
  end
  local cmd = str_upper(name)
  local why = REFUSED[cmd]
  if why then error("wxd.redis: " .. cmd .. " is not allowed here (" .. why .. ")", 3) end
  if cmd == "CLIENT" and type(arg1) == "string" and str_upper(arg1) == "REPLY" then
    error("wxd.redis: CLIENT REPLY is not allowed here (the connection is shared)", 3)
  end
end

------------------------------------------------------------------------
-- URLs
------------------------------------------------------------------------

-- The URL as logs and errors show it: the password masked.
local function make_label(u)
  local masked = u.password and ((u.user or "") .. ":***@") or ""
  if u.path then
    return "unix://" .. masked .. u.path .. (u.db ~= 0 and "?db=" .. u.db or "")
  end
  local shown = str_find(u.host, ":", 1, true) and "[" .. u.host .. "]" or u.host
  return "redis://" .. masked .. shown .. ":" .. u.port .. "/" .. u.db
end

local function url_decode(s)
  return (str_gsub(s, "%%(%x%x)", function(h) return str_char(tonumber(h, 16)) end))
end

local function parse_db(s, url)
  local n = tonumber(s)
  if not s:find("^%d+$") or not n or n > 1000000 then
    return nil, "bad database number in " .. url
  end
  return n
end

--- Parses a Redis URL. Forms: `redis://[[user]:password@]host[:port][/db]`
-- (host: a name, an IPv4 address or `[IPv6]`; port 6379, db 0 by default)
-- and `unix://[[user]:password@]/path/to/socket[?db=N]`. User and password
-- may be percent-encoded.
-- @tparam string url
-- @treturn ?table `{ host, port, path, user, password, db, label }`;
--   `label` is the URL with the password masked, for logs and errors
-- @treturn ?string what is wrong (without the password)
-- @usage local u = assert(redis.parse_url("redis://:s3cret@10.0.0.5:6380/2"))
function _M.parse_url(url)
  if type(url) ~= "string" then return nil, "expected a URL string, got " .. type(url) end
  if str_find(url, "[%z%s]") then return nil, "a Redis URL has no spaces or control characters" end
  local scheme, rest = url:match("^(%a[%w+.-]*)://(.*)$")
  scheme = scheme and str_lower(scheme)
  if scheme ~= "redis" and scheme ~= "unix" then
    if scheme == "rediss" then return nil, "rediss:// (TLS) is not supported; use redis:// or unix://" end
    return nil, 'expected "redis://[user:password@]host:port/db" or "unix:///path/to/socket?db=N"'
  end
  local user, password
  local auth, after = rest:match("^([^@/]*)@(.*)$")
  if auth then
    local u, p = auth:match("^([^:]*):(.*)$")
    if not u then return nil, "credentials in a Redis URL are user:password@ or :password@" end
    if p == "" then return nil, "empty password in the Redis URL" end
    user = u ~= "" and url_decode(u) or nil
    password = url_decode(p)
    rest = after
  end
  local out = { user = user, password = password, db = 0 }
  if scheme == "unix" then
    local path, query = rest:match("^(/[^?]*)%??(.*)$")
    if not path or path == "/" then return nil, "expected unix:///path/to/socket" end
    if query ~= "" then
      local db = query:match("^db=(%d+)$")
      if not db then return nil, "the only query parameter of a unix:// URL is db=N" end
      local n, err = parse_db(db, "unix://" .. path)
      if not n then return nil, err end
      out.db = n
    end
    out.path = path
    out.label = make_label(out)
    return out
  end
  local hostport, db = rest:match("^([^/]*)/?(.*)$")
  local host, port = hostport:match("^%[([%x:.]+)%]:?(%d*)$")
  if not host then host, port = hostport:match("^([%w.-]+):?(%d*)$") end
  if not host or host == "" then return nil, "expected a host in the Redis URL (redis://host:port/db)" end
  port = port ~= "" and tonumber(port) or 6379
  if port < 1 or port > 65535 then return nil, "the port of a Redis URL is 1..65535" end
  if db ~= "" then
    local n, err = parse_db(db, "redis://" .. hostport)
    if not n then return nil, err end
    out.db = n
  end
  out.host, out.port = host, port
  out.label = make_label(out)
  return out
end

------------------------------------------------------------------------
-- Clients
------------------------------------------------------------------------

local Client = {}
local commands = {} -- generated methods, by name

local mt = {
  __index = function(_self, name)
    local m = Client[name]
    if m then return m end
    if type(name) ~= "string" or not str_find(name, "^[%a][%w_]*$") then return nil end
    m = commands[name]
    if not m then
      local cmd = str_upper(name)
      if REFUSED[cmd] then return nil end
      m = function(client, ...) return client:call(cmd, ...) end
      commands[name] = m
    end
    return m
  end,
  __tostring = function(self) return "wxd.redis client " .. self.label end,
}

local function ms(v, name, default)
  if v == nil then return default end
  if type(v) ~= "number" or v ~= v or v < 1 or v > 1e9 then
    error("wxd.redis.new: " .. name .. " must be a number of ms in 1..1e9, got " .. tostring(v), 3)
  end
  return floor(v)
end

-- The settings of a client: a URL, or a table { url, timeout,
-- connect_timeout, user, password } (also what config.lua's `redis` is).
local function settings(arg, opts, level)
  if type(arg) == "string" then arg = { url = arg } end
  if type(arg) ~= "table" then
    error("wxd.redis.new: expected a URL or a table, got " .. type(arg), level)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("wxd.redis.new: opts must be a table, got " .. type(opts), level)
  end
  opts = opts or {}
  local u, err = _M.parse_url(arg.url)
  if not u then error("wxd.redis.new: " .. err, level) end
  local password = arg.password
  if password ~= nil then
    if type(password) ~= "string" or password == "" then
      error("wxd.redis.new: password must be a non-empty string", level)
    end
    u.password = password
  end
  if arg.user ~= nil then
    if type(arg.user) ~= "string" or arg.user == "" then error("wxd.redis.new: user must be a non-empty string", level) end
    if not u.password then error("wxd.redis.new: a user needs a password", level) end
    u.user = arg.user
  end
  u.label = make_label(u)
  u.timeout = ms(opts.timeout or arg.timeout, "timeout", DEFAULT_TIMEOUT_MS)
  u.connect_ms = ms(opts.connect_timeout or arg.connect_timeout, "connect_timeout", DEFAULT_CONNECT_MS)
  -- One connection per worker and identity (where and as whom).
  u.key = str_format("%s|%s|%s|%s|%s|%d", u.host or "", u.port or "", u.path or "", u.user or "",
    u.password or "", u.db)
  return u
end

--- A client. Clients of the same URL and credentials share the worker's
-- connection; each has its own timeouts.
-- @tparam[opt] string|table url a URL (see parse_url), or a table
--   `{ url, timeout, connect_timeout, user, password }`; default: the
--   `redis` setting of config.lua
-- @tparam[opt] table opts `timeout` (ms per command, default 5000),
--   `connect_timeout` (ms to connect, authenticate and select, default 1000)
-- @treturn table the client; raises on a bad URL or option
-- @usage local r = redis.new("redis://127.0.0.1:6379/0", { timeout = 200 })
function _M.new(url, opts)
  if url == nil then
    local wxd = require "wxd"
    url = type(wxd.config) == "table" and wxd.config.redis or nil
    if url == nil then error("wxd.redis.new: no URL given and no redis in config.lua", 2) end
  end
  local s = settings(url, opts, 3)
  local spec = { key = s.key, label = s.label, host = s.host, port = s.port, path = s.path, user = s.user,
    password = s.password, db = s.db, connect_ms = s.connect_ms }
  return setmetatable({ spec = spec, label = s.label, timeout = s.timeout, conn = core.connection(spec) }, mt)
end

--- Runs any command: `r:call("HSET", "h", "f", 1)`. The same as
-- `r:hset("h", "f", 1)`. Arguments are strings or numbers.
-- @treturn ?any the reply (see the module's description)
-- @treturn ?string "timeout", "closed", "connect", "auth", or the server's error
-- @treturn ?string detail
-- Commands and errors, counted by command name (lower case). An error is
-- the transport's kind ("timeout", "closed", "connect", "auth") or "reply"
-- for an error reply of the server.
local commands_metric, errors_metric
local TRANSPORT = { timeout = true, closed = true, connect = true, auth = true }
local function count(name, res, err)
  if not commands_metric then
    commands_metric = metrics.builtin("counter", "wxd_redis_commands_total", "Redis commands sent, by command",
      { "command" }, { max_series = 300 })
    errors_metric = metrics.builtin("counter", "wxd_redis_errors_total",
      "Redis commands that failed, by command and kind (timeout, closed, connect, auth, reply)",
      { "command", "kind" }, { max_series = 500 })
  end
  local cmd = str_lower(tostring(name))
  metrics.count(commands_metric, { cmd })
  if res == nil and err then metrics.count(errors_metric, { cmd, TRANSPORT[err] and err or "reply" }) end
  return res, err
end

local function counted_call(conn, timeout, name, ...)
  local res, err, detail = core.call(conn, timeout, name, ...)
  count(name, res, err)
  return res, err, detail
end

local function counted_pipeline(conn, timeout, cmds)
  local res, err, detail = core.pipeline(conn, timeout, cmds)
  for i = 1, #cmds do
    local r = res and res[i]
    count(cmds[i][1], res and true or nil, res and (type(r) == "table" and r.err and "reply") or err)
  end
  return res, err, detail
end

function Client:call(name, ...)
  check_command(name, "call", (...))
  return counted_call(self.conn, self.timeout, name, ...)
end

--- Sends several commands in one write and waits once.
-- @tparam table cmds a list of commands, each a list `{ name, args... }`
-- @treturn ?table one result per command: its reply, or `{ err = msg }`
--   for an error reply
-- @treturn ?string "timeout", "closed", "connect", "auth"
-- @usage local res = r:pipeline({ { "INCR", "n" }, { "EXPIRE", "n", 60 } })
function Client:pipeline(cmds)
  if type(cmds) ~= "table" or cmds[1] == nil then
    error("wxd.redis: pipeline expects a non-empty list of commands", 2)
  end
  for i = 1, #cmds do
    if type(cmds[i]) ~= "table" then error("wxd.redis: pipeline command " .. i .. " must be a table", 2) end
    check_command(cmds[i][1], "pipeline command " .. i, cmds[i][2])
  end
  return counted_pipeline(self.conn, self.timeout, cmds)
end

--- MULTI, the commands, EXEC, sent together so that no other coroutine's
-- command lands inside the transaction.
-- @tparam table cmds a list of commands
-- @treturn ?table EXEC's reply: one result per command (errors as `{ err = msg }`)
-- @treturn ?string a transport error, or the server's ("EXECABORT ..." when
--   a command was refused while queueing)
function Client:transaction(cmds)
  if type(cmds) ~= "table" or cmds[1] == nil then
    error("wxd.redis: transaction expects a non-empty list of commands", 2)
  end
  local all = { { "MULTI" } }
  for i = 1, #cmds do
    if type(cmds[i]) ~= "table" then error("wxd.redis: transaction command " .. i .. " must be a table", 2) end
    check_command(cmds[i][1], "transaction command " .. i, cmds[i][2])
    all[i + 1] = cmds[i]
  end
  all[#all + 1] = { "EXEC" }
  local res, err, detail = counted_pipeline(self.conn, self.timeout, all)
  if not res then return nil, err, detail end
  local exec = res[#res]
  if type(exec) == "table" and exec.err then return nil, exec.err end
  if exec == core.null then return nil, "aborted" end
  return exec
end

local sha_cache = setmetatable({}, { __mode = "k" })

local function sha1_hex(s)
  local h = sha_cache[s]
  if not h then
    h = require("wxd.core.crypto").sha1_hex(s)
    sha_cache[s] = h
  end
  return h
end

local function append_list(t, list, what)
  if list == nil then return 0 end
  if type(list) ~= "table" then error("wxd.redis: eval: " .. what .. " must be a list, got " .. type(list), 3) end
  local n = #list
  for i = 1, n do
    local v = list[i]
    if type(v) ~= "string" and type(v) ~= "number" then
      error("wxd.redis: eval: " .. what .. "[" .. i .. "] must be a string or a number, got " .. type(v), 3)
    end
    t[#t + 1] = v
  end
  return n
end

--- Runs a Lua script on the server: EVALSHA with the script's SHA-1, and
-- EVAL when the server does not know it yet (NOSCRIPT), which caches it.
-- @tparam string script
-- @tparam[opt] table keys KEYS
-- @tparam[opt] table args ARGV
-- @return the script's reply, or nil, err as for call
-- @usage r:eval("return redis.call('INCRBY', KEYS[1], ARGV[1])", { "n" }, { 5 })
function Client:eval(script, keys, args)
  if type(script) ~= "string" then error("wxd.redis: eval: script must be a string, got " .. type(script), 2) end
  local t = { "EVALSHA", sha1_hex(script), 0 }
  t[3] = append_list(t, keys, "keys")
  append_list(t, args, "args")
  local res, err, detail = counted_call(self.conn, self.timeout, unpack(t))
  if res == nil and type(err) == "string" and str_find(err, "^NOSCRIPT") then
    t[1], t[2] = "EVAL", script
    return counted_call(self.conn, self.timeout, unpack(t))
  end
  return res, err, detail
end

local function subscribe(self, pattern, name, fn, what)
  if type(name) ~= "string" or name == "" then
    error("wxd.redis: " .. what .. ": expected a non-empty string, got " .. type(name), 3)
  end
  if type(fn) ~= "function" then error("wxd.redis: " .. what .. ": expected a function, got " .. type(fn), 3) end
  local sub = rawget(self, "subconn")
  if not sub then
    sub = core.connection(self.spec, true)
    self.subconn = sub
  end
  return core.subscribe(sub, pattern, name, fn)
end

--- Calls `fn(message, channel)` in a new coroutine (it may wait) for each
-- message published on `channel`, on the worker's subscriber connection
-- for this URL. Does not wait: the subscription starts once that
-- connection is up, and is made again after a reconnect (messages
-- published while it was down are lost: pub/sub is fire-and-forget).
-- The subscription belongs to the app generation that made it: it stops
-- when a hot reload replaces that generation (subscribe again from
-- app.lua, which the new generation runs).
-- @treturn userdata a handle: `h:unsubscribe()`, `h:active()`
-- @usage r:subscribe("orders", function(msg) log.info("order", { id = msg }) end)
function Client:subscribe(channel, fn)
  return subscribe(self, false, channel, fn, "subscribe")
end

--- Like subscribe, for a glob pattern; calls `fn(message, channel, pattern)`.
function Client:psubscribe(pattern, fn)
  return subscribe(self, true, pattern, fn, "psubscribe")
end

--- The state of this worker's connection (not Redis's INFO: r:info() is that): `{ state = "idle"|"connecting"|
-- "ready"|"down", pending = N, error = "last failure", subscriptions = N }`.
function Client:status()
  local i = core.info(self.conn)
  local sub = rawget(self, "subconn")
  if sub then i.subscriber = core.info(sub) end
  return i
end

return _M
