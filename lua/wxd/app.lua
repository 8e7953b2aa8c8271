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
local log        = require("wxd.log")
local cookie     = require("wxd.cookie")
local static     = require("wxd.static")
local multipart  = require("wxd.multipart")
local cors       = require("wxd.cors")
local native_parse_query = require("wxd.core.http").parse_query
local trace_current = require("wxd.trace").current
local gray       = require("wxd.gray")
local wxd        = require("wxd")
local gray_apply = gray.apply

local type         = type
local next         = next
local pairs        = pairs
local ipairs       = ipairs
local error        = error
local xpcall       = xpcall
local traceback    = debug.traceback
local tostring     = tostring
local rawget       = rawget
local rawset       = rawset
local setmetatable = setmetatable
local newproxy     = newproxy
local getmetatable = getmetatable
local str_find     = string.find
local str_sub      = string.sub
local str_lower    = string.lower
local str_upper    = string.upper
local str_byte     = string.byte
local str_gsub     = string.gsub
local str_format   = string.format
local str_match    = string.match
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
--   kept: the result maps each name to an array of values, and a name
--   written as an array (`a[]`, also encoded `a%5B%5D`) counts as `a`
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

-- `a[]` and `a` name one parameter in the lists of all values.
local function array_name(name)
  if type(name) ~= "string" then
    error("wxd.app: parameter name must be a string, got a " .. type(name), 3)
  end
  if #name > 2 and str_sub(name, -2) == "[]" then
    return str_sub(name, 1, -3)
  end
  return name
end

-- The temp files a request's multipart parts went to. They are removed
-- when app:handle returns; should the request fail with an error instead,
-- the list's finaliser removes them when the request is collected.
local function new_tmp_list()
  local list = {}
  local proxy = newproxy(true)
  getmetatable(proxy).__gc = function()
    multipart.remove_files(list)
  end
  list.sentinel = proxy
  return list
end

--- Parse a `multipart/form-data` body (see wxd.multipart for the limits
-- and their defaults). File parts above `file_threshold` bytes are written
-- to temp files (`part.path`), removed when the request ends; smaller ones
-- and fields are strings (`part.data`). The core has already read the
-- whole body into memory (limits.max_body_bytes bounds it). The result is
-- cached: later calls return it whatever their options.
-- @tparam[opt] table opts max_parts, max_files, max_part_bytes,
--   max_field_bytes, max_total_bytes, max_header_bytes, file_threshold
-- @treturn ?table { fields = name → string, files = name → part, parts = list }
-- @treturn ?string "not multipart", "too large", "malformed" or "cannot store file"
-- @treturn ?number the status to answer with: 415, 413, 400 or 500
-- @usage local form, err, status = req:multipart()
-- if not form then return status, { error = err } end
function req_methods.multipart(self, opts)
  local form = rawget(self, "_multipart")
  if form then
    return form
  end
  local boundary = multipart.boundary(rawget(self, "headers")["content-type"])
  if not boundary then
    return nil, "not multipart", 415
  end
  local tmp = rawget(self, "_tmp")
  if not tmp then
    tmp = new_tmp_list()
    rawset(self, "_tmp", tmp)
  end
  local err, status
  form, err, status = multipart.parse(rawget(self, "body") or "", boundary, opts, tmp)
  if not form then
    return nil, err, status
  end
  rawset(self, "_multipart", form)
  return form
end

--- All values of a repeated query parameter, in order.
-- `req.query.k` gives only the last one. Repeats (`tag=a&tag=b`) and the
-- array syntax (`tag[]=a&tag[]=b`) are the same here: both give
-- `{ "a", "b" }` for `req:query_all("tag")` (or `"tag[]"`).
-- @tparam string name parameter name (decoded)
-- @treturn table array of values, empty when the parameter is absent
-- @usage for _, tag in ipairs(req:query_all("tag")) do ... end
function req_methods.query_all(self, name)
  name = array_name(name)
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

-- The Cookie header as a table (wxd.cookie.parse: lenient, bounded, first
-- of a repeated name wins, values as sent).
function req_lazy.cookies(self)
  local c = cookie.parse(rawget(self, "headers").cookie)
  rawset(self, "cookies", c)
  return c
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

