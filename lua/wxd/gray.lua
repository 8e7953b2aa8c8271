--- wxd.gray: gray release by traffic colouring.
--
-- Rules in config.lua (section `gray`) give a request a colour: by a
-- header value, by an allow-list of openids (or of another key), or by a
-- stable hash of the openid (or a header or query value) into a
-- percentage. The first rule that holds wins; a request no rule colours
-- has none (`req.gray` is nil). The colour is
--   * visible to handlers as `req.gray` (and `wxd.gray.current()` anywhere
--     in the request's coroutine and in the tasks it spawns),
--   * sent on outbound wxd.http calls as `X-Wxd-Gray: <colour>` and as the
--     `wxd-gray=<colour>` member of the W3C `baggage` header,
--   * counted in `wxd_gray_requests_total{colour}` (`none` for the rest),
--   * written in the access line (`"gray":"v2"`),
--   * able to route: `app:group({ gray = "v2" }, fn)` serves the routes it
--     has for requests of that colour (the others fall through to the
--     app's routes), `wxd.gray.pick{ default = url, v2 = url2 }` picks an
--     upstream.
--
-- Percentages: bucket = the first 4 bytes of SHA-256(salt .. ":" .. key)
-- read as a big-endian integer, modulo 10000; the rule holds when
-- bucket < percent * 100. The salt defaults to the colour, so a user's
-- bucket depends on nothing else: reordering rules, reloading, or changing
-- a percentage never moves users between sides, except that raising the
-- percentage adds users (and lowering it removes the most recently added
-- first). Anyone can compute a bucket with `printf 'v2:oABC' | sha256sum`.
--
-- Each generation compiles the section when config.lua is validated, so a
-- reload with new rules or percentages applies to the next request, and a
-- bad rule fails the reload (the old generation keeps serving) with an
-- error naming the rule.
--
-- @module wxd.gray
-- @usage
-- -- config.lua
-- gray = {
--   rules = {
--     { name = "scene", colour = "v2", header = { "X-Wechat-Scene", "miniapp_v3" } },
--     { name = "staff", colour = "v2", openids = { "oStaff000000000000000001" } },
--     { name = "canary", colour = "v2", percent = 5 },
--   },
-- }
-- -- app.lua
-- app:group({ gray = "v2" }, function(v2) require("handlers.v2.orders")(v2) end)
-- app:get("/orders", function(req) local url = gray.pick{ default = V1, v2 = V2 } ... end)

local core_http = require "wxd.core.http"
local sha256 = require("wxd.core.crypto").sha256
local trace = require "wxd.trace"
local metrics = require "wxd.metrics"

local type, pairs, ipairs, tostring, error, rawget, rawset, floor =
  type, pairs, ipairs, tostring, error, rawget, rawset, math.floor
local byte, find, lower, format, gsub, sub, match = string.byte, string.find, string.lower, string.format,
  string.gsub, string.sub, string.match
local c_gray, c_set_gray = core_http.gray, core_http.set_gray

local _M = {}

local COLOUR_MAX = 32
local NONE = "none" -- the metric's label for uncoloured requests
_M.HEADER = "X-Wxd-Gray"
_M.BAGGAGE_KEY = "wxd-gray"

local function colour_ok(v)
  return type(v) == "string" and #v >= 1 and #v <= COLOUR_MAX and find(v, "^[%w_.-]+$") ~= nil
end
_M.colour_ok = colour_ok

--- The bucket (0..9999) of a key under a salt: the first 4 bytes of
-- SHA-256(salt .. ":" .. key), big-endian, modulo 10000.
function _M.bucket(salt, key)
  local a, b, c, d = byte(sha256(salt .. ":" .. key), 1, 4)
  return (((a * 256 + b) * 256 + c) * 256 + d) % 10000
end
local bucket = _M.bucket

------------------------------------------------------------------------
-- Compiling the config section
------------------------------------------------------------------------

local RULE_KEYS = { name = true, colour = true, header = true, openids = true, percent = true, key = true, salt = true }
local SECTION_KEYS = { rules = true, inherit = true }

local function repr(v)
  if type(v) == "string" then return format("%q", #v > 40 and sub(v, 1, 37) .. "..." or v) end
  if type(v) == "table" then return "a table" end
  return tostring(v)
end

-- A set of exact values from a string or a non-empty list of strings.
local function value_set(v)
  if type(v) == "string" then return { [v] = true } end
  if type(v) ~= "table" or v[1] == nil then return nil end
  local set = {}
  for _, x in ipairs(v) do
    if type(x) ~= "string" then return nil end
    set[x] = true
  end
  return set
end

-- `key`: "openid" (default), { header = "X-Device-Id" } or { query = "uid" }.
local function compile_key(k)
  if k == nil or k == "openid" then return { kind = "openid" } end
  if type(k) == "table" then
    local h, q = k.header, k.query
    local n = 0
    for _ in pairs(k) do n = n + 1 end
    if n == 1 and type(h) == "string" and h ~= "" then return { kind = "header", name = lower(h) } end
    if n == 1 and type(q) == "string" and q ~= "" then return { kind = "query", name = q } end
  end
  return nil
end

-- One rule, or nil and what is wrong with it.
local function compile_rule(r)
  if type(r) ~= "table" then return nil, "expected a table { colour = ..., header/openids/percent = ... }, got "
    .. repr(r) end
  for k in pairs(r) do
    if not RULE_KEYS[k] then
      if k == "color" then return nil, 'unknown key "color" (the key is spelled "colour")' end
      return nil, "unknown key " .. repr(k) .. " (name, colour, header, openids, percent, key, salt)"
    end
  end
  if r.name ~= nil and (type(r.name) ~= "string" or r.name == "") then
    return nil, "name must be a non-empty string, got " .. repr(r.name)
  end
  if not colour_ok(r.colour) then
    return nil, "colour must be 1.." .. COLOUR_MAX .. " letters, digits, '-', '_' or '.', got " .. repr(r.colour)
  end
  if r.colour == NONE then return nil, 'colour "none" is reserved (it counts uncoloured requests)' end
  local rule = { name = r.name, colour = r.colour }
  if r.header ~= nil then
    local h = r.header
    local values = type(h) == "table" and value_set(h[2])
    if type(h) ~= "table" or type(h[1]) ~= "string" or h[1] == "" or not values or h[3] ~= nil then
      return nil, 'header must be { "Name", "value" } or { "Name", { "value1", "value2" } }'
    end
    for k in pairs(h) do
      if k ~= 1 and k ~= 2 then return nil, 'header must be { "Name", "value" } or { "Name", { "value1", "value2" } }' end
    end
    rule.header, rule.values = lower(h[1]), values
  end
  if r.key ~= nil or r.openids ~= nil or r.percent ~= nil then
    rule.key = compile_key(r.key)
    if not rule.key then
      return nil, 'key must be "openid", { header = "Name" } or { query = "name" }, got ' .. repr(r.key)
    end
    if r.openids == nil and r.percent == nil then return nil, "key is used by openids or percent; neither is set" end
  end
  if r.openids ~= nil then
    local set = value_set(r.openids)
    if not set then return nil, "openids must be a non-empty list of strings" end
    rule.ids = set
  end
  if r.percent ~= nil then
    local p = r.percent
    if type(p) == "string" then p = tonumber(p) or p end -- percent = env("GRAY_PERCENT")
    if type(p) ~= "number" or p ~= p or p < 0 or p > 100 then
      return nil, "percent must be a number in 0..100, got " .. repr(p)
    end
    rule.cut = floor(p * 100 + 0.5) -- buckets below this hold
    if r.salt ~= nil and (type(r.salt) ~= "string" or r.salt == "") then
      return nil, "salt must be a non-empty string, got " .. repr(r.salt)
    end
    rule.salt = r.salt or r.colour
  elseif r.salt ~= nil then
    return nil, "salt is used by percent, which is not set"
  end
  if not (rule.header or rule.ids or rule.cut) then
    return nil, "a rule needs a condition: header, openids or percent (all given must hold)"
  end
  return rule
end

--- Compiles a `gray` config section (config.lua validates it with this).
-- @tparam table section { rules = { ... }, inherit = bool }
-- @tparam string path where the section is, for messages ("config.gray")
-- @treturn ?table the compiled set (kept as `wxd.config.gray`)
-- @treturn ?table a list of "path: what is wrong" lines
function _M.compile(section, path)
  path = path or "config.gray"
  local errs = {}
  if type(section) ~= "table" then
    return nil, { path .. ": expected a table { rules = { ... } }, got " .. repr(section) }
  end
  for k in pairs(section) do
    if not SECTION_KEYS[k] then errs[#errs + 1] = path .. ": unknown key " .. repr(k) .. " (rules, inherit)" end
  end
  local out = { rules = {}, colours = {}, inherit = false, compiled = true }
  if section.inherit ~= nil then
    if type(section.inherit) ~= "boolean" then
      errs[#errs + 1] = path .. ".inherit: expected true or false, got " .. repr(section.inherit)
    end
    out.inherit = section.inherit == true
  end
  local rules = section.rules
  if rules == nil then rules = {} end
  if type(rules) ~= "table" then
    errs[#errs + 1] = path .. ".rules: expected a list of rules, got " .. repr(rules)
    rules = {}
  end
  local n = 0
  for k in pairs(rules) do
    n = n + 1
    if type(k) ~= "number" or k % 1 ~= 0 or k < 1 or rules[k] == nil then
      errs[#errs + 1] = path .. ".rules: expected a list (rules are tried in order), found key " .. repr(k)
    end
  end
  local names = {}
  for i = 1, #rules do
    local r = rules[i]
    local where = path .. ".rules[" .. i .. "]"
    if type(r) == "table" and type(r.name) == "string" then where = where .. " (" .. r.name .. ")" end
    local rule, err = compile_rule(r)
    if not rule then
      errs[#errs + 1] = where .. ": " .. err
    else
      if rule.name then
        if names[rule.name] then
          errs[#errs + 1] = where .. ": name " .. repr(rule.name) .. " is used by rules[" .. names[rule.name] .. "] too"
        end
        names[rule.name] = i
      end
      rule.index = i
      out.rules[i] = rule
      out.colours[rule.colour] = true
      if rule.key and rule.key.kind == "openid" then out.needs_openid = true end
    end
  end
  if n ~= #rules and not errs[1] then errs[#errs + 1] = path .. ".rules: expected a list without holes" end
  if errs[1] then return nil, errs end
  out.n = #out.rules
  return out
end

------------------------------------------------------------------------
-- Classifying a request
------------------------------------------------------------------------

-- The request's openid as wxd.trace sees it (trace.openid_header, or the
-- sender of an Official Account message). Outside the server (wxd.testing
-- hands requests to app:handle directly) there is no native context: the
-- header is read here, under the same rule.
local trace_ids, openid_header = trace.ids, trace.openid_header
local function openid(req)
  local tid, _, _, id = trace_ids()
  if tid then return id end
  local name = openid_header()
  local v = name and rawget(req, "headers")[name]
  if type(v) == "string" and #v <= 64 and find(v, "^[%w%-_.:@/+=]+$") then return v end
  return nil
end

-- A header's value without trailing blanks (RFC 9110 5.5: they are not
-- part of it; the core strips leading ones only).
local function header_of(req, name)
  local v = rawget(req, "headers")[name]
  if type(v) == "table" then v = v[#v] end
  if v ~= nil then
    local last = byte(v, -1)
    if last == 32 or last == 9 then v = match(v, "^(.-)[ \t]+$") end
  end
  return v
end

-- The key a rule hashes or looks up, or nil when the request has none.
local function key_of(req, key, cache)
  local kind = key.kind
  if kind == "openid" then
    local id = cache.openid
    if id == nil then
      id = openid(req) or false
      cache.openid = id
    end
    return id or nil
  elseif kind == "header" then
    local v = header_of(req, key.name)
    return v ~= "" and v or nil
  end
  local v = req.query[key.name]
  return v ~= "" and v or nil
end

-- The colour an upstream wxd gave (X-Wxd-Gray, or wxd-gray in baggage),
-- when it is one of ours.
local function inherited(req, set)
  local h = rawget(req, "headers")
  local v = header_of(req, "x-wxd-gray")
  if type(v) == "string" and set.colours[v] then return v end
  local bag = h.baggage
  if type(bag) == "table" then bag = table.concat(bag, ",") end
  if type(bag) == "string" then
    v = ("," .. bag):match(",%s*wxd%-gray%s*=%s*([%w_.-]+)")
    if v and set.colours[v] then return v end
  end
  return nil
end

--- The colour of a request under a compiled set, or nil; the second value
-- is true when an openid-keyed rule could not be tried for lack of an
-- openid (wxd.mp classifies again once the message names its sender).
-- `sender`, when given, is the openid to use.
function _M.classify(set, req, sender)
  if set.inherit then
    local c = inherited(req, set)
    if c then return c, false end
  end
  local rules = set.rules
  local cache, waiting = { openid = sender }, false
  for i = 1, set.n do
    local r = rules[i]
    local ok = true
    if r.header then
      local v = header_of(req, r.header)
      ok = v ~= nil and r.values[v] == true
    end
    if ok and r.key then
      local k = key_of(req, r.key, cache)
      if k == nil then
        if r.key.kind == "openid" then waiting = true end
        ok = false
      else
        if r.ids and not r.ids[k] then ok = false end
        if ok and r.cut and bucket(r.salt, k) >= r.cut then ok = false end
      end
    end
    if ok then return r.colour, false end
  end
  return nil, waiting
end

--- What wxd.app calls for each request when rules are configured: sets
-- req.gray and the colour of the request's context (outbound calls, tasks,
-- the access line).
function _M.apply(set, req)
  local colour, waiting = _M.classify(set, req)
  rawset(req, "gray", colour)
  if waiting then rawset(req, "_gray_wait", set) end
  if colour then c_set_gray(colour) end
  return colour
end

--- Classifies a request again once its openid is known (wxd.mp calls this
-- with a message's FromUserName). Does nothing unless the first pass
-- skipped an openid rule for lack of one.
function _M.refresh(req, sender)
  local set = rawget(req, "_gray_wait")
  if not set then return rawget(req, "gray") end
  rawset(req, "_gray_wait", nil)
  local colour = _M.classify(set, req, sender)
  rawset(req, "gray", colour)
  c_set_gray(colour)
  return colour
end

------------------------------------------------------------------------
-- Using the colour
------------------------------------------------------------------------

--- The running request's colour (also in a task it spawned), or nil.
_M.current = c_gray

--- Sets the running request's colour by hand (nil clears it): for a
-- colour decided by the app itself. Raises on a malformed colour. Routing
-- has happened already; req.gray is not changed (set it too if needed).
function _M.set(colour)
  if colour ~= nil and not colour_ok(colour) then
    error("wxd.gray.set: colour must be 1.." .. COLOUR_MAX .. " letters, digits, '-', '_' or '.'", 2)
  end
  return c_set_gray(colour)
end

--- Picks by the running request's colour: `choices[colour]` when there is
-- one, else `choices.default`. For upstream URLs, handler versions,
-- feature switches.
-- @tparam table choices { default = v, [colour] = v2, ... }
-- @tparam[opt] string colour instead of the running request's
-- @usage local base = gray.pick{ default = "http://orders-v1:8080", v2 = "http://orders-v2:8080" }
function _M.pick(choices, colour)
  if type(choices) ~= "table" then error("wxd.gray.pick: expected a table { default = ..., colour = ... }", 2) end
  if colour == nil then colour = c_gray() end
  if colour ~= nil then
    local v = choices[colour]
    if v ~= nil then return v end
  end
  return choices.default
end

--- For wxd.http: the value of a baggage header with the colour added, or
-- nil when `existing` already names wxd-gray (the caller's entry wins).
function _M.baggage(colour, existing)
  if existing == nil or existing == "" then return _M.BAGGAGE_KEY .. "=" .. colour end
  if find("," .. existing, ",%s*wxd%-gray%s*=") then return nil end
  return (gsub(existing, "%s+$", "")) .. "," .. _M.BAGGAGE_KEY .. "=" .. colour
end

local requests_metric
local label_sets = {} -- colour -> { colour }: no table per request
--- Counts a finished request in wxd_gray_requests_total{colour}.
function _M.count(colour)
  if not requests_metric then
    requests_metric = metrics.builtin("counter", "wxd_gray_requests_total",
      "Requests by gray colour (none: no rule coloured them)", { "colour" }, { max_series = 200 })
  end
  colour = colour or NONE
  local labels = label_sets[colour]
  if not labels then
    labels = { colour }
    label_sets[colour] = labels
  end
  metrics.count(requests_metric, labels)
end

return _M
