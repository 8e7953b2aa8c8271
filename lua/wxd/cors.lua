--- wxd.cors: Cross-Origin Resource Sharing as a `before` middleware.
--
-- A preflight (OPTIONS with Origin and Access-Control-Request-Method) is
-- answered here, 204 with the allowed methods, headers and max-age, and
-- never reaches a handler; a preflight from an origin not allowed gets a
-- 403. Other requests from an allowed origin get Access-Control-Allow-Origin
-- (and -Credentials, -Expose-Headers) and go on to their handler; requests
-- from other origins go on without them, so the browser keeps the answer
-- from the page. Whenever the answer depends on the Origin, the response
-- says `Vary: Origin` so that caches keep one copy per origin.
--
-- @module wxd.cors
-- @usage
-- app:cors({ origins = { "https://shop.example.com" }, credentials = true })
-- -- or: app:before(require("wxd.cors").middleware({ origins = "*" }))

local type, error, tostring, ipairs, pairs = type, error, tostring, ipairs, pairs
local str_upper, str_lower, str_find, str_format = string.upper, string.lower, string.find, string.format
local tbl_concat = table.concat

local _M = {}

local DEFAULT_METHODS = { "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE" }
local DEFAULT_HEADERS = { "Content-Type", "Authorization", "X-Requested-With" }

-- Option errors are raised at the line that built the middleware: they
-- travel up as a table and are raised again there.
local BAD = {}
local function fail(msg)
  error({ [BAD] = msg })
end

local function list_of_tokens(name, v, upper)
  if type(v) ~= "table" then fail(name .. " must be a list of strings") end
  local out = {}
  for i, s in ipairs(v) do
    if type(s) ~= "string" or not str_find(s, "^[%w!#$%%&'*+%-.^_`|~]+$") then
      fail(name .. "[" .. i .. "] is not a token: " .. tostring(s))
    end
    out[i] = upper and str_upper(s) or s
  end
  return out
end

-- Adds a token to the response's Vary header unless it is there.
local function vary(res, token)
  local v = res.headers["Vary"]
  if v == nil or v == "" then
    res.headers["Vary"] = token
  elseif v ~= "*" and not str_find("," .. str_lower(v):gsub("%s", "") .. ",", "," .. str_lower(token) .. ",", 1, true) then
    res.headers["Vary"] = v .. ", " .. token
  end
end

--- Build the middleware.
-- @tparam table opts
--   origins: "*", a list of origins ("https://a.example", compared
--   exactly), or function(origin, req) → boolean (required);
--   methods: list (default GET HEAD POST PUT PATCH DELETE);
--   headers: allowed request headers, a list (default Content-Type,
--   Authorization, X-Requested-With) or true to allow whatever a preflight
--   asks for; expose: response headers scripts may read (list);
--   credentials: boolean (cookies, Authorization); not with origins "*";
--   max_age: seconds a preflight answer may be cached (default 600)
-- @tparam[opt=1] number level where option errors point (1: the caller)
-- @treturn function before-middleware(req, res)
local function configure(opts)
  if type(opts) ~= "table" then fail("options must be a table") end
  for k in pairs(opts) do
    if not (k == "origins" or k == "methods" or k == "headers" or k == "expose" or k == "credentials"
        or k == "max_age") then
      fail("unknown option " .. tostring(k))
    end
  end
  local origins = opts.origins
  local any, allowed, check = false, nil, nil
  if origins == "*" then
    any = true
  elseif type(origins) == "function" then
    check = origins
  elseif type(origins) == "table" then
    allowed = {}
    for i, o in ipairs(origins) do
      if type(o) ~= "string" or not str_find(o, "^[%a][%w+.-]*://[^/%s]+$") then
        fail("origins[" .. i .. "] must be scheme://host[:port], got " .. tostring(o))
      end
      allowed[str_lower(o)] = true
    end
  else
    fail('origins must be "*", a list of origins or a function')
  end
  local credentials = opts.credentials and true or false
  if any and credentials then
    fail('origins "*" cannot go with credentials (browsers refuse it): list the origins')
  end
  local methods = tbl_concat(list_of_tokens("methods", opts.methods or DEFAULT_METHODS, true), ", ")
  local reflect_headers = opts.headers == true
  local headers = not reflect_headers and tbl_concat(list_of_tokens("headers", opts.headers or DEFAULT_HEADERS), ", ")
  local expose = opts.expose and tbl_concat(list_of_tokens("expose", opts.expose), ", ")
  local max_age = opts.max_age or 600
  if type(max_age) ~= "number" or max_age < 0 or max_age % 1 ~= 0 then
    fail("max_age must be a whole number of seconds")
  end
  max_age = str_format("%d", max_age)
  return any, allowed, check, credentials, methods, reflect_headers, headers, expose, max_age
end

function _M.middleware(opts, level)
  local ok, any, allowed, check, credentials, methods, reflect_headers, headers, expose, max_age =
    pcall(configure, opts)
  if not ok then
    if type(any) == "table" and any[BAD] then
      error("wxd.cors: " .. any[BAD], (level or 1) + 1)
    end
    error(any, 0)
  end

  return function(req, res)
    local origin = req.headers.origin
    if not any then vary(res, "Origin") end
    if origin == nil then return nil end
    local allow
    if any then
      allow = true
    elseif allowed then
      allow = allowed[str_lower(origin)] == true
    else
      allow = check(origin, req) and true or false
    end
    local preflight = req.method == "OPTIONS" and req.headers["access-control-request-method"] ~= nil
    if not allow then
      if preflight then return 403, { error = "origin not allowed" } end
      return nil
    end
    local h = res.headers
    h["Access-Control-Allow-Origin"] = any and "*" or origin
    if credentials then h["Access-Control-Allow-Credentials"] = "true" end
    if preflight then
      h["Access-Control-Allow-Methods"] = methods
      if reflect_headers then
        local asked = req.headers["access-control-request-headers"]
        if asked and asked ~= "" then h["Access-Control-Allow-Headers"] = asked end
        vary(res, "Access-Control-Request-Headers")
      else
        h["Access-Control-Allow-Headers"] = headers
      end
      h["Access-Control-Max-Age"] = max_age
      return 204
    end
    if expose then h["Access-Control-Expose-Headers"] = expose end
    return nil
  end
end

return _M
