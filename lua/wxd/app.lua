--- wxd.app: the application object — router, middleware, request, response.
--
-- An app's `app.lua` builds one of these and returns it; the core calls
-- `app:handle(raw)` once per request inside a coroutine. Everything here is
-- on the hot path, so the request object *is* the raw table built by C (we
-- only set a metatable on it), parsing is lazy, and a static route costs one
-- hash lookup.
--
-- @module wxd.app
-- @usage
-- local app = require("wxd.app").new()
-- app:get("/hello", function(req, res) return "hello world\n" end)
-- app:get("/orders/:id", function(req, res) return { id = req.params.id } end)
-- return app

local json       = require("wxd.json")
local util       = require("wxd.util")
local native_parse_query = require("wxd.core.http").parse_query
local trace_current = require("wxd.trace").current

local type         = type
local next         = next
local pairs        = pairs
local ipairs       = ipairs
local error        = error
local tostring     = tostring
local rawget       = rawget
local rawset       = rawset
local setmetatable = setmetatable
local getmetatable = getmetatable
local str_find     = string.find
local str_sub      = string.sub
local str_lower    = string.lower
local str_upper    = string.upper
local str_byte     = string.byte
local str_gsub     = string.gsub
local str_format   = string.format
local tbl_concat   = table.concat
local tbl_sort     = table.sort
local json_encode  = json.encode
local json_decode  = json.decode

local _M = { _VERSION = "0.1.0" }

-- Key under which app:any() handlers are stored in a node's method table.
-- It contains a NUL byte, so it can never collide with a real method token.
local ANY = "\0any"

local TEXT_CT = "text/plain; charset=utf-8"
local JSON_CT = "application/json"
local TEXT_HEADERS = { ["content-type"] = TEXT_CT }
local JSON_HEADERS = { ["content-type"] = JSON_CT }

local NOT_FOUND_BODY   = '{"error":"not found"}'
local NOT_ALLOWED_BODY = '{"error":"method not allowed"}'

