--- wxd.log: structured logging (JSON lines on stderr, written by the core).
-- `log.info("order paid", { order = id, openid = o })` writes
-- {"ts":...,"level":"info","worker":0,"msg":"order paid","order":"...","openid":"oAbc****wxyz"}.
-- Secrets are never written: fields whose names look like a secret are
-- replaced by "***"; openids and phone numbers are masked.
-- @module wxd.log

local core = require "wxd.core"
local json_encode = require("wxd.json").encode

local type, pairs, tostring, sub, lower, find, pcall = type, pairs, tostring, string.sub, string.lower, string.find, pcall
local core_log, log_enabled = core.log, core.log_enabled

local _M = {}

-- Everything config refuses as a literal secret, plus what only shows up
-- at run time (session keys, credentials in headers).
local is_config_secret = require("wxd.config").is_secret_key
local SECRET = { "secret", "password", "passwd", "token", "session_key", "aes_key", "api_key",
                 "private_key", "authorization", "cookie", "ticket", "sign_key", "mch_key" }

local function is_secret(name)
  if is_config_secret(name) then return true end
  for i = 1, #SECRET do
    if find(name, SECRET[i], 1, true) then return true end
  end
  return false
end

-- Fields of the line itself; a user field of the same name is renamed.
local RESERVED = { ts = true, level = true, worker = true, msg = true }
-- Long values (tracebacks, bodies) are cut so the line stays whole.
local MAX_VALUE = 4000

--- Masks the middle of an identifier, keeping enough to correlate lines.
function _M.mask(v)
  v = tostring(v)
  local n = #v
  if n <= 8 then return string.rep("*", n) end
  if n == 11 and v:match("^%d+$") then return sub(v, 1, 3) .. "****" .. sub(v, 8) end
  return sub(v, 1, 4) .. "****" .. sub(v, -4)
end

local function scrub(fields, depth)
  local out = {}
  for k, v in pairs(fields) do
    local name = lower(tostring(k))
    if not depth and RESERVED[name] then k = "field_" .. tostring(k) end
    if is_secret(name) then
      out[k] = "***"
    elseif find(name, "openid", 1, true) or find(name, "unionid", 1, true)
        or find(name, "phone", 1, true) or find(name, "mobile", 1, true) then
      out[k] = _M.mask(v)
    elseif type(v) == "table" then
      out[k] = scrub(v, (depth or 0) + 1)
    elseif type(v) == "string" and #v > MAX_VALUE then
      out[k] = sub(v, 1, MAX_VALUE) .. "...(truncated)"
    elseif type(v) == "function" or type(v) == "userdata" or type(v) == "thread" then
      out[k] = tostring(v)
    else
      out[k] = v
    end
  end
  return out
end
_M.scrub = function(fields) return scrub(fields) end

local function write(level, msg, fields)
  if not log_enabled(level) then return end
  local extra
  if fields ~= nil then
    if type(fields) ~= "table" then error("log fields must be a table", 3) end
    -- wxd.json writes valid UTF-8 whatever the strings hold, so the line
    -- stays valid JSON; fields it cannot encode are named, not dropped.
    local scrubbed = scrub(fields)
    local ok, json = pcall(json_encode, scrubbed)
    if not ok then
      json = json_encode({ log_fields_error = tostring(json) })
    elseif sub(json, 1, 1) ~= "{" then -- a list: its items cannot be fields of the line
      json = json_encode({ fields = scrubbed })
    end
    if #json > 2 then extra = sub(json, 2, -2) end
  end
  core_log(level, tostring(msg), extra)
end

function _M.debug(msg, fields) write("debug", msg, fields) end
function _M.info(msg, fields) write("info", msg, fields) end
function _M.warn(msg, fields) write("warn", msg, fields) end
function _M.error(msg, fields) write("error", msg, fields) end

return _M