--- Add a Set-Cookie header (several cookies give several headers).
-- Defaults: Path=/, HttpOnly, SameSite=Lax, and Secure when the request
-- came over HTTPS. A name that is not a token, a value with characters a
-- cookie cannot carry (space, '"', ',', ';', '\\', controls) or a bad
-- option raises (see wxd.cookie).
-- @tparam string name cookie name
-- @tparam string value cookie value (percent-encode anything else)
-- @tparam[opt] table opts path, domain, max_age, expires, secure,
--   http_only, same_site, partitioned
-- @usage res:set_cookie("sid", id, { max_age = 3600 })
function res_methods.set_cookie(self, name, value, opts)
  local v = cookie.serialize(name, value, opts, rawget(self, "_secure"), 2)
  self:add_header("Set-Cookie", v)
end

--- Tell the client to delete a cookie (an empty value, Max-Age=0 and an
-- Expires in the past). Path and domain must be those it was set with.
-- @tparam string name cookie name
-- @tparam[opt] table opts path, domain, secure, same_site ...
function res_methods.clear_cookie(self, name, opts)
  local o = {}
  for k, v in pairs(opts or {}) do
    o[k] = v
  end
  o.max_age, o.expires = 0, 0
  self:add_header("Set-Cookie", cookie.serialize(name, "", o, rawget(self, "_secure"), 2))
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

-- `group` is the route group the route was registered through (nil for
-- the app itself): its middleware and error handlers apply to the route.
local function add_route(self, methods, pattern, fn, group, opts)
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
  local route = { fn = fn, pattern = pattern, nscan = 0, group = group }
  if opts ~= nil then
    for k, v in pairs(opts) do
      if k == "max_body" then
        local n = util.parse_size(v)
        if not n then
          route_error(pattern, "max_body must be a size (bytes, or a string such as \"20m\"), got " .. repr(v))
        end
        route.max_body = n
      else
        route_error(pattern, "unknown route option " .. repr(k))
      end
    end
  end
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
  if route.max_body then
    if self._select then
      -- The core asks for a limit before the head reaches a selector.
      route_error(pattern, "max_body is not supported in a group selected by host or header")
    end
    self._body_limits = true
  end
end

-- `fn` or `opts, fn` after a pattern.
local function handler_args(a, b)
  if type(a) == "table" then
    return b, a
  end
  return a, nil
end


------------------------------------------------------------------------
-- App and route groups
------------------------------------------------------------------------

-- An app and its route groups share the registration methods below (in
-- them `self` is the app, or a group with self._app set). A group puts its
-- routes into the app's one router under its prefix, so routing costs the
-- same with or without groups; what the group adds is its own middleware
-- and error handlers, found through route.group.
local app_methods = {}
local APP_MT = { __index = app_methods }
local group_methods = {}
local GROUP_MT = { __index = group_methods }
local shared = {}

local function owner(self)
  return self._app or self
end

-- The router a route registered through self goes into: the innermost
-- selector group's own (two generations may route the same path), else
-- the app's.
local function router_of(self)
  return self._router or self._app or self
end

-- The full pattern of a route registered through an app or a group.
local function full_pattern(self, pattern)
  local prefix = self.prefix
  if prefix == nil or type(pattern) ~= "string" then
    return pattern -- add_route reports a pattern that is not a string
  end
  if pattern == "" then
    return prefix
  end
  if str_byte(pattern, 1) ~= 47 then
    error("wxd.app: route " .. repr(pattern) .. ": pattern must start with '/' (or be \"\" for the group's own path "
      .. prefix .. ")", 3)
  end
  return prefix .. pattern
end

local function group_of(self)
  if self._app then
    return self
  end
  return nil
end

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
    _groups  = {},         -- every route group, for requests no route matched
    _errors  = nil,        -- status → handler (app:on_error)
    _catch   = false,      -- a 500 handler exists somewhere
  }, APP_MT)
end

