--- wxd.apiversion: several API generations in one app, each a route group
-- chosen by the version a request names (docs/api-versions.md).
--
-- A request names its version in one of three places, looked at in this
-- order: the path (`/api/v3/...`, with `path = "/api"`), a vendor media
-- type in Accept (`application/vnd.shop.v3+json`, with `vendor = "shop"`)
-- or a header (`X-API-Version: 3`, with `header = "X-API-Version"`). A
-- request that names none gets `default`; one that names a version the app
-- does not serve gets a clear 4xx (406 for Accept, 400 for a header, 404
-- for a path) from `unknown`, never another generation's answer.
local _M = {}

local str_find, str_match, str_lower = string.find, string.match, string.lower

local function escape(s)
  return (s:gsub("%p", "%%%0"))
end

-- "3", "v3", "V3" → "v3"; anything else → nil.
local function norm(v)
  if type(v) ~= "string" then
    return nil
  end
  local n = str_match(v, "^%s*[vV]?(%d+)%s*$")
  return n and ("v" .. tonumber(n)) or nil
end
_M.normalize = norm

--- The version a request names and where: `"v3", "accept"`, or `nil` when
-- it names none. A name that is not a version (`X-API-Version: beta`) is
-- returned as sent, so that it is refused as unknown rather than ignored.
-- @tparam table req the request
-- @tparam table opts { path =, vendor =, header = } (as for mount)
-- @treturn ?string version
-- @treturn ?string "path", "accept" or "header"
function _M.requested(req, opts)
  local path = opts.path
  if path then
    local p = req.path
    if p:sub(1, #path + 1) == path .. "/" then
      local seg = str_match(p, "^([^/]+)", #path + 2)
      if seg and str_find(seg, "^[vV]%d+$") then
        return norm(seg), "path"
      end
    end
  end
  local vendor = opts.vendor
  if vendor then
    local accept = req.headers.accept
    if type(accept) == "table" then
      accept = table.concat(accept, ", ")
    end
    if type(accept) == "string" then
      local v = str_match(str_lower(accept), "application/vnd%." .. escape(str_lower(vendor)) .. "%.([^+;,%s]+)")
      if v then
        return norm(v) or v, "accept"
      end
    end
  end
  local header = opts.header
  if header then
    local v = req.headers[header]
    if type(v) == "string" and v ~= "" then
      return norm(v) or v, "header"
    end
  end
  return nil
end

local UNKNOWN_STATUS = { path = 404, accept = 406, header = 400 }

local function default_unknown(_, version, where, supported)
  return UNKNOWN_STATUS[where], {
    error = "unknown api version", version = version, supported = supported,
  }
end

--- Serve several generations from one app. Each entry of `versions`
-- (`v2 = function(g) ... end`) is called with a route group of its
-- generation, where its routes, middleware and error handlers go: with
-- `path`, the prefix group `path .. "/v2"`; with `vendor` or `header`, a
-- group selected by the version named in Accept or the header, or by
-- default (prefix `prefix`, default `path`; its routes have no version in
-- their path, and generations may route the same path). With both, the
-- function is called once for each of its groups.
-- @tparam table app a wxd.app
-- @tparam table opts { versions = { v2 = fn, ... }, path =, vendor =,
--   header =, default = "v2", prefix = (a path prefix for header/Accept
--   generations), unknown = fn(req, version, where, supported) }
-- @treturn table version → the list of its groups
function _M.mount(app, opts)
  if type(opts) ~= "table" or type(opts.versions) ~= "table" then
    error("wxd.apiversion.mount: opts.versions must be a table { v2 = fn, ... }", 2)
  end
  if not (opts.path or opts.vendor or opts.header) then
    error("wxd.apiversion.mount: give path, vendor or header (where a request names its version)", 2)
  end
  local known, supported = {}, {}
  for name, fn in pairs(opts.versions) do
    local v = norm(name)
    if not v or type(fn) ~= "function" then
      error("wxd.apiversion.mount: versions must map names like \"v2\" to functions", 2)
    end
    known[v] = fn
    supported[#supported + 1] = v
  end
  table.sort(supported)
  local default = opts.default and norm(opts.default)
  if opts.default and not known[default] then
    error("wxd.apiversion.mount: default " .. tostring(opts.default) .. " is not one of the versions", 2)
  end
  local unknown = opts.unknown or default_unknown

  -- The version of a request, parsed once.
  local function version_of(req)
    local v = rawget(req, "_api_version")
    if v == nil then
      local where
      v, where = _M.requested(req, opts)
      if v == nil then
        v, where = default or false, "default"
      end
      rawset(req, "_api_version", v)
      rawset(req, "_api_version_from", where)
    end
    return v, rawget(req, "_api_version_from")
  end

  local prefix = opts.prefix or opts.path
  local by_select = opts.vendor or opts.header
  local groups = {}
  for _, v in ipairs(supported) do
    local function setup(g)
      g.api_version = v
      g:before(function(req)
        req.ctx.api_version = v
      end)
      known[v](g)
      return g
    end
    local list = {}
    if opts.path then
      -- the version in the path: a plain prefix group
      list[#list + 1] = setup(app:group(opts.path .. "/" .. v))
    end
    if by_select then
      -- named in Accept or the header (or by default): a selected group
      -- whose routes have no version in their path; a version named in
      -- the path is left to the path's group
      local function wants(req)
        local got, where = version_of(req)
        return got == v and where ~= "path"
      end
      list[#list + 1] = setup(prefix and app:group(prefix, { select = wants }) or app:group({ select = wants }))
    end
    groups[v] = list
  end

  -- Requests that name a version nobody serves: a group of their own, so
  -- that no generation's routes answer them.
  local function is_unknown(req)
    local v = version_of(req)
    return v and not known[v] or false
  end
  local refuse = prefix and app:group(prefix, { select = is_unknown }) or app:group({ select = is_unknown })
  refuse:before(function(req)
    local v, where = version_of(req)
    return unknown(req, v, where, supported)
  end)
  return groups
end

return _M