-- Query strings and form bodies stop being parsed after this many pairs:
-- a bounded amount of work per request whatever a client sends (the same
-- idea as PHP's max_input_vars). The URI and the body are size-limited by
-- the core too, so this only bounds the CPU spent on pathological input.
local MAX_PARAMS = 1000
_M.MAX_PARAMS = MAX_PARAMS

-- A short, printable rendering of a value for error messages.
local function repr(v)
  if type(v) == "string" then
    if #v > 60 then v = str_sub(v, 1, 57) .. "..." end
    v = str_gsub(v, '[%c"\\]', function(c)
      if c == "\n" then return "\\n" end
      if c == "\r" then return "\\r" end
      if c == '"' or c == "\\" then return "\\" .. c end
      return str_format("\\%03d", str_byte(c))
    end)
    return '"' .. v .. '"'
  end
  return tostring(v)
end


------------------------------------------------------------------------
-- URL helpers
------------------------------------------------------------------------

-- Percent-decoding and -encoding live in wxd.util (lower modules use
-- them too); the app keeps exporting them.
local url_decode = util.url_decode
_M.url_decode = util.url_decode
_M.url_encode = util.url_encode

--- Parse an `application/x-www-form-urlencoded` string (a query string or a
-- form body).
-- Pairs are separated by `&`; names and values are percent-decoded and `+`
-- becomes a space; a pair without `=` (or with an empty value) gives `""`;
-- pairs with an empty name are skipped; after `MAX_PARAMS` pairs the rest
-- is ignored.
-- @tparam string s the string, without a leading `?`
-- @tparam[opt] boolean all when true, every value of a repeated name is
--   kept: the result maps each name to an array of values
-- @treturn table name → value (last one wins), or name → array of values
-- @usage local q = app.parse_query("a=1&b=x+y&a=2")  --> { a = "2", b = "x y" }
local function parse_query(s, all)
  -- One native pass (core/query.c): this runs on every WeChat callback.
  return native_parse_query(s, all, MAX_PARAMS)
end
_M.parse_query = parse_query


------------------------------------------------------------------------
-- Request
------------------------------------------------------------------------

-- Request headers arrive from C with lower-cased names; this lets
-- `req.headers["Content-Type"]` find them too.
local REQ_HEADERS_MT = {
  __index = function(t, k)
    if type(k) == "string" then
      local l = str_lower(k)
      if l ~= k then
        return rawget(t, l)
      end
    end
    return nil
  end,
}

local req_methods = {}
local req_lazy = {}

--- Value of a request header, looked up case-insensitively.
-- @tparam string name header name, any case
-- @treturn ?string value (repeated headers are joined with ", ") or nil
-- @usage local token = req:header("X-Token")
function req_methods.header(self, name)
  return rawget(self, "headers")[name]
end

--- Decode the body as JSON.
-- A client sent it, so a bad body is an expected failure, not an error.
-- @treturn ?table the decoded object or array
-- @treturn ?string `"empty body"`, `"invalid json"` or `"not a json object or array"`
-- @treturn ?string for invalid JSON, the decoder's message
-- @usage local data, err = req:json()
-- if not data then return 400, { error = err } end
function req_methods.json(self)
  local body = rawget(self, "body")
  if body == nil or body == "" then
    return nil, "empty body"
  end
  local v, err, detail = json_decode(body)
  if err then
    return nil, err, detail
  end
  if type(v) ~= "table" then
    return nil, "not a json object or array"
  end
  return v
end

--- Parse an `application/x-www-form-urlencoded` body.
-- The result is cached on the request (same table on each call).
-- @treturn ?table name → value (last one wins)
-- @treturn ?string `"not a form"` when the content type is something else
-- @usage local form, err = req:form()
function req_methods.form(self)
  local f = rawget(self, "_form")
  if f then
    return f
  end
  local ct = rawget(self, "headers")["content-type"]
  if ct == nil or not str_find(str_lower(ct), "^%s*application/x%-www%-form%-urlencoded%s*[;]?") then
    return nil, "not a form"
  end
  f = parse_query(rawget(self, "body") or "")
  rawset(self, "_form", f)
  return f
end

--- All values of a repeated query parameter, in order.
-- `req.query.k` gives only the last one.
-- @tparam string name parameter name (decoded)
-- @treturn table array of values, empty when the parameter is absent
-- @usage for _, tag in ipairs(req:query_all("tag")) do ... end
function req_methods.query_all(self, name)
  local all = rawget(self, "_query_all")
  if all == nil then
    all = parse_query(rawget(self, "query_string"), true)
    rawset(self, "_query_all", all)
  end
  local list = all[name]
  if list == nil then
    return {}
  end
  local copy = {}
  for i = 1, #list do
    copy[i] = list[i]
  end
  return copy
end

-- Lazy fields: computed on first access and stored on the request, so that
-- a handler that never looks at them pays nothing.
function req_lazy.query(self)
  local q = parse_query(rawget(self, "query_string"))
  rawset(self, "query", q)
  return q
end

function req_lazy.params(self)
  local p = {}
  rawset(self, "params", p)
  return p
end

-- A per-request scratch table for middleware to hand data to handlers.
function req_lazy.ctx(self)
  local c = {}
  rawset(self, "ctx", c)
  return c
end

function req_lazy.http_version(self)
  return rawget(self, "version")
end

-- The request's trace context (wxd.trace.current()), made once.
function req_lazy.trace(self)
  local t = trace_current()
  rawset(self, "trace", t)
  return t
end

-- "https" on an HTTPS listener (the core sets req.tls there), else "http".
function req_lazy.scheme(self)
  return rawget(self, "tls") and "https" or "http"
end

local REQ_MT = {
  __index = function(self, k)
    local m = req_methods[k]
    if m then
      return m
    end
    local lazy = req_lazy[k]
    if lazy then
      return lazy(self)
    end
    return nil
  end,
}


------------------------------------------------------------------------
-- Response
------------------------------------------------------------------------

-- Header names are few and mostly constants, so a valid one is remembered:
-- the pattern test runs once per distinct name, not once per response.
-- The cache is bounded so that names built from data cannot grow it forever.
local valid_names, n_valid_names = {}, 0

-- RFC 9110 token characters.
local function check_name(name, level)
  if valid_names[name] then
    return
  end
  if type(name) ~= "string" or name == "" or str_find(name, "[^%w!#$%%&'*+%-.^_`|~]") then
    error("wxd.app: invalid header name " .. repr(name), level + 1)
  end
  if n_valid_names < 1024 then
    valid_names[name] = true
    n_valid_names = n_valid_names + 1
  end
end

-- A CR or LF in a value would let data end the header block early
-- (response splitting); that is always a bug in the app, so we raise.
-- Plain finds, unlike a pattern, are compiled by the JIT.
local function check_value(name, v, level)
  local tv = type(v)
  if tv == "string" then
    if str_find(v, "\n", 1, true) or str_find(v, "\r", 1, true) or str_find(v, "\0", 1, true) then
      error("wxd.app: header " .. name .. ": value contains CR, LF or NUL: "
        .. repr(v), level + 1)
    end
  elseif tv == "table" then
    for i = 1, #v do
      check_value(name, v[i], level + 1)
      if type(v[i]) == "table" then
        error("wxd.app: header " .. name .. ": nested table in value", level + 1)
      end
    end
  elseif tv ~= "number" and v ~= nil then
    error("wxd.app: header " .. name .. ": expected a string, a number or an array of strings, got a "
      .. tv, level + 1)
  end
end

-- Response headers: a plain table (pairs/next and C's lua_next see only the
-- headers) whose metatable keeps names unique case-insensitively. Adding a
-- name removes any other spelling of it, so the last one set wins, and
-- reading finds any spelling.
local RES_HEADERS_MT = {}

RES_HEADERS_MT.__index = function(t, k)
  if type(k) ~= "string" then
    return nil
  end
  local lk = str_lower(k)
  for name, v in next, t do
    if str_lower(name) == lk then
      return v
    end
  end
  return nil
end

RES_HEADERS_MT.__newindex = function(t, k, v)
  check_name(k, 2)
  check_value(k, v, 2)
  local lk = str_lower(k)
  for name in next, t do
    if str_lower(name) == lk then
      rawset(t, name, nil)
    end
  end
  if v ~= nil then
    rawset(t, k, v)
  end
end

-- `res.headers = tbl` keeps tbl (same identity) but gives it our metatable.
-- Two spellings of one name in a table literal have no "last", so that is
-- refused rather than resolved at random.
local function adopt_headers(h, level)
  if type(h) ~= "table" then
    error("wxd.app: res.headers must be a table, got a " .. type(h), level + 1)
  end
  local mt = getmetatable(h)
  if mt == RES_HEADERS_MT then
    return h
  end
  if mt ~= nil then
    error("wxd.app: res.headers must be a plain table (it has a metatable)", level + 1)
  end
  local seen = {}
  for k, v in next, h do
    check_name(k, level + 1)
    check_value(k, v, level + 1)
    local lk = str_lower(k)
    if seen[lk] then
      error("wxd.app: res.headers has both " .. repr(seen[lk]) .. " and " .. repr(k)
        .. "; use one spelling", level + 1)
    end
    seen[lk] = k
  end
  return setmetatable(h, RES_HEADERS_MT)
end

local res_methods = {}

--- Set a response header, replacing any value under any spelling of the name.
-- @tparam string name header name
-- @tparam string|number|table value value, or an array of values (sent as
--   repeated headers, e.g. Set-Cookie); nil removes the header
-- @usage res:set_header("Cache-Control", "no-store")
function res_methods.set_header(self, name, value)
  check_name(name, 2)
  check_value(name, value, 2)
  self.headers[name] = value
end

--- Add a value to a response header, keeping the values already there (for
-- headers that may repeat, such as Set-Cookie).
-- @tparam string name header name
-- @tparam string value value
-- @usage res:add_header("Set-Cookie", "a=1; HttpOnly")
function res_methods.add_header(self, name, value)
  check_name(name, 2)
  check_value(name, value, 2)
  local h = self.headers
  local old = h[name]
  if old == nil then
    h[name] = value
  elseif type(old) == "table" then
    old[#old + 1] = value
  else
    h[name] = { old, value }
  end
end

--- Set the body to the JSON encoding of a table and the content type to JSON.
-- An unencodable value is a bug in the app, so it raises.
-- @tparam table tbl value to encode
-- @usage res:json({ ok = true }); return
function res_methods.json(self, tbl)
  rawset(self, "body", json_encode(tbl))
  self.headers["content-type"] = JSON_CT
end

--- Redirect to another URL.
-- @tparam string url target (absolute or relative)
-- @tparam[opt=302] number status a 3xx status
-- @usage return res:redirect("/login")
function res_methods.redirect(self, url, status)
  if type(url) ~= "string" or url == "" then
    error("wxd.app: redirect URL must be a non-empty string", 2)
  end
  check_value("Location", url, 2)
  status = status or 302
  if type(status) ~= "number" or status < 300 or status > 399 or status % 1 ~= 0 then
    error("wxd.app: redirect status must be a 3xx integer, got " .. repr(status), 2)
  end
  rawset(self, "status", status)
  rawset(self, "body", nil)
  self.headers["location"] = url
end

--- Stream a piece of the body now. The first call sends the status and the
-- headers set so far (chunked transfer coding; close-delimited for HTTP/1.0
-- clients); headers set afterwards are not sent. Waits, without blocking
-- the worker, while the client reads slowly.
-- @tparam string chunk bytes to send
-- @treturn true|nil
-- @treturn ?string "closed" when the client went away
-- @usage for row in rows() do local ok = res:write(row); if not ok then break end end
function res_methods.write(self, chunk)
  if type(chunk) ~= "string" then
    error("wxd.app: res:write expects a string, got a " .. type(chunk), 2)
  end
  local h = rawget(self, "_headers")
  if h ~= nil and not rawget(self, "_streamed") then
    for k, v in next, h do
      check_value(k, v, 2)
      if type(v) == "number" then rawset(h, k, tostring(v)) end
    end
  end
  rawset(self, "_streamed", true)
  return require("wxd.core.http").write(chunk, rawget(self, "status"), h)
end

-- `res.headers` is created on first use (most responses set none) and is
-- kept under a private key, so that every assignment to `res.headers`
-- goes through adopt_headers().
local RES_MT = {
  __index = function(self, k)
    if k == "headers" then
      local h = rawget(self, "_headers")
      if h == nil then
        h = setmetatable({}, RES_HEADERS_MT)
        rawset(self, "_headers", h)
      end
      return h
    end
    return res_methods[k]
  end,
  __newindex = function(self, k, v)
    if k == "headers" then
      if v ~= nil then
        v = adopt_headers(v, 2)
      end
      rawset(self, "_headers", v)
      return
    end
    rawset(self, k, v)
  end,
}


------------------------------------------------------------------------
-- Router
------------------------------------------------------------------------

-- Dynamic routes live in a trie of path segments. A node is
--   { children = { [segment] = node }, param = node?, wild = methods?,
--     methods = methods? }
-- where `methods` maps a method (or ANY) to a route object
--   { fn = handler, pattern = "/a/:b", pnames = { [i] = name }?,
--     nscan = segments to scan for params, wild = name? }.
-- Fully static routes are kept only in a hash keyed by the whole path,
-- which is also the most specific match there can be.

local function new_node()
  return { children = {} }
end

-- The route of a method table for a method: exact method first, then GET
-- for HEAD (the core strips the body), then app:any(), which never takes
-- TRACE: echoing a request back (cookies, auth headers included) is
-- something a route must ask for by name, e.g. app:route("TRACE", ...).
local function pick(methods, method)
  local r = methods[method]
  if r then
    return r
  end
  if method == "HEAD" then
    r = methods.GET
    if r then
      return r
    end
  end
  if method ~= "TRACE" then
    return methods[ANY]
  end
  return nil
end

-- Backtracking match: at each segment try the static child, then the
-- parameter, then the wildcard, so static beats param beats wildcard and a
-- more specific route that lacks the method does not hide a less specific
-- one that has it. `pos` is the index of the segment's first byte.
local function match(node, path, pos, len, method)
  local slash = str_find(path, "/", pos, true)
  local child, r
  if slash then
    child = node.children[str_sub(path, pos, slash - 1)]
    if child then
      r = match(child, path, slash + 1, len, method)
      if r then
        return r
      end
    end
    child = node.param
    if child and slash > pos then
      r = match(child, path, slash + 1, len, method)
      if r then
        return r
      end
    end
  else
    child = node.children[str_sub(path, pos)]
    if child and child.methods then
      r = pick(child.methods, method)
      if r then
        return r
      end
    end
    child = node.param
    if child and pos <= len and child.methods then
      r = pick(child.methods, method)
      if r then
        return r
      end
    end
  end
  local wild = node.wild
  if wild then
    return pick(wild, method)
  end
  return nil
end

local function lookup(self, method, path)
  local e = self._static[path]
  if e then
    local r = pick(e, method)
    if r then
      return r
    end
  end
  if self._dynamic and str_byte(path, 1) == 47 then -- '/'
    return match(self._root, path, 2, #path, method)
  end
  return nil
end

-- Params of a matched dynamic route, percent-decoded (but '+' kept).
local function extract(route, path)
  local params = {}
  local pnames = route.pnames
  local pos = 2
  for i = 1, route.nscan do
    local slash = str_find(path, "/", pos, true)
    local name = pnames[i]
    if name then
      params[name] = url_decode(str_sub(path, pos, (slash or 0) - 1))
    end
    if not slash then
      pos = #path + 1
      break
    end
    pos = slash + 1
  end
  if route.wild then
    params[route.wild] = url_decode(str_sub(path, pos))
  end
  return params
end

-- The methods that would be routed for this path: the Allow header of a 405.
local function allowed_methods(self, path)
  local list, has = {}, {}
  for m in pairs(self._methods) do
    if lookup(self, m, path) then
      list[#list + 1] = m
      has[m] = true
    end
  end
  if has.GET and not has.HEAD then
    list[#list + 1] = "HEAD"
  end
  tbl_sort(list)
  return list
end

local function split_pattern(pattern)
  local segs = {}
  local pos = 2
  while true do
    local slash = str_find(pattern, "/", pos, true)
    if not slash then
      segs[#segs + 1] = str_sub(pattern, pos)
      return segs
    end
    segs[#segs + 1] = str_sub(pattern, pos, slash - 1)
    pos = slash + 1
  end
end

local function route_error(pattern, msg)
  error("wxd.app: route " .. repr(pattern) .. ": " .. msg, 4)
end

local function add_route(self, methods, pattern, fn)
  if type(pattern) ~= "string" then
    error("wxd.app: route pattern must be a string, got a " .. type(pattern), 3)
  end
  if str_byte(pattern, 1) ~= 47 then
    route_error(pattern, "pattern must start with '/'")
  end
  if type(fn) ~= "function" then
    route_error(pattern, "handler must be a function, got a " .. type(fn))
  end
  if type(methods) == "string" then
    methods = { methods }
  end
  if type(methods) ~= "table" or methods[1] == nil then
    route_error(pattern, "expected a method or a non-empty list of methods")
  end

  local segs = split_pattern(pattern)
  local nseg = #segs
  local route = { fn = fn, pattern = pattern, nscan = 0 }
  local dynamic = false
  local seen = {}
  for i = 1, nseg do
    local seg = segs[i]
    local c = str_byte(seg, 1)
    if c == 58 or c == 42 then -- ':' or '*'
      dynamic = true
      local name = str_sub(seg, 2)
      if c == 42 then
        if i ~= nseg then
          route_error(pattern, "a wildcard must be the last segment")
        end
        if name == "" then
          name = "*"
        end
      elseif name == "" then
        route_error(pattern, "empty parameter name")
      end
      if name ~= "*" and not str_find(name, "^[%a_][%w_]*$") then
        route_error(pattern, "invalid parameter name " .. repr(name)
              .. " (letters, digits and '_')")
      end
      if seen[name] then
        route_error(pattern, "parameter " .. repr(name) .. " appears twice")
      end
      seen[name] = true
      if c == 42 then
        route.wild = name
        route.nscan = nseg - 1
      else
        route.pnames = route.pnames or {}
        route.pnames[i] = name
        route.nscan = i
      end
    end
  end
  route.pnames = route.pnames or {}

  -- Where this route's handlers go.
  local target
  if not dynamic then
    target = self._static[pattern]
    if not target then
      target = {}
      self._static[pattern] = target
    end
    route.pnames, route.nscan = nil, nil
  else
    self._dynamic = true
    local node = self._root
    for i = 1, nseg do
      local seg = segs[i]
      local c = str_byte(seg, 1)
      if c == 42 then
        target = node.wild
        if not target then
          target = {}
          node.wild = target
        end
        break
      elseif c == 58 then
        local p = node.param
        if not p then
          p = new_node()
          node.param = p
        end
        node = p
      else
        local ch = node.children[seg]
        if not ch then
          ch = new_node()
          node.children[seg] = ch
        end
        node = ch
      end
      if i == nseg then
        target = node.methods
        if not target then
          target = {}
          node.methods = target
        end
      end
    end
  end

  -- Validate every method before registering any, so that a failed call
  -- leaves the router as it was.
  local list = {}
  for i = 1, #methods do
    local m = methods[i]
    if m ~= ANY then
      if type(m) ~= "string" or not str_find(m, "^[%w!#$%%&'*+%-.^_`|~]+$") then
        route_error(pattern, "invalid method " .. repr(m))
      end
      m = str_upper(m)
    end
    local old = target[m] or list[m]
    if old then
      route_error(pattern, "duplicate route " .. (m == ANY and "ANY" or m) .. " "
            .. pattern .. (old.pattern ~= pattern and " (same as " .. old.pattern .. ")" or ""))
    end
    list[m] = route
    list[#list + 1] = m
  end
  for i = 1, #list do
    local m = list[i]
    target[m] = route
    if m ~= ANY then
      self._methods[m] = true
    end
  end
end


------------------------------------------------------------------------
-- App
------------------------------------------------------------------------

local app_methods = {}
local APP_MT = { __index = app_methods }

--- Create an app.
-- @treturn table the app
-- @usage local app = require("wxd.app").new()
function _M.new()
  return setmetatable({
    _static  = {},         -- whole path → method table (static routes)
    _root    = new_node(), -- trie of dynamic routes
    _dynamic = false,      -- any dynamic route registered?
    _methods = {},         -- every method some route accepts (for Allow)
    _before  = {}, _nbefore = 0,
    _after   = {}, _nafter  = 0,
  }, APP_MT)
end

--- Register a handler for one or more methods.
-- Patterns: static segments match exactly (against the raw, still encoded
-- path); `:name` matches one non-empty segment; `*` or `*name` as the last
-- segment matches the rest of the path (possibly empty, possibly with
-- slashes). Params are percent-decoded into `req.params`. A trailing slash
-- is significant. A malformed pattern or a duplicate route raises.
-- @tparam string|table methods "GET" or { "GET", "POST" }
-- @tparam string pattern e.g. "/orders/:id"
-- @tparam function fn handler(req, res) → body | status, body | nil
-- @treturn table the app
-- @usage app:route({ "GET", "POST" }, "/x", function(req, res) return "x" end)
function app_methods.route(self, methods, pattern, fn)
  add_route(self, methods, pattern, fn) -- not a tail call: error levels count this frame
  return self
end

--- Register a handler for every method (an explicit method route on the
-- same pattern takes precedence).
-- @tparam string pattern route pattern
-- @tparam function fn handler
-- @treturn table the app
function app_methods.any(self, pattern, fn)
  add_route(self, ANY, pattern, fn)
  return self
end

for _, m in ipairs({ "get", "post", "put", "patch", "delete", "options", "head" }) do
  local method = str_upper(m)
  app_methods[m] = function(self, pattern, fn)
    add_route(self, method, pattern, fn)
    return self
  end
end

--- Registers payment-order hooks of this app (see wxd.order.hooks):
-- `app:order_hooks{ on_enter = { PAID = function(order, event) ... end }, on_late = fn }`.
-- They belong to the generation that registers them (hot reload replaces them).
-- @treturn table the app
function app_methods.order_hooks(self, t)
  require("wxd.order").hooks(t)
  return self
end

--- Add a middleware that runs before the handler, in registration order.
-- A non-nil return value short-circuits: the later middlewares and the
-- handler are skipped and the value becomes the response, exactly as a
-- handler's return value would.
-- @tparam function fn middleware(req, res)
-- @treturn table the app
-- @usage app:before(function(req, res)
--   if not req:header("x-token") then return 401, "no token\n" end
-- end)
function app_methods.before(self, fn)
  if type(fn) ~= "function" then
    error("wxd.app: middleware must be a function, got a " .. type(fn), 2)
  end
  local n = self._nbefore + 1
  self._before[n] = fn
  self._nbefore = n
  return self
end

--- Add a middleware that runs after the handler (also after a
-- short-circuit, a 404 or a 405), in registration order. It may change
-- `res`; its return value is ignored.
-- @tparam function fn middleware(req, res)
-- @treturn table the app
function app_methods.after(self, fn)
  if type(fn) ~= "function" then
    error("wxd.app: middleware must be a function, got a " .. type(fn), 2)
  end
  local n = self._nafter + 1
  self._after[n] = fn
  self._nafter = n
  return self
end

--- Mount a WeChat message callback (Official Account, Mini Program,
-- WeCom) at `path`: GET verification and POST messages. See wxd.mp.
-- @tparam string path e.g. "/wx"
-- @tparam table cfg token, appid, aes_key, ... (docs/mp.md)
-- @tparam table handlers by MsgType, `event`, `default`
-- @treturn table the app
function app_methods.mp(self, path, cfg, handlers)
  -- A tail call (mount returns the app): a bad cfg is reported at the caller's line.
  return require("wxd.mp").mount(self, path, cfg, handlers)
end

--- The route a request would reach, for tools and tests.
-- @tparam string method request method
-- @tparam string path raw request path
-- @treturn ?string the route's pattern
-- @treturn ?table its params
function app_methods.match(self, method, path)
  local r = lookup(self, method, path)
  if not r then
    return nil
  end
  return r.pattern, r.pnames and extract(r, path) or {}
end

-- Turn a handler's (or a short-circuiting middleware's) return values into
-- the response; returns the default content type for the body, if any.
local function apply(res, a, b)
  if type(a) == "number" then
    rawset(res, "status", a)
    a = b
  end
  local ta = type(a)
  if ta == "string" then
    rawset(res, "body", a)
    return TEXT_CT
  elseif a == nil or a == res then
    return nil
  elseif ta == "table" then
    rawset(res, "body", json_encode(a))
    return JSON_CT
  end
  error("wxd.app: a handler returned a " .. ta
    .. "; expected a string, a table, a status and a body, or nil", 0)
end

-- Check the response and hand it to the core.
local function finish(res, ctype)
  local status = rawget(res, "status")
  if type(status) ~= "number" or status % 1 ~= 0 or status < 100 or status > 999 then
    error("wxd.app: invalid status " .. repr(status) .. " (expected an integer in 100..999)", 0)
  end
  local body = rawget(res, "body")
  if rawget(res, "_streamed") then
    -- Status and headers are on the wire already; a body is the last piece.
    return status, nil, body
  end
  if body ~= nil and type(body) ~= "string" then
    if type(body) ~= "number" then
      error("wxd.app: res.body must be a string or nil, got a " .. type(body)
        .. " (use res:json() or return the table)", 0)
    end
    body = tostring(body)
  end
  local h = rawget(res, "_headers")
  if h == nil then
    -- Shared, never modified: the core only reads the headers table.
    if ctype == TEXT_CT then
      return status, TEXT_HEADERS, body
    elseif ctype == JSON_CT then
      return status, JSON_HEADERS, body
    elseif ctype then
      return status, { ["content-type"] = ctype }, body
    end
    return status, nil, body
  end
  -- Values may have been replaced in place (no metamethod runs for an
  -- existing key), so check them all again; the core gets strings only.
  for k, v in next, h do
    check_value(k, v, 1)
    if type(v) == "number" then
      rawset(h, k, tostring(v))
    elseif type(v) == "table" then
      for i = 1, #v do
        if type(v[i]) == "number" then
          v[i] = tostring(v[i])
        end
      end
    end
  end
  if ctype and h["content-type"] == nil then
    rawset(h, "content-type", ctype)
  end
  return status, h, body
end

--- Handle one request; called by the core inside the request's coroutine.
-- The raw table becomes the request object (a metatable is set on it;
-- the core passes `query_string`; a raw `query` is accepted too). Errors raised by middleware or
-- handlers propagate: the core turns them into a 500 with the request id.
-- @tparam table raw request built by the core (method, path, query,
--   version, headers, body, remote_addr, remote_port, id)
-- @treturn integer status
-- @treturn ?table headers: name → string or array of strings
-- @treturn ?string body
function app_methods.handle(self, req)
  local method, path = req.method, req.path

  -- Routing first: params are then visible to `before` middlewares.
  local route
  local e = self._static[path]
  if e then
    route = e[method] or pick(e, method)
  end
  if route == nil and self._dynamic and str_byte(path, 1) == 47 then
    route = match(self._root, path, 2, #path, method)
  end

  -- The core sets query_string; a hand-built raw table may use `query`.
  if req.query_string == nil then
    req.query_string = req.query or ""
    req.query = nil
  end
  local rh = req.headers
  if rh then
    setmetatable(rh, REQ_HEADERS_MT)
  else
    req.headers = setmetatable({}, REQ_HEADERS_MT)
  end
  setmetatable(req, REQ_MT)
  if route then
    -- The pattern, never the path: metrics label requests with it.
    req.route = route.pattern
    if route.pnames then
      req.params = extract(route, path)
    end
  end

  local res = setmetatable({ status = 200 }, RES_MT)
  local ctype, a, b

  local short = false
  local before = self._before
  for i = 1, self._nbefore do
    a, b = before[i](req, res)
    if a ~= nil then
      short = true
      break
    end
  end

  if short then
    ctype = apply(res, a, b)
  elseif route then
    a, b = route.fn(req, res)
    if a ~= nil then
      ctype = apply(res, a, b)
    end
  else
    local allow = allowed_methods(self, path)
    if allow[1] or method == "TRACE" then
      rawset(res, "status", 405)
      rawset(res, "body", NOT_ALLOWED_BODY)
      if allow[1] then
        res.headers["allow"] = tbl_concat(allow, ", ")
      end
    else
      rawset(res, "status", 404)
      rawset(res, "body", NOT_FOUND_BODY)
    end
    ctype = JSON_CT
  end

  local after = self._after
  for i = 1, self._nafter do
    after[i](req, res)
  end

  return finish(res, ctype)
end

return _M