--- Register a handler for one or more methods.
-- Patterns: static segments match exactly (against the raw, still encoded
-- path); `:name` matches one non-empty segment; `*` or `*name` as the last
-- segment matches the rest of the path (possibly empty, possibly with
-- slashes). Params are percent-decoded into `req.params`. A trailing slash
-- is significant. A malformed pattern or a duplicate route raises.
-- On a group, the pattern is appended to the group's prefix ("" is the
-- prefix itself).
-- Options, as a table before the handler: `max_body` (bytes or "20m"),
-- this route's request body limit instead of limits.max_body_bytes,
-- larger or smaller, enforced by the core before it reads the body.
-- @tparam string|table methods "GET" or { "GET", "POST" }
-- @tparam string pattern e.g. "/orders/:id"
-- @tparam[opt] table opts { max_body = size }
-- @tparam function fn handler(req, res) → body | status, body | nil
-- @treturn table the app (or the group)
-- @usage app:route({ "GET", "POST" }, "/x", function(req, res) return "x" end)
function shared.route(self, methods, pattern, a, b)
  local fn, opts = handler_args(a, b)
  -- not a tail call: error levels count this frame
  add_route(router_of(self), methods, full_pattern(self, pattern), fn, group_of(self), opts)
  return self
end

--- Register a handler for every method (an explicit method route on the
-- same pattern takes precedence).
-- @tparam string pattern route pattern
-- @tparam function fn handler
-- @treturn table the app (or the group)
function shared.any(self, pattern, a, b)
  local fn, opts = handler_args(a, b)
  add_route(router_of(self), ANY, full_pattern(self, pattern), fn, group_of(self), opts)
  return self
end

for _, m in ipairs({ "get", "post", "put", "patch", "delete", "options", "head" }) do
  local method = str_upper(m)
  shared[m] = function(self, pattern, a, b)
    local fn, opts = handler_args(a, b)
    add_route(router_of(self), method, full_pattern(self, pattern), fn, group_of(self), opts)
    return self
  end
end

--- Add a middleware that runs before the handler, in registration order.
-- A non-nil return value short-circuits: the later middlewares and the
-- handler are skipped and the value becomes the response, exactly as a
-- handler's return value would. The app's middlewares run first, then
-- those of the request's groups, outermost first.
-- @tparam function fn middleware(req, res)
-- @treturn table the app (or the group)
-- @usage app:before(function(req, res)
--   if not req:header("x-token") then return 401, "no token\n" end
-- end)
function shared.before(self, fn)
  if type(fn) ~= "function" then
    error("wxd.app: middleware must be a function, got a " .. type(fn), 2)
  end
  local n = self._nbefore + 1
  self._before[n] = fn
  self._nbefore = n
  return self
end

--- The same as before(): `app:use(limit.middleware{ ... })`.
shared.use = shared.before

--- Add a middleware that runs after the handler (also after a
-- short-circuit, a 404 or a 405), in registration order. It may change
-- `res`; its return value is ignored. Those of the request's groups run
-- first, innermost first, then the app's.
-- @tparam function fn middleware(req, res)
-- @treturn table the app (or the group)
function shared.after(self, fn)
  if type(fn) ~= "function" then
    error("wxd.app: middleware must be a function, got a " .. type(fn), 2)
  end
  local n = self._nafter + 1
  self._after[n] = fn
  self._nafter = n
  return self
end

local ERROR_STATUSES = { [404] = true, [405] = true, [500] = true }

--- Set the handler of 404 (no route), 405 (no route for the method) or 500
-- (an error was raised) responses, for the app or for a group's requests.
-- A 404 or 405 handler gets `res` filled in as the default answer (status,
-- JSON body, `Allow` for a 405) and returns like a route handler. A 500
-- handler gets `(req, res, err)`: `err` is the value raised (the log gets
-- it with its traceback); `res` is a fresh response, a 500 with the
-- default text body, so nothing the failed handler set is sent unless
-- the handler sets it again.
-- @tparam number status 404, 405 or 500
-- @tparam function fn handler(req, res[, err])
-- @treturn table the app (or the group)
-- @usage app:on_error(404, function(req, res) return 404, "no such page\n" end)
function shared.on_error(self, status, fn)
  if not ERROR_STATUSES[status] then
    error("wxd.app: on_error: status must be 404, 405 or 500, got " .. repr(status), 2)
  end
  if type(fn) ~= "function" then
    error("wxd.app: on_error: handler must be a function, got a " .. type(fn), 2)
  end
  local errors = self._errors
  if not errors then
    errors = {}
    self._errors = errors
  end
  errors[status] = fn
  if status == 500 then
    owner(self)._catch = true
  end
  return self
