--- wxd.log: structured logging (JSON lines on stderr, written by the core).
-- `log.info("order paid", { order = id, openid = o })` writes
-- {"ts":...,"level":"info","worker":0,"msg":"order paid","order":"...","openid":"oAbc****wxyz"}.
-- Secrets are never written: fields whose names look like a secret are
-- replaced by "***"; openids and phone numbers are masked.
-- @module wxd.log

local core = require "wxd.core"
local cjson = require "cjson.safe"

local type, pairs, tostring, sub, lower, find = type, pairs, tostring, string.sub, string.lower, string.find
local core_log, log_enabled = core.log, core.log_enabled

local _M = {}

local SECRET = { "secret", "password", "passwd", "token", "session_key", "aes_key", "api_key",
                 "private_key", "authorization", "cookie", "ticket" }

local function is_secret(name)
  for i = 1, #SECRET do
    if find(name, SECRET[i], 1, true) then return true end
  end
  return false
end

--- Masks the middle of an identifier, keeping enough to correlate lines.
function _M.mask(v)
  v = tostring(v)
  local n = #v
  if n <= 8 then return string.rep("*", n) end
  if n == 11 and v:match("^%d+$") then return sub(v, 1, 3) .. "****" .. sub(v, 8) end
  return sub(v, 1, 4) .. "****" .. sub(v, -4)
end

local function scrub(fields)
  local out = {}
  for k, v in pairs(fields) do
    local name = lower(tostring(k))
    if is_secret(name) then
      out[k] = "***"
    elseif find(name, "openid", 1, true) or find(name, "unionid", 1, true)
        or find(name, "phone", 1, true) or find(name, "mobile", 1, true) then
      out[k] = _M.mask(v)
    elseif type(v) == "table" then
      out[k] = scrub(v)
    elseif type(v) == "function" or type(v) == "userdata" or type(v) == "thread" then
      out[k] = tostring(v)
    else
      out[k] = v
    end
  end
  return out
end
_M.scrub = scrub

local function write(level, msg, fields)
  if not log_enabled(level) then return end
  local extra
  if fields ~= nil then
    if type(fields) ~= "table" then error("log fields must be a table", 3) end
    local json = cjson.encode(scrub(fields))
    if json and #json > 2 then extra = sub(json, 2, -2) end
  end
  core_log(level, tostring(msg), extra)
end

function _M.debug(msg, fields) write("debug", msg, fields) end
function _M.info(msg, fields) write("info", msg, fields) end
function _M.warn(msg, fields) write("warn", msg, fields) end
function _M.error(msg, fields) write("error", msg, fields) end

return _M