end

-- The Host of a request without its port, lower case.
local function request_host(req)
  local h = req.headers.host
  if type(h) ~= "string" then
    return nil
  end
  h = str_lower(h)
  if str_byte(h, 1) == 91 then -- '[' IPv6 literal
    return (str_match(h, "^(%[[^%]]*%])")) or h
  end
  return (str_match(h, "^([^:]*)")) or h
end

-- A selector table { host = name | list, header = { name, value | fn },
-- gray = colour | list, select = fn(req) } as one predicate (every given
-- part must hold).
local function selector(sel)
  local hosts, hname, hval, fn, colours
  for k, v in pairs(sel) do
    if k == "host" then
      hosts = {}
      for _, h in ipairs(type(v) == "table" and v or { v }) do
        if type(h) ~= "string" or h == "" then
          error("wxd.app: group: host must be a name or a list of names, got " .. repr(h), 4)
        end
        hosts[str_lower(h)] = true
      end
    elseif k == "header" then
      if type(v) ~= "table" or type(v[1]) ~= "string"
          or (type(v[2]) ~= "string" and type(v[2]) ~= "function") then
        error("wxd.app: group: header must be { name, value or function(value, req) }", 4)
      end
      hname, hval = str_lower(v[1]), v[2]
    elseif k == "select" then
      if type(v) ~= "function" then
        error("wxd.app: group: select must be a function(req), got a " .. type(v), 4)
      end
      fn = v
    elseif k == "gray" then
      colours = {}
      for _, c in ipairs(type(v) == "table" and v or { v }) do
        if not gray.colour_ok(c) then
          error("wxd.app: group: gray must be a colour or a list of colours (letters, digits, '-', '_', '.'), got "
            .. repr(c), 4)
        end
        colours[c] = true
      end
      if next(colours) == nil then
        error("wxd.app: group: gray must be a colour or a non-empty list of colours", 4)
      end
    else
      error("wxd.app: group: unknown selector " .. repr(k) .. " (host, header, gray, select)", 4)
    end
  end
  if not (hosts or hname or fn or colours) then
    error("wxd.app: group: empty selector (host, header, gray or select)", 4)
  end
  return function(req)
    if colours then
      local c = rawget(req, "gray")
      if c == nil or not colours[c] then
        return false
      end
    end
    if hosts and not hosts[request_host(req) or ""] then
      return false
    end
    if hname then
      local v = req.headers[hname]
      if type(v) == "table" then
        v = tbl_concat(v, ", ")
      end
      if type(hval) == "function" then
        if not hval(v, req) then
          return false
        end
      elseif v ~= hval then
        return false
      end
    end
    if fn and not fn(req) then
      return false
    end
    return true
  end
end

-- A group prefix: "/a/b" or "/shops/:shop" (params allowed, no wildcard,
-- no trailing slash, no empty segment).
local function check_prefix(prefix)
  if type(prefix) ~= "string" then
    error("wxd.app: group prefix must be a string, got a " .. type(prefix), 3)
  end
  if str_byte(prefix, 1) ~= 47 or prefix == "/" or str_find(prefix, "//", 1, true)
      or str_byte(prefix, -1) == 47 then
    error("wxd.app: group prefix " .. repr(prefix)
      .. " must start with '/', have no empty segment and no trailing '/'", 3)
  end
  for seg in string.gmatch(prefix, "[^/]+") do
    local c = str_byte(seg, 1)
    if c == 42 or (c == 58 and not str_find(seg, "^:[%a_][%w_]*$")) then
      error("wxd.app: group prefix " .. repr(prefix) .. ": invalid segment " .. repr(seg)
        .. " (':name' params are allowed, wildcards are not)", 3)
    end
  end
end

--- Create a route group: routes registered on it get `prefix` in front of
-- their pattern, and its own middleware (before/after) and error handlers
-- (on_error) apply to its routes only, and to requests under its prefix
-- that no route matches. Groups nest (`g:group("/admin")`).
-- @tparam string prefix e.g. "/api/v2" (':name' segments allowed)
-- @tparam[opt] function fn called with the group, to register its routes
-- @treturn table the group
-- @usage app:group("/api/v2", function(v2)
--   v2:before(require_session)
--   v2:get("/orders/:id", get_order)
-- end)
function shared.group(self, prefix, sel, fn)
  if type(prefix) == "table" then
    prefix, sel, fn = nil, prefix, sel
  elseif type(sel) ~= "table" then
    sel, fn = nil, sel
  end
  if prefix ~= nil or sel == nil then
    check_prefix(prefix)
  end
  if fn ~= nil and type(fn) ~= "function" then
    error("wxd.app: group: expected a function, got a " .. type(fn), 2)
  end
  local select_fn = sel and selector(sel)
  -- A gray group overrides the routes it has; the rest fall through.
  local fallthrough = sel ~= nil and sel.gray ~= nil
  local app = owner(self)
  local full = (self.prefix or "") .. (prefix or "")
  local g = setmetatable({
    _app = app, _parent = self, prefix = full ~= "" and full or nil,
    _segs = full ~= "" and split_pattern(full) or {},
    _before = {}, _nbefore = 0,
    _after  = {}, _nafter  = 0,
    _errors = nil,
    _router = self._router,
  }, GROUP_MT)
  if select_fn then
    -- Its own router: routes, methods and groups of its generation.
    g._select = select_fn
    g._fallthrough = fallthrough
    g._static, g._root, g._dynamic, g._methods = {}, new_node(), false, {}
    g._groups = {}
    g._router = g
    local list = app._selectors or {}
    list[#list + 1] = g
    app._selectors = list
  end
  local chain = {}
  if self._chain then
    for i = 1, #self._chain do
      chain[i] = self._chain[i]
    end
  end
  chain[#chain + 1] = g
  g._chain = chain -- outermost first
  local groups = router_of(g)._groups
  groups[#groups + 1] = g
  if fn then
    fn(g)
  end
  return g
end

--- Mount a WeChat message callback (Official Account, Mini Program,
-- WeCom) at `path`: GET verification and POST messages. See wxd.mp.
-- @tparam string path e.g. "/wx"
-- @tparam table cfg token, appid, aes_key, ... (docs/mp.md)
-- @tparam table handlers by MsgType, `event`, `default`
-- @treturn table the app (or the group)
function shared.mp(self, path, cfg, handlers)
  -- A tail call (mount returns the app): a bad cfg is reported at the caller's line.
  return require("wxd.mp").mount(self, path, cfg, handlers)
end

--- Mount a WeChat Pay v3 notification URL at `path` (POST): signature,
-- clock window, nonce memory, decryption, then the handler by event_type;
-- 204 only after the handler returned true. See wxd.pay and docs/pay.md.
-- @tparam string path e.g. "/pay/notify"
-- @tparam table cfg `client` (a wxd.pay client) or its settings, `deadline_ms`, `v2`
-- @tparam table|function handlers by event_type, `default`
-- @treturn table the app
function app_methods.pay_notify(self, path, cfg, handlers)
  return require("wxd.pay").mount(self, path, cfg, handlers)
end

--- Mount a WeChat Pay v2 notification URL at `path` (POST, XML): payment
-- results (signature checked) and refunds (req_info decrypted). See
-- wxd.pay.v2 and docs/pay.md.
function app_methods.pay_notify_v2(self, path, cfg, handlers)
  return require("wxd.pay.v2").mount(self, path, cfg, handlers)
end

--- Serve WebSocket connections at `path` (GET with an Upgrade handshake).
-- `handler(ws, req)` runs in the connection's coroutine: `ws:receive()`,
-- `ws:send(data [, "binary"])`, `ws:close(code, reason)`,
-- `ws:subscribe(topic)`. See wxd.ws and docs/websocket.md.
-- @tparam string path route pattern
-- @tparam function handler handler(ws, req)
-- @tparam[opt] table opts the keys of config `websocket`, for this route
-- @treturn table the app
function app_methods.ws(self, path, handler, opts)
  return require("wxd.ws").mount(self, path, handler, opts)
end

--- Serve the files of a directory under a prefix (GET and HEAD): ETag,
-- Last-Modified and 304s, single byte ranges, Content-Type by extension,
-- an index file, and no way out of the directory (see wxd.static).
-- @tparam string prefix e.g. "/assets", or "/" for the whole site
-- @tparam string dir the directory (must exist when the app loads)
-- @tparam[opt] table opts index, max_age, dotfiles, etag, last_modified, types
-- @treturn table the app (or the group)
-- @usage app:static("/assets", "public", { max_age = 3600 })
function shared.static(self, prefix, dir, opts)
  local r = static.mount(self, prefix, dir, opts) -- not a tail call: error levels count this frame
  return r
end

--- Answer CORS preflights and mark allowed cross-origin responses, for the
-- app's requests or a group's (a `before` middleware; see wxd.cors).
-- @tparam table opts origins, methods, headers, expose, credentials, max_age
-- @treturn table the app (or the group)
-- @usage app:cors({ origins = { "https://shop.example.com" }, credentials = true })
function shared.cors(self, opts)
  shared.before(self, cors.middleware(opts, 2))
  return self
end

for k, f in pairs(shared) do
  app_methods[k] = f
  group_methods[k] = f
end

--- Registers payment-order hooks of this app (see wxd.order.hooks):
-- `app:order_hooks{ on_enter = { PAID = function(order, event) ... end }, on_late = fn }`.
-- They belong to the generation that registers them (hot reload replaces them).
-- @treturn table the app
function app_methods.order_hooks(self, t)
  require("wxd.order").hooks(t)
  return self
end

--- The body limit of the route a request would reach, if it has one (the
-- core asks before it reads a body; see wxd.server).
-- @tparam string method request method
-- @tparam string path raw request path
-- @treturn ?number bytes
function app_methods.body_limit(self, method, path)
  local r = lookup(self, method, path)
  return r and r.max_body
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

-- Does the path lie under a group's prefix (segments, ':name' matches any
-- non-empty one)?
local function under_prefix(segs, path)
  local n = #segs
  local pos = 2
  for i = 1, n do
    local slash = str_find(path, "/", pos, true)
    local seg = str_sub(path, pos, (slash or 0) - 1)
    local want = segs[i]
    if str_byte(want, 1) == 58 then
      if seg == "" then
        return false
      end
    elseif seg ~= want then
      return false
    end
    if not slash then
      return i == n
    end
    pos = slash + 1
  end
  return true
end

-- The innermost group whose prefix covers a path no route matched.
local function group_for_path(self, path)
  local best, depth = nil, 0
  local groups = self._groups
  for i = 1, #groups do
    local g = groups[i]
    local n = #g._segs
    if n > depth and under_prefix(g._segs, path) then
      best, depth = g, n
    end
  end
  return best
end

-- The error handler for a status: the innermost group's, else its
-- parents', else the app's.
local function error_handler(group, app, status)
  local g = group or app
  while g do
    local errors = g._errors
    if errors and errors[status] then
      return errors[status]
    end
    g = g._parent
  end
  return nil
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

-- Middleware, handler (or 404/405), middleware: the request after routing.
local function run(self, req, res, route, group, method, path, router)
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
  if group and not short then
    local chain = group._chain
    for j = 1, #chain do
      local g = chain[j]
      local gb = g._before
      for i = 1, g._nbefore do
        a, b = gb[i](req, res)
        if a ~= nil then
          short = true
          break
        end
      end
      if short then
        break
      end
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
    local allow = allowed_methods(router or self, path)
    local status
    if allow[1] or method == "TRACE" then
      status = 405
      rawset(res, "body", NOT_ALLOWED_BODY)
      if allow[1] then
        res.headers["allow"] = tbl_concat(allow, ", ")
      end
    else
      status = 404
      rawset(res, "body", NOT_FOUND_BODY)
    end
    rawset(res, "status", status)
    ctype = JSON_CT
    local h = (self._errors or group) and error_handler(group, self, status)
    if h then
      a, b = h(req, res)
      if a ~= nil then
        ctype = apply(res, a, b)
      end
    end
  end

  if group then
    local chain = group._chain
    for j = #chain, 1, -1 do
      local g = chain[j]
      local ga = g._after
      for i = 1, g._nafter do
        ga[i](req, res)
      end
    end
  end
  local after = self._after
  for i = 1, self._nafter do
    after[i](req, res)
  end

  return finish(res, ctype)
end

local function capture_error(e)
  return { err = e, trace = traceback(tostring(e), 2) }
end

-- run() under a 500 handler: an error becomes the handler's answer.
local function run_protected(self, h500, req, res, route, group, method, path, router)
  local ok, status, headers, body = xpcall(run, capture_error, self, req, res, route, group, method, path, router)
  if ok then
    return status, headers, body
  end
  local e = status
  if rawget(res, "_streamed") then
    -- The status is on the wire: the core can only cut the response short.
    error(e.trace, 0)
  end
  log.error("handler error", { id = req.id, method = method, path = path, error = e.trace })
  local res2 = setmetatable({ status = 500, body = "internal server error (request id " .. tostring(req.id) .. ")\n" },
    RES_MT)
  rawset(res2, "_secure", rawget(res, "_secure"))
  local ctype = TEXT_CT
  local a, b = h500(req, res2, e.err)
  if a ~= nil then
    ctype = apply(res2, a, b)
  end
  return finish(res2, ctype)
end

--- Handle one request; called by the core inside the request's coroutine.
-- The raw table becomes the request object (a metatable is set on it;
-- the core passes `query_string`; a raw `query` is accepted too). Errors raised by middleware or
-- handlers propagate (unless a 500 handler is set): the core turns them
-- into a 500 with the request id.
-- @tparam table raw request built by the core (method, path, query,
--   version, headers, body, remote_addr, remote_port, id)
-- @treturn integer status
-- @treturn ?table headers: name → string or array of strings
-- @treturn ?string body
function app_methods.handle(self, req)
  local method, path = req.method, req.path

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

  -- Gray release: the request's colour (wxd.gray), before any selector.
  local cfg = wxd.config
  local gray_set = cfg and cfg.gray
  if gray_set then
    gray_apply(gray_set, req)
  end

  -- A group selected by host or header brings its own router (the first
  -- one whose selector holds and whose prefix covers the path). A gray
  -- group that has no route for the request passes it on to the next
  -- selector, and at last to the app's router.
  local router, route
  local sel = self._selectors
  local nsel, isel = sel and #sel or 0, 1
  while true do
    router = self
    while isel <= nsel do
      local g = sel[isel]
      isel = isel + 1
      if under_prefix(g._segs, path) and g._select(req) then
        router = g
        break
      end
    end

    -- Routing before middleware: params are then visible to `before`.
    local e = router._static[path]
    if e then
      route = e[method] or pick(e, method)
    end
    if route == nil and router._dynamic and str_byte(path, 1) == 47 then
      route = match(router._root, path, 2, #path, method)
    end
    if route or not router._fallthrough then
      break
    end
  end
  if route then
    -- The pattern, never the path: metrics label requests with it.
    req.route = route.pattern
    if route.pnames then
      req.params = extract(route, path)
    end
  end

  -- The core enforces a route's limit before reading the body; this
  -- covers requests built by hand (wxd.testing, unit specs).
  if route and route.max_body and #(rawget(req, "body") or "") > route.max_body then
    return 413, TEXT_HEADERS, "request body too large\n"
  end

  local res = setmetatable({ status = 200 }, RES_MT)
  if rawget(req, "tls") then
    rawset(res, "_secure", true) -- cookies get Secure by default
  end

  local group
  if route then
    group = route.group
  elseif router._groups[1] then
    group = group_for_path(router, path) or (router ~= self and router or nil)
  end

  local status, headers, body
  local h500 = self._catch and error_handler(group, self, 500)
  if h500 then
    status, headers, body = run_protected(self, h500, req, res, route, group, method, path, router)
  else
    status, headers, body = run(self, req, res, route, group, method, path, router)
  end
  local tmp = rawget(req, "_tmp")
  if tmp then
    multipart.remove_files(tmp)
  end
  return status, headers, body
end

return _M
